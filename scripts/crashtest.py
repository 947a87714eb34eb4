"""The crash test behind ``scripts/crashtest``: ``kill -9`` mailbridge at random moments while it
imports, restart it, repeat; then prove that no message was lost or duplicated.

A throwaway Dovecot on loopback gets a mailbox of mixed mail, a few messages over the size limit
(they must end in Failed with their reason recorded). Each cycle delivers more mail, starts
``mailbridge run`` (the daemon: a backlog pass, then IDLE), and kills it with SIGKILL after a
random 0.1-2.5 s - mid-FETCH, mid-transaction, between commit and MOVE, whatever it was doing.
After the last cycle one clean ``mailbridge run --once`` finishes the work, and every message
is checked:

* in the database exactly once: an imported message once in ``conversationmessage`` (and not an
  open ``importfailure``), a failed one once in ``importfailure`` (and not imported);
* on the server exactly once, in Processed (imported) or Failed (failed); the Inbox is empty.

Worker processes left behind by a killed daemon (its parse pool) are counted as orphans.
Prints cycles, lost, duplicated; exit status 1 if anything was lost, duplicated or orphaned.

``--database postgresql --daemons N`` is the fleet's crash test: a throwaway PostgreSQL cluster
(mailbridge.testing.postgres), ``--accounts`` accounts (default two per daemon) and N daemons
running side by side, sharing the accounts through leases (``cluster.lease_seconds``, default 5
here). Each cycle delivers mail to every account, waits a random 0.1 s to lease_seconds + 2 s,
kills one daemon at random with SIGKILL and starts it again - the others keep running and take
its accounts over when its leases expire, while the killed one may have been mid-transaction or
between commit and MOVE. After the last cycle the daemons are stopped cleanly (SIGTERM: leases
released) and one ``run --once`` finishes the work. Misplaced also counts a message stored under
another account than the one it was delivered to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

from mailbridge.testing.dovecot import Dovecot
from mailbridge.testing.postgres import PostgresCluster

PASSWORD = "crash-password"  # noqa: S105 - a throwaway local server's password
USER = "crash"
PROCESSED = "Mailbridge Processed"
FAILED = "Mailbridge Failed"
LIMIT_MB = 0.2  # attachment_max_size_mb: the "too large" messages exceed it
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)


def say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


def make_mail(
    rng: random.Random, number: int, parents: list[str], user: str = USER
) -> tuple[str, bytes, bool]:
    """(message-id, raw, too_large); ``parents`` are earlier Message-IDs of the same account."""
    msg = EmailMessage()
    message_id = f"crash-{number}@example.net"
    msg["From"] = f"Customer {number % 97} <c{number % 97}@example.net>"
    msg["To"] = f"{user}@example.test"
    msg["Subject"] = f"Crash test {number}"
    msg["Date"] = format_datetime(datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=number))
    msg["Message-ID"] = f"<{message_id}>"
    if parents and rng.random() < 0.3:
        parent = rng.choice(parents[-50:])
        msg["In-Reply-To"] = f"<{parent}>"
        msg["References"] = f"<{parent}>"
    parents.append(message_id)
    filler = "lorem ipsum dolor sit amet\n" * rng.randrange(10, 400)
    msg.set_content(f"Message {number}.\n{filler}")
    too_large = rng.random() < 0.03
    if too_large:
        blob = rng.randbytes(int(LIMIT_MB * 1024 * 1024) + 10_000)
        msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="big")
    elif rng.random() < 0.2:
        html = f"<html><body><p>Message {number}</p></body></html>"
        msg.add_alternative(html, subtype="html")
    elif rng.random() < 0.1:
        blob = rng.randbytes(rng.randrange(5_000, 60_000))
        msg.add_attachment(blob, maintype="application", subtype="pdf", filename="doc.pdf")
    return message_id, msg.as_bytes(), too_large


def account_name(user: str) -> str:
    return user  # each account is named after its IMAP user


def server_ids(dovecot: Dovecot, folder: str, user: str = USER) -> list[str]:
    if folder != "INBOX" and folder not in dovecot.folders(user, PASSWORD):
        return []
    return [
        match.group(1).decode()
        for raw in dovecot.folder_messages(user, PASSWORD, folder)
        if (match := _MESSAGE_ID.search(raw)) is not None
    ]


class Database:
    """The end state's rows: (account, Message-ID) of imports and of open failures."""

    def __init__(self, database: Path | str, password: str | None = None) -> None:
        self.database = database
        self.password = password

    def rows(self, sql: str) -> list[tuple[str, str]]:
        if isinstance(self.database, Path):
            conn = sqlite3.connect(self.database)
            try:
                return [(r[0], r[1]) for r in conn.execute(sql)]
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.database, password=self.password) as pg:
            return [(r[0], r[1]) for r in pg.execute(sql.encode()).fetchall()]


