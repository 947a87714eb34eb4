"""The import loop end to end: real Dovecot on loopback, real SQLite, the real daemon code.

Each test gets a fresh Dovecot user (``imap_user``) so tests share one server but no mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailbridge.cli import main as cli_main
from mailbridge.config import Settings, parse_config
from mailbridge.daemon.account import AccountWorker
from mailbridge.daemon.supervisor import Supervisor, once_exit_code, run_once
from mailbridge.errors import ServerError
from mailbridge.mail.imap import ImapSession
from mailbridge.store.factory import open_repository

pytestmark = pytest.mark.dovecot

PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)

PROCESSED = "Mailbridge Processed"
FAILED = "Mailbridge Failed"


def config_data(tmp_path: Path, dovecot: Any, user: Any, **account: Any) -> dict[str, Any]:
    return {
        "database": str(tmp_path / "mailbridge.db"),
        "limits": {"attachment_max_size_mb": 1},
        "accounts": [
            {
                "name": "support",
                "address": user.address,
                "imap": {
                    "host": dovecot.host,
                    "port": dovecot.port,
                    "tls": "none",
                    "timeout_seconds": 10,
                },
                "auth": {"username": user.login, "password": user.password},
                "mode": "idle",
                **account,
            }
        ],
    }


def make_settings(tmp_path: Path, dovecot: Any, user: Any, **account: Any) -> Settings:
    return parse_config(config_data(tmp_path, dovecot, user, **account))


def mail(
    subject: str,
    sender: str = "John Doe <john@customer.example>",
    to: str = "support@example.com",
    body: str = "Hello",
    **headers: str,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = "Mon, 23 Nov 2026 09:00:00 +0000"
    msg["Message-ID"] = make_msgid(domain="customer.example")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def db(settings: Settings) -> sqlite3.Connection:
    """The integrator's view: plain sqlite3 on the file."""
    conn = sqlite3.connect(settings.database)
    conn.row_factory = sqlite3.Row
    return conn


