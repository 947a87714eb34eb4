"""Sending from the outbox against a real SMTP server (aiosmtpd on loopback) and Dovecot.

A reply deferred with 451 is retried and sent once, with one Message-ID; a 550 fails the row
at once with the server's words; a new conversation gets its row; kill -9 between the end of
DATA and the status update leads to the documented outcome (resent with the same Message-ID,
or found in the Sent folder and not resent); the customer's answer to our reply threads back
into the same conversation through Dovecot by each identification method; a row an integrator
INSERTs is picked up by the running worker without a polling delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import yaml

from mailbridge.cli import main as cli_main
from mailbridge.config import Settings, parse_config
from mailbridge.core.identify import normalize_message_id
from mailbridge.core.parse import parse_message
from mailbridge.daemon.outbox import OutboxWorker
from mailbridge.daemon.supervisor import run_once
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import ImportContext, ImportItem
from mailbridge.store.factory import connector, open_repository
from mailbridge.store.outbox import OutboxFile, OutgoingRequest
from mailbridge.store.sqlite import SqliteRepository
from mailbridge.testing.dovecot import free_port
from mailbridge.testing.faultproxy import Fault, FaultProxy
from mailbridge.testing.smtpsink import SmtpSink
from tests.integration.test_import_loop import config_data, eventually, mail

CUSTOMER = "john@customer.example"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink().start()
    try:
        yield server
    finally:
        server.stop()


def offline_config(tmp_path: Path, sink: SmtpSink, **account: Any) -> dict[str, Any]:
    """An account whose IMAP server is not there (the outbox needs only SMTP)."""
    return {
        "database": str(tmp_path / "mailbridge.db"),
        "outbox": {"first_retry_seconds": 1},
        "recovery": {"enabled": False},
        "accounts": [
            {
                "name": "support",
                "address": "support@example.test",
                "display_name": "Example Support",
                "imap": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
                "smtp": sink.smtp_settings(),
                "auth": {"username": "support", "password": "secret-pw"},
                **account,
            }
        ],
    }


def seed_conversation(settings: Settings, message: EmailMessage | None = None) -> int:
    """Import one customer message the way the account loop does (into the configured
    database: SQLite or PostgreSQL); its conversation id."""
    message = message or mail("Order 1042", to="support@example.test", Cc="Jane <jane@x.example>")
    repo = connector(settings.database, settings.database_password())()
    try:
        repo.migrate()
        context = ImportContext.for_account(settings, settings.accounts[0])
        [result] = repo.import_batch(
            context, [ImportItem(uid=1, message=parse_message(message.as_bytes()))]
        )
    finally:
        repo.close()
    assert result.conversation_id is not None
    return result.conversation_id


def queue(settings: Settings, request: OutgoingRequest) -> int:
    repo = SqliteRepository(settings.database)
    try:
        repo.migrate()
        return repo.queue_outgoing(request)
    finally:
        repo.close()


def row(settings: Settings, outbox_id: int) -> sqlite3.Row:
    conn = sqlite3.connect(settings.database)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
    finally:
        conn.close()
    assert found is not None
    return found


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


async def send_pass(settings: Settings) -> None:
    repo = await open_repository(settings.database, settings)
    try:
        await OutboxWorker(settings, repo).run_once()
    finally:
        await repo.aclose()


async def test_reply_deferred_with_451_is_retried_and_sent_once(
    tmp_path: Path, sink: SmtpSink
) -> None:
    settings = parse_config(offline_config(tmp_path, sink))
    original = mail("Order 1042", to="support@example.test", Cc="Jane <jane@x.example>")
    conversation = seed_conversation(settings, original)
    outbox_id = queue(
        settings,
        OutgoingRequest(
            account="support",
            conversation_id=conversation,
            body_text="We are on it.",
            coworker="Ann Agent",
            coworker_address="ann@example.test",
        ),
    )
    sink.replies.append("451 4.3.0 Temporary local problem, try again later")
    await send_pass(settings)
    first = row(settings, outbox_id)
    assert first["state"] == "queued"
    assert first["attempts"] == 1
    assert first["lasterrorcode"] == "send_deferred"
    assert "451 4.3.0 Temporary local problem" in first["lasterror"]
    assert first["nextattempt"] is not None
    assert first["messageid"]  # fixed before the first attempt
    assert sink.received == []

    async def sent() -> bool:
        await send_pass(settings)
        return bool(row(settings, outbox_id)["state"] == "sent")

    deadline = time.monotonic() + 30
    while not await sent():
        assert time.monotonic() < deadline, "not sent after the retry"
        await asyncio.sleep(0.2)
    done = row(settings, outbox_id)
    assert done["attempts"] == 2
    assert len(sink.received) == 1
    message = parsed(sink.received[0].data)
    assert (
        normalize_message_id(str(message["Message-ID"])) == first["messageid"] == done["messageid"]
    )
    assert sink.received[0].data == first["raw"]  # the very bytes fixed before the first try
    assert message["In-Reply-To"] == original["Message-ID"]
    assert message["Subject"] == "Re: Order 1042"
    assert "Example Support" in str(message["From"])
    assert set(sink.received[0].recipients) == {CUSTOMER, "jane@x.example"}
    assert sink.received[0].sender == "support@example.test"

    # Stored as an outgoing message of the conversation, with its followers and the coworker.
    conn = sqlite3.connect(settings.database)
    try:
        stored = conn.execute(
            "SELECT id, conversation, direction, messageid FROM conversationmessage WHERE id = ?",
            (done["conversationmessage"],),
        ).fetchone()
        levels = dict(
            conn.execute(
                "SELECT f.email, mf.participationlevel FROM messagefollower AS mf"
                " JOIN follower AS f ON f.id = mf.follower WHERE mf.conversationmessage = ?"
                " AND mf.participationlevel != 'cc'",
                (stored[0],),
            ).fetchall()
        )
        unread = conn.execute(
            "SELECT earliestunread FROM conversation WHERE id = ?", (conversation,)
        ).fetchone()[0]
    finally:
        conn.close()
    assert stored[1:] == (conversation, "outgoing", done["messageid"])
    assert levels == {CUSTOMER: "to", "ann@example.test": "from"}
    assert unread is not None  # our answer does not mark the customer's message read


async def test_550_fails_the_row_at_once_with_the_servers_words(
    tmp_path: Path, sink: SmtpSink
) -> None:
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings,
        OutgoingRequest(account="support", conversation_id=conversation, body_text="Hello"),
    )
    sink.replies.append("550 5.7.1 Message rejected as spam by content filter")
    await send_pass(settings)
    failed = row(settings, outbox_id)
    assert failed["state"] == "failed"
    assert failed["attempts"] == 1
    assert failed["lasterrorcode"] == "message_rejected"
    assert failed["lasterror"] == "550 5.7.1 Message rejected as spam by content filter"
    assert failed["nextattempt"] is None
    await send_pass(settings)  # never retried by itself
    assert row(settings, outbox_id)["attempts"] == 1


async def test_rows_that_cannot_be_sent_fail_with_a_reason(tmp_path: Path, sink: SmtpSink) -> None:
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    no_recipient = queue(
        settings,
        OutgoingRequest(
            account="support", to="support@example.test", subject="x", body_text="loop"
        ),
    )
    # Refused by the foreign key on mailbridge's connection; an integrator's may not check.
    conn = sqlite3.connect(settings.database)
    no_conversation = conn.execute(
        "INSERT INTO outbox (account, conversation, bodytext) VALUES ('support', 999, 'x')"
    ).lastrowid
    conn.commit()
    conn.close()
    bad_action = queue(
        settings,
        OutgoingRequest(
            account="support",
            conversation_id=conversation,
            body_text="x",
            actions='{"ticket": {"status": "closed"}}',
        ),
    )
    await send_pass(settings)
    assert sink.received == []
    for outbox_id, words in (
        (no_recipient, "no recipient"),
        (no_conversation, "conversation 999 does not exist"),
        (bad_action, "'ticket'"),
    ):
        failed = row(settings, outbox_id)
        assert failed["state"] == "failed", outbox_id
        assert failed["lasterrorcode"] == "outbox_invalid"
        assert words in failed["lasterror"]
        assert failed["attempts"] == 0  # never reached the server


async def test_message_actions_update_the_conversation_parent(
    tmp_path: Path, sink: SmtpSink
) -> None:
    data = offline_config(tmp_path, sink)
    data["conversation_parents"] = [
        {
            "table": "ticket",
            "properties": [
                {"column": "subject", "message_property": "subject"},
                {"column": "status", "default": "new"},
            ],
        }
    ]
    settings = parse_config(data)
    repo = SqliteRepository(settings.database)
    repo.migrate()
    repo.prepare(settings.follower_parents, settings.conversation_parents)
    repo.close()
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings,
        OutgoingRequest(
            account="support",
            conversation_id=conversation,
            body_text="Please send the invoice number.",
            actions='{"ticket": {"status": "waiting_customer"}}',
        ),
    )
    await send_pass(settings)
    assert row(settings, outbox_id)["state"] == "sent"
    conn = sqlite3.connect(settings.database)
    try:
        status = conn.execute(
            "SELECT t.status FROM ticket AS t JOIN conversation AS c ON c.ticket = t.id"
            " WHERE c.id = ?",
            (conversation,),
        ).fetchone()[0]
    finally:
        conn.close()
    assert status == "waiting_customer"
    # A new conversation: its ticket is created when the sent message is stored, and the
    # actions apply to it in the same transaction.
    new_id = queue(
        settings,
        OutgoingRequest(
            account="support", to="jo@customer.example", subject="Offer", body_text="Hi",
            actions='{"ticket": {"status": "offer_sent"}}',
        ),
    )  # fmt: skip
    await send_pass(settings)
    sent = row(settings, new_id)
    assert sent["state"] == "sent"
    conn = sqlite3.connect(settings.database)
    try:
        ticket = conn.execute(
            "SELECT t.subject, t.status FROM ticket AS t JOIN conversation AS c"
            " ON c.ticket = t.id WHERE c.id = ?",
            (sent["conversation"],),
        ).fetchone()
    finally:
        conn.close()
    assert ticket == ("Offer", "offer_sent")


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def test_send_starts_a_new_conversation(
    tmp_path: Path, sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    body = tmp_path / "body.html"
    body.write_text("<p>Your <b>order</b> has shipped.</p>")
    assert (
        cli_main(
            [
                "-c",
                str(path),
                "send",
                "support",
                "--to",
                "Jo <jo@customer.example>",
                "--subject",
                "Shipping news",
                "--body-file",
                str(body),
                "--html",
            ]
        )
        == 0
    )
    assert "queued a new conversation as outbox row 1" in capsys.readouterr().out
    await send_pass(settings)
    [received] = sink.received
    message = parsed(received.data)
    assert message["Subject"] == "Shipping news"
    assert message["In-Reply-To"] is None
    plain = message.get_body(("plain",))
    assert plain is not None
    assert "order" in plain.get_content()  # a text part generated from the HTML
    done = row(settings, 1)
    conn = sqlite3.connect(settings.database)
    try:
        conversation = conn.execute(
            "SELECT uniqueid, account, subject FROM conversation WHERE id = ?",
            (done["conversation"],),
        ).fetchone()
        followers = conn.execute(
            "SELECT email FROM follower WHERE conversation = ?", (done["conversation"],)
        ).fetchall()
    finally:
        conn.close()
    assert conversation == (done["conversationkey"], "support", "Shipping news")
    assert followers == [("jo@customer.example",)]
    # The operator's view.
    assert cli_main(["-c", str(path), "outbox", "--all"]) == 0
    assert "sent" in capsys.readouterr().out


def test_outbox_retry_and_cancel(tmp_path: Path, sink: SmtpSink, capsys: Any) -> None:
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings, OutgoingRequest(account="support", conversation_id=conversation, body_text="x")
    )
    sink.replies.append("550 5.1.1 <john@customer.example>: Recipient address rejected")
    asyncio.run(send_pass(settings))
    assert cli_main(["-c", str(path), "outbox", "--failed"]) == 0
    out = capsys.readouterr().out
    assert "message_rejected" in out
    assert "Recipient address rejected" in out
    assert cli_main(["-c", str(path), "status", "--json"]) == 0
    [account] = json.loads(capsys.readouterr().out)["accounts"]
    assert account["outbox"] == {"failed": 1}
    assert cli_main(["-c", str(path), "outbox", "cancel", str(outbox_id)]) == 0
    assert row(settings, outbox_id)["state"] == "cancelled"
    assert cli_main(["-c", str(path), "outbox", "retry", str(outbox_id)]) == 0
    assert row(settings, outbox_id)["state"] == "queued"
    asyncio.run(send_pass(settings))
    assert row(settings, outbox_id)["state"] == "sent"
    assert cli_main(["-c", str(path), "outbox", "cancel", str(outbox_id)]) == 1  # sent: too late
    assert "is sent" in capsys.readouterr().err
    assert cli_main(["-c", str(path), "outbox", "retry", "999"]) == 1
    assert "no outbox row 999" in capsys.readouterr().err


async def test_the_running_worker_picks_up_an_integrators_insert_at_once(
    tmp_path: Path, sink: SmtpSink
) -> None:
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.3)  # the worker is asleep (nothing due: up to 60 s)
        conn = sqlite3.connect(settings.database)
        try:
            conn.execute(
                "INSERT INTO outbox (account, conversation, bodytext) VALUES (?, ?, ?)",
                ("support", conversation, "Inserted by the CRM"),
            )
            conn.commit()
        finally:
            conn.close()
        # Far below the worker's 60 s sleep: the database change woke it.
        await eventually(lambda: len(sink.received) == 1, within=15, what="the row sent")
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()


async def test_stopping_mid_batch_leaves_no_row_marked_sending(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The next chunk is composed and marked sending while one is sent: stopped meanwhile,
    every row not attempted goes back to queued (none is left in sending for a restart)."""
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    ids = [
        queue(settings, OutgoingRequest("support", conversation_id=conversation, body_text=f"{n}"))
        for n in range(4)
    ]
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    sink.hold()
    try:
        task = asyncio.create_task(worker.send_due())
        await eventually(sink.holding.is_set, within=30, what="the first DATA held")
        # Rows 2 and 3 (the second chunk) are marked sending while the first is in DATA.
        await eventually(
            lambda: row(settings, ids[2])["state"] == "sending", within=30, what="chunk 2 began"
        )
        worker.stopping.set()
        sink.release()
        await asyncio.wait_for(task, 30)
    finally:
        sink.release()
        await repo.aclose()
    states = [row(settings, i)["state"] for i in ids]
    assert states == ["sent", "queued", "queued", "queued"]
    assert all("not attempted" in row(settings, i)["lasterror"] for i in ids[1:])
    assert len(sink.received) == 1


