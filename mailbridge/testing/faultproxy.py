"""A fault-injecting TCP proxy for tests and ``scripts/crashtest``: put it between a client and
a server and make the connection fail in controlled ways.

Usage::

    async with FaultProxy(dovecot.host, dovecot.port) as proxy:
        ... point the client at proxy.host / proxy.port ...
        fired = proxy.inject(Fault("cut", on_client=b"UID FETCH", after_server_bytes=30_000))
        await fired.wait()          # the connection was cut 30 kB into the FETCH response

Without a fault the proxy passes bytes through unchanged, counting them (``server_bytes``: what
the client received, e.g. to show a message was *not* downloaded). :meth:`FaultProxy.inject`
arms one :class:`Fault`; the first connection that meets its trigger consumes it, so a client that
reconnects afterwards gets a healthy connection (which is what "the loop recovers by itself"
needs). The trigger is either a byte pattern seen client->server (``on_client``, e.g.
``b"UID FETCH"``, ``b"UID MOVE"``, ``b"IDLE"``) or, with ``on_client=None``, the start of the next
connection. After the trigger the proxy forwards ``after_server_bytes`` more bytes
server->client (or waits ``delay`` seconds), then acts:

* ``cut``: both sockets are aborted (a TCP reset), as a crashed server or a NAT timeout does;
* ``stall``: nothing more is forwarded in either direction and the sockets stay open, as a hung
  server or a black-holed route does; the client has to notice by its own timeout.

With ``forward_trigger=False`` the client's triggering chunk is not sent to the server (the
command is lost on the way); by default it is, so e.g. a cut "mid-MOVE" means the server received
and carried out the MOVE but the client never saw the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

_CHUNK = 65536


@dataclass
class Fault:
    """One fault to inject; see the module docstring."""

    action: Literal["cut", "stall"]
    on_client: bytes | None = None
    after_server_bytes: int = 0
    delay: float = 0.0
    forward_trigger: bool = True
    fired: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Pipe:
    """One proxied connection."""

    client_writer: asyncio.StreamWriter
    server_writer: asyncio.StreamWriter
    fault: Fault | None = None  # claimed by this connection once triggered
    budget: int = 0  # server->client bytes still to forward before acting
    broken: bool = False  # cut or stalled: forward nothing more
    tail: bytes = b""  # the last client bytes, to find a pattern split across reads


class FaultProxy:
    """Listens on loopback (``host``/``port``) and forwards to ``target_host``:``target_port``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.connections = 0  # accepted so far
        self.server_bytes = 0  # bytes forwarded server->client, all connections (what was fetched)
        self.events: list[str] = []  # what happened, for test diagnostics
        self._pending: Fault | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            self._abort(pipe)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def inject(self, fault: Fault) -> asyncio.Event:
        """Arm ``fault`` (replacing one not yet triggered); returns its ``fired`` event."""
        self._pending = fault
        return fault.fired

    def cut_all(self) -> None:
        """Abort every open connection now."""
        for pipe in list(self._pipes):
            self._abort(pipe)

    # -- internals ---------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError as exc:
            self.events.append(f"connect to target failed: {exc}")
            writer.transport.abort()
            return
        pipe = _Pipe(client_writer=writer, server_writer=server_writer)
        self._pipes.add(pipe)
        if self._pending is not None and self._pending.on_client is None:
            self._trigger(pipe)
        up = asyncio.create_task(self._client_to_server(pipe, reader))
        down = asyncio.create_task(self._server_to_client(pipe, server_reader))
        for task in (up, down):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if pipe.broken:
                # A stall keeps both sockets open until the client gives up (or stop()).
                await asyncio.wait({up})
            else:
                # One side finished (e.g. the server's BYE): let the other drain briefly.
                await asyncio.wait({up, down}, timeout=5)
        finally:
            if pipe.broken:
                self._abort(pipe)
            else:
                for each in (pipe.client_writer, pipe.server_writer):
                    each.close()
            for task in (up, down):
                task.cancel()
            self._pipes.discard(pipe)

    def _trigger(self, pipe: _Pipe) -> None:
        fault = self._pending
        assert fault is not None
        self._pending = None
        pipe.fault = fault
        pipe.budget = fault.after_server_bytes
        self.events.append(f"triggered {fault.action} on connection {self.connections}")
        if fault.delay > 0:
            asyncio.get_running_loop().call_later(fault.delay, self._act, pipe)

    def _act(self, pipe: _Pipe) -> None:
        fault = pipe.fault
        if fault is None or pipe.broken:
            return
        pipe.broken = True
        self.events.append(f"{fault.action} done")
        if fault.action == "cut":
            self._abort(pipe)
        fault.fired.set()

    def _abort(self, pipe: _Pipe) -> None:
        pipe.broken = True
        for writer in (pipe.client_writer, pipe.server_writer):
            writer.transport.abort()

    async def _client_to_server(self, pipe: _Pipe, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if pipe.broken:
                    continue  # stalled: swallow (a cut aborted the reader already)
                pending = self._pending
                forward = True
                if pipe.fault is None and pending is not None and pending.on_client is not None:
                    if pending.on_client in pipe.tail + data:
                        forward = pending.forward_trigger
                        self._trigger(pipe)
                        if not forward and pending.delay <= 0:
                            self._act(pipe)
                    pipe.tail = (pipe.tail + data)[-len(pending.on_client) :]
                if forward and not pipe.broken:
                    pipe.server_writer.write(data)
                    await pipe.server_writer.drain()
        if not pipe.broken:
            with contextlib.suppress(OSError):
                pipe.server_writer.write_eof()

    async def _server_to_client(self, pipe: _Pipe, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if pipe.broken:
                    continue
                fault = pipe.fault
                if fault is not None and fault.delay <= 0:
                    allowed, pipe.budget = data[: pipe.budget], max(0, pipe.budget - len(data))
                    if allowed:
                        self.server_bytes += len(allowed)
                        pipe.client_writer.write(allowed)
                        await pipe.client_writer.drain()
                    if len(allowed) < len(data) or pipe.budget == 0:
                        self._act(pipe)
                    continue
                self.server_bytes += len(data)
                pipe.client_writer.write(data)
                await pipe.client_writer.drain()
        if not pipe.broken:
            with contextlib.suppress(OSError):
                pipe.client_writer.write_eof()
