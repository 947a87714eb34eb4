"""The benchmark behind ``scripts/bench``: how fast mailbridge imports, how quickly IDLE mail lands,
and what a fleet of idle accounts costs, each beside a baseline measured in the same run.

A throwaway Dovecot on loopback (``mailbridge.testing.dovecot``) is loaded with a realistic
mailbox (2 KB - 200 KB; plain, multipart HTML, attachments, inline images, reply threads), then:

* raw: a minimal client (stdlib imaplib) doing ``UID FETCH BODY.PEEK[]`` in batches of 100;
* naive floor: the raw fetch plus ``email`` with ``policy.default`` parsing and one SQLite insert
  per message (a commit per batch) - what a straightforward Python importer costs;
* import: ``mailbridge run --once`` from a full Inbox to an empty one (a fresh process, so start-up
  is included), msgs/s, ratio to raw and to the floor, peak RSS;
* import into PostgreSQL: the same messages, the same command, into a throwaway local cluster
  (``fsync=on``, TCP with a password: ``scripts/bench_postgres.py``), beside the SQLite import;
* IDLE: APPEND to committed row (the ``message_imported`` log line, written after the commit) for
  the daemon, beside the server's own push latency (APPEND to ``* EXISTS`` on a bare IDLE session);
* fleets: N idle accounts in one daemon: RSS, CPU while idle, IDLE latency with the fleet connected;
* recovery sweep: as many messages as the import (1,000 without one), of the import's kind
  (:func:`make_corpus`, another seed), put in Failed by a too-low ``limits.message_max_size_mb``,
  then retried by ``mailbridge sync`` once the limit is back to its default: its time per
  message against the import's;
* sending: outbox rows to an aiosmtpd sink beside a bare aiosmtplib loop sending the same
  messages, and the latency from an integrator's INSERT to the end of DATA
  (``scripts/bench_sending.py``).

Targets (reported, not asserted): import >= 1.0x the naive floor; IDLE p99 at most 20 ms above the
server's push p99; 1,000 idle accounts <= 300 MB RSS and < 2 % of a core; sending >= 0.8x the
bare loop, INSERT -> end of DATA p99 <= 100 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import imaplib
import json
import os
import platform
import random
import re
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import psutil
import yaml
from rich.console import Console
from rich.table import Table

from mailbridge.testing.dovecot import Dovecot

PASSWORD = "bench-password"  # noqa: S105 - a throwaway local server's password
BATCH = 100
WORDS = (
    "order invoice delivery shipment customer support ticket refund payment account please "
    "thanks regards hello attached question problem update status urgent soon tomorrow today "
    "price quote contract meeting schedule review approve confirm cancel return damaged replace"
)
VOCABULARY = WORDS.split()
LATENCY_INTERVAL = 0.1  # seconds between APPENDs in the latency runs
HIBERNATE_SECONDS = 2.0  # imap_hibernate_timeout of the server for fleets above 1,000


def say(text: str) -> None:
    print(f"== {text}", file=sys.stderr, flush=True)


# -- the mailbox --------------------------------------------------------------------------------


def _text(rng: random.Random, size: int) -> str:
    words = rng.choices(VOCABULARY, k=max(8, size // 7))
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    return "\n".join(lines) + "\n"


def make_corpus(count: int, address: str, seed: int = 7) -> list[bytes]:
    """``count`` messages: ~55 % plain 2-10 KB, ~20 % multipart/alternative HTML 5-30 KB,
    ~15 % with an attachment (20-200 KB), ~10 % HTML with an inline image; ~30 % are replies."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    sent: list[tuple[str, str]] = []  # (message-id, references) of earlier messages
    out: list[bytes] = []
    for n in range(count):
        msg = EmailMessage()
        sender = rng.randrange(400)
        msg["From"] = f"Customer {sender} <customer{sender}@example.net>"
        msg["To"] = address
        if rng.random() < 0.2:
            msg["Cc"] = f"Colleague {sender} <colleague{sender}@example.net>"
        msg["Date"] = format_datetime(start + timedelta(minutes=n))
        message_id = f"<bench-{seed}-{n}@example.net>"
        msg["Message-ID"] = message_id
        subject = f"Order {rng.randrange(100000)} {rng.choice(VOCABULARY)}"
        if sent and rng.random() < 0.3:
            parent, refs = rng.choice(sent[-200:])
            msg["In-Reply-To"] = parent
            msg["References"] = f"{refs} {parent}".strip()
            subject = "Re: " + subject
            sent.append((message_id, f"{refs} {parent}".strip()[-900:]))
        else:
            sent.append((message_id, ""))
        msg["Subject"] = subject
        kind = rng.random()
        if kind < 0.55:
            msg.set_content(_text(rng, rng.randrange(2000, 10000)))
        elif kind < 0.75:
            body = _text(rng, rng.randrange(2500, 15000))
            msg.set_content(body)
            html = "".join(f"<p>{line}</p>" for line in body.splitlines())
            msg.add_alternative(f"<html><body>{html}</body></html>", subtype="html")
        elif kind < 0.90:
            msg.set_content(_text(rng, rng.randrange(1000, 4000)))
            blob = rng.randbytes(rng.randrange(15000, 140000))
            msg.add_attachment(blob, maintype="application", subtype="pdf", filename="doc.pdf")
        else:
            body = _text(rng, rng.randrange(1000, 5000))
            msg.set_content(body)
            msg.add_alternative(
                f'<html><body><p>{body[:500]}</p><img src="cid:logo{n}@example.net"></body></html>',
                subtype="html",
            )
            parts = msg.get_payload()
            assert isinstance(parts, list)
            html_part = parts[1]
            assert isinstance(html_part, EmailMessage)
            html_part.add_related(
                rng.randbytes(rng.randrange(2000, 30000)),
                maintype="image",
                subtype="png",
                cid=f"<logo{n}@example.net>",
            )
        out.append(msg.as_bytes())
    return out


