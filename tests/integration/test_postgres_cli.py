"""The operator's commands with ``database: postgresql://...`` against a real PostgreSQL.

The password comes from ``database_password_file`` (the cluster refuses TCP logins without
it). ``status`` names the daemon holding each account (``holder``); ``run --once`` imports
mail from a real Dovecot into it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mailbridge.cli import main as cli_main
from mailbridge.config import load_config
from mailbridge.daemon.doctor import check_database
from mailbridge.store.postgres import PostgresRepository
from mailbridge.store.sql import SqlRepository
from tests.conftest import PostgresDatabase
from tests.integration.test_import_loop import config_data, thread_of_three

pytestmark = pytest.mark.postgres


@pytest.fixture
def config(tmp_path: Path, postgres_database: PostgresDatabase) -> Path:
    secret = tmp_path / "db.pw"
    secret.write_text(postgres_database.password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            database: {postgres_database.url}
            database_password_file: {secret}
            cluster: {{lease_seconds: 10}}
            accounts:
              - name: support
                address: support@example.com
                imap: {{host: 127.0.0.1, port: 1, tls: none}}
                auth: {{username: u, password: p}}
              - name: sales
                address: sales@example.com
                imap: {{host: 127.0.0.1, port: 1, tls: none}}
                auth: {{username: u, password: p}}
            """
        ),
        encoding="utf-8",
    )
    return path


def _repo(db: PostgresDatabase) -> PostgresRepository:
    repo = PostgresRepository(db.url, password=db.password)
    repo.migrate()
    return repo


def test_status_json_names_the_holder_of_each_account(
    config: Path, postgres_database: PostgresDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _repo(postgres_database)
    try:
        assert repo.claim_leases("hostA:42:beef", ["support"], 30, 5) == {"support": 1}
        # A daemon not reloaded yet still serves an account removed from the shared config.
        assert repo.claim_leases("hostB:7:cafe", ["archive"], 30, 5) == {"archive": 1}
    finally:
        repo.close()
    assert cli_main(["-c", str(config), "status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    holders = {row["account"]: row["holder"] for row in out["accounts"]}
    assert holders == {"support": "hostA:42:beef", "sales": None}
    assert out["held_not_in_config"] == {"archive": "hostB:7:cafe"}
    assert out["database"] == postgres_database.url  # no password in it
    assert postgres_database.password not in json.dumps(out)

    assert cli_main(["-c", str(config), "status"]) == 0
    table = capsys.readouterr().out
    assert "holder" in table
    assert "hostA:42:beef" in table
    assert "not in this config: archive (held by hostB:7:cafe)" in " ".join(table.split())


def test_read_commands_work_on_postgresql(
    config: Path, postgres_database: PostgresDatabase, capsys: pytest.CaptureFixture[str]
) -> None:
    # The commands migrate an empty database themselves (status does, as with SQLite).
    assert cli_main(["-c", str(config), "conversations"]) == 0
    assert "0 conversation(s)" in capsys.readouterr().out
    repo: SqlRepository = _repo(postgres_database)
    try:
        with repo._sql("seed", write=True) as sql:
            sql.execute(
                "INSERT INTO conversation (uniqueid, account, subject, earliestunread,"
                " lastmessagedate) VALUES ('k1', 'support', 'Printer on fire', "
                "'2024-01-01T00:00:00Z', '2024-01-01T00:00:00Z')"
            )
    finally:
        repo.close()
    assert cli_main(["-c", str(config), "conversations", "--search", "PRINTER"]) == 0
    assert "Printer on fire" in capsys.readouterr().out
    assert cli_main(["-c", str(config), "conversation", "read", "1"]) == 0
    assert cli_main(["-c", str(config), "failed"]) == 0
    assert "0 failed message(s)" in capsys.readouterr().out


def test_run_once_imports_a_thread_into_postgresql(
    tmp_path: Path,
    postgres_database: PostgresDatabase,
    dovecot: Any,
    imap_user: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = tmp_path / "db.pw"
    secret.write_text(postgres_database.password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    data = config_data(tmp_path, dovecot, imap_user)
    data.update(database=postgres_database.url, database_password_file=str(secret))
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    thread = thread_of_three(imap_user.address)
    for msg in (thread[2], thread[0], thread[1]):  # the last reply first: UID order != date
        dovecot.append(imap_user.login, imap_user.password, msg.as_bytes())
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    repo = _repo(postgres_database)
    try:
        [summary] = repo.conversations()
        # One conversation although the last reply came first (all three share one Date).
        assert (summary.messages, summary.followers) == (3, 2)
        assert summary.subject.endswith("Order 1042")
    finally:
        repo.close()
    # The same mail again (a crash before the move): duplicates, nothing stored twice.
    for msg in thread:
        dovecot.append(imap_user.login, imap_user.password, msg.as_bytes())
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    assert cli_main(["-c", str(path), "conversations"]) == 0
    assert "1 conversation(s)" in capsys.readouterr().out


def test_doctor_checks_the_postgresql_database(config: Path) -> None:
    settings = load_config(config)
    check = check_database(settings)
    assert check.status == "ok"
    assert "empty (will be set up)" in check.detail
    wrong = settings.model_copy(update={"database_password_file": config.parent / "nope"})
    with pytest.raises(Exception, match="database_password_file"):
        wrong.database_password()
    refused = check_database(wrong)
    assert (refused.status, refused.code) == ("fail", "secret_missing")


def test_wrong_database_password_exits_78_with_the_code(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong password is not temporary: 78, which the unit's RestartPreventExitStatus keeps
    from restarting the daemon every 5 s against PostgreSQL (75 would)."""
    (config.parent / "db.pw").write_text("wrong\n", encoding="utf-8")
    assert cli_main(["-c", str(config), "run", "--once"]) == 78
    capsys.readouterr()
    assert cli_main(["-c", str(config), "status"]) == 78
    err = capsys.readouterr().err
    assert "password authentication failed" in err
    assert "database_password_file" in err  # the remedy names where the password comes from
    check = check_database(load_config(config))
    assert (check.status, check.code) == ("fail", "database_auth_failed")