def _insert_outbox_row(settings: Settings) -> None:
    conn = sqlite3.connect(settings.database)
    try:
        conn.execute("INSERT INTO outbox (account, toaddresses, bodytext)"
                     " VALUES ('support', 'a@x.example', 'x')")  # fmt: skip
        conn.commit()
    finally:
        conn.close()


async def test_a_commit_by_another_process_wakes_the_watch_without_polling(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """inotify on the database's files: an integrator's INSERT (another connection's commit)
    wakes the worker, not the change counter's next read."""
    from mailbridge.daemon.outbox import WATCH_POLL_SECONDS, Watch

    settings = parse_config(offline_config(tmp_path, sink))
    seed_conversation(settings)
    watch = Watch(settings)
    watch.open()
    try:
        assert watch._poll_seconds == WATCH_POLL_SECONDS  # inotify is watching
        watch._poll_seconds = 3600.0  # so only a file event can end the wait below
        stopping = asyncio.Event()
        waiting = asyncio.create_task(watch.wait(7200, stopping))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        _insert_outbox_row(settings)
        await asyncio.wait_for(waiting, 30)
    finally:
        watch.close()


async def test_an_account_state_write_does_not_wake_the_watch_at_once_but_within_a_second(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """A state write of this process (a quiet commit: it cannot change the outbox) does not
    start a round of its own, as every one of a starting fleet's did: the change is left for
    the look WATCH_POLL_SECONDS later, so it is still looked at."""
    from mailbridge.daemon.outbox import Watch
    from mailbridge.store.base import AccountState

    settings = parse_config(offline_config(tmp_path, sink))
    seed_conversation(settings)
    repo = await open_repository(settings.database, settings)
    watch = Watch(settings, repo.quiet_commits)
    watch.open()
    try:
        stopping = asyncio.Event()
        waiting = asyncio.create_task(watch.wait(7200, stopping))
        await asyncio.sleep(0.2)
        await repo.set_account_state(AccountState(account="support", state="idle"))
        await eventually(lambda: watch._deferred_since is not None, what="the change seen")
        # Left for later rather than woken at once (the wait ends WATCH_POLL_SECONDS after the
        # change was seen, measured from that moment, never before it).
        seen = watch._deferred_since
        assert seen is not None
        await asyncio.wait_for(waiting, 30)
        assert time.monotonic() - seen >= 0.9
        assert watch._deferred_since is None
    finally:
        watch.close()
        await repo.aclose()


async def test_an_integrators_row_wakes_the_watch_while_state_writes_go_on(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """A row committed by another process while this one writes account states all the time
    (a fleet starting) is still looked at: at once, or at the latest with the deferred look
    (WATCH_POLL_SECONDS) when it landed together with a state write."""
    from mailbridge.daemon.outbox import Watch
    from mailbridge.store.base import AccountState

    settings = parse_config(offline_config(tmp_path, sink))
    seed_conversation(settings)
    repo = await open_repository(settings.database, settings)
    watch = Watch(settings, repo.quiet_commits)
    watch.open()
    stopping = asyncio.Event()

    async def state_writes() -> None:
        number = 0
        while not stopping.is_set():
            number += 1
            await repo.set_account_state(AccountState(account=f"fleet{number % 50}", state="idle"))
            await asyncio.sleep(0.005)

    writer = asyncio.create_task(state_writes())
    try:
        for _ in range(3):  # each state write alone is left for later: rounds are at most 1/s
            await asyncio.wait_for(watch.wait(7200, stopping), 30)
        waiting = asyncio.create_task(watch.wait(7200, stopping))
        await asyncio.to_thread(_insert_outbox_row, settings)
        await asyncio.wait_for(waiting, 30)
        with sqlite3.connect(settings.database) as conn:
            assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] >= 1
    finally:
        stopping.set()
        await writer
        watch.close()
        await repo.aclose()


# -- kill -9 between the end of DATA and the status update --------------------------------------


def _daemon(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(path), "--log-format", "json", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_9_when(path: Path, sink: SmtpSink, held: Callable[[], bool], what: str) -> None:
    """Start the daemon with the server holding its 250s, kill -9 it once ``held()``, then let
    the server answer."""
    sink.hold()
    proc = _daemon(path)
    try:
        deadline = time.monotonic() + 60
        while not held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held(), what
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        sink.release()


def _killed_mid_send(path: Path, settings: Settings, sink: SmtpSink, outbox_id: int) -> bytes:
    """Start the daemon, let the server take the message and hold its 250, kill -9 the daemon
    then; returns the bytes the server got."""
    _kill_9_when(path, sink, sink.holding.is_set, "the daemon never reached DATA")
    assert row(settings, outbox_id)["state"] == "sending"  # the status update never happened
    [received] = sink.received
    return received.data


def test_kill_9_after_data_resends_with_the_same_message_id(tmp_path: Path, sink: SmtpSink) -> None:
    """Without a Sent folder to look in: at-least-once, the second copy identical."""
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings, OutgoingRequest(account="support", conversation_id=conversation, body_text="x")
    )
    first = _killed_mid_send(path, settings, sink, outbox_id)
    asyncio.run(send_pass(settings))  # the restart: `run --once` does the same recovery
    done = row(settings, outbox_id)
    assert done["state"] == "sent"
    assert done["attempts"] == 2
    assert [r.data for r in sink.received] == [first, first]  # same Message-ID, same bytes
    conn = sqlite3.connect(settings.database)
    try:
        [count] = conn.execute(
            "SELECT COUNT(*) FROM conversationmessage WHERE direction = 'outgoing'"
        ).fetchone()
    finally:
        conn.close()
    assert count == 1  # stored once


@pytest.mark.dovecot
def test_kill_9_after_data_then_found_in_sent_is_not_resent(
    tmp_path: Path, sink: SmtpSink, dovecot: Any, imap_user: Any
) -> None:
    """A server that files submissions in Sent (append_sent: false): the restart finds the
    Message-ID there and records the row as sent without sending it again."""
    data = config_data(
        tmp_path, dovecot, imap_user, smtp=sink.smtp_settings(),
        folders={"sent": "Sent", "append_sent": False},
    )  # fmt: skip
    data["recovery"] = {"enabled": False}
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    conversation = seed_conversation(settings, mail("Order", to=imap_user.address))
    outbox_id = queue(
        settings, OutgoingRequest(account="support", conversation_id=conversation, body_text="x")
    )
    first = _killed_mid_send(path, settings, sink, outbox_id)
    dovecot.append(imap_user.login, imap_user.password, first, folder="Sent")  # the server's copy
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    done = row(settings, outbox_id)
    assert done["state"] == "sent"
    assert done["attempts"] == 1
    assert len(sink.received) == 1  # not sent again


@pytest.mark.dovecot
def test_kill_9_during_personalised_copies_resends_only_those_not_in_sent(
    tmp_path: Path, sink: SmtpSink, dovecot: Any, imap_user: Any
) -> None:
    """personalized_emails: killed while the server holds its 250 to the first copy, which
    the server then files in Sent under that copy's own Message-ID. The restart finds it
    there and does not send it again; the second copy, never sent, is."""
    data = config_data(
        tmp_path, dovecot, imap_user, smtp=sink.smtp_settings(),
        folders={"sent": "Sent", "append_sent": False}, personalized_emails=True,
    )  # fmt: skip
    data["recovery"] = {"enabled": False}
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    conversation = seed_conversation(
        settings, mail("Order", to=imap_user.address, Cc="Jane <jane@x.example>")
    )
    outbox_id = queue(
        settings,
        OutgoingRequest(account="support", conversation_id=conversation, body_text="x",
                        coworker="Ann Agent"),
    )  # fmt: skip
    first = _killed_mid_send(path, settings, sink, outbox_id)
    assert parsed(first)["To"] is not None
    first_id = normalize_message_id(str(parsed(first)["Message-ID"]))
    dovecot.append(imap_user.login, imap_user.password, first, folder="Sent")  # the server's copy
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    done = row(settings, outbox_id)
    assert done["state"] == "sent"
    received = [(r.recipients, normalize_message_id(str(parsed(r.data)["Message-ID"])))
                for r in sink.received]  # fmt: skip
    # The first copy once (before the kill), the second once (after it), each its own id.
    assert [r for r, _id in received] == [(CUSTOMER,), ("jane@x.example",)]
    assert received[0][1] == first_id
    assert received[1][1] != first_id
    conn = sqlite3.connect(settings.database)
    try:
        copies = conn.execute(
            "SELECT recipient, senttime IS NOT NULL FROM outboxcopy WHERE outbox = ? ORDER BY id",
            (outbox_id,),
        ).fetchall()
    finally:
        conn.close()
    assert copies == [(CUSTOMER, 1), ("jane@x.example", 1)]


# -- the customer's answer threads back ---------------------------------------------------------


@pytest.mark.dovecot
@pytest.mark.parametrize("identification", ["message_id", "plus_address", "subject"])
def test_the_customers_answer_to_our_reply_joins_the_conversation(
    tmp_path: Path, sink: SmtpSink, dovecot: Any, imap_user: Any, identification: str
) -> None:
    data = config_data(
        tmp_path, dovecot, imap_user, smtp=sink.smtp_settings(),
        folders={"sent": "Sent"},
    )  # fmt: skip
    data["identification"] = identification
    data["recovery"] = {"enabled": False}
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    question = mail("Where is my order?", to=imap_user.address)
    dovecot.append(imap_user.login, imap_user.password, question.as_bytes())
    asyncio.run(run_once(settings))
    conn = sqlite3.connect(settings.database)
    [(conversation,)] = conn.execute("SELECT id FROM conversation").fetchall()
    conn.close()
    body = tmp_path / "answer.txt"
    body.write_text("It ships today.")
    assert cli_main(["-c", str(path), "reply", str(conversation), "--body-file", str(body)]) == 0
    asyncio.run(run_once(settings))
    [ours] = sink.received
    sent = parsed(ours.data)
    # With folders.sent a copy of what was sent is in the Sent folder.
    assert dovecot.folder_messages(imap_user.login, imap_user.password, "Sent") != []

    # The customer answers with a client that keeps only what the method needs.
    answer = EmailMessage()
    answer["From"] = f"John Doe <{CUSTOMER}>"
    reply_to = sent["Reply-To"]
    answer["To"] = str(reply_to) if reply_to is not None else imap_user.address
    answer["Subject"] = f"Re: {sent['Subject']}"
    answer["Date"] = "Tue, 24 Nov 2026 09:00:00 +0000"
    answer["Message-ID"] = f"<answer-{identification}@customer.example>"
    if identification == "message_id":
        answer["In-Reply-To"] = sent["Message-ID"]
    answer.set_content("Thanks!")
    dovecot.append(imap_user.login, imap_user.password, answer.as_bytes())
    asyncio.run(run_once(settings))
    conn = sqlite3.connect(settings.database)
    try:
        rows = conn.execute(
            "SELECT conversation, direction, threadedby FROM conversationmessage ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    assert rows == [
        (conversation, "incoming", "new"),
        (conversation, "outgoing", "outbox"),
        (conversation, "incoming", identification),
    ]


def test_the_daemon_notices_a_cli_reply_at_once(tmp_path: Path, sink: SmtpSink) -> None:
    """`mailbridge reply` while `mailbridge run` is up: sent without waiting for a poll."""
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    conversation = seed_conversation(settings)
    proc = _daemon(path)
    try:
        deadline = time.monotonic() + 30
        while b"daemon_started" not in _peek(proc):
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.05)
        body = tmp_path / "b.txt"
        body.write_text("On its way.")
        assert (
            cli_main(["-c", str(path), "reply", str(conversation), "--body-file", str(body)]) == 0
        )
        deadline = time.monotonic() + 15
        while not sink.received:
            assert time.monotonic() < deadline, "the daemon did not send the reply"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        os.set_blocking(proc.stderr.fileno(), True)  # type: ignore[union-attr]
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0


_peeked: dict[int, bytes] = {}


def _peek(proc: subprocess.Popen[bytes]) -> bytes:
    """What the daemon logged so far (non-blocking read of its stderr)."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    chunk = proc.stderr.read() or b""
    _peeked[proc.pid] = _peeked.get(proc.pid, b"") + chunk
    return _peeked[proc.pid]


async def test_personalised_mail_sends_one_copy_per_recipient(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """personalized_emails: "Coworker - Account" as sender, each recipient an own copy with
    an own Message-ID (kept on messagefollower), and an answer citing it threads back."""
    settings = parse_config(offline_config(tmp_path, sink, personalized_emails=True))
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings,
        OutgoingRequest(
            account="support", conversation_id=conversation,
            body_text="Hi {{ recipient_name }},", coworker="Ann Agent",
        ),
    )  # fmt: skip
    sink.replies.extend(["250 OK", "451 4.3.0 try again"])  # the second copy deferred once
    await send_pass(settings)
    assert row(settings, outbox_id)["state"] == "queued"
    sink.replies.clear()
    deadline = time.monotonic() + 30
    while row(settings, outbox_id)["state"] != "sent":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
        await send_pass(settings)
    assert [r.recipients for r in sink.received] == [(CUSTOMER,), ("jane@x.example",)]
    copies = [parsed(r.data) for r in sink.received]
    ids = [normalize_message_id(str(m["Message-ID"])) for m in copies]
    assert len(set(ids)) == 2
    assert ids[0] == row(settings, outbox_id)["messageid"]
    assert all(
        str(m["From"]) == "Ann Agent - Example Support <support@example.test>" for m in copies
    )
    # Each copy is rendered for its own recipient.
    texts = [m.get_body(("plain",)).get_content() for m in copies]  # type: ignore[union-attr]
    assert texts[0].startswith("Hi John Doe,")
    assert texts[1].startswith("Hi Jane,")
    conn = sqlite3.connect(settings.database)
    try:
        stored = dict(
            conn.execute(
                "SELECT f.email, mf.messageid FROM messagefollower AS mf"
                " JOIN follower AS f ON f.id = mf.follower"
                " WHERE mf.conversationmessage = ?",
                (row(settings, outbox_id)["conversationmessage"],),
            ).fetchall()
        )
    finally:
        conn.close()
    assert stored == {CUSTOMER: ids[0], "jane@x.example": ids[1]}
    # Jane answers her copy: it threads into the conversation by that id.
    answer = mail("Re: Order 1042", sender="Jane <jane@x.example>", to="support@example.test",
                  In_Reply_To=f"<{ids[1]}>")  # fmt: skip
    repo = SqliteRepository(settings.database)
    try:
        [result] = repo.import_batch(
            ImportContext.for_account(settings, settings.accounts[0]),
            [ImportItem(uid=2, message=parse_message(answer.as_bytes()))],
        )
    finally:
        repo.close()
    assert result.conversation_id == conversation


# -- automatic replies --------------------------------------------------------------------------


def _robot_answer(to_us: bytes, robot: str, number: int, *, subject: str) -> bytes:
    """A robot that marks nothing (no RFC 3834 header) and threads nothing: every answer of
    it starts a new conversation at our end. ``subject`` is its subject's prefix."""
    seen = parsed(to_us)
    answer = EmailMessage()
    answer["From"] = f"Robot <{robot}>"
    answer["To"] = str(seen["From"])
    answer["Subject"] = f"{subject} {seen['Subject']}"
    answer["Date"] = "Tue, 24 Nov 2026 09:00:00 +0000"
    answer["Message-ID"] = f"<ooo-{number}@robot.example>"
    answer.set_content("I am away.")
    return answer.as_bytes()


@pytest.mark.dovecot
@pytest.mark.parametrize(
    ("subject", "answers", "conversations"),
    [
        # A robot nothing gives away: the loop protection alone ends it. Every robot mail is
        # imported (a new conversation each), only the first three are answered.
        ("About your mail:", 3, 4),
        # An "Out of office:" answer is automatic mail (core/automatic.py): under the default
        # policy it continues nothing and is discarded, and it is never answered anyway.
        ("Out of office:", 1, 1),
    ],
)
def test_two_auto_responders_facing_each_other_stop_within_the_limit(
    tmp_path: Path,
    sink: SmtpSink,
    dovecot: Any,
    imap_user: Any,
    subject: str,
    answers: int,
    conversations: int,
) -> None:
    robot = "robot@robot.example"
    data = config_data(
        tmp_path, dovecot, imap_user, smtp=sink.smtp_settings(),
        auto_reply={"enabled": True, "body_text": "Thanks, we got your message."},
    )  # fmt: skip
    data["recovery"] = {"enabled": False}
    data["loop_protection"] = {"max_auto_replies": 3, "window_hours": 24}
    settings = parse_config(data)
    first = EmailMessage()
    first["From"] = f"Robot <{robot}>"
    first["To"] = imap_user.address
    first["Subject"] = "Hello"
    first["Message-ID"] = "<ooo-0@robot.example>"
    first.set_content("Hi")
    dovecot.append(imap_user.login, imap_user.password, first.as_bytes())
    answered = 0
    for number in range(1, 10):
        asyncio.run(run_once(settings))  # import, queue the automatic reply, send it
        if len(sink.received) == answered:
            break  # we did not answer: the loop is over
        answered = len(sink.received)
        ours = sink.received[-1]
        assert ours.recipients == (robot,)
        message = parsed(ours.data)
        assert message["Auto-Submitted"] == "auto-replied"
        assert message["X-Auto-Response-Suppress"] == "All"
        assert message["Precedence"] == "auto_reply"
        dovecot.append(
            imap_user.login,
            imap_user.password,
            _robot_answer(ours.data, robot, number, subject=subject),
        )
    assert len(sink.received) == answers  # at most loop_protection.max_auto_replies
    conn = sqlite3.connect(settings.database)
    try:
        [(stored,)] = conn.execute("SELECT COUNT(*) FROM conversation").fetchall()
    finally:
        conn.close()
    assert stored == conversations


@pytest.mark.dovecot
def test_automatic_mail_and_own_mail_get_no_automatic_reply(
    tmp_path: Path, sink: SmtpSink, dovecot: Any, imap_user: Any
) -> None:
    data = config_data(
        tmp_path, dovecot, imap_user, smtp=sink.smtp_settings(),
        aliases=["help@example.test"],
        auto_reply={"enabled": True, "body_text": "Thanks, {{ recipient_name }}."},
    )  # fmt: skip
    data["recovery"] = {"enabled": False}
    settings = parse_config(data)
    for message in (
        mail("Vacation", Auto_Submitted="auto-replied", to=imap_user.address),
        mail("Newsletter", Precedence="bulk", to=imap_user.address),
        mail("From our alias", sender="help@example.test", to="john@customer.example"),
        mail("A person", to=imap_user.address),
    ):
        dovecot.append(imap_user.login, imap_user.password, message.as_bytes())
    asyncio.run(run_once(settings))
    assert [r.recipients for r in sink.received] == [(CUSTOMER,)]
    answer = parsed(sink.received[0].data)
    assert answer["Subject"] == "Re: A person"
    plain = answer.get_body(("plain",))
    assert plain is not None
    assert plain.get_content().startswith("Thanks, John Doe.")  # merge codes filled


# -- templates, snippets ------------------------------------------------------------------------


async def test_template_wraps_the_reply_with_merge_codes_and_relations(
    tmp_path: Path, sink: SmtpSink, capsys: pytest.CaptureFixture[str]
) -> None:
    template = tmp_path / "support.html"
    template.write_text(
        "<html><body>{{ body }}<p>Ticket {{ ticket.number }} for {{ ticket.company.name }},"
        " dear {{ recipient_name }}.</p>{{ reply_info }}{{ conversation_messages }}"
        "{{ signature }}</body></html>"
    )
    data = offline_config(
        tmp_path, sink, template_file=str(template), signature="<p>-- Support team</p>",
        language="de", time_zone="Europe/Berlin",
    )  # fmt: skip
    data["conversation_parents"] = [
        {"table": "ticket", "properties": [{"column": "number", "default": "T-1"},
                                            {"column": "company", "default": 1}]},
    ]  # fmt: skip
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    repo = SqliteRepository(settings.database)
    repo.migrate()
    repo.prepare(settings.follower_parents, settings.conversation_parents)
    repo._conn.execute("CREATE TABLE company (id INTEGER PRIMARY KEY, name TEXT)")
    repo._conn.execute("INSERT INTO company (id, name) VALUES (1, 'ACME <GmbH>')")
    repo._conn.execute(
        "INSERT INTO textsnippet (name, text, pinned)"
        " VALUES ('greet', 'Hallo {{ recipient_name }},', 1)"
    )
    repo.close()
    conversation = seed_conversation(settings)
    assert cli_main(["-c", str(path), "snippets"]) == 0
    assert "greet" in capsys.readouterr().out
    assert cli_main(["-c", str(path), "reply", str(conversation), "--snippet", "greet"]) == 0
    await send_pass(settings)
    [received] = sink.received
    message = parsed(received.data)
    html_part = message.get_body(("html",))
    plain_part = message.get_body(("plain",))
    assert html_part is not None
    assert plain_part is not None
    html = html_part.get_content()
    assert "Hallo John Doe," in html  # the snippet's merge code, filled
    assert "Ticket T-1 for ACME &lt;GmbH&gt;" in html
    assert "antworten Sie auf diese E-Mail" in html
    assert "Am 2026-11-23 10:00 CET schrieb John Doe" in html  # 09:00 UTC, shown in Berlin
    assert "-- Support team" in html
    assert "Ticket T-1 for ACME <GmbH>" in plain_part.get_content()
    conn = sqlite3.connect(settings.database)
    try:
        uses = conn.execute("SELECT count, lastused FROM textsnippet").fetchone()
    finally:
        conn.close()
    assert uses[0] == 1
    assert uses[1] is not None


async def test_the_template_is_read_once_and_again_after_a_reload(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The template file is read at its first use, not per message; a reload (new settings,
    as SIGHUP gives the worker) reads it again."""
    template = tmp_path / "support.html"
    template.write_text("<p>{{ body }}</p><p>first version</p>")
    data = offline_config(tmp_path, sink, template_file=str(template))
    current = parse_config(data)
    conversation = seed_conversation(current)
    repo = await open_repository(current.database, current)
    worker = OutboxWorker(lambda: current, repo)

    async def send(text: str) -> str:
        queue(current, OutgoingRequest(account="support", conversation_id=conversation,
                                       body_text=text))  # fmt: skip
        await worker.run_once()
        html = parsed(sink.received[-1].data).get_body(("html",))
        assert html is not None
        return str(html.get_content())

    try:
        assert "first version" in await send("one")
        template.write_text("<p>{{ body }}</p><p>second version</p>")
        assert "first version" in await send("two")  # not read again
        current = parse_config(data)  # the reload
        assert "second version" in await send("three")
        template.unlink()
        assert "second version" in await send("four")  # kept: no read per message
    finally:
        await repo.aclose()
    assert len(sink.received) == 4


async def test_attachments_by_path_only_from_the_configured_directories(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """A row must not mail out any file the daemon can read (its password file, say)."""
    allowed = tmp_path / "invoices"
    allowed.mkdir()
    (allowed / "1042.pdf").write_bytes(b"%PDF-1.4 invoice")
    secret = tmp_path / "support.pw"
    secret.write_text("hunter2")
    (allowed / "sneaky.pdf").symlink_to(secret)
    data = offline_config(tmp_path, sink)
    data["outbox"]["attachment_directories"] = [str(allowed)]
    settings = parse_config(data)
    conversation = seed_conversation(settings)
    repo = SqliteRepository(settings.database)
    try:
        good, *bad = (
            repo.queue_outgoing(
                OutgoingRequest(account="support", conversation_id=conversation, body_text="x"),
                [OutboxFile("", "application/pdf", path, None)],
            )
            for path in (
                str(allowed / "1042.pdf"),
                str(secret),
                str(allowed / "sneaky.pdf"),
                str(allowed / ".." / "support.pw"),
            )
        )
    finally:
        repo.close()
    await send_pass(settings)
    assert row(settings, good)["state"] == "sent"
    [received] = sink.received
    [attachment] = list(parsed(received.data).iter_attachments())
    assert attachment.get_filename() == "1042.pdf"
    assert attachment.get_content() == b"%PDF-1.4 invoice"
    for outbox_id in bad:
        refused = row(settings, outbox_id)
        assert refused["state"] == "failed"
        assert "not under outbox.attachment_directories" in refused["lasterror"]
    assert b"hunter2" not in b"".join(r.data for r in sink.received)


async def test_an_unreachable_server_is_retried_and_a_row_expires(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Connection refused: temporary (unreachable), retried later; a row still failing after
    outbox.max_age_hours fails with send_expired and keeps the last error's words."""
    data = offline_config(tmp_path, sink)
    data["accounts"][0]["smtp"]["port"] = free_port()  # nothing listens there
    data["outbox"]["max_age_hours"] = 0.01  # 36 s: a retry 1 s later is still within it
    settings = parse_config(data)
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings, OutgoingRequest(account="support", conversation_id=conversation, body_text="x")
    )
    await send_pass(settings)
    first = row(settings, outbox_id)
    assert (first["state"], first["attempts"], first["lasterrorcode"]) == (
        "queued",
        1,
        "unreachable",
    )
    assert "connection refused" in first["lasterror"]
    data["outbox"]["max_age_hours"] = 0.0001  # 0.36 s: now the next retry would be too late
    conn = sqlite3.connect(settings.database)
    conn.execute("UPDATE outbox SET nextattempt = NULL WHERE id = ?", (outbox_id,))
    conn.commit()
    conn.close()
    await send_pass(parse_config(data))
    expired = row(settings, outbox_id)
    assert (expired["state"], expired["attempts"], expired["lasterrorcode"]) == (
        "failed",
        2,
        "send_expired",
    )
    assert "connection refused" in expired["lasterror"]


async def test_run_once_beside_a_running_daemon_leaves_the_daemons_attempt_alone(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """``run --once`` (after ``reply``, say) while the daemon is sending: a row the daemon has
    marked ``sending`` is its attempt in flight, not one a crash left behind. Resolving it as
    after a crash sent it a second time (and the daemon then recorded it sent as well)."""
    from datetime import UTC, datetime

    from mailbridge.daemon.outbox import Watch

    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings,
        OutgoingRequest(account="support", conversation_id=conversation, body_text="Hello"),
    )
    repo = await open_repository(settings.database, settings)
    try:
        daemon = OutboxWorker(settings, repo)
        [due] = await repo.outbox_due(["support"], datetime.now(UTC), 10)
        prepared = await daemon._prepare(settings.accounts[0], due)
        began = await repo.outbox_begin([(outbox_id, prepared.fix)], datetime.now(UTC))
        assert began == {outbox_id}  # the daemon is now between MAIL FROM and DATA's reply
        watch = Watch(settings)  # the daemon's wake socket
        watch.open()
        try:
            await OutboxWorker(settings, repo).run_once()
        finally:
            watch.close()
    finally:
        await repo.aclose()
    assert sink.received == []
    assert row(settings, outbox_id)["state"] == "sending"


async def test_a_missing_password_file_is_a_failed_attempt_not_a_row_stuck_sending(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """A secret that cannot be read (ConfigError, not a server's error) when the connection is
    opened: the row is retried later with the code, like any connection failure. It escaped
    the send loop instead, leaving the row ``sending`` (re-queued by the next round's recovery,
    begun again, forever, never expiring) and failing the other accounts' round."""
    data = offline_config(tmp_path, sink)
    data["accounts"][0]["auth"] = {"username": "support", "password_file": str(tmp_path / "gone")}
    settings = parse_config(data)
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings,
        OutgoingRequest(account="support", conversation_id=conversation, body_text="Hello"),
    )
    await send_pass(settings)
    found = row(settings, outbox_id)
    assert found["state"] == "queued"
    assert found["lasterrorcode"] == "secret_missing"
    assert found["nextattempt"] is not None
    assert sink.received == []


async def test_an_interrupted_attempt_is_stored_resolved_before_it_is_logged(
    tmp_path: Path, sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store, then log: whoever reads ``mailbridge outbox`` on seeing the
    ``outbox_interrupted_attempt`` line finds the row as the line reports it (queued again)."""
    from datetime import UTC, datetime

    from mailbridge.daemon import outbox as outbox_module

    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings,
        OutgoingRequest(account="support", conversation_id=conversation, body_text="Hello"),
    )
    seen: list[str] = []
    real_log = outbox_module.log

    class Probe:
        def __getattr__(self, level: str) -> Any:
            method = getattr(real_log, level)

            def emit(event: str, **kw: Any) -> Any:
                if event == "outbox_interrupted_attempt":
                    seen.append(row(settings, outbox_id)["state"])
                return method(event, **kw)

            return emit

    repo = await open_repository(settings.database, settings)
    try:
        worker = OutboxWorker(settings, repo)
        [due] = await repo.outbox_due(["support"], datetime.now(UTC), 10)
        prepared = await worker._prepare(settings.accounts[0], due)
        await repo.outbox_begin([(outbox_id, prepared.fix)], datetime.now(UTC))  # then kill -9
        monkeypatch.setattr(outbox_module, "log", Probe())
        await worker.recover()
    finally:
        await repo.aclose()
    assert seen == ["queued"]


@pytest.mark.parametrize("server_got_it", [False, True], ids=["before-end", "reply-lost"])
async def test_a_connection_cut_mid_data_is_retried_with_the_same_message_id(
    tmp_path: Path, sink: SmtpSink, server_got_it: bool
) -> None:
    """The SMTP connection is reset at the end of DATA (RFC 5321 4.1.1.4): either before the
    server saw the final "." (nothing was delivered) or after (the server took the message but
    its 250 never arrived). Both are a temporary failure of the attempt; the retry sends the very
    same bytes, so the customer gets the mail once — or, when the reply was lost, twice with one
    Message-ID (the documented at-least-once guarantee), never a different mail."""
    data = offline_config(tmp_path, sink)
    async with FaultProxy(sink.host, sink.port) as proxy:
        data["accounts"][0]["smtp"]["port"] = proxy.port
        settings = parse_config(data)
        conversation = seed_conversation(settings)
        outbox_id = queue(
            settings,
            OutgoingRequest(account="support", conversation_id=conversation, body_text="On it."),
        )
        fired = proxy.inject(Fault("cut", on_client=b"\r\n.\r\n", forward_trigger=server_got_it))
        await send_pass(settings)
        assert fired.is_set()
        first = row(settings, outbox_id)
        assert (first["state"], first["attempts"]) == ("queued", 1)
        assert first["lasterrorcode"] == "connection_lost"
        assert first["nextattempt"] is not None
        if server_got_it:
            await eventually_async(lambda: len(sink.received) == 1)
        else:
            assert sink.received == []

        deadline = time.monotonic() + 30
        while row(settings, outbox_id)["state"] != "sent":
            assert time.monotonic() < deadline, "not sent after the retry"
            await asyncio.sleep(0.2)
            await send_pass(settings)
    done = row(settings, outbox_id)
    assert done["attempts"] == 2
    assert done["messageid"] == first["messageid"]
    copies = [r.data for r in sink.received]
    assert len(copies) == (2 if server_got_it else 1)
    assert all(c == first["raw"] for c in copies)  # the bytes fixed before the first attempt


async def eventually_async(check: Any) -> None:
    """Poll ``check`` (something another thread changes, so no event to await) for up to 30 s."""
    for _ in range(600):
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail("condition not met within 30 s")


async def test_rows_left_sending_are_resolved_when_the_worker_starts_to_serve_their_account(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """With several daemons the worker serves the accounts this daemon holds a lease of
    (``only``): a row the previous holder left ``sending`` (it died mid-attempt) is resolved
    when the account is taken over, not only at start, and only then."""
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    outbox_id = queue(
        settings, OutgoingRequest(account="support", conversation_id=conversation, body_text="x")
    )
    conn = sqlite3.connect(settings.database)
    conn.execute("UPDATE outbox SET state = 'sending' WHERE id = ?", (outbox_id,))
    conn.commit()
    conn.close()
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo, only=frozenset())  # holds no lease yet
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(1.0)
        assert row(settings, outbox_id)["state"] == "sending"  # another daemon's, for all it knows
        worker.only = frozenset({"support"})  # the lease is taken over
        worker.wake()
        await eventually(lambda: len(sink.received) == 1, within=15, what="the row sent")
        await eventually(
            lambda: row(settings, outbox_id)["state"] == "sent", within=15, what="recorded"
        )
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()
    assert "the daemon stopped during this attempt" in row(settings, outbox_id)["lasterror"]


def test_the_sending_commands_refuse_what_could_never_be_sent(
    tmp_path: Path, sink: SmtpSink, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a command is given is checked when it is queued, not found out by the worker later:
    a body on stdin is kept beside --snippet, an unreadable --body-file is a clear error, an
    address that is none and --actions the worker would refuse are usage errors, and an
    account name that is not configured is the argument's fault (exit 1), not the config's."""
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    conversation = seed_conversation(settings)
    conn = sqlite3.connect(settings.database)
    conn.execute("INSERT INTO textsnippet (name, text) VALUES ('thanks', 'Thank you!')")
    conn.commit()
    conn.close()

    def rows_queued() -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(settings.database)
        try:
            return conn.execute("SELECT bodytext FROM outbox ORDER BY id").fetchall()
        finally:
            conn.close()

    monkeypatch.setattr("sys.stdin", io.StringIO("Body first.\n"))
    argv = ["-c", str(path), "reply", str(conversation), "--snippet", "thanks"]
    assert cli_main(argv) == 0
    assert rows_queued() == [("Body first.\n\nThank you!",)]
    capsys.readouterr()

    missing = tmp_path / "nonexistent.txt"
    reply = ["-c", str(path), "reply", str(conversation)]
    assert cli_main([*reply, "--body-file", str(missing)]) == 66
    assert f"cannot read --body-file {missing}: No such file" in capsys.readouterr().err
    body = tmp_path / "body.txt"
    body.write_text("Hello")
    assert cli_main([*reply, "--body-file", str(body), "--actions", "not json"]) == 64
    assert "actions is not JSON" in capsys.readouterr().err
    assert cli_main([*reply, "--body-file", str(body), "--actions", '["status"]']) == 64
    assert "must be a JSON object" in capsys.readouterr().err

    send = ["-c", str(path), "send", "support", "--subject", "Hi", "--body-file", str(body)]
    assert cli_main([*send, "--to", "not an address"]) == 64
    assert "not an email address: 'not an address'" in capsys.readouterr().err
    assert cli_main([*send, "--to", "ann@x.example", "--cc", "bob@"]) == 64
    assert "'bob@'" in capsys.readouterr().err
    assert len(rows_queued()) == 1  # nothing more was queued

    assert cli_main([*send[:3], "nosuch", *send[4:], "--to", "ann@x.example"]) == 1
    err = capsys.readouterr().err
    assert "no account named 'nosuch' (configured: support)" in err
    assert "config error" not in err
    assert cli_main(["-c", str(path), "discarded", "--account", "nosuch"]) == 1
    assert "no account named 'nosuch'" in capsys.readouterr().err


async def test_an_account_let_go_and_taken_again_within_one_round_is_recovered_again(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The lease of an account is lost and taken again (another daemon held it meanwhile and
    died mid-attempt) before the worker's loop looked at its served accounts in between (a
    long round for other accounts): the row that daemon left ``sending`` is still resolved."""
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    first = queue(
        settings, OutgoingRequest(account="support", conversation_id=conversation, body_text="1")
    )
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo, only=frozenset({"support"}))
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: row(settings, first)["state"] == "sent", 15, "the first row")
        # Meanwhile (as far as this worker's loop saw) the other daemon queued and began one.
        second = queue(
            settings,
            OutgoingRequest(account="support", conversation_id=conversation, body_text="2"),
        )
        conn = sqlite3.connect(settings.database)
        conn.execute("UPDATE outbox SET state = 'sending' WHERE id = ?", (second,))
        conn.commit()
        conn.close()
        await asyncio.sleep(1.0)  # the worker's loop has had its look and waits again
        assert row(settings, second)["state"] == "sending"
        worker.only = frozenset()  # the lease lost (the supervisor's on_lost) ...
        await worker.let_go("support", within=5)
        worker.only = frozenset({"support"})  # ... and taken again
        worker.wake()
        await eventually(lambda: row(settings, second)["state"] == "sent", 15, "resolved, sent")
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()
    assert len(sink.received) == 2


async def test_cancelled_while_the_next_chunk_begins_leaves_no_row_marked_sending(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The drain's last resort cancels the worker. Cancelled while it waits for the next
    chunk's transaction (on the database thread, which commits it anyway), the rows that
    transaction marks sending go back to queued: none is left for nobody to send."""
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    ids = [
        queue(settings, OutgoingRequest("support", conversation_id=conversation, body_text=f"{n}"))
        for n in range(3)
    ]
    repo = await open_repository(settings.database, settings)
    backend = await repo.backend()
    original = backend.outbox_begin
    gate = threading.Event()
    calls: list[object] = []

    def gated(rows: Any, now: Any) -> Any:
        calls.append(rows)
        if len(calls) == 2:  # the second chunk's transaction: slow
            gate.wait(30)
        return original(rows, now)

    backend.outbox_begin = gated  # type: ignore[method-assign]
    worker = OutboxWorker(settings, repo)
    try:
        task = asyncio.create_task(worker.send_due())
        await eventually(lambda: len(sink.received) == 1, 30, "the first row sent")
        await eventually(lambda: len(calls) == 2, 30, "the second chunk's transaction")
        task.cancel()
        await asyncio.sleep(0.2)
        gate.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await repo.outbox_due(["support"], datetime.now(UTC), 10)  # after the thread's queue
    finally:
        gate.set()
        await repo.aclose()
    assert [row(settings, i)["state"] for i in ids] == ["sent", "queued", "queued"]
    assert len(sink.received) == 1


async def test_a_reply_to_names_with_commas_reaches_them(tmp_path: Path, sink: SmtpSink) -> None:
    """Outlook writes "Doe, Jane" <jane@...>: written back into an address list unquoted,
    the comma made two entries of it and the reply failed with outbox_invalid ("not an
    address"). The sender, the followers (Cc) and an integrator's toaddresses all keep the
    name, quoted (RFC 5322 section 3.2.4)."""
    settings = parse_config(offline_config(tmp_path, sink))
    original = mail(
        "Order 1042",
        sender='"Doe, John" <john@customer.example>',
        to="support@example.test",
        Cc='"Roe, Jane (Sales)" <jane@x.example>',
    )
    conversation = seed_conversation(settings, original)
    reply = queue(
        settings,
        OutgoingRequest(account="support", conversation_id=conversation, body_text="On it."),
    )
    new = queue(
        settings,
        OutgoingRequest(
            account="support",
            to='"Poe, Ed" <ed@y.example>',
            subject="Hello",
            body_text="Hi.",
        ),
    )
    await send_pass(settings)
    assert row(settings, reply)["state"] == "sent", row(settings, reply)["lasterror"]
    assert row(settings, new)["state"] == "sent", row(settings, new)["lasterror"]
    by_subject = {parsed(m.data)["Subject"]: m for m in sink.received}
    answer = by_subject["Re: Order 1042"]
    assert set(answer.recipients) == {CUSTOMER, "jane@x.example"}
    headers = parsed(answer.data)
    assert [(a.display_name, a.addr_spec) for a in headers["To"].addresses] == [
        ("Doe, John", CUSTOMER)
    ]
    assert [(a.display_name, a.addr_spec) for a in headers["Cc"].addresses] == [
        ("Roe, Jane (Sales)", "jane@x.example")
    ]
    assert list(by_subject["Hello"].recipients) == ["ed@y.example"]
    assert parsed(by_subject["Hello"].data)["To"].addresses[0].display_name == "Poe, Ed"


async def test_sending_is_synced_before_mail_from_and_sent_is_recorded_without_an_fsync(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """README "The guarantee": `sending` is committed (synced) before MAIL FROM; `sent` is
    committed with synchronous=NORMAL (kept by a killed process, not by a power cut, after
    which the row is resolved as an attempt in flight), and FULL is back for what follows."""
    settings = parse_config(offline_config(tmp_path, sink))
    repo = AsyncRepository.sqlite(tmp_path / "mailbridge.db")
    statements: list[str] = []
    try:
        await repo.migrate()
        await repo.queue_outgoing(
            OutgoingRequest(
                account="support", to="jo@customer.example", subject="Hi", body_text="Hello"
            )
        )

        def trace(r: object) -> None:
            assert isinstance(r, SqliteRepository)
            r._conn.set_trace_callback(statements.append)

        await repo._run(trace)
        await OutboxWorker(settings, repo).run_once()
    finally:
        await repo.aclose()
    assert len(sink.received) == 1
    sending = next(i for i, q in enumerate(statements) if "SET state = 'sending'" in q)
    sent = next(i for i, q in enumerate(statements) if "SET state = 'sent'" in q)
    relaxed = max(i for i, q in enumerate(statements[:sent]) if q.startswith("PRAGMA synchronous"))
    assert statements[relaxed] == "PRAGMA synchronous=NORMAL"
    assert "PRAGMA synchronous=NORMAL" not in statements[:sending]  # `sending` synced
    after = statements[sent:]
    assert after.index("COMMIT") < after.index("PRAGMA synchronous=FULL")


def _new_rows(settings: Settings, count: int, conversation: int | None = None) -> list[int]:
    return [
        queue(
            settings,
            OutgoingRequest(
                "support",
                conversation_id=conversation,
                to="" if conversation else f"customer{n}@example.org",
                subject=None if conversation else f"Row {n}",
                body_text=f"Message {n}",
            ),
        )
        for n in range(count)
    ]


async def test_a_batch_goes_out_on_several_connections_each_row_once(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """smtp.connections (3 by default) connections send an account's batch at once; the
    replies in one conversation leave in the order queued, on one connection; the next
    round reuses the kept connections instead of signing in again."""
    settings = parse_config(offline_config(tmp_path, sink))
    conversation = seed_conversation(settings)
    replies = _new_rows(settings, 5, conversation)
    fresh = _new_rows(settings, 10)
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    try:
        summary = await worker.send_due()
        assert summary.sent == 15
        assert [row(settings, i)["state"] for i in replies + fresh] == ["sent"] * 15
        assert len(sink.received) == 15  # each once
        peers = {r.peer for r in sink.received}
        assert len(peers) == 3
        ids = [normalize_message_id(parsed(r.data)["Message-ID"]) for r in sink.received]
        by_id = {row(settings, i)["messageid"]: i for i in replies}
        ours = [(r.peer, by_id[m]) for r, m in zip(sink.received, ids, strict=True) if m in by_id]
        assert len({peer for peer, _i in ours}) == 1  # one connection for the conversation
        assert [i for _peer, i in ours] == replies  # in the order queued
        # The next batch: the three connections kept (RSET), no new sign-in.
        more = _new_rows(settings, 12)
        assert (await worker.send_due()).sent == 12
        assert {r.peer for r in sink.received[15:]} <= peers
        assert [row(settings, i)["state"] for i in more] == ["sent"] * 12
    finally:
        await worker._close_sessions()
        await repo.aclose()


async def test_a_single_row_goes_out_on_one_connection(tmp_path: Path, sink: SmtpSink) -> None:
    settings = parse_config(offline_config(tmp_path, sink))
    [only] = _new_rows(settings, 1)
    await send_pass(settings)
    assert row(settings, only)["state"] == "sent"
    assert len(sink.connections) == 1


async def test_connections_one_sends_on_one(tmp_path: Path, sink: SmtpSink) -> None:
    data = offline_config(tmp_path, sink)
    data["accounts"][0]["smtp"]["connections"] = 1
    settings = parse_config(data)
    ids = _new_rows(settings, 12)
    await send_pass(settings)
    assert [row(settings, i)["state"] for i in ids] == ["sent"] * 12
    assert len({r.peer for r in sink.received}) == 1


async def test_a_further_connection_the_server_refuses_hands_its_rows_back(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Exchange Online allows three connections per mailbox at once and answers a fourth
    "432 4.3.2 Concurrent connections limit exceeded". A further connection refused: its rows
    go back to queued, not failed, and are sent on the connections that worked; the account is
    then sent on that many for a while, with a warning naming the setting."""
    sink.max_connections = 1
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    ids = _new_rows(settings, 12)
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    try:
        with structlog.testing.capture_logs() as logs:
            first = await worker.send_due()
        assert sink.refused_connections >= 1
        assert (first.failed, first.retrying) == (0, 0)
        assert first.sent == len(sink.received) == 12  # those handed back: sent in the same pass
        assert [row(settings, i)["state"] for i in ids] == ["sent"] * 12
        assert len({r.peer for r in sink.received}) == 1
        # Capped: the next round opens no further connection.
        refused = sink.refused_connections
        assert (await worker.send_due()).sent == 0
        _new_rows(settings, 8)
        assert (await worker.send_due()).sent == 8
        assert sink.refused_connections == refused
    finally:
        await worker._close_sessions()
        await repo.aclose()
    [warning, *_more] = [e for e in logs if e["event"] == "outbox_connection_refused"]
    assert "432 4.3.2" in warning["error"]
    assert "smtp.connections" in warning["remedy"]
    assert worker._lane_cap["support"][0] == 1  # the connections that worked


async def test_the_first_connection_failing_holds_the_other_lanes_rows(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The server down: one row records the failed attempt (a retry later), the others go
    back to queued untried; no further connection is tried, and no cap is set."""
    data = offline_config(tmp_path, sink)
    data["accounts"][0]["smtp"]["port"] = free_port()  # nothing listens there
    settings = parse_config(data)
    ids = _new_rows(settings, 12)
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    try:
        summary = await worker.send_due()
    finally:
        await repo.aclose()
    assert (summary.retrying, summary.sent) == (1, 0)
    states = [row(settings, i) for i in ids]
    assert [r["state"] for r in states] == ["queued"] * 12
    assert sum(1 for r in states if r["lasterrorcode"] == "unreachable") == 1
    assert worker._lane_cap == {}


def test_kill_9_with_a_message_on_each_connection_resends_those_and_sends_the_rest_once(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Three connections at once, each with a message whose 250 the server holds, the next
    chunks already marked sending: kill -9. The restart resends the three with their
    Message-IDs and bytes, sends every other row once, and stores each row's message once."""
    data = offline_config(tmp_path, sink)
    settings = parse_config(data)
    path = write_config(tmp_path, data)
    ids = _new_rows(settings, 12)
    _kill_9_when(
        path, sink, lambda: len(sink.received) >= 3, "a message in DATA on three connections"
    )
    assert len(sink.received) == 3
    held = {r.data for r in sink.received}
    assert len({r.peer for r in sink.received}) == 3
    assert [row(settings, i)["state"] for i in ids].count("sent") == 0  # none recorded
    asyncio.run(send_pass(settings))  # the restart: `run --once` does the same recovery
    assert [row(settings, i)["state"] for i in ids] == ["sent"] * 12
    by_id: dict[str, list[bytes]] = {}
    for received in sink.received:
        message_id = normalize_message_id(parsed(received.data)["Message-ID"]) or ""
        by_id.setdefault(message_id, []).append(received.data)
    assert set(by_id) == {row(settings, i)["messageid"] for i in ids}  # every row delivered
    twice = {m for m, copies in by_id.items() if len(copies) == 2}
    assert {by_id[m][0] for m in twice} == held  # the three held: sent again, same bytes
    assert all(len(set(by_id[m])) == 1 for m in twice)
    assert all(len(copies) == 1 for m, copies in by_id.items() if m not in twice)
    with sqlite3.connect(settings.database) as conn:
        [count] = conn.execute(
            "SELECT COUNT(*) FROM conversationmessage WHERE direction = 'outgoing'"
        ).fetchone()
    assert count == 12  # stored once each


async def _one_pass(settings: Settings) -> tuple[OutboxWorker, Any, list[dict[str, Any]]]:
    """One send_due pass of a new worker, with the log events it wrote; its kept connections
    closed after."""
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    try:
        with structlog.testing.capture_logs() as logs:
            summary = await worker.send_due()
    finally:
        await worker._close_sessions()
        await repo.aclose()
    return worker, summary, logs


async def test_a_limit_said_at_mail_from_hands_the_rows_back(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """Exchange Online may accept the connection and refuse the submission ("432 4.3.2" to
    MAIL FROM or DATA): on a further connection that is the limit too, not the row's fault.
    The rows go out on the connection that works, none counted as failed."""
    sink.max_connections = 1
    sink.limit_at = "mail"
    settings = parse_config(offline_config(tmp_path, sink))
    ids = _new_rows(settings, 12)
    worker, summary, logs = await _one_pass(settings)
    assert sink.refused_connections >= 1
    assert (summary.sent, summary.failed, summary.retrying) == (12, 0, 0)
    assert [row(settings, i)["state"] for i in ids] == ["sent"] * 12
    assert len(sink.received) == 12  # each once
    assert worker._lane_cap["support"][0] == 1
    assert any(e["event"] == "outbox_connection_refused" for e in logs)


async def test_the_first_connection_of_a_round_need_not_be_the_first_lanes(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The first lane's rows all invalid (it never connects) and the server down: the next
    lane's failure is the round's first connection failing (a failed attempt, the account
    paused), not a further connection refused (no cap, no warning naming smtp.connections)."""
    data = offline_config(tmp_path, sink)
    data["accounts"][0]["smtp"]["port"] = free_port()  # nothing listens there
    settings = parse_config(data)
    recipients = ["not an address" if n % 2 == 0 else f"c{n}@example.org" for n in range(8)]
    ids = [
        queue(settings, OutgoingRequest("support", to=to, subject="Row", body_text="x"))
        for to in recipients
    ]
    worker, summary, logs = await _one_pass(settings)
    assert (summary.failed, summary.retrying, summary.sent) == (4, 1, 0)
    assert [row(settings, i)["state"] for i in ids[0::2]] == ["failed"] * 4
    assert [row(settings, i)["state"] for i in ids[1::2]] == ["queued"] * 4
    assert worker._lane_cap == {}
    assert worker._is_paused("support")
    assert not any(e["event"] == "outbox_connection_refused" for e in logs)


async def test_a_lease_lost_while_the_connections_open_sends_nothing_more(
    tmp_path: Path, sink: SmtpSink
) -> None:
    """The account let go of (its lease lost, or the daemon stopping) while its connections
    are still signing in: once let_go returns nothing more is sent by this daemon, and every
    row is queued again for the next holder."""
    sink.greeting_delay = 0.6
    data = offline_config(tmp_path, sink)
    data["accounts"][0]["smtp"]["connections"] = 2
    settings = parse_config(data)
    ids = _new_rows(settings, 8)
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo, only=frozenset({"support"}))
    try:
        sending = asyncio.create_task(worker.send_due())
        await asyncio.sleep(0.3)  # the first connection is being greeted
        worker.only = frozenset()
        await worker.let_go("support", within=30)
        received = len(sink.received)
        await asyncio.wait_for(sending, 30)
        assert len(sink.received) == received == 0  # nothing sent, then or after
    finally:
        await worker._close_sessions()
        await repo.aclose()
    assert [row(settings, i)["state"] for i in ids] == ["queued"] * 8
