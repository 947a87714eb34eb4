"""A database that cannot be opened: the command says what and how in one line, not a
traceback, and exits 75 (temporary: systemd restarts it, since the catch-all database_error
also covers a file system mounted late); a lock file or a directory the daemon cannot open
is such a case too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mailbridge.cli import main as cli_main
from tests.unit.test_systemd import write_config


def _with_database(tmp_path: Path, database: Path) -> Path:
    path = write_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["database"] = str(database)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", [["status"], ["run", "--once"], ["run"], ["conversations"]])
def test_a_file_that_is_not_a_database_is_said_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    pdf = tmp_path / "invoice.pdf"
    pdf.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 20)
    pdf.chmod(0o600)
    config = _with_database(tmp_path, pdf)
    assert cli_main(["-c", str(config), *command]) == 75
    err = capsys.readouterr().err
    assert "not a database" in err
    assert "integrity_check" in err  # the remedy
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["run"], ["run", "--once"]])
def test_a_database_path_through_a_file_is_said_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where a directory should be\n")
    config = _with_database(tmp_path, blocker / "mailbridge.db")
    assert cli_main(["-c", str(config), *command]) == 75
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(blocker) in err
    assert "database_error" in err or "could not be opened" in err


def test_the_daemon_creates_the_database_directory_owner_only(tmp_path: Path) -> None:
    from mailbridge.daemon.instance import DatabaseLock

    database = tmp_path / "new" / "sub" / "mailbridge.db"
    lock = DatabaseLock(database)
    try:
        assert (database.parent.stat().st_mode & 0o777) == 0o700  # as the store makes it
    finally:
        lock.release()