def check(
    dovecot: Dovecot, database: Database, expected: dict[str, bool], owners: dict[str, str]
) -> dict[str, Any]:
    """Compare the end state with ``expected`` ({message-id: too_large}); ``owners`` says which
    user (account) each message was delivered to."""
    imported_rows = database.rows("SELECT account, messageid FROM conversationmessage")
    failed_rows = database.rows(
        "SELECT account, messageid FROM importfailure WHERE resolved IS NULL"
    )
    imported = Counter(m for _, m in imported_rows)
    failed = Counter(m for _, m in failed_rows)
    # Where each message is stored: (account, message-id) pairs.
    stored_under = Counter((a, m) for a, m in imported_rows + failed_rows)
    users = sorted(set(owners.values()))
    processed: Counter[str] = Counter()
    failed_folder: Counter[str] = Counter()
    inbox: list[str] = []
    on_server_of: Counter[tuple[str, str]] = Counter()
    for user in users:
        for folder, counter in ((PROCESSED, processed), (FAILED, failed_folder)):
            ids = server_ids(dovecot, folder, user)
            counter.update(ids)
            on_server_of.update((user, m) for m in ids)
        inbox += server_ids(dovecot, "INBOX", user)
    lost: list[str] = []
    duplicated: list[str] = []
    misplaced: list[str] = []
    for message_id, too_large in expected.items():
        in_db = imported[message_id] + failed[message_id]
        on_server = processed[message_id] + failed_folder[message_id]
        if in_db == 0 or on_server == 0:
            lost.append(message_id)
        if in_db > 1 or on_server > 1:
            duplicated.append(message_id)
        want_db, want_folder = (failed, failed_folder) if too_large else (imported, processed)
        owner = owners[message_id]
        right_place = (
            want_db[message_id]
            and want_folder[message_id]
            and stored_under[(account_name(owner), message_id)] == 1
            and on_server_of[(owner, message_id)] == 1
        )
        if in_db == 1 and on_server == 1 and not right_place:
            misplaced.append(message_id)
    return {
        "messages": len(expected),
        "imported": sum(1 for m, big in expected.items() if not big and imported[m]),
        "failed": sum(1 for m, big in expected.items() if big and failed[m]),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "misplaced": len(misplaced),
        "left_in_inbox": len(inbox),
        "examples": (lost + duplicated + misplaced)[:10],
    }