async def eventually(check: Callable[[], Any], within: float = 20.0, what: str = "") -> Any:
    """Poll until check() is truthy (generous bound: correctness, not speed, is tested here)."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what or 'the condition'}")
        await asyncio.sleep(0.05)


def thread_of_three(to: str) -> list[EmailMessage]:
    first = mail("Order 1042", to=to, Cc="Jane Doe <jane@customer.example>")
    second = mail(
        "Re: Order 1042",
        sender="Jane Doe <jane@customer.example>",
        to=to,
        In_Reply_To=first["Message-ID"],
        References=first["Message-ID"],
    )
    third = mail(
        "Re: Order 1042",
        to=to,
        In_Reply_To=second["Message-ID"],
        References=f"{first['Message-ID']} {second['Message-ID']}",
    )
    return [first, second, third]


async def test_thread_of_three_is_one_conversation(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    for msg in thread_of_three(imap_user.address):
        dovecot.append(imap_user.login, imap_user.password, msg.as_bytes())

    results = await run_once(settings)

    assert once_exit_code(results) == 0
    assert results[0].summary is not None
    assert results[0].summary.imported == 3
    with db(settings) as conn:
        conversations = conn.execute("SELECT id, subject FROM conversation").fetchall()
        assert len(conversations) == 1
        assert conversations[0]["subject"] == "Order 1042"
        rows = conn.execute(
            "SELECT conversation, messageid FROM conversationmessage ORDER BY id"
        ).fetchall()
        assert [r["conversation"] for r in rows] == [conversations[0]["id"]] * 3
        followers = {
            r["email"]
            for r in conn.execute(
                "SELECT email FROM follower WHERE conversation = ?", (conversations[0]["id"],)
            )
        }
        assert followers == {"john@customer.example", "jane@customer.example"}
        first_id = conn.execute("SELECT min(id) FROM conversationmessage").fetchone()[0]
        levels = conn.execute(
            "SELECT f.email, mf.participationlevel FROM messagefollower mf "
            "JOIN follower f ON f.id = mf.follower WHERE mf.conversationmessage = ?",
            (first_id,),
        ).fetchall()
        assert {(r[0], r[1]) for r in levels} == {
            ("john@customer.example", "from"),
            ("jane@customer.example", "cc"),
        }
    # Mail left the Inbox only after the commit, and is \Seen in Processed.
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    processed = dovecot.folder_flags(imap_user.login, imap_user.password, PROCESSED)
    assert len(processed) == 3
    assert all("\\Seen" in flags for flags in processed.values())


async def test_attachment_and_inline_image_are_stored(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    with_file = mail("Invoice", to=imap_user.address)
    with_file.add_attachment(
        b"%PDF-1.4 demo", maintype="application", subtype="pdf", filename="invoice.pdf"
    )
    with_image = mail("Photo", to=imap_user.address)
    cid = make_msgid(domain="customer.example")
    with_image.add_alternative(f'<p>See <img src="cid:{cid[1:-1]}"></p>', subtype="html")
    with_image.get_payload()[1].add_related(  # type: ignore[index]
        PIXEL, maintype="image", subtype="png", cid=cid, filename="photo.png"
    )
    for msg in (with_file, with_image):
        dovecot.append(imap_user.login, imap_user.password, msg.as_bytes())

    await run_once(settings)

    with db(settings) as conn:
        doc = conn.execute("SELECT filename, contenttype, size, document FROM document").fetchone()
        assert doc["filename"] == "invoice.pdf"
        assert doc["contenttype"] == "application/pdf"
        assert bytes(doc["document"]) == b"%PDF-1.4 demo"
        image = conn.execute("SELECT id, contentid, document FROM embeddedfile").fetchone()
        assert image["contentid"] == cid[1:-1]
        assert bytes(image["document"]) == PIXEL
        html = conn.execute(
            "SELECT message FROM conversationmessage WHERE subject = 'Photo'"
        ).fetchone()["message"]
        assert "cid:" not in html
        assert f"embeddedfile:{image['id']}" in html


async def test_over_limit_message_goes_to_failed_with_reason(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    big = mail("Huge scan", to=imap_user.address)
    big.add_attachment(
        bytes(2 * 1024 * 1024), maintype="application", subtype="octet-stream", filename="scan.bin"
    )
    small = mail("Small one", to=imap_user.address)
    dovecot.append(imap_user.login, imap_user.password, big.as_bytes())
    dovecot.append(imap_user.login, imap_user.password, small.as_bytes())
    big_uid = dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX")[0]

    with structlog.testing.capture_logs() as logs:
        results = await run_once(settings)

    assert results[0].summary is not None
    assert (results[0].summary.imported, results[0].summary.failed) == (1, 1)
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    failed_flags = dovecot.folder_flags(imap_user.login, imap_user.password, FAILED)
    assert len(failed_flags) == 1
    assert all("\\Seen" in flags for flags in failed_flags.values())
    failed_raw = dovecot.folder_messages(imap_user.login, imap_user.password, FAILED)[0]
    assert b"Huge scan" in failed_raw
    with db(settings) as conn:
        row = conn.execute(
            "SELECT account, uid, folderuid, messageid, code, reason, lastfailed FROM importfailure"
        ).fetchone()
        assert row["account"] == "support"
        assert row["uid"] == big_uid  # its UID in the Inbox, where it was found
        assert row["code"] == "too_large"
        assert "limit" in row["reason"]
        assert row["messageid"] == big["Message-ID"][1:-1]
        # Dovecot has UIDPLUS: the COPYUID of the move names it in the Failed folder.
        assert row["folderuid"] == next(iter(failed_flags))
        assert row["lastfailed"]
        assert conn.execute("SELECT count(*) FROM conversationmessage").fetchone()[0] == 1
    failed_logs = [e for e in logs if e["event"] == "message_failed"]
    assert failed_logs
    assert failed_logs[0]["code"] == "too_large"
    assert failed_logs[0]["account"] == "support"
    assert failed_logs[0]["uid"] == big_uid
    assert "attachment_max_size_mb" in failed_logs[0]["remedy"]


async def test_redelivered_message_is_not_imported_twice(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    msg = mail("Only once", to=imap_user.address)
    no_id = mail("No id", to=imap_user.address)
    del no_id["Message-ID"]
    for raw in (msg.as_bytes(), msg.as_bytes(), no_id.as_bytes()):
        dovecot.append(imap_user.login, imap_user.password, raw)
    await run_once(settings)
    # Delivered again later, after the first copies were processed.
    for raw in (msg.as_bytes(), no_id.as_bytes()):
        dovecot.append(imap_user.login, imap_user.password, raw)
    results = await run_once(settings)

    assert results[0].summary is not None
    assert results[0].summary.duplicates == 2
    with db(settings) as conn:
        assert conn.execute("SELECT count(*) FROM conversationmessage").fetchone()[0] == 2
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 5


async def test_crash_between_commit_and_move_imports_exactly_once(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit happened, the MOVE did not: the next pass must not import again."""
    settings = make_settings(tmp_path, dovecot, imap_user)
    dovecot.append(
        imap_user.login, imap_user.password, mail("Crash", to=imap_user.address).as_bytes()
    )

    async def lost(*args: object, **kwargs: object) -> dict[int, int]:
        raise ServerError("connection lost during MOVE", code="connection_lost")

    with monkeypatch.context() as patch:
        patch.setattr(ImapSession, "move", lost)
        results = await run_once(settings)
    assert isinstance(results[0].error, ServerError)
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") != []

    results = await run_once(settings)

    assert results[0].summary is not None
    assert results[0].summary.duplicates == 1
    with db(settings) as conn:
        assert conn.execute("SELECT count(*) FROM conversationmessage").fetchone()[0] == 1
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []


