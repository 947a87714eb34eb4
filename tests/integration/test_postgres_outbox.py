"""Sending with ``database: postgresql://...``: a real PostgreSQL (throwaway cluster) and a real
SMTP server (aiosmtpd on loopback).

A row an integrator INSERTs with plain SQL is sent by a running ``mailbridge run`` within
seconds, woken by the outbox trigger's NOTIFY (migration 9) on its LISTENing session; ``reply``,
``send``, ``outbox``, ``outbox retry|cancel`` and ``snippets`` work against PostgreSQL; of two
daemons claiming the same rows at once, exactly one begins each.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from mailbridge.cli import main as cli_main
from mailbridge.config import PostgresUrl, parse_config
from mailbridge.daemon.outbox import OutboxWorker
from mailbridge.store.factory import open_repository
from mailbridge.store.outbox import OutgoingRequest
from mailbridge.store.postgres import LISTENER_NAME, OutboxListener, PostgresRepository
from mailbridge.testing.smtpsink import SmtpSink
from tests.conftest import PostgresDatabase
from tests.integration.test_import_loop import eventually, write_config
from tests.integration.test_outbox import offline_config, seed_conversation, send_pass
from tests.integration.test_outbox import sink as sink  # the SMTP sink fixture, shared

pytestmark = pytest.mark.postgres

CUSTOMER = "john@customer.example"


def pg_config(tmp_path: Path, db: PostgresDatabase, sink: SmtpSink) -> dict[str, Any]:
    secret = tmp_path / "db.pw"
    secret.write_text(db.password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    data = offline_config(tmp_path, sink)
    data.update(database=db.url, database_password_file=str(secret))
    return data


def repository(db: PostgresDatabase) -> PostgresRepository:
    repo = PostgresRepository(db.url, password=db.password)
    repo.migrate()
    return repo


def execute(db: PostgresDatabase, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """One statement on its own connection, as an integrator would run it."""
    conninfo = make_conninfo("", **PostgresUrl.parse(db.url).connection_parameters())
    with psycopg.connect(conninfo, password=db.password, autocommit=True) as conn:
        cursor = conn.execute(sql.replace("?", "%s").encode(), params)
        return cursor.fetchall() if cursor.description else []


def state(db: PostgresDatabase, outbox_id: int) -> str:
    [(found,)] = execute(db, "SELECT state FROM outbox WHERE id = ?", outbox_id)
    return str(found)


def wait_for(check: Any, within: float, what: str) -> None:
    """Poll (a loaded machine: the bound is generous; correctness is what is tested)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.05)


def test_the_outbox_trigger_notifies_a_listener_of_a_plain_insert(
    postgres_database: PostgresDatabase,
) -> None:
    repo = repository(postgres_database)
    url = PostgresUrl.parse(postgres_database.url)
    listener = OutboxListener(url, postgres_database.password)
    try:
        assert repo.outbox_watchers() == 1  # what `reply` asks: does a daemon listen?
        assert not listener.drain()
        execute(
            postgres_database,
            "INSERT INTO outbox (account, toaddresses, subject, bodytext) VALUES (?, ?, ?, ?)",
            "support",
            CUSTOMER,
            "Hello",
            "From the CRM",
        )
        wait_for(listener.drain, 15, "the NOTIFY of a plain INSERT")
        # Rows that are not (or no longer) queued wake no one: the worker's own writes.
        execute(postgres_database, "UPDATE outbox SET state = 'cancelled'")
        execute(postgres_database, "UPDATE outbox SET subject = 'changed'")
        time.sleep(0.2)
        assert not listener.drain()
        execute(postgres_database, "UPDATE outbox SET state = 'queued'")  # a retry
        wait_for(listener.drain, 15, "the NOTIFY of a retry")
    finally:
        listener.close()
        repo.close()
    repo = repository(postgres_database)
    try:
        assert repo.outbox_watchers() == 0
    finally:
        repo.close()


