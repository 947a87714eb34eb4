"""Fault tests: the daemon loop (``AccountWorker.run``) against real Dovecot and real SQLite while
the network, the server, the database or the disk misbehave.

The network faults go through :class:`~mailbridge.testing.faultproxy.FaultProxy`, which sits
between mailbridge and Dovecot. Every test checks the same three promises:

* no loss, no duplicate: every message is in the database exactly once and on the server exactly
  once, in Processed (the Inbox is empty);
* the loop recovered by itself: nobody restarted the worker, it is back to ``idle``;
* the fault was logged with its catalogue code (``account_backoff`` with ``code``).

Sending under a connection cut mid-DATA is tested beside the other outbox guarantees, in
``test_outbox.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
import secrets
import sqlite3
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailbridge.config import Settings, parse_config
from mailbridge.daemon.account import AccountWorker
from mailbridge.daemon.supervisor import run_once
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.sqlite import SqliteRepository
from mailbridge.testing.dovecot import Dovecot
from mailbridge.testing.faultproxy import Fault, FaultProxy
from tests.integration.test_import_loop import eventually as _eventually

# Recovering from a fault includes a backoff: a longer bound than the import tests use.
eventually = functools.partial(_eventually, within=30.0)

pytestmark = pytest.mark.dovecot

PROCESSED = "Mailbridge Processed"
FAILED = "Mailbridge Failed"
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)


# -- helpers ---------------------------------------------------------------------------------


def make_mail(address: str, number: int, size: int = 20_000) -> bytes:
    """A plain message of about ``size`` bytes with a unique Message-ID."""
    msg = EmailMessage()
    msg["From"] = f"Customer {number} <c{number}@customer.example>"
    msg["To"] = address
    msg["Subject"] = f"Fault test {number}"
    msg["Date"] = "Mon, 23 Nov 2026 09:00:00 +0000"
    msg["Message-ID"] = make_msgid(idstring=f"n{number}", domain="customer.example")
    line = f"Line of message {number}: " + secrets.token_hex(24) + "\n"
    msg.set_content(line * max(1, size // len(line)))
    return msg.as_bytes()


def message_ids(raws: list[bytes]) -> list[str]:
    ids = []
    for raw in raws:
        match = _MESSAGE_ID.search(raw)
        assert match is not None
        ids.append(match.group(1).decode())
    return ids


def settings_for(
    tmp_path: Path,
    user: Any,
    host: str,
    port: int,
    *,
    database: Path | None = None,
    timeout: float = 3.0,
    batch: int = 10,
) -> Settings:
    return parse_config(
        {
            "database": str(database or tmp_path / "mailbridge.db"),
            "limits": {"fetch_batch_size": batch},
            "accounts": [
                {
                    "name": "support",
                    "address": user.address,
                    "imap": {"host": host, "port": port, "tls": "none", "timeout_seconds": timeout},
                    "auth": {"username": user.login, "password": user.password},
                    "mode": "idle",
                }
            ],
        }
    )


def db_ids(settings: Settings) -> list[str]:
    conn = sqlite3.connect(settings.database)
    try:
        return [row[0] for row in conn.execute("SELECT messageid FROM conversationmessage")]
    finally:
        conn.close()


class Running:
    """A worker running its daemon loop, as the supervisor runs it."""

    def __init__(self, settings: Settings, repo: AsyncRepository) -> None:
        self.settings = settings
        self.repo = repo
        self.worker = AccountWorker(settings, settings.accounts[0], repo)
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        self.worker.stopping.set()
        await asyncio.wait_for(self.task, timeout=20)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, repo: AsyncRepository | None = None
) -> AsyncIterator[Running]:
    if repo is None:
        repo = AsyncRepository.sqlite(settings.database)
        await repo.migrate()
    run = Running(settings, repo)
    try:
        yield run
    finally:
        try:
            await run.stop()
        finally:
            await repo.aclose()


async def all_imported(
    run: Running, dovecot: Dovecot, user: Any, ids: list[str], within: float = 30.0
) -> None:
    """Wait until every message is stored and the Inbox is empty, then the worker idles."""

    def done() -> bool:
        # The database first: it is cheap, and the server is asked only once it is complete.
        if len(set(db_ids(run.settings)) & set(ids)) != len(ids):
            return False
        return not dovecot.folder_uids(user.login, user.password, "INBOX")

    await eventually(done, within=within, what="every message imported and moved")
    await eventually(lambda: run.worker.state.state == "idle", what="worker back to idle")
    assert not run.task.done(), "the loop recovered by itself, without a restart"


def assert_exactly_once(settings: Settings, dovecot: Dovecot, user: Any, ids: list[str]) -> None:
    stored = Counter(db_ids(settings))
    assert sorted(stored) == sorted(ids), "every message in the database"
    assert all(n == 1 for n in stored.values()), f"duplicated in the database: {stored}"
    on_server = Counter(
        message_ids(dovecot.folder_messages(user.login, user.password, PROCESSED))
        + message_ids(dovecot.folder_messages(user.login, user.password, FAILED))
    )
    assert sorted(on_server) == sorted(ids), "every message on the server, Processed or Failed"
    assert all(n == 1 for n in on_server.values()), f"duplicated on the server: {on_server}"
    assert dovecot.folder_uids(user.login, user.password, "INBOX") == []


def backoff_codes(logs: list[dict[str, Any]]) -> list[str]:
    return [e["code"] for e in logs if e["event"] == "account_backoff"]


def load(dovecot: Dovecot, user: Any, count: int, size: int = 20_000) -> list[str]:
    raws = [make_mail(user.address, n, size) for n in range(count)]
    dovecot.append_many(user.login, user.password, raws)
    return message_ids(raws)


@pytest.fixture
async def proxy(dovecot: Dovecot) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(dovecot.host, dovecot.port) as running_proxy:
        yield running_proxy


# -- network faults through the proxy ----------------------------------------------------------


async def test_connection_cut_mid_fetch(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any, proxy: FaultProxy
) -> None:
    """Cut 50 kB into a FETCH response (inside a message literal)."""
    ids = load(dovecot, imap_user, 30)
    fired = proxy.inject(Fault("cut", on_client=b"UID FETCH", after_server_bytes=50_000))
    settings = settings_for(tmp_path, imap_user, proxy.host, proxy.port)
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as run:
            await asyncio.wait_for(fired.wait(), 20)
            await all_imported(run, dovecot, imap_user, ids)
    assert "connection_lost" in backoff_codes(logs)
    assert_exactly_once(settings, dovecot, imap_user, ids)


@pytest.mark.parametrize("forward", [True, False], ids=["server-moved-answer-lost", "command-lost"])
async def test_connection_cut_mid_move(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any, proxy: FaultProxy, forward: bool
) -> None:
    """Cut after the batch is committed: with the MOVE done by the server but its answer lost,
    or with the MOVE lost on the way (the batch is found again and recognised as duplicates)."""
    ids = load(dovecot, imap_user, 30)
    fired = proxy.inject(Fault("cut", on_client=b"UID MOVE", forward_trigger=forward))
    settings = settings_for(tmp_path, imap_user, proxy.host, proxy.port)
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as run:
            await asyncio.wait_for(fired.wait(), 20)
            await all_imported(run, dovecot, imap_user, ids)
    assert "connection_lost" in backoff_codes(logs)
    duplicates = [e for e in logs if e["event"] == "message_duplicate"]
    if not forward:
        assert len(duplicates) == 10, "the committed batch was recognised, not imported again"
    assert_exactly_once(settings, dovecot, imap_user, ids)


async def test_connection_cut_mid_idle(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any, proxy: FaultProxy
) -> None:
    """The connection dies while IDLE waits; mail that arrives meanwhile is still imported."""
    fired = proxy.inject(Fault("cut", on_client=b"IDLE", delay=0.5))
    settings = settings_for(tmp_path, imap_user, proxy.host, proxy.port)
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as run:
            await asyncio.wait_for(fired.wait(), 20)
            ids = await asyncio.to_thread(load, dovecot, imap_user, 5)
            await all_imported(run, dovecot, imap_user, ids)
    assert backoff_codes(logs) == ["connection_lost"]
    assert any("IDLE" in e.get("error", "") for e in logs if e["event"] == "account_backoff")
    assert_exactly_once(settings, dovecot, imap_user, ids)


async def test_stalled_read_times_out_and_recovers(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any, proxy: FaultProxy
) -> None:
    """The server goes silent 20 kB into a FETCH; the inactivity timeout notices."""
    ids = load(dovecot, imap_user, 20)
    fired = proxy.inject(Fault("stall", on_client=b"UID FETCH", after_server_bytes=20_000))
    settings = settings_for(tmp_path, imap_user, proxy.host, proxy.port, timeout=1.5)
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as run:
            await asyncio.wait_for(fired.wait(), 20)
            await all_imported(run, dovecot, imap_user, ids)
    assert "timeout" in backoff_codes(logs)
    assert_exactly_once(settings, dovecot, imap_user, ids)


# -- the server, the database and the disk ----------------------------------------------------


def damage(dovecot: Dovecot, user: Any, message_id: str) -> None:
    """Truncate the maildir file of one message: Dovecot then drops the session whenever a FETCH
    reads its body ("Cached message size larger than expected"), as with a damaged mail file."""
    mail_dir = Path(dovecot.mail_root) / user.login
    for path in [*mail_dir.glob("new/*"), *mail_dir.glob("cur/*")]:
        if f"<{message_id}>".encode() in path.read_bytes():
            with path.open("r+b") as handle:
                handle.truncate(200)
            return
    raise AssertionError(f"no mail file holds {message_id}")


async def test_a_message_the_server_cannot_send_stops_only_itself(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any
) -> None:
    """One damaged message in a batch breaks every FETCH that includes it. The batch's other
    messages are imported (each fetched alone once), and the damaged one goes to Failed unread
    (message_unreadable) after breaking the connection three times on its own."""
    ids = load(dovecot, imap_user, 12)
    victim = ids[2]
    damage(dovecot, imap_user, victim)
    settings = settings_for(tmp_path, imap_user, dovecot.host, dovecot.port)
    others = [i for i in ids if i != victim]
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as run:

            def done() -> bool:
                if set(db_ids(settings)) != set(others):
                    return False
                return not dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX")

            await eventually(done, within=90.0, what="the others imported, the Inbox empty")
            await eventually(lambda: run.worker.state.state == "idle", what="back to idle")
    assert backoff_codes(logs).count("connection_lost") >= 4
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)) == 1
    conn = sqlite3.connect(settings.database)
    try:
        [(code, reason, size)] = conn.execute(
            "SELECT code, reason, size FROM importfailure WHERE resolved IS NULL"
        ).fetchall()
    finally:
        conn.close()
    assert code == "message_unreadable"
    assert "broke the connection" in reason
    assert size > 0
    [failed] = [e for e in logs if e["event"] == "message_failed"]
    assert failed["code"] == "message_unreadable"


async def test_run_once_gets_past_a_message_the_server_cannot_send(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any
) -> None:
    """``run --once`` retries a broken FETCH at once, its messages alone, instead of failing
    the whole pass: one pass imports the others and fails the damaged message."""
    ids = load(dovecot, imap_user, 4)
    damage(dovecot, imap_user, ids[1])
    settings = settings_for(tmp_path, imap_user, dovecot.host, dovecot.port, batch=50)
    with structlog.testing.capture_logs() as logs:
        [result] = await run_once(settings)
    assert result.error is None, result.error
    # A batch committed while the next FETCH broke the connection is moved by the next pass, as
    # a duplicate: stored once all the same.
    summary = result.summary
    assert (summary.imported + summary.duplicates, summary.failed) == (3, 1)
    assert sorted(db_ids(settings)) == sorted(ids[:1] + ids[2:])
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    assert len([e for e in logs if e["event"] == "fetch_retried"]) == 4


async def test_run_once_gets_past_two_messages_the_server_cannot_send(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any
) -> None:
    """Each damaged message gets its own retries: with two, one ``run --once`` still fails
    both to Failed and imports the rest (the retries were counted for the whole pass, so the
    second damaged message failed the run, and the next run, and so on, one at a time)."""
    ids = load(dovecot, imap_user, 5)
    damage(dovecot, imap_user, ids[1])
    damage(dovecot, imap_user, ids[3])
    settings = settings_for(tmp_path, imap_user, dovecot.host, dovecot.port, batch=50)
    [result] = await run_once(settings)
    assert result.error is None, result.error
    assert result.summary.failed == 2
    assert sorted(db_ids(settings)) == sorted([ids[0], ids[2], ids[4]])
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)) == 2


async def test_dovecot_restarted_mid_import(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any
) -> None:
    ids = load(dovecot, imap_user, 60)
    settings = settings_for(tmp_path, imap_user, dovecot.host, dovecot.port, batch=5)
    with structlog.testing.capture_logs() as logs:
        async with running(settings) as run:
            await eventually(
                lambda: any(e["event"] == "batch_done" for e in logs), what="first batch"
            )
            await asyncio.to_thread(dovecot.restart)
            # Reconnects back off (with jitter) while the server is down: allow for a few.
            await all_imported(run, dovecot, imap_user, ids, within=60)
    codes = backoff_codes(logs)
    assert codes, "the dropped connection was logged"
    assert set(codes) <= {"connection_lost", "unreachable", "server_unavailable", "timeout"}
    assert_exactly_once(settings, dovecot, imap_user, ids)


async def test_database_locked_by_integrator(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any
) -> None:
    """An integrator's write transaction outlasts the busy timeout (0.3 s here): the batch is
    not committed, so the mail stays unseen in the Inbox; once the lock is gone it is imported."""
    ids = load(dovecot, imap_user, 12)
    settings = settings_for(tmp_path, imap_user, dovecot.host, dovecot.port)
    repo = AsyncRepository.sqlite(settings.database, busy_timeout=0.3)
    await repo.migrate()
    integrator = sqlite3.connect(settings.database, isolation_level=None)
    try:
        integrator.execute("BEGIN IMMEDIATE")
        with structlog.testing.capture_logs() as logs:
            async with running(settings, repo) as run:
                await eventually(lambda: "database_locked" in backoff_codes(logs), within=20)
                inbox = dovecot.unseen(imap_user.login, imap_user.password, "INBOX")
                assert len(inbox) == len(ids), "nothing left the Inbox while the lock was held"
                # Between two backoffs the account is "connecting" again (no code): polled.
                await eventually(lambda: run.worker.state.code == "database_locked", within=20)
                integrator.execute("ROLLBACK")
                await all_imported(run, dovecot, imap_user, ids)
    finally:
        integrator.close()
    assert_exactly_once(settings, dovecot, imap_user, ids)


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` on ``directory``; yields False where mounting is not allowed."""
    directory.mkdir()
    if os.geteuid() != 0:
        yield False
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as out:
        while True:
            out.write(b"\0" * 512)  # the last partial block too
    return filler