def write_config(
    workdir: Path,
    dovecot: Dovecot,
    users: Sequence[str] = (USER,),
    *,
    database: str | None = None,
    password: str | None = None,
    lease_seconds: float = 5.0,
) -> Path:
    """The daemons' config: SQLite in ``workdir`` unless ``database`` is a PostgreSQL URL."""
    config: dict[str, Any] = {
        "database": database or str(workdir / "crash.db"),
        "limits": {"attachment_max_size_mb": LIMIT_MB, "fetch_batch_size": 50},
        "accounts": [
            {
                "name": account_name(user),
                "address": f"{user}@example.test",
                "imap": {
                    "host": dovecot.host,
                    "port": dovecot.port,
                    "tls": "none",
                    "timeout_seconds": 10,
                },
                "auth": {"username": user, "password": PASSWORD},
                "mode": "idle",
            }
            for user in users
        ],
    }
    if database is not None:
        secret = workdir / "db.pw"
        secret.write_text(f"{password}\n", encoding="utf-8")
        secret.chmod(0o600)
        config["database_password_file"] = str(secret)
        config["cluster"] = {"lease_seconds": lease_seconds}
    path = workdir / "crash.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def kill_cycle(command: list[str], log_path: Path, seconds: float) -> int:
    """Run the daemon for ``seconds``, SIGKILL it; returns how many of its children outlived it."""
    proc = start(command, log_path)
    time.sleep(seconds)
    return kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL ``proc``; returns how many of its children outlived it (then killed too)."""
    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    alive = [c for c in children if c.is_running()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for child in alive:  # our own leftovers: clean up, and report them
        with contextlib.suppress(psutil.Error):
            child.kill()
    return len(alive)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kill -9 mailbridge while it imports; verify")
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--initial", type=int, default=1500, help="messages in the Inbox first")
    parser.add_argument("--per-cycle", type=int, default=40, help="messages added each cycle")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--daemons", type=int, default=1, help="daemons side by side")
    parser.add_argument(
        "--accounts", type=int, default=None, help="accounts (default: two per daemon)"
    )
    parser.add_argument(
        "--lease-seconds", type=float, default=5.0, help="cluster.lease_seconds (PostgreSQL)"
    )
    args = parser.parse_args(argv)
    if args.daemons < 1:
        parser.error("--daemons must be at least 1")
    if args.daemons > 1 and args.database != "postgresql":
        parser.error("--daemons above 1 needs --database postgresql (SQLite has one daemon)")
    accounts = args.accounts or (1 if args.daemons == 1 else 2 * args.daemons)
    users = [USER] if accounts == 1 else [f"{USER}{n:02d}" for n in range(accounts)]
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    expected: dict[str, bool] = {}
    owners: dict[str, str] = {}
    parents: dict[str, list[str]] = {user: [] for user in users}
    numbers = iter(range(1 << 30))

    def deliver(dovecot: Dovecot, count: int) -> None:
        by_user: dict[str, list[bytes]] = {user: [] for user in users}
        for n in range(count):
            user = users[n % len(users)]
            message_id, raw, too_large = make_mail(rng, next(numbers), parents[user], user)
            expected[message_id] = too_large
            owners[message_id] = user
            by_user[user].append(raw)
        for user, raws in by_user.items():
            if raws:
                dovecot.append_many(user, PASSWORD, raws)

    started = time.monotonic()
    orphans = 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="mailbridge-crash-", dir="/tmp")
        )
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # noqa: S103 - Dovecot's unprivileged processes traverse it
        dovecot = stack.enter_context(Dovecot(workdir / "dovecot"))
        for user in users:
            dovecot.add_user(user, PASSWORD)
        database: Database
        if args.database == "postgresql":
            say("starting a throwaway PostgreSQL cluster")
            cluster = stack.enter_context(PostgresCluster(workdir / "postgres"))
            url = cluster.create_database("crash")
            config = write_config(
                workdir,
                dovecot,
                users,
                database=url,
                password=cluster.password,
                lease_seconds=args.lease_seconds,
            )
            database = Database(url, cluster.password)
        else:
            config = write_config(workdir, dovecot, users)
            database = Database(workdir / "crash.db")
        say(
            f"seed {seed}: {args.database}, {args.daemons} daemon(s), {accounts} account(s); "
            f"delivering {args.initial} messages"
        )
        deliver(dovecot, args.initial)
        base = [sys.executable, "-m", "mailbridge", "-c", str(config), "--log-format", "json"]
        log_path = workdir / "mailbridge.log"
        if args.daemons == 1:
            for cycle in range(1, args.cycles + 1):
                deliver(dovecot, args.per_cycle)
                orphans += kill_cycle([*base, "run"], log_path, rng.uniform(0.1, 2.5))
                if cycle % 10 == 0:
                    say(f"cycle {cycle}/{args.cycles}")
        else:
            # A fleet: the daemons run side by side; each cycle one of them is killed at a
            # random moment and started again, the others taking over its accounts.
            logs = [workdir / f"mailbridge{n}.log" for n in range(args.daemons)]
            fleet = [start([*base, "run"], logs[n]) for n in range(args.daemons)]
            try:
                for cycle in range(1, args.cycles + 1):
                    deliver(dovecot, args.per_cycle)
                    time.sleep(rng.uniform(0.1, args.lease_seconds + 2))
                    victim = rng.randrange(args.daemons)
                    orphans += kill(fleet[victim])
                    fleet[victim] = start([*base, "run"], logs[victim])
                    if cycle % 10 == 0:
                        say(f"cycle {cycle}/{args.cycles}")
                say("stopping the daemons cleanly (SIGTERM)")
                for proc in fleet:
                    proc.send_signal(signal.SIGTERM)
                for proc in fleet:
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        say(f"daemon {proc.pid} did not stop in 120 s; killing it")
                        orphans += kill(proc)
            finally:
                for proc in fleet:
                    if proc.poll() is None:
                        kill(proc)
            with log_path.open("ab") as combined:
                for path in logs:
                    combined.write(path.read_bytes())
        # How much the daemons did themselves, before the clean pass finishes the rest.
        by_daemons = len(database.rows("SELECT account, messageid FROM conversationmessage"))
        say("final clean pass (run --once)")
        with log_path.open("ab") as log:
            final = subprocess.run(
                [*base, "run", "--once"], stdout=subprocess.DEVNULL, stderr=log, check=False
            )
        result = check(dovecot, database, expected, owners)
        result.update(
            cycles=args.cycles,
            seed=seed,
            database=args.database,
            daemons=args.daemons,
            accounts=accounts,
            imported_before_final_pass=by_daemons,
            orphans=orphans,
            final_exit=final.returncode,
            seconds=round(time.monotonic() - started, 1),
        )
        if final.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            say("final pass failed; last log lines:\n" + "\n".join(tail))
    if not args.json:
        print(
            f"{result['database']}, {result['daemons']} daemon(s), "
            f"{result['accounts']} account(s), cycles: {result['cycles']}  "
            f"messages: {result['messages']}  "
            f"imported: {result['imported']} ({by_daemons} before the final pass)  "
            f"failed (too large): {result['failed']}\n"
            f"lost: {result['lost']}  duplicated: {result['duplicated']}  "
            f"misplaced: {result['misplaced']}  left in Inbox: {result['left_in_inbox']}  "
            f"orphaned processes: {result['orphans']}  ({result['seconds']} s, seed {seed})"
        )
    print(json.dumps(result))
    bad = result["lost"] or result["duplicated"] or result["misplaced"] or result["orphans"]
    return 1 if bad or result["left_in_inbox"] or final.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