def append_parallel(dovecot: Dovecot, user: str, raws: Sequence[bytes], workers: int = 4) -> None:
    # The first one alone: it creates the mailbox, which parallel clients would race to do.
    dovecot.append_many(user, PASSWORD, raws[:1])
    chunks = [raws[1:][i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda chunk: dovecot.append_many(user, PASSWORD, chunk), chunks))


# -- raw baseline and the naive floor ---------------------------------------------------------


def _fetch_batches(dovecot: Dovecot, user: str) -> Iterator[list[bytes]]:
    with dovecot.client(user, PASSWORD) as conn:
        conn.select("INBOX")
        typ, data = conn.uid("SEARCH", "ALL")
        uids = [int(x) for x in data[0].split()] if typ == "OK" and data[0] else []
        for start in range(0, len(uids), BATCH):
            chunk = uids[start : start + BATCH]
            typ, data = conn.uid("FETCH", f"{chunk[0]}:{chunk[-1]}", "(BODY.PEEK[])")
            yield [item[1] for item in data if isinstance(item, tuple)]


def measure_raw(dovecot: Dovecot, user: str) -> dict[str, float]:
    started = time.perf_counter()
    count = size = 0
    for batch in _fetch_batches(dovecot, user):
        count += len(batch)
        size += sum(len(raw) for raw in batch)
    seconds = time.perf_counter() - started
    return {
        "messages": count,
        "seconds": seconds,
        "msgs_per_s": count / seconds,
        "mb_per_s": size / seconds / 1e6,
        "mb": size / 1e6,
    }


def measure_naive(dovecot: Dovecot, user: str, workdir: Path) -> dict[str, float]:
    """Fetch + ``policy.default`` parse + one INSERT per message, committed per batch."""
    db = sqlite3.connect(workdir / "naive.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE message (id INTEGER PRIMARY KEY, messageid TEXT, subject TEXT, sender TEXT,"
        " recipients TEXT, date TEXT, inreplyto TEXT, body TEXT, attachments INTEGER)"
    )
    started = time.perf_counter()
    count = 0
    for batch in _fetch_batches(dovecot, user):
        for raw in batch:
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            body_part = msg.get_body(("plain", "html"))
            body = body_part.get_content() if body_part is not None else ""
            attachments = [
                len(part.get_payload(decode=True) or b"") for part in msg.iter_attachments()
            ]
            db.execute(
                "INSERT INTO message (messageid, subject, sender, recipients, date, inreplyto,"
                " body, attachments) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(msg["Message-ID"] or ""),
                    str(msg["Subject"] or ""),
                    str(msg["From"] or ""),
                    str(msg["To"] or ""),
                    str(msg["Date"] or ""),
                    str(msg["In-Reply-To"] or ""),
                    body,
                    len(attachments),
                ),
            )
            count += 1
        db.commit()
    seconds = time.perf_counter() - started
    db.close()
    return {"messages": count, "seconds": seconds, "msgs_per_s": count / seconds}


# -- mailbridge as a process -----------------------------------------------------------------


def write_config(
    workdir: Path,
    dovecot: Dovecot,
    users: Sequence[str],
    *,
    mode: str,
    name: str,
    attachment_max_size_mb: float = 25.0,
    message_max_size_mb: float = 50.0,
) -> Path:
    config = {
        "database": str(workdir / f"{name}.db"),
        "limits": {
            "fetch_batch_size": BATCH,
            "attachment_max_size_mb": attachment_max_size_mb,
            "message_max_size_mb": message_max_size_mb,
        },
        "accounts": [
            {
                "name": user,
                "address": f"{user}@example.test",
                "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"},
                "auth": {"username": user, "password": PASSWORD},
                "mode": mode,
            }
            for user in users
        ],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def mailbridge_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mailbridge", "-c", str(config), "--log-format", "json", *args]


