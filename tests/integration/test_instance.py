"""One daemon per SQLite database: a second ``mailbridge run`` on the same file is refused
(exit 78, ``database_in_use``, naming the first one's pid) instead of importing every message
twice; ``run --once`` still works beside the daemon; after the first is killed with SIGKILL
the lock is gone with it and a new daemon starts."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mailbridge.cli import main as cli_main
from mailbridge.config import parse_config
from mailbridge.daemon.instance import DatabaseLock, lock_path
from mailbridge.errors import ConfigError
from tests.integration.test_import_loop import config_data, write_config
from tests.integration.test_recovery import _status_row, start_daemon, stop_daemon

pytestmark = pytest.mark.dovecot


def test_a_second_daemon_on_one_sqlite_database_is_refused(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    path = write_config(tmp_path, data)
    database = parse_config(data).sqlite_path
    assert database is not None
    first, lines = start_daemon(path)
    try:
        lines.wait_for("daemon_started")
        assert lock_path(database).read_text().strip() == str(first.pid)
        assert lock_path(database).stat().st_mode & 0o777 == 0o600

        assert cli_main(["-c", str(path), "run"]) == 78
        err = capsys.readouterr().err
        assert f"another mailbridge daemon (pid {first.pid})" in err
        assert "PostgreSQL" in err  # the remedy
        assert first.poll() is None  # the first one goes on

        # Beside it: allowed — once the daemon has set the account up (its first start
        # creates the folders; a CREATE of the same folder at the same moment can cost a
        # connection, which is not what this test is about).
        deadline = time.monotonic() + 30
        while _status_row(path, capsys)["state"] != "idle":
            assert time.monotonic() < deadline, "the daemon's account never became idle"
            time.sleep(0.1)
        assert cli_main(["-c", str(path), "run", "--once"]) == 0

        # kill -9: no clean-up runs, yet the kernel dropped the lock with the process.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        second, second_lines = start_daemon(path)
        try:
            second_lines.wait_for("daemon_started")
            assert lock_path(database).read_text().strip() == str(second.pid)
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
        finally:
            stop_daemon(second, second_lines)
    finally:
        stop_daemon(first, lines)


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    database = tmp_path / "state" / "mailbridge.db"
    held = DatabaseLock(database)
    with pytest.raises(ConfigError, match=r"pid \d+") as info:
        DatabaseLock(database)  # another open file description: refused as another process is
    assert info.value.code == "database_in_use"
    # Another path to the same file (a symbolic link) is the same database.
    link = tmp_path / "link.db"
    database.touch()
    link.symlink_to(database)
    with pytest.raises(ConfigError, match="another mailbridge daemon"):
        DatabaseLock(link)
    held.release()
    DatabaseLock(database).release()
