"""The sending row of ``scripts/bench``: outbox rows to an SMTP sink (aiosmtpd on loopback).

* bare loop: the same messages (composed once, as bytes) sent by aiosmtplib over one logged-in
  connection, ``sendmail`` per message - what any SMTP client costs; it and the outbox take
  turns on a quarter of the messages each, so that other load on the machine weighs on both;
* outbox: the same number of rows INSERTed by an integrator (plain sqlite3, one transaction),
  then ``OutboxWorker.run_once()``: compose, fix the Message-ID, ``sending``, SMTP, ``sent`` and
  the stored outgoing message, per row; msgs/s and the ratio to the bare loop (goal >= 0.8x);
* latency: the daemon's worker running, rows INSERTed one at a time (each its own commit, as an
  integrator's) 20 ms apart; from the INSERT to the end of DATA at the sink (goal p99 <= 100 ms).

``python scripts/bench_sending.py --messages N`` runs this row alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib

from mailbridge.config import Settings, parse_config
from mailbridge.core.identify import new_conversation_key
from mailbridge.core.outbox import build_message
from mailbridge.daemon.outbox import OutboxWorker
from mailbridge.log import configure_logging
from mailbridge.store.factory import open_repository
from mailbridge.testing.dovecot import free_port

_BODY = "Thank you for your message. " * 30
ROUNDS = 4  # turns of the bare loop and the outbox (see _measure)


@dataclass
class _Sink:
    """The SMTP sink in its own process; what it received is read from its log."""

    port: int
    log: Path
    host: str = "127.0.0.1"

    def lines(self) -> list[tuple[float, str]]:
        """(time.time() at the end of DATA, Subject) per message received."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            at, _size, subject = line.split(" ", 2)
            out.append((float(at), subject))
        return out

    def smtp_settings(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "tls": "none", "timeout_seconds": 10}


@contextlib.contextmanager
def _sink_process(workdir: Path) -> Iterator[_Sink]:
    sink = _Sink(free_port(), workdir / "sink.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge.testing.smtpsink", str(sink.port), str(sink.log)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        yield sink
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _settings(workdir: Path, sink: _Sink) -> Settings:
    return parse_config(
        {
            "database": str(workdir / "sending.db"),
            "recovery": {"enabled": False},
            "accounts": [
                {
                    "name": "support",
                    "address": "support@example.test",
                    "imap": {"host": "127.0.0.1", "port": 9, "tls": "none"},
                    "smtp": sink.smtp_settings(),
                    "auth": {"username": "support", "password": "bench"},
                }
            ],
        }
    )


def _insert(database: Path, rows: list[tuple[str, str, str]]) -> None:
    conn = sqlite3.connect(database)
    try:
        conn.executemany(
            "INSERT INTO outbox (account, toaddresses, subject, bodytext)"
            " VALUES ('support', ?, ?, ?)",
            rows,
        )
        conn.commit()
    finally:
        conn.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    cuts = statistics.quantiles(ordered, n=100, method="inclusive") if len(ordered) > 1 else []

    def pick(p: int) -> float:
        return cuts[p - 1] if cuts else ordered[0]

    return {"n": len(ordered), "p50_ms": pick(50), "p95_ms": pick(95), "p99_ms": pick(99)}


async def _bare_loop(sink: _Sink, raws: list[bytes], recipients: list[str]) -> float:
    client = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, start_tls=False, use_tls=False)
    await client.connect()
    await client.login("support", "bench")
    started = time.perf_counter()
    for raw, to in zip(raws, recipients, strict=True):
        await client.sendmail("support@example.test", [to], raw)
    seconds = time.perf_counter() - started
    await client.quit()
    return seconds


async def _latency(settings: Settings, sink: _Sink, count: int) -> list[float]:
    repo = await open_repository(settings.database, settings)
    worker = OutboxWorker(settings, repo)
    task = asyncio.create_task(worker.run())
    inserted: dict[str, float] = {}
    try:
        await asyncio.sleep(0.5)
        assert settings.sqlite_path is not None  # the bench's outbox is an SQLite file
        conn = sqlite3.connect(settings.sqlite_path)
        try:
            for n in range(count):
                subject = f"latency {n}"
                inserted[subject] = time.time()
                conn.execute(
                    "INSERT INTO outbox (account, toaddresses, subject, bodytext)"
                    " VALUES ('support', ?, ?, ?)",
                    (f"customer{n}@example.org", subject, _BODY),
                )
                conn.commit()
                await asyncio.sleep(0.02)
        finally:
            conn.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(1 for _at, subject in sink.lines() if subject in inserted) >= count:
                break
            await asyncio.sleep(0.05)
    finally:
        worker.stopping.set()
        await task
        await repo.aclose()
    return [(at - inserted[s]) * 1000 for at, s in sink.lines() if s in inserted]


async def measure(count: int, latency_count: int, workdir: Path) -> dict[str, Any]:
    # The daemon's log lines (one per message sent) go to a file, as under systemd's journal.
    with (workdir / "mailbridge.log").open("w") as log_file:
        configure_logging("info", "json", stream=log_file)
        with _sink_process(workdir) as sink:
            return await _measure(count, latency_count, workdir, sink)


async def _measure(count: int, latency_count: int, workdir: Path, sink: _Sink) -> dict[str, Any]:
    settings = _settings(workdir, sink)
    recipients = [f"customer{n}@example.org" for n in range(count)]
    raws = [
        build_message(
            address="support@example.test",
            display_name="Support",
            identification="message_id",
            conversation_key=new_conversation_key(),
            subject=f"Bench {n}",
            to=[to],
            text=_BODY,
        ).as_bytes()
        for n, to in enumerate(recipients)
    ]
    repo = await open_repository(settings.database, settings)  # creates the schema
    await repo.aclose()
    # The bare loop and the outbox take turns, ROUNDS times on a share of the messages each,
    # so that a change in the machine's load (other processes) weighs on both alike.
    bare = seconds = 0.0
    sent = 0
    share = -(-count // ROUNDS)
    for start in range(0, count, share):
        part = range(start, min(start + share, count))
        bare += await _bare_loop(sink, [raws[n] for n in part], [recipients[n] for n in part])
        assert settings.sqlite_path is not None
        _insert(settings.sqlite_path, [(recipients[n], f"Bench {n}", _BODY) for n in part])
        repo = await open_repository(settings.database, settings)
        try:
            started = time.perf_counter()
            summary = await OutboxWorker(settings, repo).run_once()
            seconds += time.perf_counter() - started
            sent += summary.sent
        finally:
            await repo.aclose()
    received = sum(1 for _at, subject in sink.lines() if subject.startswith("Bench"))
    latencies = await _latency(settings, sink, latency_count)
    bare_rate = count / bare
    rate = sent / seconds if seconds else 0.0
    return {
        "status": "measured",
        "messages": count,
        "bare_msgs_per_s": bare_rate,
        "msgs_per_s": rate,
        "ratio_to_bare": rate / bare_rate if bare_rate else 0.0,
        "sent": sent,
        "received": received - count,  # the bare loop's copies are in the log too
        "latency": _percentiles(latencies),
    }


def measure_sending(count: int, latency_count: int) -> dict[str, Any]:
    """The sending row; ``count`` 0 skips it."""
    if count <= 0:
        return {"status": "skipped"}
    with tempfile.TemporaryDirectory(prefix="mailbridge-bench-send-") as tmp:
        return asyncio.run(measure(count, latency_count, Path(tmp)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--latency-messages", type=int, default=200)
    args = parser.parse_args()
    print(json.dumps(measure_sending(args.messages, args.latency_messages), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
