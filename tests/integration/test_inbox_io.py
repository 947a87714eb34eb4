"""Issue 10, the I/O side, against a real Dovecot: the Inbox is the queue (read mail too), size
before body, byte-bounded batches, a silent connection replaced, store-then-log, bugs logged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from mailbridge import cli
from mailbridge.config import Settings, parse_config
from mailbridge.daemon.account import AccountWorker, inbox_backlog
from mailbridge.daemon.supervisor import once_exit_code, run_once
from mailbridge.daemon.sweep import SweepSummary, sweep_and_record
from mailbridge.mail import net
from mailbridge.mail.imap import ImapSession
from mailbridge.store import importer
from mailbridge.store.factory import open_repository
from mailbridge.testing.faultproxy import Fault, FaultProxy
from tests.integration.test_import_loop import (
    config_data,
    count_messages,
    db,
    eventually,
    mail,
    make_settings,
    run_worker,
    stop_worker,
)

pytestmark = pytest.mark.dovecot

PROCESSED = "Mailbridge Processed"
FAILED = "Mailbridge Failed"


def subjects(settings: Settings) -> set[str]:
    with db(settings) as conn:
        return {r[0] for r in conn.execute("SELECT subject FROM conversationmessage")}


def failures(settings: Settings) -> list[sqlite3.Row]:
    with db(settings) as conn:
        return list(conn.execute("SELECT * FROM importfailure ORDER BY id"))


async def sweep_now(settings: Settings) -> SweepSummary:
    """One recovery sweep of the first account, as the schedule runs it."""
    repo = await open_repository(settings.database, settings)
    try:
        return await sweep_and_record(settings, settings.accounts[0], repo)
    finally:
        await repo.aclose()


def with_limits(
    tmp_path: Path, dovecot: Any, user: Any, host: str, port: int, **limits: Any
) -> Settings:
    data = config_data(tmp_path, dovecot, user)
    data["limits"] = {**data["limits"], **limits}
    data["accounts"][0]["imap"].update({"host": host, "port": port})
    return parse_config(data)


# -- the Inbox is the queue ------------------------------------------------------------------


async def test_read_mail_in_the_inbox_is_imported_by_a_pass(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """Someone opened it in their own client first: it is imported all the same."""
    settings = make_settings(tmp_path, dovecot, imap_user)
    login, password = imap_user.login, imap_user.password
    dovecot.append(
        login, password, mail("Read first", to=imap_user.address).as_bytes(), flags=["\\Seen"]
    )
    dovecot.append(login, password, mail("Unread", to=imap_user.address).as_bytes())
    dovecot.append(
        login, password, mail("Deleted", to=imap_user.address).as_bytes(), flags=["\\Deleted"]
    )

    results = await run_once(settings)

    assert once_exit_code(results) == 0
    assert subjects(settings) == {"Read first", "Unread"}  # \Deleted mail is not work
    assert dovecot.folder_uids(login, password, "INBOX") == [3]
    flags = dovecot.folder_flags(login, password, PROCESSED)
    assert len(flags) == 2
    assert all("\\Seen" in f for f in flags.values())


async def test_read_mail_arriving_while_idle_is_imported(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    worker, task, repo = await run_worker(settings)
    try:
        await eventually(lambda: worker.state.state == "idle")
        dovecot.append(
            imap_user.login,
            imap_user.password,
            mail("Read by a rule", to=imap_user.address).as_bytes(),
            flags=["\\Seen"],
        )
        await eventually(lambda: count_messages(settings) == 1)
    finally:
        await stop_worker(worker, task, repo)
    assert subjects(settings) == {"Read by a rule"}


async def test_sweep_and_sync_import_read_inbox_mail(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    login, password = imap_user.login, imap_user.password
    old = datetime.now(UTC) - timedelta(hours=1)
    data = config_data(tmp_path, dovecot, imap_user)
    data["recovery"] = {"grace_period_minutes": 2}
    settings = parse_config(data)
    dovecot.append(
        login, password, mail("Swept", to=imap_user.address).as_bytes(), flags=["\\Seen"], date=old
    )
    dovecot.append(  # young: the live loop's, left alone by the sweep
        login, password, mail("Young", to=imap_user.address).as_bytes(), flags=["\\Seen"]
    )
    summary = await sweep_now(settings)
    assert summary.inbox_imported == 1
    assert summary.skipped_young == 1
    assert subjects(settings) == {"Swept"}

    # `mailbridge sync` (the same sweep, from the command line) takes read mail too.
    dovecot.append(
        login, password, mail("Synced", to=imap_user.address).as_bytes(), flags=["\\Seen"], date=old
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    assert await asyncio.to_thread(cli.main, ["-c", str(config), "sync"]) == 0
    assert subjects(settings) == {"Swept", "Synced"}
    capsys.readouterr()


# -- size before body ------------------------------------------------------------------------


async def test_message_over_the_size_limit_goes_to_failed_without_being_downloaded(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    login, password = imap_user.login, imap_user.password
    big = mail("Huge scan", to=imap_user.address, body="x" * 3_000_000)
    dovecot.append(login, password, big.as_bytes())
    dovecot.append(login, password, mail("Small", to=imap_user.address).as_bytes())
    async with FaultProxy(dovecot.host, dovecot.port) as proxy:
        settings = with_limits(
            tmp_path, dovecot, imap_user, proxy.host, proxy.port, message_max_size_mb=1
        )
        with structlog.testing.capture_logs() as logs:
            results = await run_once(settings)
        received = proxy.server_bytes
    assert once_exit_code(results) == 0
    assert subjects(settings) == {"Small"}
    assert received < 200_000, f"{received} bytes crossed the wire: the 3 MB body was fetched"
    [row] = failures(settings)
    assert row["code"] == "too_large"
    assert "limits.message_max_size_mb" in row["reason"]
    assert "not downloaded" in row["reason"]
    assert row["messageid"] == big["Message-ID"].strip("<>")
    assert row["subject"] == "Huge scan"
    assert row["size"] > 3_000_000
    assert len(dovecot.folder_uids(login, password, FAILED)) == 1
    assert dovecot.folder_uids(login, password, "INBOX") == []
    assert any(e["event"] == "message_failed" and e["code"] == "too_large" for e in logs)


async def test_batches_are_bounded_by_bytes(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    login, password = imap_user.login, imap_user.password
    raws = [
        mail(f"Attachment {n}", to=imap_user.address, body="y" * 400_000).as_bytes()
        for n in range(6)
    ]
    dovecot.append_many(login, password, raws)
    settings = with_limits(
        tmp_path, dovecot, imap_user, dovecot.host, dovecot.port, fetch_batch_max_mb=1
    )
    with structlog.testing.capture_logs() as logs:
        results = await run_once(settings)
    assert once_exit_code(results) == 0
    assert count_messages(settings) == 6
    batches = [e["messages"] for e in logs if e["event"] == "batch_done"]
    assert sum(batches) == 6
    assert max(batches) <= 2, f"a batch held more than 1 MB of mail: {batches}"


# -- a silent connection ---------------------------------------------------------------------


async def test_sockets_have_tcp_keepalive(dovecot: Any, imap_user: Any) -> None:
    session = await ImapSession.open(dovecot.account(imap_user.login, imap_user.password))
    try:
        sock = session._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == net.KEEPIDLE_SECONDS
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == net.KEEPINTVL_SECONDS
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == net.KEEPCNT
    finally:
        await session.close()


async def test_a_silent_connection_is_replaced_within_the_idle_interval(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """A NAT drops the connection without a word: nothing arrives, nothing is refused. The IDLE
    is re-issued after idle_timeout_seconds, the DONE goes unanswered for timeout_seconds, and
    the account reconnects and imports the mail that came meanwhile."""
    async with FaultProxy(dovecot.host, dovecot.port) as proxy:
        data = config_data(tmp_path, dovecot, imap_user, idle_timeout_seconds=2)
        data["accounts"][0]["imap"].update(
            {"host": proxy.host, "port": proxy.port, "timeout_seconds": 2}
        )
        settings = parse_config(data)
        # Silent once the server's "+ idling" has reached the client.
        fired = proxy.inject(
            Fault("stall", on_client=b"IDLE", after_server_bytes=len(b"+ idling\r\n"))
        )
        with structlog.testing.capture_logs() as logs:
            worker, task, repo = await run_worker(settings)
            try:
                await asyncio.wait_for(fired.wait(), timeout=30)
                dovecot.append(
                    imap_user.login,
                    imap_user.password,
                    mail("During the silence", to=imap_user.address).as_bytes(),
                )
                await eventually(lambda: count_messages(settings) == 1, within=60)
            finally:
                await stop_worker(worker, task, repo)
        assert proxy.connections >= 2, "a new connection replaced the silent one"
    backoffs = [e for e in logs if e["event"] == "account_backoff"]
    assert backoffs
    assert backoffs[0]["code"] == "timeout"
    assert "IDLE DONE" in backoffs[0]["error"]


def test_idle_is_reissued_within_ten_minutes_by_default(tmp_path: Path) -> None:
    settings = parse_config(
        {
            "database": str(tmp_path / "db"),
            "accounts": [
                {
                    "name": "a",
                    "address": "a@example.test",
                    "imap": {"host": "localhost"},
                    "auth": {"username": "a", "password": "x"},
                }
            ],
        }
    )
    assert settings.accounts[0].idle_timeout_seconds <= 600


# -- store, then log -------------------------------------------------------------------------


class _Probe:
    """Wraps a bound logger: calls ``on_event(event)`` before the line is written."""

    def __init__(self, inner: Any, on_event: Any) -> None:
        self._inner = inner
        self._on_event = on_event

    def __getattr__(self, level: str) -> Any:
        method = getattr(self._inner, level)
        if level not in {"debug", "info", "warning", "error", "exception", "critical"}:
            return method

        def emit(event: str, **kw: Any) -> Any:
            self._on_event(event)
            return method(event, **kw)

        return emit


async def test_status_read_at_the_backoff_line_says_auth_failed(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"]["password"] = "wrong-password"
    settings = parse_config(data)
    seen: list[dict[str, Any]] = []

    def read_status(event: str) -> None:
        if event == "account_backoff" and not seen:
            # What an operator's `mailbridge status --json` prints at that very moment.
            capsys.readouterr()
            cli._status(settings, as_json=True)
            seen.append(json.loads(capsys.readouterr().out)["accounts"][0])

    repo = await open_repository(settings.database)
    worker = AccountWorker(settings, settings.accounts[0], repo)
    worker.log = _Probe(worker.log, read_status)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: seen, within=30, what="the backoff line")
    finally:
        await stop_worker(worker, task, repo)
    assert seen[0]["state"] == "auth_failed"
    assert seen[0]["code"] == "auth_failed"


# -- errors are never swallowed --------------------------------------------------------------


async def test_a_bug_importing_one_message_is_logged_with_traceback_and_code_internal(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    login, password = imap_user.login, imap_user.password
    for subject in ("Fine 1", "Boom", "Fine 2"):
        dovecot.append(login, password, mail(subject, to=imap_user.address).as_bytes())
    original = importer.import_one

    def buggy(db: Any, context: Any, item: Any, *args: Any, **kwargs: Any) -> Any:
        if item.message.subject == "Boom":
            raise KeyError("a bug in the import code")
        return original(db, context, item, *args, **kwargs)

    # The one step that writes a message (store/importer.py, on every backend).
    monkeypatch.setattr(importer, "import_one", buggy)
    settings = make_settings(tmp_path, dovecot, imap_user)
    with structlog.testing.capture_logs() as logs:
        results = await run_once(settings)
    assert once_exit_code(results) == 0
    assert subjects(settings) == {"Fine 1", "Fine 2"}
    [failed] = [e for e in logs if e["event"] == "message_failed"]
    assert failed["code"] == "internal"
    assert failed["log_level"] == "error"
    assert "Traceback" in failed["traceback"]
    assert "a bug in the import code" in failed["traceback"]
    [row] = failures(settings)
    assert row["code"] == "internal"
    assert "KeyError" in row["reason"]
    assert len(dovecot.folder_uids(login, password, FAILED)) == 1

    # The scheduled sweep does not retry a bug every 20 minutes; `failed retry` does.
    summary = await sweep_now(settings)
    assert summary.retried == 0
    assert summary.held_internal == 1
    assert "held (internal error or unreadable) 1" in summary.line()


# -- exit 78 for a missing secret, in every command ------------------------------------------


@pytest.mark.parametrize(
    "command", [["sync"], ["failed", "retry", "--all"], ["run", "--once"], ["doctor"]]
)
def test_a_missing_secret_exits_78(
    tmp_path: Path,
    dovecot: Any,
    imap_user: Any,
    command: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"] = {
        "username": imap_user.login,
        "password_file": str(tmp_path / "absent"),
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    assert cli.main(["-c", str(config), *command]) == 78
    printed = capsys.readouterr()
    assert "secret_missing" in printed.out + printed.err


# -- a backlog of old mail -------------------------------------------------------------------


async def test_a_backlog_of_old_mail_is_warned_about_by_doctor_and_the_first_start(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    login, password = imap_user.login, imap_user.password
    long_ago = datetime.now(UTC) - timedelta(days=3)
    dovecot.append_many(
        login,
        password,
        [mail(f"Old {n}", to=imap_user.address).as_bytes() for n in range(3)],
        date=long_ago,
    )
    dovecot.append(login, password, mail("New", to=imap_user.address).as_bytes())
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"]["backlog_warning"] = 2
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))

    # Counted with RFC 5032 OLDER where the server has WITHIN, else with BEFORE a date.
    session = await ImapSession.open(dovecot.account(login, password))
    try:
        await session.select("INBOX")
        assert await inbox_backlog(session) == 3
        session.capabilities -= {"WITHIN"}
        assert await inbox_backlog(session) == 3
    finally:
        await session.close()

    assert await asyncio.to_thread(cli.main, ["-c", str(config), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "! 'INBOX' backlog — 3 message(s) older than a day" in out
    assert "doveadm move" in out

    with structlog.testing.capture_logs() as logs:
        results = await run_once(parse_config(data))
    assert once_exit_code(results) == 0
    [warning] = [e for e in logs if e["event"] == "inbox_backlog"]
    assert warning["older_than_a_day"] == 3
    assert warning["threshold"] == 2
    assert "move it to another folder first" in warning["remedy"]
    # A warning, not a refusal: the backlog is imported (the operator chose to leave it).
    assert count_messages(parse_config(data)) == 4


async def test_no_backlog_warning_under_the_threshold(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    dovecot.append(
        imap_user.login,
        imap_user.password,
        mail("Old", to=imap_user.address).as_bytes(),
        date=datetime.now(UTC) - timedelta(days=3),
    )
    settings = make_settings(tmp_path, dovecot, imap_user)
    with structlog.testing.capture_logs() as logs:
        await run_once(settings)
    assert not [e for e in logs if e["event"] == "inbox_backlog"]