@dataclass
class Watched:
    """One mailbridge command run to its end, sampled every 20 ms."""

    seconds: float
    peak: int  # bytes, the process's own high-water mark
    peak_total: int  # bytes, with its children (the parse workers) at the same moment
    cpu: float  # seconds, the process's own
    workers_cpu: float  # seconds, its children's


def run_watched(config: Path, log_path: Path, *args: str) -> Watched:
    """Run ``mailbridge ARGS`` with its log in ``log_path``; SystemExit if it fails."""
    peak = peak_total = 0
    cpu = 0.0
    workers_cpu: dict[int, float] = {}
    started = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            mailbridge_command(config, *args), stdout=subprocess.DEVNULL, stderr=log
        )
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error, OSError):
                rss = watched.memory_info().rss
                # VmHWM: the kernel's own high-water mark, so a spike between samples counts.
                peak = max(peak, rss, _vm_hwm(proc.pid))
                times = watched.cpu_times()
                cpu = times.user + times.system
                # With the parse workers (forkserver, pool processes) it starts for a backlog.
                for child in watched.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
                        child_times = child.cpu_times()
                        workers_cpu[child.pid] = child_times.user + child_times.system
                peak_total = max(peak_total, rss)
            time.sleep(0.02)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        command = " ".join(args)
        raise SystemExit(f"mailbridge {command} failed ({proc.returncode}): see {log_path}")
    return Watched(seconds, peak, peak_total, cpu, sum(workers_cpu.values()))


def measure_import(
    dovecot: Dovecot,
    user: str,
    workdir: Path,
    count: int,
    *,
    name: str = "import",
    database: dict[str, str] | None = None,
) -> dict[str, float]:
    """``run --once`` over ``user``'s full Inbox; ``database``: config keys replacing the SQLite
    file (PostgreSQL)."""
    config = write_config(workdir, dovecot, [user], mode="poll", name=name)
    if database is not None:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        data.update(database)
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
    log_path = workdir / f"{name}.log"
    run = run_watched(config, log_path, "run", "--once")
    imported = sum(1 for event in read_events(log_path) if event["event"] == "message_imported")
    left = len(dovecot.folder_uids(user, PASSWORD, "INBOX"))
    return {
        "messages": count,
        "imported": imported,
        "left_in_inbox": left,
        "seconds": run.seconds,
        "msgs_per_s": count / run.seconds,
        "cpu_seconds": run.cpu,
        "workers_cpu_seconds": run.workers_cpu,
        "peak_rss_mb": run.peak / 1e6,
        "peak_rss_with_workers_mb": run.peak_total / 1e6,
    }


def _vm_hwm(pid: int) -> int:
    """Peak resident set size of a running process, in bytes (Linux /proc), else 0."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and "event" in event:
                events.append(event)
    return events


@dataclass
class Daemon:
    """``mailbridge run`` in the background, logging JSON to a file."""

    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(mailbridge_command(self.config, "run"), stderr=self._log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def wait_idle(self, database: Path, accounts: int, timeout: float) -> float:
        """Seconds until every account's state is ``idle`` (read from the database)."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SystemExit(f"mailbridge run exited early: see {self.log_path}")
            with contextlib.suppress(sqlite3.Error):
                conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)
                try:
                    row = conn.execute(
                        "SELECT count(*) FROM accountstate WHERE state = 'idle'"
                    ).fetchone()
                finally:
                    conn.close()
                if row[0] >= accounts:
                    return time.perf_counter() - started
            time.sleep(0.2)
        raise SystemExit(f"not all {accounts} accounts idle within {timeout:.0f}s: {self.log_path}")


def _simple_mail(user: str, number: int, tag: str) -> tuple[str, bytes]:
    message_id = f"{tag}-{number}-{time.time_ns()}@example.net"
    raw = (
        f"From: Latency <latency@example.net>\r\nTo: {user}@example.test\r\n"
        f"Subject: latency {number}\r\nMessage-ID: <{message_id}>\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\n\r\nPing {number}.\r\n"
    ).encode()
    return message_id, raw