async def test_disk_full_on_data_directory(
    tmp_path: Path, dovecot: Dovecot, imap_user: Any
) -> None:
    """A really full disk: the data directory is a 4 MB tmpfs filled to the last byte.

    Where mounting is not permitted (not root, no CAP_SYS_ADMIN), the test falls back to
    SQLite's ``PRAGMA max_page_count`` on mailbridge's own connection, which makes SQLite answer
    SQLITE_FULL exactly as a full disk does.
    """
    ids = load(dovecot, imap_user, 10, size=60_000)
    with small_filesystem(tmp_path / "data", "4m") as mounted:
        database = tmp_path / "data" / "mailbridge.db"
        settings = settings_for(tmp_path, imap_user, dovecot.host, dovecot.port, database=database)
        cap = {"pages": 0}

        def factory() -> SqliteRepository:
            repo = SqliteRepository(database)
            if not mounted:
                repo.migrate()
                pages = repo._conn.execute("PRAGMA page_count").fetchone()[0]
                cap["pages"] = pages + 4
                repo._conn.execute(f"PRAGMA max_page_count = {cap['pages']}")
            return repo

        repo = AsyncRepository(factory)
        await repo.migrate()
        filler = fill(database.parent) if mounted else None
        with structlog.testing.capture_logs() as logs:
            async with running(settings, repo) as run:
                await eventually(lambda: "disk_full" in backoff_codes(logs), within=20)
                inbox = dovecot.unseen(imap_user.login, imap_user.password, "INBOX")
                assert len(inbox) == len(ids), "nothing left the Inbox while the disk was full"
                if filler is not None:
                    filler.unlink()  # the operator frees space
                else:
                    await repo._run(lambda r: r._conn.execute("PRAGMA max_page_count = 1073741823"))
                await all_imported(run, dovecot, imap_user, ids)
        assert_exactly_once(settings, dovecot, imap_user, ids)
