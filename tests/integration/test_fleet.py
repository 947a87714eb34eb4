"""Several daemons, one fleet: real ``mailbridge run`` processes on one throwaway PostgreSQL and
a real Dovecot.

Two daemons share 20 accounts through leases (daemon/leases.py): every account is served by
exactly one of them, mail to all 20 is imported exactly once; one daemon is killed with SIGKILL
and the other takes its accounts over once their leases expire (``cluster.lease_seconds: 5``),
importing what arrived after the kill. Nothing lost, nothing stored twice (rows per
Message-ID). Then fencing: a daemon whose lease row is taken from under it stops the account's
loop and commits no import with the old token.

Every wait polls with a generous bound: the suite runs on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
import yaml

from mailbridge.config import load_config
from mailbridge.core.planner import ImportContext
from mailbridge.daemon.supervisor import Supervisor
from mailbridge.errors import StoreError
from mailbridge.store.base import ImportItem
from mailbridge.store.postgres import PostgresRepository
from mailbridge.testing.dovecot import Dovecot
from tests.conftest import ImapUser, PostgresDatabase
from tests.integration.test_import_loop import eventually
from tests.integration.test_reload import account
from tests.unit import factories

pytestmark = [pytest.mark.postgres, pytest.mark.dovecot]

LEASE = 5.0  # cluster.lease_seconds' minimum: the fastest take-over a test can wait for
PROCESSED = "Mailbridge Processed"
MAILBRIDGE = (sys.executable, "-m", "mailbridge")


def new_users(dovecot: Dovecot, count: int) -> list[ImapUser]:
    made = []
    for _ in range(count):
        login = f"fleet-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        dovecot.add_user(login, password)
        made.append(ImapUser(login=login, password=password, address=f"{login}@example.test"))
    return made


def entries(dovecot: Dovecot, users: list[ImapUser]) -> list[dict[str, Any]]:
    """The config's accounts: ``acct00``, ``acct01`` ... for ``users`` in order."""
    return [account(f"acct{n:02d}", dovecot, user) for n, user in enumerate(users)]