def test_a_row_inserted_into_postgresql_is_sent_by_the_running_daemon(
    tmp_path: Path, postgres_database: PostgresDatabase, sink: SmtpSink
) -> None:
    data = pg_config(tmp_path, postgres_database, sink)
    path = write_config(tmp_path, data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(path), "--log-format", "json", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    logged = b""

    def log_has(what: bytes) -> bool:
        nonlocal logged
        assert proc.poll() is None, logged.decode(errors="replace")
        logged += proc.stderr.read() or b""  # type: ignore[union-attr]
        return what in logged

    repo = repository(postgres_database)
    try:
        wait_for(lambda: log_has(b"daemon_started"), 60, "the daemon started")
        # Its outbox worker LISTENs (so the 60 s sleep below is never waited out).
        wait_for(lambda: repo.outbox_watchers() == 1, 30, "the daemon LISTENs")
        [(outbox_id,)] = execute(
            postgres_database,
            "INSERT INTO outbox (account, toaddresses, subject, bodytext) VALUES (?, ?, ?, ?)"
            " RETURNING id",
            "support",
            CUSTOMER,
            "Your order",
            "Inserted by the CRM",
        )
        wait_for(lambda: len(sink.received) == 1, 20, "the row sent")
        wait_for(lambda: state(postgres_database, outbox_id) == "sent", 20, "the row recorded")
        [received] = sink.received
        assert received.recipients == (CUSTOMER,)
        assert b"Inserted by the CRM" in received.data
        # Recorded as an outgoing message of a new conversation in PostgreSQL.
        [conversation] = repo.conversations()
        found = repo.conversation(conversation.id)
        assert found is not None
        assert [m.subject for m in found.messages] == ["Your order"]
        assert not log_has(b"outbox_listen_unavailable")
        proc.send_signal(signal.SIGTERM)
        os.set_blocking(proc.stderr.fileno(), True)
        proc.communicate(timeout=60)
    finally:
        repo.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0


async def test_the_worker_listens_again_after_losing_its_session(
    tmp_path: Path, postgres_database: PostgresDatabase, sink: SmtpSink
) -> None:
    """The server ends the LISTENing session (a restart, a fail-over, an administrator): rows
    are still sent, and the worker LISTENs again."""
    settings = parse_config(pg_config(tmp_path, postgres_database, sink))
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: _watchers(postgres_database) == 1, 30, "the worker LISTENs")
        execute(
            postgres_database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?",
            LISTENER_NAME,
        )
        await eventually(lambda: _watchers(postgres_database) == 0, 30, "the session ended")
        execute(
            postgres_database,
            "INSERT INTO outbox (account, toaddresses, subject, bodytext) VALUES (?, ?, ?, ?)",
            *("support", CUSTOMER, "Still there?", "Sent without a NOTIFY"),
        )
        await eventually(lambda: len(sink.received) == 1, 30, "the row sent")
        await eventually(lambda: _watchers(postgres_database) == 1, 30, "LISTENing again")
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()
    assert _watchers(postgres_database) == 0  # the stop closed the session


def _watchers(db: PostgresDatabase) -> int:
    [(count,)] = execute(
        db,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = ? AND application_name = ?",
        db.name,
        LISTENER_NAME,
    )
    return int(count)


