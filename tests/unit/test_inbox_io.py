"""Issue 10, the I/O side, pure parts: byte-bounded batches, a parser bug as code ``internal``,
the drain reporting a worker that failed, keepalive on a socket, the new limits' validation."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.config import parse_config
from mailbridge.daemon import parse_step
from mailbridge.daemon.account import _parse_batch, plan_batches
from mailbridge.daemon.supervisor import Supervisor, _Running
from mailbridge.errors import ConfigError
from mailbridge.mail import net
from mailbridge.mail.imap import FetchedMessage, parse_meta_response

SIZES = st.lists(st.integers(min_value=0, max_value=5_000), max_size=60)


@given(SIZES, st.integers(min_value=1, max_value=10), st.integers(min_value=1, max_value=8_000))
def test_plan_batches_keeps_order_and_both_bounds(
    sizes: list[int], max_count: int, max_bytes: int
) -> None:
    pairs = [(uid, size) for uid, size in enumerate(sizes, start=1)]
    batches = plan_batches(pairs, max_count, max_bytes)
    assert [uid for batch in batches for uid in batch] == [uid for uid, _ in pairs]
    size_of = dict(pairs)
    for batch in batches:
        assert 1 <= len(batch) <= max_count
        total = sum(size_of[uid] for uid in batch)
        # Over the byte bound only as a single message that is larger on its own.
        assert total <= max_bytes or len(batch) == 1


def test_hundred_large_messages_never_share_a_batch_beyond_the_byte_bound() -> None:
    mb = 1024 * 1024
    batches = plan_batches([(uid, 25 * mb) for uid in range(100)], 100, 50 * mb)
    assert [len(b) for b in batches] == [2] * 50


def test_meta_response_is_parsed() -> None:
    lines = [
        b'1 FETCH (UID 7 FLAGS (\\Seen) INTERNALDATE "30-Nov-2026 09:00:00 +0100" '
        b"RFC822.SIZE 123456)",
        b"2 FETCH (FLAGS (\\Seen))",  # an unsolicited flag update: no UID, no size
        b"Fetch completed (0.001 + 0.000 secs).",
    ]
    [meta] = parse_meta_response(lines)
    assert (meta.uid, meta.size, meta.flags) == (7, 123456, frozenset({"\\Seen"}))
    assert meta.internaldate is not None
    assert meta.internaldate.utcoffset() is not None


def test_a_parser_bug_is_internal_with_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes, **_: Any) -> Any:
        raise ZeroDivisionError("a bug in the parser")

    monkeypatch.setattr(parse_step, "parse_message", broken)
    raw = b"Message-ID: <a@b>\r\nSubject: x\r\n\r\nbody\r\n"
    items, failures = _parse_batch([FetchedMessage(1, raw, None, frozenset())], 10**6)
    assert items == []
    [failure] = failures
    assert failure.code == "internal"
    assert "ZeroDivisionError" in failure.reason
    assert failure.traceback is not None
    assert "a bug in the parser" in failure.traceback


def test_keepalive_is_set_on_a_tcp_socket() -> None:
    with socket.socket() as sock:
        assert net.enable_keepalive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == net.KEEPIDLE_SECONDS
    with socket.socket(socket.AF_UNIX) as unix:
        assert not net.enable_keepalive(unix)
    assert not net.enable_keepalive(None)


def _config(tmp_path: Path, **limits: Any) -> dict[str, Any]:
    return {
        "database": str(tmp_path / "db"),
        "limits": limits,
        "accounts": [
            {
                "name": "a",
                "address": "a@example.test",
                "imap": {"host": "127.0.0.1"},
                "auth": {"username": "a", "password": "x"},
            }
        ],
    }


def test_new_limits_have_defaults_and_are_validated(tmp_path: Path) -> None:
    limits = parse_config(_config(tmp_path)).limits
    assert limits.message_max_size_mb == 50
    assert limits.fetch_batch_max_mb == 50
    assert limits.backlog_warning == 1000
    assert limits.message_max_bytes == 50 * 1024 * 1024
    for key, value in (
        ("message_max_size_mb", 0),
        ("fetch_batch_max_mb", -1),
        ("backlog_warning", -5),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(_config(tmp_path, **{key: value}))
        assert caught.value.path == f"limits.{key}"


async def test_the_drain_logs_a_worker_that_failed(tmp_path: Path) -> None:
    settings = parse_config(_config(tmp_path))
    supervisor = Supervisor(settings, drain_seconds=5)

    async def crash() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the worker broke while draining")

    task = asyncio.create_task(crash(), name="account:a")
    worker: Any = type("W", (), {"stopping": asyncio.Event()})()
    supervisor.running["a"] = _Running(worker, task, settings.accounts[0])
    with structlog.testing.capture_logs() as logs:
        await supervisor._stop_workers(["a"])
    [failed] = [e for e in logs if e["event"] == "drain_task_failed"]
    assert failed["task"] == "account:a"
    assert failed["code"] == "internal"
    assert "the worker broke" in failed["error"]