def write_config(
    tmp_path: Path,
    db: PostgresDatabase,
    dovecot: Dovecot,
    users: list[ImapUser],
    *,
    recovery: bool = False,
    lease: float = LEASE,
) -> Path:
    secret = tmp_path / "db.pw"
    secret.write_text(db.password + "\n", encoding="utf-8")
    secret.chmod(0o600)
    data = {
        "database": db.url,
        "database_password_file": str(secret),
        "cluster": {"lease_seconds": lease},
        "recovery": {"enabled": recovery},
        "accounts": entries(dovecot, users),
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    path.chmod(0o600)
    return path


def message(user: ImapUser, tag: str) -> tuple[str, bytes]:
    message_id = f"{tag}-{secrets.token_hex(6)}@customer.example"
    msg = EmailMessage()
    msg["From"] = "Customer <customer@customer.example>"
    msg["To"] = user.address
    msg["Subject"] = f"Fleet {tag}"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<{message_id}>"
    msg.set_content(f"Message {tag} for {user.login}.\n")
    return message_id, msg.as_bytes()


def deliver(dovecot: Dovecot, users: list[ImapUser], tag: str) -> list[str]:
    ids = []
    for user in users:
        message_id, raw = message(user, tag)
        dovecot.append(user.login, user.password, raw)
        ids.append(message_id)
    return ids


class Database:
    """Reads of the shared database, as an integrator would make them."""

    def __init__(self, db: PostgresDatabase) -> None:
        self.conn = psycopg.connect(db.url, password=db.password, autocommit=True)

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql.encode(), params).fetchall()

    def execute(self, sql: str) -> int:
        return self.conn.execute(sql.encode()).rowcount

    def holders(self) -> dict[str, str]:
        """account -> holder of its unexpired lease."""
        return dict(
            self.rows(
                "SELECT account, holder FROM lease WHERE holder IS NOT NULL"
                " AND expires::timestamptz >= now()"
            )
        )

    def copies(self) -> Counter[str]:
        """Message-ID -> rows in conversationmessage."""
        return Counter(row[0] for row in self.rows("SELECT messageid FROM conversationmessage"))

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def daemons(config: Path, tmp_path: Path, count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` real ``mailbridge run`` processes; whatever is left is killed at the end."""
    procs = []
    try:
        for n in range(count):
            log = (tmp_path / f"daemon{n}.log").open("ab")
            procs.append(
                subprocess.Popen(
                    [*MAILBRIDGE, "-c", str(config), "--log-format", "json", "run"],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
            log.close()
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def imported_accounts(log: Path) -> set[str]:
    """The accounts a daemon logged ``message_imported`` for (its JSON log lines)."""
    accounts = set()
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "message_imported":
                accounts.add(event["account"])
    return accounts


def holder_pid(holder: str) -> int:
    return int(holder.split(":")[1])  # host:pid:random


async def test_two_daemons_share_20_accounts_and_one_takes_over_after_kill_9(
    tmp_path: Path, dovecot: Dovecot, postgres_database: PostgresDatabase
) -> None:
    users = new_users(dovecot, 20)
    names = [f"acct{n:02d}" for n in range(20)]
    config = write_config(tmp_path, postgres_database, dovecot, users)
    db = Database(postgres_database)
    try:
        with daemons(config, tmp_path, 2) as (first, second):
            pids = {first.pid, second.pid}

            def spread() -> dict[int, int] | None:
                # Every account held, by both daemons in fair shares (10 each, after any
                # rebalancing of a daemon that started first and took more).
                try:
                    holders = db.holders()
                except psycopg.errors.UndefinedTable:
                    return None  # not migrated yet
                per_pid = Counter(holder_pid(h) for h in holders.values())
                if set(holders) == set(names) and per_pid == dict.fromkeys(pids, 10):
                    return dict(per_pid)
                return None

            await eventually(spread, 90, "20 accounts held, 10 by each daemon")
            assert first.poll() is None
            assert second.poll() is None

            # `status --json` names each account's holder: one of the two daemons.
            status_run = await asyncio.create_subprocess_exec(
                *MAILBRIDGE, "-c", str(config), "status", "--json", stdout=subprocess.PIPE
            )
            out, _ = await status_run.communicate()
            assert status_run.returncode == 0
            status = {row["account"]: row["holder"] for row in json.loads(out)["accounts"]}
            assert set(status) == set(names)
            assert {holder_pid(h) for h in status.values()} == pids

            before = deliver(dovecot, users, "before")
            await eventually(
                lambda: set(db.copies()) >= set(before), 90, "the 20 first messages imported"
            )

            # Served, not only leased: each daemon's log shows imports for its accounts only.
            # The line follows the commit (store first, then log): wait for the last ones.
            def logged() -> dict[int, set[str]] | None:
                found = {n: imported_accounts(tmp_path / f"daemon{n}.log") for n in (0, 1)}
                return found if found[0] | found[1] >= set(names) else None

            by_daemon = await eventually(logged, 30, "every account's import logged")
            assert by_daemon[0].isdisjoint(by_daemon[1])
            assert by_daemon[0] | by_daemon[1] == set(names)
            for n, proc in enumerate((first, second)):
                assert {a for a, h in status.items() if holder_pid(h) == proc.pid} == by_daemon[n]

            # kill -9 one daemon: its accounts' leases are left to expire.
            victim = first
            held_by_victim = {a for a, h in db.holders().items() if holder_pid(h) == victim.pid}
            assert len(held_by_victim) == 10
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed_at = time.monotonic()
            after = deliver(dovecot, users, "after")

            def taken_over() -> bool:
                holders = db.holders()
                return set(holders) == set(names) and all(
                    holder_pid(h) == second.pid for h in holders.values()
                )

            await eventually(taken_over, 90, "every account held by the surviving daemon")
            took = time.monotonic() - killed_at
            # The leases lapse lease_seconds after the victim's last renewal; the survivor
            # claims right after. A bound far above that, for a loaded machine.
            assert took < LEASE * 6, f"take-over took {took:.1f} s"

            everything = before + after
            await eventually(
                lambda: set(db.copies()) >= set(everything), 90, "the 40 messages imported"
            )
            assert second.poll() is None

            def all_moved() -> bool:
                return all(not dovecot.folder_uids(u.login, u.password, "INBOX") for u in users)

            await eventually(all_moved, 60, "every Inbox emptied")
            copies = db.copies()
            assert {m: copies[m] for m in everything} == dict.fromkeys(everything, 1)
            on_server = Counter(
                raw.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()
                for u in users
                for raw in dovecot.folder_messages(u.login, u.password, PROCESSED)
            )
            assert {m: on_server[m] for m in everything} == dict.fromkeys(everything, 1)

            # A clean stop gives every lease back at once (others need not wait for expiry).
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
            assert db.holders() == {}
    finally:
        db.close()


# -- fencing, and sweeps once per account: daemons in this process, to look inside --------------


@contextlib.asynccontextmanager
async def supervised(config: Path) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(load_config(config), drain_seconds=5.0)
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        supervisor.request_stop()
        assert await asyncio.wait_for(task, timeout=60) == 0


async def test_a_daemon_whose_lease_is_taken_stops_the_loop_and_commits_nothing(
    tmp_path: Path, dovecot: Dovecot, postgres_database: PostgresDatabase
) -> None:
    (user,) = new_users(dovecot, 1)
    config = write_config(tmp_path, postgres_database, dovecot, [user])
    db = Database(postgres_database)
    try:
        with structlog.testing.capture_logs() as logs:
            async with supervised(config) as supervisor:
                await eventually(
                    lambda: (
                        "acct00" in supervisor.running
                        and supervisor.states.get("acct00") is not None
                        and supervisor.states["acct00"].state == "idle"
                    ),
                    within=60,
                    what="acct00 served and idle",
                )
                first_id = deliver(dovecot, [user], "held")[0]
                await eventually(lambda: first_id in db.copies(), 60, "imported while held")

                # Another daemon takes the lease (as a claim after expiry would: a new token).
                db.execute(
                    "UPDATE lease SET holder = 'thief:1:x', token = token + 1, expires ="
                    " to_char((now() + interval '1 hour') AT TIME ZONE 'UTC',"
                    " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') WHERE account = 'acct00'"
                )
                await eventually(
                    lambda: "acct00" not in supervisor.running, 60, "the loop of acct00 stopped"
                )
                assert any(
                    e["event"] == "lease_lost" and e.get("account") == "acct00" for e in logs
                )
                # Mail now is the thief's to import: this daemon neither imports nor moves it.
                stolen_id = deliver(dovecot, [user], "stolen")[0]
                await asyncio.sleep(LEASE / 2)  # no event to poll for: time for a wrong import
                assert stolen_id not in db.copies()
                assert len(dovecot.folder_uids(user.login, user.password, "INBOX")) == 1
                # The account's state is the new holder's to write: no last "stopped" from
                # the daemon that lost it over the holder's live one.
                [(state,)] = db.rows("SELECT state FROM accountstate WHERE account = 'acct00'")
                assert state != "stopped"

                # The thief's lease lapses: the daemon claims it again and imports.
                db.execute(
                    "UPDATE lease SET expires = '2000-01-01T00:00:00Z' WHERE account = 'acct00'"
                )
                await eventually(
                    lambda: db.copies()[stolen_id] == 1, 60, "imported after the re-claim"
                )
                assert db.copies()[first_id] == 1
    finally:
        db.close()


async def test_a_daemon_that_cannot_renew_stops_the_loop_before_the_lease_lapses(
    tmp_path: Path, dovecot: Dovecot, postgres_database: PostgresDatabase
) -> None:
    """The daemon's promise: renewals that do not get through (here a transaction holding the
    lease row locked, as a database too slow to answer) end the account's loop while the
    database still shows the lease unexpired, so no other daemon can have started it. Then,
    unlocked, the daemon takes the account again (its late renewal does not strand it)."""
    (user,) = new_users(dovecot, 1)
    lease = 20.0  # room on a loaded machine: given up a quarter of this before it lapses
    config = write_config(tmp_path, postgres_database, dovecot, [user], lease=lease)
    db = Database(postgres_database)
    blocker = psycopg.connect(
        postgres_database.url, password=postgres_database.password, autocommit=True
    )
    try:
        async with supervised(config) as supervisor:
            await eventually(lambda: "acct00" in supervisor.running, 60, "acct00 served")
            served = supervisor.running["acct00"]
            with blocker.transaction():
                blocker.execute("SELECT 1 FROM lease WHERE account = 'acct00' FOR UPDATE")
                await eventually(
                    lambda: served.task.done() and (served.sweep is None or served.sweep.done()),
                    lease * 2,
                    "the loop of acct00 ended",
                )
                # Not claimable by anyone yet (the claim's own condition, on the database's clock).
                ((unexpired,),) = db.rows(
                    "SELECT expires >= to_char(now() AT TIME ZONE 'UTC',"
                    " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM lease WHERE account = 'acct00'"
                )
                assert unexpired, "the loop outlived the lease"
            await eventually(
                lambda: (
                    "acct00" in supervisor.running and supervisor.running["acct00"] is not served
                ),
                lease * 3,
                "acct00 served again once the database answers",
            )
            message_id = deliver(dovecot, [user], "again")[0]
            await eventually(lambda: db.copies()[message_id] == 1, 60, "imported again")
    finally:
        blocker.close()
        db.close()


def test_the_import_transaction_refuses_a_lost_lease(postgres_database: PostgresDatabase) -> None:
    """Fencing in the database: an import under a (holder, token) the lease row no longer shows
    raises lease_lost and writes nothing; under the current one it commits."""
    repo = PostgresRepository(postgres_database.url, password=postgres_database.password)
    repo.migrate()
    db = Database(postgres_database)
    try:
        old = repo.claim_leases("a:1:x", ["acct00"], 60, 1)["acct00"]
        db.execute("UPDATE lease SET expires = '2000-01-01T00:00:00Z' WHERE account = 'acct00'")
        new = repo.claim_leases("b:2:y", ["acct00"], 60, 1)["acct00"]
        assert new == old + 1
        item = ImportItem(uid=1, message=factories.message("fenced@customer.example"))
        stale = ImportContext(account="acct00", lease_holder="a:1:x", lease_token=old)
        with pytest.raises(StoreError) as caught:
            repo.import_batch(stale, [item])
        assert caught.value.code == "lease_lost"
        assert db.copies() == Counter()
        current = ImportContext(account="acct00", lease_holder="b:2:y", lease_token=new)
        (result,) = repo.import_batch(current, [item])
        assert result.conversation_id is not None
        assert db.copies() == Counter({"fenced@customer.example": 1})
    finally:
        db.close()
        repo.close()


async def test_each_account_is_swept_by_its_holder_only(
    tmp_path: Path, dovecot: Dovecot, postgres_database: PostgresDatabase
) -> None:
    users = new_users(dovecot, 4)
    config = write_config(tmp_path, postgres_database, dovecot, users, recovery=True)
    names = {f"acct{n:02d}" for n in range(4)}
    async with supervised(config) as one, supervised(config) as two:

        def served() -> bool:
            return set(one.running) | set(two.running) == names and not (
                set(one.running) & set(two.running)
            )

        await eventually(served, 60, "each account served by one of the two daemons")
        for supervisor in (one, two):
            assert supervisor.leases is not None
            assert set(supervisor.running) == set(supervisor.leases.held)
            for entry in supervisor.running.values():
                # The sweep schedule runs beside the loop of the holder, and nowhere else.
                assert entry.sweep is not None
                assert not entry.sweep.done()


async def test_reload_changes_the_accounts_competed_for(
    tmp_path: Path, dovecot: Dovecot, postgres_database: PostgresDatabase
) -> None:
    users = new_users(dovecot, 3)
    config = write_config(tmp_path, postgres_database, dovecot, users[:2])
    db = Database(postgres_database)
    try:
        async with supervised(config) as supervisor:
            await eventually(
                lambda: set(supervisor.running) == {"acct00", "acct01"}, 60, "both served"
            )
            # acct00 leaves the config, acct02 (a new user) joins it.
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
            data["accounts"] = entries(dovecot, users)[1:]
            config.write_text(yaml.safe_dump(data), encoding="utf-8")
            supervisor.request_reload()
            await eventually(
                lambda: set(supervisor.running) == {"acct01", "acct02"}, 60, "acct02 claimed"
            )
            assert supervisor.leases is not None
            assert set(supervisor.leases.held) == {"acct01", "acct02"}
            await eventually(
                lambda: set(db.holders()) == {"acct01", "acct02"}, 60, "acct00's lease freed"
            )
            message_id = deliver(dovecot, users[2:], "added")[0]
            await eventually(lambda: db.copies()[message_id] == 1, 60, "acct02 imports")
    finally:
        db.close()