class PushProbe:
    """A bare IDLE session on its own mailbox: APPEND to ``* N EXISTS`` is the server's own push
    latency, the floor for any client's IDLE latency. Every latency APPEND is repeated into this
    mailbox at once, so both are measured in the same moments, under the same load."""

    def __init__(self, dovecot: Dovecot, user: str) -> None:
        self.seen: list[tuple[float, int]] = []
        self._sock = socket.create_connection((dovecot.host, dovecot.port), timeout=30)
        self._reader = self._sock.makefile("rb")
        self._reader.readline()  # greeting
        self._command(f"a LOGIN {user} {PASSWORD}", b"a ")
        self._command("b SELECT INBOX", b"b ")
        self._command("c IDLE", b"+")
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _command(self, line: str, until: bytes) -> None:
        self._sock.sendall(line.encode() + b"\r\n")
        while not self._reader.readline().startswith(until):
            pass

    def _listen(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self._reader:
                match = re.match(rb"\* (\d+) EXISTS", line)
                if match:
                    self.seen.append((time.time(), int(match.group(1))))

    def latencies(self, appended: Sequence[float]) -> list[float]:
        """Per APPEND (in order), seconds until an EXISTS counted it."""
        out = []
        for index, at in enumerate(sorted(appended)):
            later = [when for when, exists in self.seen if exists >= index + 1]
            if later:
                out.append(min(later) - at)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.sendall(b"DONE\r\nd LOGOUT\r\n")
            time.sleep(0.2)
        self._sock.close()
        self._thread.join(2)


def append_timed(
    dovecot: Dovecot, targets: Sequence[str], count: int, tag: str, probe_user: str
) -> tuple[dict[str, float], list[float]]:
    """APPEND ``count`` small messages, one every LATENCY_INTERVAL s, round-robin over
    ``targets``, each followed at once by a copy into ``probe_user``'s mailbox. Returns
    ({message-id: wall time its APPEND completed}, [wall times of the copies])."""
    clients: dict[str, imaplib.IMAP4] = {}
    sent: dict[str, float] = {}
    copies: list[float] = []

    def client(user: str) -> imaplib.IMAP4:
        conn = clients.get(user)
        if conn is None:
            conn = imaplib.IMAP4(dovecot.host, dovecot.port, timeout=30)
            conn.login(user, PASSWORD)
            clients[user] = conn
        return conn

    try:
        for number in range(count):
            user = targets[number % len(targets)]
            message_id, raw = _simple_mail(user, number, tag)
            client(user).append("INBOX", None, None, raw)
            sent[message_id] = time.time()
            if len(targets) > 1:
                # A fleet: don't hold one more server process per account for the whole run.
                with contextlib.suppress(imaplib.IMAP4.error, OSError):
                    clients.pop(user).logout()
            client(probe_user).append("INBOX", None, None, raw)
            copies.append(time.time())
            time.sleep(LATENCY_INTERVAL)
    finally:
        for conn in clients.values():
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()
    return sent, copies


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "n": 0}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": cuts[49] * 1000,
        "p95_ms": cuts[94] * 1000,
        "p99_ms": cuts[98] * 1000,
        "n": len(ordered),
    }


