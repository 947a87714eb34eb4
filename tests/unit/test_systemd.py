"""Tests for the sd_notify client against real AF_UNIX datagram sockets.

The last ones run a real :class:`Supervisor` with the socket as ``$NOTIFY_SOCKET``; its one
account points at a closed port (it just backs off), so no mail server is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from mailbridge.config import load_config
from mailbridge.daemon import supervisor as supervisor_module
from mailbridge.daemon.supervisor import Supervisor
from mailbridge.daemon.systemd import Notifier, watchdog_interval


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


# -- a running Supervisor and the watchdog ---------------------------------------------------------


class Datagrams:
    """Every datagram the socket receives while in use, with the event loop's time of arrival."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[float, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Datagrams:
        self.sock.setblocking(False)  # loop.sock_recv needs it
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.received.append((loop.time(), data))

    def times(self, payload: bytes) -> list[float]:
        return [at for at, data in self.received if data == payload]

    def first(self, prefix: bytes, after: float = 0.0) -> float | None:
        """When the first datagram starting with ``prefix`` arrived after ``after``."""
        return next((at for at, d in self.received if d.startswith(prefix) and at > after), None)

    async def wait_for(self, prefix: bytes, after: float = 0.0, within: float = 10.0) -> float:
        deadline = time.monotonic() + within
        while (at := self.first(prefix, after)) is None:
            assert time.monotonic() < deadline, f"no {prefix!r} within {within} s"
            await asyncio.sleep(0.02)
        return at


def write_config(tmp_path: Path) -> Path:
    """A one-account config whose server refuses connections: the account just backs off."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    data: dict[str, Any] = {
        "database": str(tmp_path / "mailbridge.db"),
        "recovery": {"enabled": False},
        "accounts": [
            {
                "name": "nowhere",
                "address": "nowhere@example.test",
                "imap": {"host": "127.0.0.1", "port": closed_port, "tls": "none"},
                "auth": {"username": "nobody", "password": "not-a-real-password"},
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.asynccontextmanager
async def running_supervisor(
    tmp_path: Path, environ: dict[str, str], drain_seconds: float = 2.0
) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor(
        load_config(write_config(tmp_path)),
        notifier=Notifier(environ),
        drain_seconds=drain_seconds,
    )
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        supervisor.request_stop()
        assert await asyncio.wait_for(task, timeout=20) == 0


@pytest.mark.parametrize("pid", [None, "self"])
async def test_supervisor_pings_at_half_of_watchdog_usec(
    tmp_path: Path, path_socket: tuple[socket.socket, str], pid: str | None
) -> None:
    sock, address = path_socket
    environ = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}  # WatchdogSec=0.2
    if pid is not None:
        environ["WATCHDOG_PID"] = str(os.getpid())
    async with Datagrams(sock) as datagrams, running_supervisor(tmp_path, environ):
        ready = await datagrams.wait_for(b"READY=1")
        await asyncio.sleep(1.0)
    pings = [at for at in datagrams.times(b"WATCHDOG=1") if ready - 0.5 < at < ready + 1.0]
    # Every 0.1 s: about 10 in that second, never more than one per interval (the loop also
    # wakes for other reasons, and must not ping on each wake). Fewer on a loaded machine, and
    # gaps measured on arrival bunch up there, so only the counts are asserted.
    assert 2 <= len(pings) <= 12, pings


@pytest.mark.parametrize(
    "watchdog",
    [
        {},  # no WatchdogSec=
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getppid())},  # meant for another pid
        {"WATCHDOG_USEC": "0"},
    ],
    ids=["unset", "other-pid", "zero"],
)
async def test_supervisor_sends_no_pings_unless_asked(
    tmp_path: Path, path_socket: tuple[socket.socket, str], watchdog: dict[str, str]
) -> None:
    sock, address = path_socket
    async with (
        Datagrams(sock) as datagrams,
        running_supervisor(tmp_path, {"NOTIFY_SOCKET": address, **watchdog}) as supervisor,
    ):
        ready = await datagrams.wait_for(b"READY=1")
        supervisor.request_reload()  # the loop wakes; a reload must not ping either
        reloading = await datagrams.wait_for(b"RELOADING=1", after=ready)
        await datagrams.wait_for(b"READY=1", after=reloading)
        await asyncio.sleep(0.5)
    assert datagrams.first(b"STOPPING=1") is not None  # the socket did receive the rest
    assert datagrams.times(b"WATCHDOG=1") == []


async def test_pings_stop_while_a_reload_is_hung_and_resume_after(
    tmp_path: Path, path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload overrunning drain_seconds + STUCK_GRACE_SECONDS is a hung supervisor: systemd
    must get no more pings (it restarts the service); if it does finish, pings resume."""
    monkeypatch.setattr(supervisor_module, "STUCK_GRACE_SECONDS", 0.3)
    sock, address = path_socket
    release = asyncio.Event()

    async def hung_reload() -> None:
        await release.wait()

    environ = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"}  # a ping every 0.05 s
    with structlog.testing.capture_logs() as logs:
        async with (
            Datagrams(sock) as datagrams,
            running_supervisor(tmp_path, environ, drain_seconds=0.2) as supervisor,
        ):
            await datagrams.wait_for(b"WATCHDOG=1")
            monkeypatch.setattr(supervisor, "reload", hung_reload)
            loop = asyncio.get_running_loop()
            requested = loop.time()
            supervisor.request_reload()
            await asyncio.sleep(1.5)  # the bound is 0.5 s
            before = loop.time()
            release.set()
            await datagrams.wait_for(b"WATCHDOG=1", after=before)
    pings = datagrams.times(b"WATCHDOG=1")
    assert not [at for at in pings if requested + 0.8 < at < before]
    assert [at for at in pings if requested < at < requested + 0.4]  # pinged while healthy
    hung = [e for e in logs if e["event"] == "supervisor_hung"]
    assert len(hung) == 1
    assert hung[0]["task"] == "reload"