async def run_worker(settings: Settings) -> tuple[AccountWorker, asyncio.Task[None], Any]:
    repo = await open_repository(settings.database)
    worker = AccountWorker(settings, settings.accounts[0], repo)
    task = asyncio.create_task(worker.run())
    return worker, task, repo


async def stop_worker(worker: AccountWorker, task: asyncio.Task[None], repo: Any) -> None:
    worker.stopping.set()
    await asyncio.wait_for(task, timeout=15)
    await repo.aclose()


def count_messages(settings: Settings) -> int:
    with db(settings) as conn:
        return int(conn.execute("SELECT count(*) FROM conversationmessage").fetchone()[0])


async def test_new_message_arrives_through_idle(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    with structlog.testing.capture_logs() as logs:
        worker, task, repo = await run_worker(settings)
        try:
            await eventually(lambda: worker.state.state == "idle")
            dovecot.append(
                imap_user.login, imap_user.password, mail("Pushed", to=imap_user.address).as_bytes()
            )
            await eventually(lambda: count_messages(settings) == 1)
            await eventually(lambda: worker.state.state == "idle")
        finally:
            await stop_worker(worker, task, repo)
    imported = [e for e in logs if e["event"] == "message_imported"]
    assert len(imported) == 1
    assert imported[0]["account"] == "support"
    assert worker.state.state == "stopped"


async def test_poll_mode_imports_new_mail(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user, mode="poll", poll_interval_seconds=1)
    worker, task, repo = await run_worker(settings)
    try:
        await eventually(lambda: worker.state.state == "polling")
        dovecot.append(
            imap_user.login, imap_user.password, mail("Polled", to=imap_user.address).as_bytes()
        )
        await eventually(lambda: count_messages(settings) == 1)
    finally:
        await stop_worker(worker, task, repo)


async def test_a_poll_finds_mail_that_arrived_while_it_slept(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first SEARCH after the poll's sleep sees mail that arrived during it: the server
    tells of new mail only at the end of a command (RFC 3501 section 5.2), so a SEARCH alone
    runs on the view from before and the mail waited a whole poll interval more."""
    searches: list[list[int]] = []
    original = ImapSession.undeleted_uids

    async def recorded(self: ImapSession) -> list[int]:
        found = await original(self)
        searches.append(found)
        return found

    monkeypatch.setattr(ImapSession, "undeleted_uids", recorded)
    settings = make_settings(tmp_path, dovecot, imap_user, mode="poll", poll_interval_seconds=4)
    worker, task, repo = await run_worker(settings)
    try:
        await eventually(lambda: worker.state.state == "polling")  # asleep for 4 s
        before = len(searches)
        dovecot.append(
            imap_user.login, imap_user.password, mail("Polled", to=imap_user.address).as_bytes()
        )
        await eventually(lambda: count_messages(settings) == 1)
    finally:
        await stop_worker(worker, task, repo)
    # The search after the sleep in which the mail arrived found it, not the one after next.
    assert searches[before], searches[before:]


async def test_idle_mode_polls_when_the_server_lacks_idle(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mode: idle on a server without IDLE (RFC 2177 is an extension): poll, and say so."""
    original = ImapSession.open

    async def open_without_idle(cls: type[ImapSession], *args: Any, **kwargs: Any) -> ImapSession:
        session = await original(*args, **kwargs)
        session.capabilities = session.capabilities - {"IDLE"}
        return session

    monkeypatch.setattr(ImapSession, "open", classmethod(open_without_idle))
    settings = make_settings(tmp_path, dovecot, imap_user, poll_interval_seconds=1)
    with structlog.testing.capture_logs() as logs:
        worker, task, repo = await run_worker(settings)
        try:
            await eventually(lambda: worker.state.state == "polling")
            dovecot.append(
                imap_user.login,
                imap_user.password,
                mail("No IDLE", to=imap_user.address).as_bytes(),
            )
            await eventually(lambda: count_messages(settings) == 1)
        finally:
            await stop_worker(worker, task, repo)
    assert any(e["event"] == "imap_idle_unsupported_polling" for e in logs)


async def test_idle_is_reissued_before_its_timeout_on_the_same_connection(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """RFC 2177 section 3: a client must end IDLE and issue it again before the server's
    30-minute inactivity limit. With idle_timeout_seconds: 1 the worker does so every second,
    on the same session (no reconnect), and mail still arrives through the renewed IDLE."""
    settings = make_settings(tmp_path, dovecot, imap_user, idle_timeout_seconds=1)
    states: list[str] = []
    worker, task, repo = await run_worker(settings)
    worker.on_state = lambda state: states.append(state.state)
    try:
        await eventually(lambda: states.count("idle") >= 4, within=60)
        dovecot.append(
            imap_user.login,
            imap_user.password,
            mail("After renewals", to=imap_user.address).as_bytes(),
        )
        await eventually(lambda: count_messages(settings) == 1)
    finally:
        await stop_worker(worker, task, repo)
    assert states.count("connecting") == 1, "IDLE was renewed on the open session, no reconnect"
    assert "backoff" not in states


async def test_server_restart_mid_run_is_survived(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = make_settings(tmp_path, dovecot, imap_user)
    with structlog.testing.capture_logs() as logs:
        worker, task, repo = await run_worker(settings)
        try:
            dovecot.append(
                imap_user.login,
                imap_user.password,
                mail("Before restart", to=imap_user.address).as_bytes(),
            )
            await eventually(lambda: count_messages(settings) == 1)
            await eventually(lambda: worker.state.state == "idle")
            await asyncio.to_thread(dovecot.restart)
            dovecot.append(
                imap_user.login,
                imap_user.password,
                mail("After restart", to=imap_user.address).as_bytes(),
            )
            await eventually(lambda: count_messages(settings) == 2, within=60)
        finally:
            await stop_worker(worker, task, repo)
    backoffs = [e for e in logs if e["event"] == "account_backoff"]
    assert backoffs, "the lost connection was logged"
    assert all(
        e["code"] in {"connection_lost", "unreachable", "server_unavailable", "timeout"}
        for e in backoffs
    )


async def test_backoff_grows_when_the_fault_comes_after_login(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """A login that succeeds is no proof of health: a missing Inbox fails every attempt after
    login, and each attempt must count, so the backoff grows instead of restarting at 1 s."""
    settings = make_settings(tmp_path, dovecot, imap_user, folders={"inbox": "No Such Folder"})
    with structlog.testing.capture_logs() as logs:
        worker, task, repo = await run_worker(settings)

        def woken_until(n: int) -> bool:
            # End the (long) backoff now instead of after minutes. Again at every poll: a
            # wake() between the backoff's log line and its wait is (rightly) forgotten.
            worker.wake()
            return sum(e["event"] == "account_backoff" for e in logs) >= n

        try:
            for expected in (1, 2, 3):
                await eventually(lambda n=expected: woken_until(n))
        finally:
            await stop_worker(worker, task, repo)
    backoffs = [e for e in logs if e["event"] == "account_backoff"]
    assert [e["consecutive_failures"] for e in backoffs[:3]] == [1, 2, 3]
    assert {e["code"] for e in backoffs} == {"folder_unavailable"}


async def test_one_broken_account_does_not_stop_another(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    broken = {
        **data["accounts"][0],
        "name": "broken",
        "auth": {"username": imap_user.login, "password": "wrong"},
    }
    data["accounts"].append(broken)
    settings = parse_config(data)
    dovecot.append(imap_user.login, imap_user.password, mail("Hi", to=imap_user.address).as_bytes())

    results = await run_once(settings)

    by_name = {r.account: r for r in results}
    assert by_name["support"].summary is not None
    assert by_name["support"].summary.imported == 1
    error = by_name["broken"].error
    assert error is not None
    assert error.code == "auth_failed"
    assert once_exit_code(results) == 69


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_bad_port_exits_78_naming_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "database: /tmp/x.db\n"
        "accounts:\n"
        "  - name: support\n"
        "    address: support@example.com\n"
        "    imap: {host: imap.example.com, port: not-a-port}\n"
        "    auth: {method: password, username: u, password: p}\n"
    )
    assert cli_main(["-c", str(path), "check-config"]) == 78
    assert cli_main(["-c", str(path), "run", "--once"]) == 78
    err = capsys.readouterr().err
    assert "accounts[0].imap.port" in err


async def test_daemon_serves_a_good_account_beside_a_broken_one(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """The daemon, not one pass: an account whose password is wrong backs off (auth_failed),
    and the other account of the same process keeps importing what arrives through IDLE."""
    data = config_data(tmp_path, dovecot, imap_user)
    broken = {
        **data["accounts"][0],
        "name": "broken",
        "auth": {"username": imap_user.login, "password": "wrong"},
    }
    data["accounts"].append(broken)
    settings = parse_config(data)
    supervisor = Supervisor(settings, drain_seconds=5)
    task = asyncio.ensure_future(supervisor.run())
    try:
        await eventually(
            lambda: (
                "broken" in supervisor.states
                and supervisor.states["broken"].state == "auth_failed"
                and supervisor.states.get("support") is not None
                and supervisor.states["support"].state == "idle"
            )
        )
        for n in range(3):
            dovecot.append(
                imap_user.login,
                imap_user.password,
                mail(f"While the other is broken {n}", to=imap_user.address).as_bytes(),
            )
            await eventually(lambda n=n: count_messages(settings) == n + 1)
        assert supervisor.states["broken"].state == "auth_failed"
        assert not supervisor.running["support"].task.done()
    finally:
        supervisor.request_stop()
        assert await task == 0


def test_cli_run_once_and_status(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    dovecot.append(imap_user.login, imap_user.password, mail("Hi", to=imap_user.address).as_bytes())
    path = write_config(tmp_path, config_data(tmp_path, dovecot, imap_user))

    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    assert cli_main(["-c", str(path), "status", "--json"]) == 0

    out = capsys.readouterr().out
    status = json.loads(out[out.index("{") :])
    row = status["accounts"][0]
    assert row["account"] == "support"
    assert row["imported"] == 1
    assert row["failed"] == 0
    assert row["last_import"]

    # The table an operator reads: one row per account, state, imported and failed counts.
    assert cli_main(["-c", str(path), "status"]) == 0
    table = capsys.readouterr().out
    line = next(line for line in table.splitlines() if "support" in line)
    cells = [cell.strip() for cell in line.strip("│ ").split("│")]
    assert cells[:2] == ["support", row["state"]]
    assert cells[2].endswith("ago")  # last import
    assert cells[3:5] == ["1", "0"]


def test_cli_run_once_exits_69_when_login_fails(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"]["password"] = "wrong"
    path = write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "run", "--once"]) == 69
    capsys.readouterr()

    assert cli_main(["-c", str(path), "status", "--json"]) == 0

    row = json.loads(capsys.readouterr().out)["accounts"][0]
    assert (row["state"], row["code"]) == ("auth_failed", "auth_failed")
    assert "password" in row["remedy"]


def test_cli_run_once_exits_78_when_a_secret_file_is_missing(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing password_file is the operator's config to fix (78), not a passing fault (75)."""
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"].pop("password", None)
    data["accounts"][0]["auth"]["password_file"] = str(tmp_path / "missing.pw")
    path = write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "run", "--once"]) == 78
    assert "missing.pw" in capsys.readouterr().out


def test_daemon_notifies_systemd_and_drains_on_sigterm(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """`mailbridge run` as systemd runs it: READY=1, the mail imported, STATUS= idle, then
    SIGTERM -> STOPPING=1, exit 0."""
    settings = make_settings(tmp_path, dovecot, imap_user)
    path = write_config(tmp_path, config_data(tmp_path, dovecot, imap_user))
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.2)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(path), "--log-format", "json", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        received: list[str] = []
        sock.settimeout(30)
        while not any(m.startswith("READY=1") for m in received):
            received.extend(sock.recv(4096).decode().splitlines())
        sock.settimeout(0.2)
        dovecot.append(
            imap_user.login, imap_user.password, mail("Hi", to=imap_user.address).as_bytes()
        )
        deadline = time.monotonic() + 30
        while not (count_messages(settings) == 1 and "idle" in _last_status(received)):
            assert time.monotonic() < deadline, received
            with contextlib.suppress(TimeoutError):
                received.extend(sock.recv(4096).decode().splitlines())
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        sock.settimeout(30)
        while not any(m.startswith("STOPPING=1") for m in received):
            received.extend(sock.recv(4096).decode().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0, stderr.decode()
    assert b'"event": "daemon_stopped"' in stderr or b'"event":"daemon_stopped"' in stderr
    assert imap_user.password.encode() not in stderr  # secrets never logged
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 1


def _last_status(received: list[str]) -> str:
    statuses = [m for m in received if m.startswith("STATUS=")]
    return statuses[-1] if statuses else ""


def _imported_any(settings: Settings) -> bool:
    """At least one message committed (the daemon may still be creating the schema)."""
    try:
        return settings.database.exists() and count_messages(settings) > 0
    except sqlite3.OperationalError:
        return False


def test_sigterm_mid_batch_drains_the_batch_in_flight(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """SIGTERM while a backlog is being imported: the batch in flight is finished (committed
    and moved), nothing else is started, the daemon exits 0 - every message is then either
    imported and out of the Inbox, or untouched in the Inbox for the next start."""
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"]["fetch_batch_size"] = 20
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    dovecot.append_many(
        imap_user.login,
        imap_user.password,
        [
            mail(f"Backlog {n}", to=imap_user.address, body="x" * 20_000).as_bytes()
            for n in range(300)
        ],
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(path), "--log-format", "json", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not _imported_any(settings):
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    imported = count_messages(settings)
    inbox = dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX")
    processed = dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)
    assert 0 < imported < 300, "stopped mid-backlog, not before or after it"
    assert len(processed) == imported  # every committed message was moved before exit
    assert len(inbox) == 300 - imported  # the rest is untouched, to import on the next start
    assert set(dovecot.unseen(imap_user.login, imap_user.password, "INBOX")) == set(inbox)


async def test_mail_arriving_during_a_pass_that_only_discarded_is_imported_without_waiting(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """A pass that found mail searches the Inbox again at once: the server announced what
    arrived meanwhile (EXISTS) inside that pass's commands, not to the next IDLE. A pass whose
    only mail was discarded (automatic) or a bounce must count as one that found mail, or the
    new message waits for the IDLE timeout (here 20 minutes)."""
    settings = make_settings(tmp_path, dovecot, imap_user, idle_timeout_seconds=1200)
    robot = mail("Automatic reply: hello", to=imap_user.address, Auto_Submitted="auto-replied")
    dovecot.append(imap_user.login, imap_user.password, robot.as_bytes())
    person = mail("Arrived during the pass", to=imap_user.address)
    worker, task, repo = await run_worker(settings)
    real_import = repo.import_batch
    arrived = False

    async def import_batch(context: Any, items: Any) -> Any:
        nonlocal arrived
        if not arrived:
            arrived = True  # delivered while the robot's pass is under way
            await asyncio.to_thread(
                dovecot.append, imap_user.login, imap_user.password, person.as_bytes()
            )
        return await real_import(context, items)

    repo.import_batch = import_batch
    try:
        await eventually(lambda: count_messages(settings) == 1, within=15, what="the person's mail")
    finally:
        await stop_worker(worker, task, repo)
    with db(settings) as conn:
        subjects = [r[0] for r in conn.execute("SELECT subject FROM conversationmessage")]
    assert subjects == ["Arrived during the pass"]


async def test_an_inbox_found_empty_is_not_searched_before_idle(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SELECT said EXISTS 0: the first pass sends no UID SEARCH (a round trip per account of a
    quiet fleet); the next pass, after IDLE announced mail, searches and imports."""
    searches: list[tuple[str, ...]] = []
    search = ImapSession.search

    async def counted(self: ImapSession, *criteria: str) -> list[int]:
        searches.append(criteria)
        return await search(self, *criteria)

    monkeypatch.setattr(ImapSession, "search", counted)
    settings = make_settings(tmp_path, dovecot, imap_user)
    worker, task, repo = await run_worker(settings)
    try:
        await eventually(lambda: worker.state.state == "idle")
        assert searches == []
        dovecot.append(
            imap_user.login, imap_user.password, mail("After", to=imap_user.address).as_bytes()
        )
        await eventually(lambda: count_messages(settings) == 1)
        assert searches  # the pass the IDLE push started did search
    finally:
        await stop_worker(worker, task, repo)


async def test_mail_arriving_between_an_empty_select_and_idle_is_imported(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SEARCH spared after an empty SELECT loses nothing: a message delivered right after
    the SELECT (before IDLE begins) is announced by EXISTS and imported without reconnecting."""
    select = ImapSession.select
    delivered: list[int] = []

    async def select_then_deliver(self: ImapSession, folder: str) -> int:
        exists = await select(self, folder)
        if not delivered:
            delivered.append(exists)
            raw = mail("Between", to=imap_user.address).as_bytes()
            await asyncio.to_thread(dovecot.append, imap_user.login, imap_user.password, raw)
        return exists

    monkeypatch.setattr(ImapSession, "select", select_then_deliver)
    settings = make_settings(tmp_path, dovecot, imap_user)
    worker, task, repo = await run_worker(settings)
    try:
        await eventually(lambda: count_messages(settings) == 1, within=30)
        assert delivered == [0]  # the SELECT found the Inbox empty
        # Committed first, then moved: the MOVE follows the commit.
        await eventually(
            lambda: dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == [],
            within=30,
            what="moved out of the Inbox",
        )
    finally:
        await stop_worker(worker, task, repo)
