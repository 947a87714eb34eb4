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

PASSWORD = "crash-password"  # noqa: S105 - a throwaway local server's password
USER = "crash"
PROCESSED = "Mailbridge Processed"
FAILED = "Mailbridge Failed"
LIMIT_MB = 0.2  # attachment_max_size_mb: the "too large" messages exceed it
_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>\r\n]+)>", re.IGNORECASE | re.MULTILINE)


def say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


def make_mail(rng: random.Random, number: int, parents: list[str]) -> tuple[str, bytes, bool]:
    """(message-id, raw, too_large)."""
    msg = EmailMessage()
    message_id = f"crash-{number}@example.net"
    msg["From"] = f"Customer {number % 97} <c{number % 97}@example.net>"
    msg["To"] = f"{USER}@example.test"
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


def server_ids(dovecot: Dovecot, folder: str) -> list[str]:
    if folder != "INBOX" and folder not in dovecot.folders(USER, PASSWORD):
        return []
    return [
        match.group(1).decode()
        for raw in dovecot.folder_messages(USER, PASSWORD, folder)
        if (match := _MESSAGE_ID.search(raw)) is not None
    ]


def check(dovecot: Dovecot, database: Path, expected: dict[str, bool]) -> dict[str, Any]:
    """Compare the end state with ``expected`` ({message-id: too_large})."""
    conn = sqlite3.connect(database)
    try:
        imported = Counter(r[0] for r in conn.execute("SELECT messageid FROM conversationmessage"))
        failed = Counter(
            r[0] for r in conn.execute("SELECT messageid FROM importfailure WHERE resolved IS NULL")
        )
    finally:
        conn.close()
    processed = Counter(server_ids(dovecot, PROCESSED))
    failed_folder = Counter(server_ids(dovecot, FAILED))
    inbox = server_ids(dovecot, "INBOX")
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
        if in_db == 1 and on_server == 1 and not (want_db[message_id] and want_folder[message_id]):
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


def write_config(workdir: Path, dovecot: Dovecot) -> Path:
    config = {
        "database": str(workdir / "crash.db"),
        "limits": {"attachment_max_size_mb": LIMIT_MB, "fetch_batch_size": 50},
        "accounts": [
            {
                "name": USER,
                "address": f"{USER}@example.test",
                "imap": {
                    "host": dovecot.host,
                    "port": dovecot.port,
                    "tls": "none",
                    "timeout_seconds": 10,
                },
                "auth": {"username": USER, "password": PASSWORD},
                "mode": "idle",
            }
        ],
    }
    path = workdir / "crash.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def kill_cycle(command: list[str], log_path: Path, seconds: float) -> int:
    """Run the daemon for ``seconds``, SIGKILL it; returns how many of its children outlived it."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        time.sleep(seconds)
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
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    expected: dict[str, bool] = {}
    parents: list[str] = []
    numbers = iter(range(1 << 30))

    def deliver(dovecot: Dovecot, count: int) -> None:
        raws = []
        for _ in range(count):
            message_id, raw, too_large = make_mail(rng, next(numbers), parents)
            expected[message_id] = too_large
            raws.append(raw)
        dovecot.append_many(USER, PASSWORD, raws)

    started = time.monotonic()
    orphans = 0
    with tempfile.TemporaryDirectory(prefix="mailbridge-crash-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # noqa: S103 - Dovecot's unprivileged processes traverse it
        with Dovecot(workdir / "dovecot") as dovecot:
            dovecot.add_user(USER, PASSWORD)
            say(f"seed {seed}: delivering {args.initial} messages")
            deliver(dovecot, args.initial)
            config = write_config(workdir, dovecot)
            base = [sys.executable, "-m", "mailbridge", "-c", str(config), "--log-format", "json"]
            log_path = workdir / "mailbridge.log"
            for cycle in range(1, args.cycles + 1):
                deliver(dovecot, args.per_cycle)
                orphans += kill_cycle([*base, "run"], log_path, rng.uniform(0.1, 2.5))
                if cycle % 10 == 0:
                    say(f"cycle {cycle}/{args.cycles}")
            say("final clean pass (run --once)")
            with log_path.open("ab") as log:
                final = subprocess.run(
                    [*base, "run", "--once"], stdout=subprocess.DEVNULL, stderr=log, check=False
                )
            result = check(dovecot, workdir / "crash.db", expected)
            result.update(
                cycles=args.cycles,
                seed=seed,
                orphans=orphans,
                final_exit=final.returncode,
                seconds=round(time.monotonic() - started, 1),
            )
            if final.returncode != 0:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                say("final pass failed; last log lines:\n" + "\n".join(tail))
    if not args.json:
        print(
            f"cycles: {result['cycles']}  messages: {result['messages']}  "
            f"imported: {result['imported']}  failed (too large): {result['failed']}\n"
            f"lost: {result['lost']}  duplicated: {result['duplicated']}  "
            f"misplaced: {result['misplaced']}  left in Inbox: {result['left_in_inbox']}  "
            f"orphaned processes: {result['orphans']}  ({result['seconds']} s, seed {seed})"
        )
    print(json.dumps(result))
    bad = result["lost"] or result["duplicated"] or result["misplaced"] or result["orphans"]
    return 1 if bad or result["left_in_inbox"] or final.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