def test_sending_commands_work_on_postgresql(
    tmp_path: Path,
    postgres_database: PostgresDatabase,
    sink: SmtpSink,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = pg_config(tmp_path, postgres_database, sink)
    settings = parse_config(data)
    path = str(write_config(tmp_path, data))
    conversation = seed_conversation(settings)
    execute(
        postgres_database,
        "INSERT INTO textsnippet (name, text, description, pinned)"
        " VALUES (?, ?, ?, ?), (?, ?, ?, ?)",
        *("thanks", "Thank you for your patience.", "closing", 1),
        *("apology", "Sorry for the wait.", "delay", 0),
    )
    assert cli_main(["-c", path, "snippets", "--search", "WAIT"]) == 0
    listed = capsys.readouterr().out
    assert "apology" in listed
    assert "thanks" not in listed
    body = tmp_path / "body.txt"
    body.write_text("We are on it.", encoding="utf-8")
    reply = ["-c", path, "reply", str(conversation), "--body-file", str(body)]
    assert (
        cli_main([*reply, "--coworker", "Ann Agent", "--coworker-address", "ann@example.test"]) == 0
    )
    captured = capsys.readouterr()
    assert "queued a reply" in captured.out
    assert "no daemon is running" in captured.err  # no daemon LISTENs on this database
    assert cli_main(["-c", path, "reply", str(conversation), "--snippet", "thanks"]) == 0
    send = ["-c", path, "send", "support", "--to", "Jane <jane@new.example>", "--subject", "Hi"]
    assert cli_main([*send, "--body-file", str(body)]) == 0
    assert cli_main(["-c", path, "outbox"]) == 0
    assert "3 outbox row(s)" in capsys.readouterr().out

    asyncio.run(send_pass(settings))
    assert len(sink.received) == 3
    assert [state(postgres_database, i) for i in (1, 2, 3)] == ["sent"] * 3
    repo = repository(postgres_database)
    try:
        found = repo.conversation(conversation)
        assert found is not None
        assert len(found.messages) == 3  # the customer's and our two replies
        # The sending coworker follows the conversation and is the reply's 'from' (inactive
        # again since the next reply, sent without a coworker, left her out).
        assert ("ann@example.test", "Ann Agent", False) in found.followers
        assert ("ann@example.test", "from") in found.messages[1].followers
        [snippet] = [s for s in repo.snippets() if s.name == "thanks"]
        assert snippet.count == 1
        assert len(repo.conversations()) == 2  # `send` started a new one
    finally:
        repo.close()
    assert b"Thank you for your patience." in sink.received[1].data

    # A refused reply: failed with the server's words; cancel, retry, sent.
    sink.replies.append("550 5.1.1 <john@customer.example>: Recipient address rejected")
    assert cli_main(reply) == 0
    asyncio.run(send_pass(settings))
    assert state(postgres_database, 4) == "failed"
    capsys.readouterr()
    assert cli_main(["-c", path, "outbox", "--failed"]) == 0
    out = capsys.readouterr().out
    assert "message_rejected" in out
    assert "Recipient address rejected" in out
    assert cli_main(["-c", path, "status", "--json"]) == 0
    [account] = json.loads(capsys.readouterr().out)["accounts"]
    assert account["outbox"] == {"failed": 1}
    assert cli_main(["-c", path, "outbox", "cancel", "4"]) == 0
    assert state(postgres_database, 4) == "cancelled"
    assert cli_main(["-c", path, "outbox", "retry", "4"]) == 0
    assert state(postgres_database, 4) == "queued"
    asyncio.run(send_pass(settings))
    assert state(postgres_database, 4) == "sent"
    assert cli_main(["-c", path, "outbox", "cancel", "4"]) == 1  # sent: too late
    assert "is sent" in capsys.readouterr().err


def test_two_daemons_claiming_the_same_rows_begin_each_once(
    postgres_database: PostgresDatabase,
) -> None:
    first, second = repository(postgres_database), repository(postgres_database)
    try:
        ids = [
            first.queue_outgoing(OutgoingRequest(account="support", to=CUSTOMER, body_text=str(n)))
            for n in range(40)
        ]
        began: list[set[int]] = [set(), set()]
        start = threading.Barrier(2)

        def claim(index: int, repo: PostgresRepository) -> None:
            start.wait()
            for n in range(0, len(ids), 5):  # chunks, as the worker claims them
                began[index] |= repo.outbox_begin([(i, None) for i in ids[n : n + 5]], _now())

        threads = [
            threading.Thread(target=claim, args=(i, repo)) for i, repo in enumerate((first, second))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not began[0] & began[1]
        assert began[0] | began[1] == set(ids)
        assert {row.attempts for row in first.outbox(states=["sending"], limit=100)} == {1}
    finally:
        first.close()
        second.close()


def test_run_once_beside_a_daemon_resolves_rows_of_accounts_no_daemon_holds(
    tmp_path: Path,
    postgres_database: PostgresDatabase,
    sink: SmtpSink,
) -> None:
    """A daemon LISTENs on the database but holds no lease for `support` (it serves other
    accounts, or none yet): a row of `support` left `sending` by a process that died is no
    daemon's attempt in flight, so `run --once` resolves and sends it. Once a daemon holds the
    account's lease, its rows in `sending` are left to that daemon."""
    settings = parse_config(pg_config(tmp_path, postgres_database, sink))
    repo = repository(postgres_database)
    url = PostgresUrl.parse(postgres_database.url)
    daemon = OutboxListener(url, postgres_database.password)  # a daemon's LISTENing session
    try:
        assert repo.outbox_watchers() == 1
        left = repo.queue_outgoing(OutgoingRequest(account="support", to=CUSTOMER, body_text="1"))
        assert repo.outbox_begin([(left, None)], _now()) == {left}  # then the process died
        asyncio.run(send_pass(settings))  # what `run --once` does for the outbox
        assert state(postgres_database, left) == "sent"
        assert len(sink.received) == 1

        assert repo.claim_leases("other-host:1:x", ["support"], 60, 10) == {"support": 1}
        held = repo.queue_outgoing(OutgoingRequest(account="support", to=CUSTOMER, body_text="2"))
        assert repo.outbox_begin([(held, None)], _now()) == {held}  # the holder's, in flight
        asyncio.run(send_pass(settings))
        assert state(postgres_database, held) == "sending"
        assert len(sink.received) == 1
    finally:
        daemon.close()
        repo.close()


def _now() -> datetime:
    return datetime.now(UTC)


def _in_sending(db: PostgresDatabase) -> int:
    [(count,)] = execute(db, "SELECT COUNT(*) FROM outbox WHERE state = 'sending'")
    return int(count)


async def test_a_lost_lease_settles_the_rows_in_hand_before_another_daemon_takes_them(
    tmp_path: Path, postgres_database: PostgresDatabase, sink: SmtpSink
) -> None:
    """Daemon A loses the account's lease (rebalancing to a daemon that just started, renewals
    too slow) while sending a batch: one row in DATA, the next chunk already marked sending.
    Daemon B, taking the lease, resolves the rows it finds left ``sending`` and sends them
    again - so A, before the lease is given up (the supervisor's on_lost awaits let_go), must
    finish the row on the wire, record it, and put the rows it has not attempted back to
    queued. Each row is delivered exactly once."""
    settings = parse_config(pg_config(tmp_path, postgres_database, sink))
    setup = repository(postgres_database)
    try:
        ids = [
            setup.queue_outgoing(
                OutgoingRequest(account="support", to=CUSTOMER, body_text=f"row {n}")
            )
            for n in range(7)
        ]
    finally:
        setup.close()
    repo_a = await open_repository(settings.database, settings)
    first = OutboxWorker(settings, repo_a, only=frozenset({"support"}))
    sink.hold()
    task = asyncio.create_task(first.run())
    try:
        await eventually(sink.holding.is_set, 30, "A's first row in DATA")
        await eventually(lambda: _in_sending(postgres_database) >= 3, 30, "A's next chunk begun")
        # The supervisor's on_lost: the account is no longer A's, its rows in hand settled.
        first.only = frozenset()
        settling = asyncio.create_task(first.let_go("support", within=60))
        await asyncio.sleep(0)
        assert not settling.done()  # the row on the wire is not settled yet
        sink.release()
        await asyncio.wait_for(settling, 90)
        assert _in_sending(postgres_database) == 0
        # The rows on the wire (one per connection of A's) were finished and recorded sent;
        # the others are back to queued.
        states = [state(postgres_database, i) for i in ids]
        assert len(sink.received) == states.count("sent") >= 1
        assert states.count("queued") == 7 - len(sink.received)
        # B holds the lease now: it resolves what it finds left sending, then sends.
        repo_b = await open_repository(settings.database, settings)
        try:
            second = OutboxWorker(settings, repo_b, only=frozenset({"support"}))
            await second.recover()
            await second.run_once()
        finally:
            await repo_b.aclose()
    finally:
        sink.release()
        first.stopping.set()
        await asyncio.wait_for(task, 60)
        await repo_a.aclose()
    bodies = sorted(r.data.split(b"\r\n\r\n", 1)[1].strip() for r in sink.received)
    assert bodies == sorted(b"row %d" % n for n in range(7))  # each row once
    assert [state(postgres_database, i) for i in ids] == ["sent"] * 7
