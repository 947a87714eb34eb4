"""A real SMTP server for tests and the bench: aiosmtpd on loopback, with AUTH, that keeps what
it receives and can be told how to answer.

``SmtpSink().start()`` listens on a free loopback port. ``replies`` is a queue of answers to
DATA (``"451 4.3.0 Try again later"``), used up one per message; when empty, ``250 OK``.
``rcpt_replies`` does the same for RCPT TO. ``max_connections`` refuses EHLO/HELO on a
further connection while that many are open (``432 4.3.2``, as Exchange Online answers past
its limit per mailbox), or with ``limit_at = "mail"`` its MAIL FROM; ``greeting_delay`` slows
every EHLO/HELO. ``hold()`` makes the next DATA wait, after the
message has been received and kept, until ``release()``: the window between the end of DATA
and the client's status update, where a crash test kills the client.
"""

from __future__ import annotations

import email
import email.policy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailbridge.testing.dovecot import free_port

LIMIT_REPLY = "432 4.3.2 Concurrent connections limit exceeded"


@dataclass(frozen=True, slots=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    at: float = 0.0  # time.monotonic() at the end of DATA (same clock in one process)
    peer: Any = None  # the client's (host, port): which connection brought it
    mail_options: tuple[str, ...] = ()  # MAIL FROM parameters, upper-cased: ("SIZE=1234",)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        with self.sink.lock:
            reply = self.sink.rcpt_replies.pop(0) if self.sink.rcpt_replies else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def _over_limit(self, server: Any, at: str) -> bool:
        """Whether ``server`` (a connection's protocol) is past ``max_connections``, refused
        at ``at`` (``greeting``: EHLO/HELO of a new connection; ``mail``: MAIL FROM of one not
        among the first ``max_connections`` of those open)."""
        with self.sink.lock:
            open_ = [s for s in self.sink.connections if s.transport is not None]
            if server not in open_:
                if self.sink.limit_at == "greeting" and self._full(open_):
                    self.sink.refused_connections += 1
                    return True
                open_.append(server)
            self.sink.connections = open_
            limit = self.sink.max_connections
            if (
                at == "mail" == self.sink.limit_at
                and limit is not None
                and (server not in open_[:limit])
            ):
                self.sink.refused_connections += 1
                return True
            return False

    def _full(self, open_: list[Any]) -> bool:
        limit = self.sink.max_connections
        return limit is not None and len(open_) >= limit

    async def _greet(self, server: Any, session: Any, hostname: str) -> bool:
        if self.sink.greeting_delay:
            import asyncio

            await asyncio.sleep(self.sink.greeting_delay)
        if self._over_limit(server, "greeting"):
            return False
        session.host_name = hostname
        return True

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses if await self._greet(server, session, hostname) else [LIMIT_REPLY]

    async def handle_HELO(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, hostname: str
    ) -> str:
        ok = await self._greet(server, session, hostname)
        return f"250 {server.hostname}" if ok else LIMIT_REPLY

    async def handle_MAIL(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self._over_limit(server, "mail"):
            return LIMIT_REPLY
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        import asyncio

        with self.sink.lock:
            reply = self.sink.replies.pop(0) if self.sink.replies else "250 OK"
            held = self.sink._hold
            if reply.startswith("250") and self.sink.log_path is not None:
                self.sink.log(bytes(envelope.content))
            elif reply.startswith("250"):
                self.sink.received.append(
                    Received(
                        envelope.mail_from,
                        tuple(envelope.rcpt_tos),
                        bytes(envelope.content),
                        time.monotonic(),
                        session.peer,
                        tuple(envelope.mail_options),
                    )
                )
        if held is not None:
            self.sink.holding.set()
            await asyncio.get_running_loop().run_in_executor(None, held.wait, 60)
        return reply


class _Authenticator:
    """Any login with a password succeeds unless ``sink.logins`` names the accepted ones."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        logins = self.sink.logins
        login, password = auth_data.login.decode(), auth_data.password.decode()
        ok = bool(password) if logins is None else logins.get(login) == password
        return AuthResult(success=ok, handled=False)


class SmtpSink:
    """See the module docstring."""

    def __init__(
        self,
        *,
        port: int | None = None,
        log_path: str | None = None,
        data_size_limit: int | None = 2**25,
    ) -> None:
        """``data_size_limit``: announced as SIZE in the EHLO reply (RFC 1870) and enforced,
        aiosmtpd's default; None announces no SIZE."""
        self.log_path = log_path
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.replies: list[str] = []
        self.rcpt_replies: list[str] = []
        self.holding = threading.Event()
        self._hold: threading.Event | None = None
        self.logins: dict[str, str] | None = None  # None: every login is accepted
        self.max_connections: int | None = None  # None: any number at once
        self.limit_at = "greeting"  # or "mail": where a connection over the limit is refused
        self.greeting_delay = 0.0  # seconds each EHLO/HELO waits (a slow sign-in)
        self.connections: list[Any] = []  # the open ones (aiosmtpd protocols) once greeted
        self.refused_connections = 0
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            authenticator=_Authenticator(self),
            auth_require_tls=False,
            data_size_limit=data_size_limit,
        )

    def log(self, data: bytes) -> None:
        """Append ``<time.time()> <bytes> <Subject>`` to ``log_path`` (see :func:`_serve`)."""
        assert self.log_path is not None
        message = email.message_from_bytes(data, policy=email.policy.default)
        with open(self.log_path, "a", encoding="utf-8") as out:
            out.write(f"{time.time():.6f} {len(data)} {message['Subject']}\n")

    def start(self) -> SmtpSink:
        # aiosmtpd logs every connection from its own thread; keep that out of the root logger.
        logging.getLogger("mail.log").propagate = False
        self._controller.start()
        return self

    def stop(self) -> None:
        self.release()
        self._controller.stop()

    def hold(self) -> None:
        """Make DATA wait (after keeping the message) until :meth:`release`."""
        with self.lock:
            self._hold = threading.Event()
            self.holding.clear()

    def release(self) -> None:
        with self.lock:
            if self._hold is not None:
                self._hold.set()
            self._hold = None

    def smtp_settings(self) -> dict[str, Any]:
        """The ``smtp`` section of an account pointing here (plain text, loopback)."""
        return {"host": self.host, "port": self.port, "tls": "none", "timeout_seconds": 10}


def _serve(port: int, log_path: str) -> None:
    """``python -m mailbridge.testing.smtpsink PORT LOG``: a sink in its own process (the bench,
    so that the server does not share the measured process's interpreter). Each message
    appends ``<time.time()> <bytes> <Subject>`` to LOG instead of being kept; stops on SIGTERM."""
    import signal

    sink = SmtpSink(port=port, log_path=log_path)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    sink.start()
    print("ready", flush=True)
    done.wait()
    sink.stop()


if __name__ == "__main__":
    import sys

    _serve(int(sys.argv[1]), sys.argv[2])
