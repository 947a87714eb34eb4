"""Tests for the sd_notify client against real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailbridge.daemon.systemd import Notifier, watchdog_interval


@pytest.fixture
def path_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: AF_UNIX paths are limited to 108 bytes and pytest's tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="mb-") as directory:
        address = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            sock.settimeout(2)
            yield sock, address


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"mailbridge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        yield sock, "@" + name


def _receive(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_path_socket_receives_exact_datagrams(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready()
    assert _receive(sock) == b"READY=1"
    assert notifier.status("Watching 2 accounts")
    assert _receive(sock) == b"STATUS=Watching 2 accounts"
    assert notifier.watchdog()
    assert _receive(sock) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert _receive(sock) == b"STOPPING=1"
    assert notifier.failures == 0


def test_abstract_socket_receives_exact_datagrams(
    abstract_socket: tuple[socket.socket, str],
) -> None:
    sock, address = abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})

    assert notifier.ready("started")
    assert _receive(sock) == b"READY=1\nSTATUS=started"
    assert notifier.watchdog()
    assert _receive(sock) == b"WATCHDOG=1"


def test_reloading_carries_monotonic_usec(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier({"NOTIFY_SOCKET": address}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    first, second = _receive(sock).decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_cannot_inject_assignments(path_socket: tuple[socket.socket, str]) -> None:
    sock, address = path_socket
    Notifier({"NOTIFY_SOCKET": address}).status("NO LOGIN failed\nREADY=1")
    assert _receive(sock) == b"STATUS=NO LOGIN failed READY=1"


def test_reads_notify_socket_from_the_environment(
    path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier().ready()
    assert _receive(sock) == b"READY=1"


def test_unset_environment_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.watchdog_interval() is None
    assert notifier.failures == 0


def test_unsupported_address_is_a_no_op() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_send_errors_never_raise() -> None:
    with tempfile.TemporaryDirectory(prefix="mb-") as directory:
        notifier = Notifier({"NOTIFY_SOCKET": str(Path(directory) / "nobody-listens")})
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.failures == 2


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == (
        15.0
    )
    notifier = Notifier({"WATCHDOG_USEC": "10000000"})
    assert notifier.watchdog_interval() == 5.0


def test_watchdog_interval_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0
    assert Notifier().watchdog_interval() == 2.0


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},  # someone else's watchdog
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"},
    ],
)
def test_watchdog_interval_none_when_not_for_us(env: dict[str, str]) -> None:
    if env.get("WATCHDOG_PID") == "1" and os.getpid() == 1:
        pytest.skip("running as PID 1")
    assert watchdog_interval(env) is None