def import_latencies(log_path: Path, sent: dict[str, float], timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    committed: dict[str, float] = {}
    while time.monotonic() < deadline:
        for event in read_events(log_path):
            if event["event"] == "message_imported" and event.get("message_id") in sent:
                stamp = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
                committed[str(event["message_id"])] = stamp.timestamp()
        if len(committed) >= len(sent):
            break
        time.sleep(0.5)
    missing = len(sent) - len(committed)
    if missing:
        say(f"warning: {missing} latency messages not imported within {timeout:.0f}s")
    return [committed[mid] - sent[mid] for mid in committed]


def server_cpu_seconds(dovecot: Dovecot) -> float:
    """CPU seconds the Dovecot instance used so far: its master, the processes alive now, and
    those that exited (reaped by the master: its children's times). For the share of a fleet's
    start-up that is the server's, on the same cores."""
    pid = dovecot._master_pid()
    if pid is None:
        return 0.0
    total = 0.0
    with contextlib.suppress(psutil.Error):
        master = psutil.Process(pid)
        times = master.cpu_times()
        total += times.user + times.system + times.children_user + times.children_system
        for child in master.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    return total


def measure_idle(
    dovecot: Dovecot, users: Sequence[str], workdir: Path, count: int, name: str
) -> dict[str, Any]:
    """One daemon with ``users`` idle: RSS and CPU while idle, then the latency of ``count``
    APPENDs beside the server's own push latency measured on the same APPENDs."""
    config = write_config(workdir, dovecot, users, mode="idle", name=name)
    daemon = Daemon(config, workdir / f"{name}.log")
    result: dict[str, Any] = {"accounts": len(users)}
    probe_user = dovecot.add_user(f"push-{name}", PASSWORD)
    dovecot.create_folder(probe_user, PASSWORD, "INBOX")
    server_before = server_cpu_seconds(dovecot)
    daemon.start()
    try:
        result["connect_seconds"] = daemon.wait_idle(
            workdir / f"{name}.db", len(users), timeout=60 + len(users) * 0.3
        )
        # The server's CPU time over the same window (logins, SELECTs, hibernation).
        result["server_connect_cpu_seconds"] = server_cpu_seconds(dovecot) - server_before
        assert daemon.proc is not None
        process = psutil.Process(daemon.proc.pid)
        started = process.cpu_times()
        # mailbridge's own CPU time to bring the fleet up, beside the wall time: on a busy
        # machine the wall time is mostly waiting for a core (the server's logins included).
        result["connect_cpu_seconds"] = started.user + started.system
        # Start-up settles (the last accounts' state writes, the garbage collector's passes
        # over a heap that grew by the fleet) and the server parks the sessions: the idle
        # window starts after that. 10,000 accounts measured 14.6 % of a core 4 s after the
        # last one was idle, and 0.5 % minutes later.
        time.sleep(2 + (dovecot.hibernate_seconds or 0) + len(users) / 500)
        result["server_processes"] = dovecot.server_processes()
        result["server_parked_sessions"] = dovecot.parked_sessions()
        window = 10.0
        before = process.cpu_times()
        time.sleep(window)
        after = process.cpu_times()
        busy = (after.user - before.user) + (after.system - before.system)
        result["idle_cpu_percent"] = busy / window * 100
        result["rss_mb"] = process.memory_info().rss / 1e6
        # A slot of recovery.schedule (every 20 minutes) reached during the run sends every
        # account through a second login, spread over five minutes: that is not idling.
        result["sweeps_during_run"] = sum(
            1 for event in read_events(daemon.log_path) if event["event"] == "sweep_done"
        )
        if count <= 0:
            return result
        probe = PushProbe(dovecot, probe_user)
        try:
            sent, copies = append_timed(dovecot, users, count, name, probe_user)
            time.sleep(1.5)  # the last pushes
        finally:
            probe.close()
        result.update(percentiles(import_latencies(daemon.log_path, sent, timeout=60)))
        result["push"] = percentiles(probe.latencies(copies))
        result["p99_over_push_ms"] = result["p99_ms"] - result["push"]["p99_ms"]
        result["rss_after_mb"] = process.memory_info().rss / 1e6
    finally:
        daemon.stop()
    return result


# -- the run ------------------------------------------------------------------------------------


def measure_sweep(dovecot: Dovecot, workdir: Path, count: int) -> dict[str, Any]:
    """Recovery sweep of ``count`` failed messages of the import's kind (:func:`make_corpus`,
    another seed, so the per-message comparison with the import is like for like): ``run
    --once`` with a 1 KB ``limits.message_max_size_mb`` puts them all in Failed unread
    (``too_large``); then, the limit back at its default, ``mailbridge sync`` (a fresh process,
    start-up included) downloads them from Failed, imports them and moves them to Processed."""
    user = dovecot.add_user("sweep", PASSWORD)
    failing = make_corpus(count, f"{user}@example.test", seed=13)
    size = sum(len(raw) for raw in failing)
    append_parallel(dovecot, user, failing)
    del failing
    low = write_config(
        workdir, dovecot, [user], mode="poll", name="sweep", message_max_size_mb=0.001
    )
    with (workdir / "sweep-fail.log").open("wb") as log:
        subprocess.run(
            mailbridge_command(low, "run", "--once"),
            stdout=subprocess.DEVNULL,
            stderr=log,
            check=True,
        )
    failed_before = len(dovecot.folder_uids(user, PASSWORD, "Mailbridge Failed"))
    config = write_config(workdir, dovecot, [user], mode="poll", name="sweep")
    run = run_watched(config, workdir / "sweep.log", "sync")
    return {
        "status": "measured",
        "failed_before": failed_before,
        "recovered": len(dovecot.folder_uids(user, PASSWORD, "Mailbridge Processed")),
        "left_in_failed": len(dovecot.folder_uids(user, PASSWORD, "Mailbridge Failed")),
        "seconds": run.seconds,
        "msgs_per_s": failed_before / run.seconds if run.seconds else 0.0,
        "mb": size / 1e6,
        "peak_rss_mb": run.peak / 1e6,
    }


def compare_sweep(results: dict[str, Any]) -> None:
    """The sweep's time per message and per MB over the import's, same run (target <= 1.5x
    per message; its messages are bigger than the import corpus's mean, hence per MB too)."""
    sweep, imported = results["sweep"], results.get("import")
    if imported is None or sweep.get("status") != "measured" or not sweep["msgs_per_s"]:
        return
    sweep["time_per_message_vs_import"] = imported["msgs_per_s"] / sweep["msgs_per_s"]
    per_mb = sweep["seconds"] / sweep["mb"]
    sweep["time_per_mb_vs_import"] = per_mb / (imported["seconds"] / results["corpus"]["mb"])


def measure_sending(count: int, latency_count: int) -> dict[str, Any]:
    """Outbox rows to an SMTP sink beside a bare aiosmtplib loop (scripts/bench_sending.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sending import measure_sending as measure

    return measure(count, latency_count)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


@contextlib.contextmanager
def inotify_instances(needed: int) -> Iterator[str]:
    """Dovecot's IDLE needs one inotify instance per session, all under the user ``mail``;
    Linux allows 128 per user by default, and beyond that Dovecot falls back to polling every
    30 s. Raise the limit for this run (as root), put it back afterwards; yields the setting."""
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    try:
        current = int(path.read_text())
    except (OSError, ValueError):
        yield "unknown"
        return
    if current >= needed:
        yield str(current)
        return
    try:
        path.write_text(str(needed))
    except OSError:
        say(f"warning: fs.inotify.max_user_instances is {current}; fleets above it poll")
        yield f"{current} (too low for the fleet: could not raise it)"
        return
    try:
        yield f"{needed} (raised from {current} for this run)"
    finally:
        with contextlib.suppress(OSError):
            path.write_text(str(current))


def open_files_limit(needed: int) -> str:
    """Each idle account holds a socket in mailbridge (and Dovecot's side of it): raise this
    process's RLIMIT_NOFILE, which mailbridge inherits, when it is below ``needed`` (raising the
    hard limit needs root); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return str(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        say(
            f"warning: the open-files limit is {hard} (hard) and {needed} are needed: run as "
            "root or raise it (ulimit -Hn); mailbridge logs fd_limit and some accounts fail"
        )
        return f"{hard} (too low for the fleet: could not raise it)"
    return f"{needed} (raised from {soft} for this run)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "messages": args.messages}
    fleets = [n for n in args.accounts if n > 0]
    largest = max([*fleets, 0])
    with contextlib.ExitStack() as stack:
        results["machine"]["inotify_max_user_instances"] = stack.enter_context(
            # One per session, plus the server's reused imap processes waiting for their
            # next login (service_count): with only 256 to spare, 91 of 10,000 sessions found
            # none left ("Inotify instance limit ... exceeded"), polled and were never parked.
            inotify_instances(2 * largest + 256)
        )
        results["machine"]["open_files_limit"] = open_files_limit(2 * largest + 1024)
        if args.workdir is not None:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mailbridge-bench-"))
            workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # noqa: S103 - Dovecot's unprivileged processes traverse it
        # Above 1,000 accounts the server parks idle sessions in one imap-hibernate process,
        # as a fleet's server must (one imap process of 2-6 MB per session otherwise).
        hibernate = HIBERNATE_SECONDS if largest > 1000 else None
        results["server_hibernation"] = f"{hibernate:g} s" if hibernate else "off"
        dovecot = Dovecot(
            workdir / "dovecot",
            process_limit=max([*fleets, 100]) + 300,
            max_user_connections=20,
            hibernate_seconds=hibernate,
            client_limit=largest + 300,
        )
        with dovecot:
            if args.messages > 0:
                measure_messages(args, dovecot, workdir, results)
            if args.latency_messages > 0:
                say(f"IDLE latency beside the server's push ({args.latency_messages} APPENDs)")
                dovecot.add_user("idle", PASSWORD)
                results["idle"] = measure_idle(
                    dovecot, ["idle"], workdir, args.latency_messages, "idle"
                )
            results["fleets"] = []
            for size in fleets:
                say(f"fleet of {size} idle accounts")
                users = [dovecot.add_user(f"fleet{size}-{i}", PASSWORD) for i in range(size)]
                results["fleets"].append(
                    measure_idle(dovecot, users, workdir, args.latency_messages, f"fleet{size}")
                )
            if args.sweep_messages is None:
                args.sweep_messages = args.messages or 1000
            if args.sweep_messages > 0:
                say(f"recovery sweep of {args.sweep_messages} failed messages (mailbridge sync)")
                results["sweep"] = measure_sweep(dovecot, workdir, args.sweep_messages)
                compare_sweep(results)
            else:
                results["sweep"] = {"status": "skipped"}
            say(f"sending: {args.sending_messages} outbox rows to an SMTP sink")
            results["sending"] = measure_sending(args.sending_messages, args.latency_messages)
            dovecot.stop(wait=False)
    return results


def measure_messages(
    args: argparse.Namespace, dovecot: Dovecot, workdir: Path, results: dict[str, Any]
) -> None:
    """Raw fetch, the naive floor and ``run --once`` over the same mailbox, in that order."""
    say(f"building and loading {args.messages} messages")
    dovecot.add_user("bulk", PASSWORD)
    corpus = make_corpus(args.messages, "bulk@example.test")
    sizes = sorted(len(raw) for raw in corpus)
    results["corpus"] = {
        "mb": sum(sizes) / 1e6,
        "median_kb": sizes[len(sizes) // 2] / 1e3,
        "max_kb": sizes[-1] / 1e3,
    }
    append_parallel(dovecot, "bulk", corpus)
    if args.postgresql:  # the same messages, for the import into PostgreSQL
        dovecot.add_user("bulkpg", PASSWORD)
        append_parallel(dovecot, "bulkpg", corpus)
    del corpus
    say("raw fetch baseline")
    results["raw"] = measure_raw(dovecot, "bulk")
    say("naive floor (fetch + email policy.default + one INSERT per message)")
    results["naive"] = measure_naive(dovecot, "bulk", workdir)
    say("mailbridge run --once")
    imported = measure_import(dovecot, "bulk", workdir, args.messages)
    imported["ratio_to_raw"] = imported["msgs_per_s"] / results["raw"]["msgs_per_s"]
    imported["ratio_to_naive"] = imported["msgs_per_s"] / results["naive"]["msgs_per_s"]
    results["import"] = imported
    results["import_postgresql"] = measure_postgresql(args, dovecot, workdir, results)


def measure_postgresql(
    args: argparse.Namespace, dovecot: Dovecot, workdir: Path, results: dict[str, Any]
) -> dict[str, Any]:
    """``run --once`` over the same messages into PostgreSQL (scripts/bench_postgres.py)."""
    if not args.postgresql:
        return {"status": "skipped"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_postgres import throwaway_database

    say("mailbridge run --once into PostgreSQL (the same messages)")
    with throwaway_database(workdir) as database:
        if database is None:
            return {"status": "skipped: PostgreSQL is not installed"}
        imported: dict[str, Any] = dict(
            measure_import(dovecot, "bulkpg", workdir, args.messages, name="import-pg",
                           database=database)
        )  # fmt: skip
    imported["status"] = "measured"
    imported["ratio_to_sqlite"] = imported["msgs_per_s"] / results["import"]["msgs_per_s"]
    imported["ratio_to_naive"] = imported["msgs_per_s"] / results["naive"]["msgs_per_s"]
    return imported


def _f(value: Any, digits: int = 0) -> str:
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(results: dict[str, Any]) -> Table:
    m = results["machine"]
    corpus = f" ({results['corpus']['mb']:.0f} MB)" if "corpus" in results else ""
    out = Table(
        title=(
            f"mailbridge bench - {results['messages']:,} messages{corpus} - "
            f"{m['cpus']} x {m['cpu_model']}, Python {m['python']}, {m['date']}"
        )
    )
    out.add_column("measurement")
    out.add_column("result", justify="right")
    out.add_column("beside", justify="right")
    if "import" in results:
        _message_rows(out, results)
    if "idle" in results:
        _latency_rows(out, results["idle"])
    for fleet in results["fleets"]:
        _fleet_rows(out, fleet, results["server_hibernation"])
    sweep = results["sweep"]
    if sweep["status"] == "measured":
        out.add_row(
            f"recovery sweep (mailbridge sync) of {sweep['failed_before']:,} failed messages",
            f"{_f(sweep['msgs_per_s'])} msgs/s",
            f"{sweep['seconds']:.1f} s, {_f(sweep['peak_rss_mb'])} MB peak RSS",
        )
        if "time_per_message_vs_import" in sweep:
            out.add_row(
                "  time per message / per MB, over the import's",
                f"{sweep['time_per_message_vs_import']:.2f}x",
                f"{sweep['time_per_mb_vs_import']:.2f}x",
            )
        out.add_row(
            "  recovered to Processed / left in Failed",
            f"{sweep['recovered']:,}",
            f"{sweep['left_in_failed']:,}",
        )
    else:
        out.add_row("recovery sweep of failed messages", sweep["status"], "")
    sending = results["sending"]
    if sending["status"] == "measured":
        lat = sending["latency"]
        out.add_row(
            "bare aiosmtplib loop (sendmail per message)",
            f"{_f(sending['bare_msgs_per_s'])} msgs/s",
            "",
        )
        out.add_row(
            f"sending: {sending['messages']:,} outbox rows -> SMTP sink",
            f"{_f(sending['msgs_per_s'])} msgs/s",
            f"{sending['ratio_to_bare']:.2f}x bare",
        )
        if "p50_ms" in lat:  # measured unless --latency-messages 0
            out.add_row(
                "  outbox INSERT -> end of DATA p50/p95/p99",
                f"{_f(lat['p50_ms'])}/{_f(lat['p95_ms'])}/{_f(lat['p99_ms'])} ms",
                f"n={lat['n']}",
            )
    else:
        out.add_row("sending: outbox -> SMTP sink", sending["status"], "")
    return out


def _message_rows(out: Table, results: dict[str, Any]) -> None:
    raw, naive, imp = results["raw"], results["naive"], results["import"]
    out.add_row(
        "raw UID FETCH BODY.PEEK[] (imaplib)",
        f"{_f(raw['msgs_per_s'])} msgs/s",
        f"{_f(raw['mb_per_s'], 1)} MB/s",
    )
    naive_rate = f"{_f(naive['msgs_per_s'])} msgs/s"
    out.add_row("naive floor: fetch + policy.default + INSERT", naive_rate, "")
    out.add_row(
        "mailbridge run --once (full Inbox -> empty)",
        f"{_f(imp['msgs_per_s'])} msgs/s",
        f"{imp['ratio_to_naive']:.2f}x floor, {imp['ratio_to_raw']:.2f}x raw",
    )
    peak = f"{_f(imp['peak_rss_mb'])} MB ({_f(imp['peak_rss_with_workers_mb'])} MB)"
    cpu = f"{imp['cpu_seconds']:.1f} s (+{imp['workers_cpu_seconds']:.1f} s)"
    out.add_row("  peak RSS / CPU time (with parse workers)", peak, cpu)
    out.add_row("  imported / left in Inbox", f"{imp['imported']:,}", f"{imp['left_in_inbox']:,}")
    pg = results.get("import_postgresql", {"status": "skipped"})
    if pg["status"] != "measured":
        out.add_row("mailbridge run --once into PostgreSQL", pg["status"], "")
        return
    out.add_row(
        "mailbridge run --once into PostgreSQL (same messages)",
        f"{_f(pg['msgs_per_s'])} msgs/s",
        f"{pg['ratio_to_sqlite']:.2f}x SQLite, {pg['ratio_to_naive']:.2f}x floor",
    )
    out.add_row(
        "  imported / left in Inbox; peak RSS", f"{pg['imported']:,} / {pg['left_in_inbox']:,}",
        f"{_f(pg['peak_rss_mb'])} MB",
    )  # fmt: skip


def _latency_rows(out: Table, idle: dict[str, Any]) -> None:
    push = idle["push"]
    out.add_row(
        "server push APPEND -> * EXISTS p50/p95/p99",
        f"{_f(push['p50_ms'])}/{_f(push['p95_ms'])}/{_f(push['p99_ms'])} ms",
        f"n={push['n']}",
    )
    out.add_row(
        "IDLE APPEND -> committed row p50/p95/p99",
        f"{_f(idle['p50_ms'])}/{_f(idle['p95_ms'])}/{_f(idle['p99_ms'])} ms",
        f"p99 {idle['p99_over_push_ms']:+.0f} ms vs server",
    )


def _fleet_rows(out: Table, fleet: dict[str, Any], hibernation: str) -> None:
    sweeps = fleet.get("sweeps_during_run", 0)
    out.add_row(
        f"{fleet['accounts']:,} idle accounts: RSS, CPU idle",
        f"{_f(fleet['rss_mb'])} MB",
        f"{fleet['idle_cpu_percent']:.2f} % of a core"
        + (f" ({sweeps:,} scheduled sweeps ran: not idle)" if sweeps else ""),
    )
    if "p99_ms" in fleet:
        out.add_row(
            "  IDLE p99 with the fleet connected (vs server push)",
            f"{_f(fleet['p99_ms'])} ms",
            f"{fleet['p99_over_push_ms']:+.0f} ms (server {_f(fleet['push']['p99_ms'])} ms)",
        )
    out.add_row(
        "  time until every account is idle",
        f"{fleet['connect_seconds']:.1f} s",
        f"mailbridge CPU {fleet.get('connect_cpu_seconds', 0):.1f} s, "
        f"server {fleet.get('server_connect_cpu_seconds', 0):.1f} s",
    )
    procs = fleet.get("server_processes", {})
    out.add_row(
        f"  server: imap processes (reused, idle ones included) / sessions parked ({hibernation})",
        f"{procs.get('imap', 0):,}",
        f"{fleet.get('server_parked_sessions', 0):,} in {procs.get('imap-hibernate', 0)} "
        "imap-hibernate process(es)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--messages", type=int, default=10_000, help="messages to import (0 skips the import)"
    )
    parser.add_argument(
        "--accounts",
        type=int,
        action="append",
        help="fleet size (repeatable; default 100 and 1000; 0 skips the fleets)",
    )
    parser.add_argument(
        "--latency-messages",
        type=int,
        default=200,
        help="APPENDs per latency measurement (0 skips the latency runs)",
    )
    parser.add_argument(
        "--sweep-messages",
        type=int,
        default=None,
        help="failed messages to sweep (default: as many as --messages, so that the time per "
        "message compares like for like, start-up included; 1,000 without an import; 0 skips)",
    )
    parser.add_argument(
        "--sending-messages", type=int, default=1000, help="outbox rows to send (0 skips)"
    )
    parser.add_argument(
        "--no-postgresql",
        dest="postgresql",
        action="store_false",
        help="skip the import into PostgreSQL (a throwaway local cluster, fsync on)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--workdir", help="a new directory to keep the server, databases and logs in (for study)"
    )
    args = parser.parse_args(argv)
    if args.accounts is None:
        args.accounts = [100, 1000]
    results = run(args)
    if not args.json:
        Console(width=120).print(table(results))
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
