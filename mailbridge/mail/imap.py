"""IMAP network I/O over aioimaplib: one :class:`ImapSession` per account connection.

This module is the boundary between mailbridge and aioimaplib/ssl/socket/asyncio: every
exception from below is mapped into :mod:`mailbridge.errors` here (``raise ... from exc``), so the
daemon only ever sees :class:`ServerError` (codes ``unreachable``, ``timeout``,
``connection_lost``, ``tls_untrusted``, ``tls_failed``, or one classified from the server's
words), :class:`AuthError` and :class:`FolderError`. The password never appears in a message or
a log line.

aioimaplib 2.0.3 is used at the protocol level (``IMAP4ClientProtocol``) rather than through its
``IMAP4``/``IMAP4_SSL`` wrappers, because the wrappers cannot do STARTTLS, do not report a
dropped TLS connection, leave some commands (IDLE) without a timeout, and mis-parse the
post-login capability list. Every command here is raced against a per-session "connection lost"
future and an inactivity timeout (``imap.timeout_seconds``), so a stalled or vanished server
cannot hang the daemon. After any exception the session is unusable (aioimaplib's command queue
is in an unknown state): the caller closes it and opens a new one.

Commands are serialised by a lock: aioimaplib keys pending commands by response name, so two
concurrent commands of one session could steal each other's responses.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import inspect
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final, TypeVar

import aioimaplib
import structlog

from mailbridge.config import AccountSettings
from mailbridge.errors import AuthError, FolderError, ServerError, classify_server_text
from mailbridge.mail.auth.tokens import (
    sasl_error_text,
    sasl_oauthbearer,
    sasl_xoauth2,
    with_token_retry,
)
from mailbridge.mail.net import enable_keepalive

log = structlog.get_logger("mailbridge.imap")

T = TypeVar("T")

# Codes that mean "these credentials/this account cannot log in": raised as AuthError. Any other
# classified refusal (connection limit, server unavailable) stays a plain ServerError so the
# daemon's backoff treats it as the transient condition it is.
_AUTH_CODES: Final = frozenset(
    {
        "auth_failed",
        "account_disabled",
        "app_password_required",
        "token_expired",
        "consent_missing",
        "protocol_disabled",
        "mailbox_not_connected",
        "client_secret_invalid",
        "client_secret_expired",
        "sign_in_required",
        "upn_mismatch",
    }
)

_LOGOUT_TIMEOUT: Final = 5.0
# UIDs per metadata FETCH: bounds one response (~100 bytes a message) for a 40,000-mail Inbox.
_META_CHUNK: Final = 5000
_FEED_SLICE: Final = 1024

_MONTHS: Final = {
    m: i + 1
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    )
}
_INTERNALDATE_RE: Final = re.compile(
    r'INTERNALDATE "\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) '
    r'(\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})"'
)
_FETCH_START_RE: Final = re.compile(rb"^(\d+) FETCH \(")
_LITERAL_END_RE: Final = re.compile(rb"\{(\d+)\}$")
_COPYUID_RE: Final = re.compile(r"\[COPYUID (\d+) ([0-9:,]+) ([0-9:,]+)\]", re.IGNORECASE)
_APPENDUID_RE: Final = re.compile(r"\[APPENDUID (\d+) (\d+)\]", re.IGNORECASE)
_CAPABILITY_RE: Final = re.compile(r"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_LIST_RE: Final = re.compile(
    r'^\((?P<flags>[^)]*)\) (?P<delim>"(?:[^"\\]|\\.)*"|NIL) (?P<name>.*)$', re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """What the server says of a message without sending it: UID, RFC822.SIZE (octets, RFC 3501
    section 2.3.4), INTERNALDATE (when it arrived) and flags."""

    uid: int
    size: int
    internaldate: datetime | None
    flags: frozenset[str]


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    """One message as fetched: its UID, exact bytes, INTERNALDATE and flags at fetch time."""

    uid: int
    raw: bytes
    internaldate: datetime | None
    flags: frozenset[str]


# -- helpers: UID sets, quoting, modified UTF-7 ----------------------------------------------


def uid_set(uids: Iterable[int]) -> str:
    """A compact RFC 3501 sequence set: ``[1, 2, 3, 5, 7, 8]`` -> ``"1:3,5,7:8"``."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(parts)


def parse_uid_set(text: str) -> list[int]:
    """Expand a sequence set without ``*`` (as in COPYUID): ``"1:3,5"`` -> ``[1, 2, 3, 5]``."""
    out: list[int] = []
    for part in text.split(","):
        if ":" in part:
            a, b = (int(x) for x in part.split(":", 1))
            # RFC 4315 section 3: a range may be written high:low; UIDs pair up in ascending order.
            out.extend(range(min(a, b), max(a, b) + 1))
        else:
            out.append(int(part))
    return out


def quote(text: str) -> str:
    """An IMAP quoted string (RFC 3501 section 4.3); aioimaplib sends arguments verbatim."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_mailbox(name: str) -> str:
    """Folder name to modified UTF-7 (RFC 3501 section 5.1.3): ``Entwürfe`` -> ``Entw&APw-rfe``.

    Servers without UTF8=ACCEPT (RFC 6855) only understand this form.
    """
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            encoded = base64.b64encode(data).decode("ascii").rstrip("=").replace("/", ",")
            out.append(f"&{encoded}-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def decode_mailbox(name: str) -> str:
    """Modified UTF-7 folder name (as LIST returns it) to text."""

    def repl(match: re.Match[str]) -> str:
        body = match.group(1)
        if not body:
            return "&"
        data = body.replace(",", "/")
        data += "=" * (-len(data) % 4)
        try:
            return base64.b64decode(data).decode("utf-16-be")
        except (ValueError, UnicodeDecodeError):
            return match.group(0)

    return re.sub(r"&([A-Za-z0-9+,]*)-", repl, name)


def _mailbox_arg(name: str) -> str:
    # Always quoted: names with spaces ("Mailbridge Processed") are otherwise two arguments.
    return quote(encode_mailbox(name))


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _text(lines: Sequence[Any]) -> str:
    """The textual lines of a response (no literals) joined for messages and classification."""
    return " ".join(
        line.decode("utf-8", "replace") if isinstance(line, bytes) else ""
        for line in lines
        if isinstance(line, bytes)
    ).strip()


def _informs(line: object) -> bool:
    """An untagged ``OK`` status line (RFC 3501 section 7.1.1): information, not a reason."""
    return isinstance(line, bytes) and line.startswith(b"OK ")


def imap_date(when: datetime) -> str:
    """An RFC 3501 ``date`` (``1-Feb-2026``) whatever the process locale (strftime's %b is not)."""
    month = next(name for name, number in _MONTHS.items() if number == when.month)
    return f"{when.day}-{month}-{when.year}"


def _parse_internaldate(text: str) -> datetime | None:
    match = _INTERNALDATE_RE.search(text)
    if match is None:
        return None
    day, mon, year, hh, mm, ss, sign, oh, om = match.groups()
    month = _MONTHS.get(mon.capitalize())
    if month is None:
        return None
    offset = timedelta(hours=int(oh), minutes=int(om))
    tz = timezone(-offset if sign == "-" else offset)
    try:
        return datetime(int(year), month, int(day), int(hh), int(mm), int(ss), tzinfo=tz)
    except ValueError:
        return None


def parse_fetch_response(lines: Sequence[Any]) -> list[FetchedMessage]:
    """Parse aioimaplib 2.0.3 FETCH response lines into messages (in response order).

    aioimaplib hands a FETCH back as a flat list: the untagged line without ``* `` and ending
    in ``{size}`` (e.g. ``b'3 FETCH (UID 7 FLAGS (\\Seen) BODY[] {512}'``), then the literal as a
    ``bytearray``, then the rest of that response as another line (``b')'`` or
    ``b' FLAGS (\\Seen))'`` - Dovecot may put FLAGS after the literal), and so on for the next
    message; the last element is the tagged status text. Items without a UID or without a body
    (unsolicited flag updates from other sessions) are skipped.
    """
    items: list[tuple[list[str], list[bytes]]] = []
    expect_literal = False
    for line in lines:
        if expect_literal:
            expect_literal = False
            if items:
                items[-1][1].append(bytes(line))
                items[-1][0].append(f"\x00{len(items[-1][1]) - 1}\x00")
            continue
        if not isinstance(line, bytes):
            continue
        if _FETCH_START_RE.match(line):
            items.append(([], []))
        elif not items:
            continue
        literal = _LITERAL_END_RE.search(line)
        if literal is not None:
            line = line[: literal.start()]
            expect_literal = True
        items[-1][0].append(line.decode("utf-8", "replace"))
    messages: list[FetchedMessage] = []
    for parts, literals in items:
        text = "".join(parts)
        uid_match = re.search(r"\bUID (\d+)", text)
        if uid_match is None:
            continue
        body: bytes | None = None
        body_match = re.search(
            r'BODY\[(?:HEADER\.FIELDS \([^)]*\))?\] (?:\x00(\d+)\x00|"((?:[^"\\]|\\.)*)")', text
        )
        if body_match is not None:
            if body_match.group(1) is not None:
                body = literals[int(body_match.group(1))]
            else:
                body = _unquote(f'"{body_match.group(2)}"').encode("utf-8")
        if body is None:
            continue
        flags_match = re.search(r"\bFLAGS \(([^)]*)\)", text)
        flags = frozenset(flags_match.group(1).split()) if flags_match else frozenset()
        messages.append(
            FetchedMessage(
                uid=int(uid_match.group(1)),
                raw=body,
                internaldate=_parse_internaldate(text),
                flags=flags,
            )
        )
    return messages


def parse_meta_response(lines: Sequence[Any]) -> list[MessageMeta]:
    """Parse the lines of a ``UID FETCH ... (UID FLAGS INTERNALDATE RFC822.SIZE)`` (no literals).

    Items without a UID or an RFC822.SIZE (unsolicited flag updates) are skipped.
    """
    metas: list[MessageMeta] = []
    for line in lines:
        if not isinstance(line, bytes) or not _FETCH_START_RE.match(line):
            continue
        text = line.decode("utf-8", "replace")
        uid_match = re.search(r"\bUID (\d+)", text)
        size_match = re.search(r"\bRFC822\.SIZE (\d+)", text)
        if uid_match is None or size_match is None:
            continue
        flags_match = re.search(r"\bFLAGS \(([^)]*)\)", text)
        metas.append(
            MessageMeta(
                uid=int(uid_match.group(1)),
                size=int(size_match.group(1)),
                internaldate=_parse_internaldate(text),
                flags=frozenset(flags_match.group(1).split()) if flags_match else frozenset(),
            )
        )
    return metas


def _parse_list(lines: Sequence[Any]) -> list[str]:
    """Folder names from LIST response lines (quoted, atom or literal names)."""
    names: list[str] = []
    expect_literal = False
    for line in lines:
        if expect_literal:
            expect_literal = False
            names.append(decode_mailbox(bytes(line).decode("utf-8", "replace")))
            continue
        if not isinstance(line, bytes):
            continue
        match = _LIST_RE.match(line.decode("utf-8", "replace"))
        if match is None:
            continue
        name = match.group("name")
        if re.fullmatch(r"\{\d+\}", name):
            expect_literal = True
            continue
        names.append(decode_mailbox(_unquote(name)))
    return names


# -- the aioimaplib protocol, instrumented -----------------------------------------------------


_AIOIMAPLIB_LOG = logging.getLogger("aioimaplib.aioimaplib")


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol plus what it lacks: a greeting outcome and a data timestamp."""

    incomplete_line: bytes  # aioimaplib's: a line split across reads
    current_command: Any  # aioimaplib's: the command whose response is being read

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Any) -> None:
        super().__init__(loop, on_lost)
        self.greeted: asyncio.Future[None] = loop.create_future()
        self.greeting = b""
        self.welcome_error: Exception | None = None
        self.last_activity = loop.time()
        # AUTHENTICATE (RFC 3501 section 6.2.2): the mechanism in progress and the server's
        # challenge, which for XOAUTH2/OAUTHBEARER is a base64 JSON error (RFC 7628 3.2.2).
        self.sasl_mechanism: str | None = None
        self.sasl_challenge = b""

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "AUTHENTICATE":
            # aioimaplib would wait here forever: answer the error challenge so the server
            # sends its tagged NO - an empty line for XOAUTH2, %x01 for OAUTHBEARER (RFC 7628).
            self.sasl_challenge = line.removeprefix(b"+").strip()
            self.transport.write(b"AQ==\r\n" if self.sasl_mechanism == "OAUTHBEARER" else b"\r\n")
            return
        super()._continuation(line)

    def data_received(self, d: bytes) -> None:
        self.last_activity = self.loop.time()
        # aioimaplib parses a chunk by recursing once per line, so a 64 KiB read holding a few
        # hundred small FETCH responses exceeds Python's recursion limit and kills the
        # connection. Feeding it slices bounds the depth (at worst ~340 one-line frames);
        # its parser already copes with lines and literals split across reads. The rest of a
        # literal (a message body) it takes in one step, without recursing per line: it goes
        # in one piece with the slice that follows it, not in 1 KiB pieces (each of which cost
        # a timer reset and a scan of the response, ~40 % of an import's CPU in the daemon).
        view = memoryview(d)
        start, end = 0, len(d)
        while start < end:
            size = _FEED_SLICE
            command = self.current_command
            if command is not None and not self.incomplete_line and command.wait_literal_data():
                size += command._expected_size - len(command._resp_literal_data)
            self._feed(bytes(view[start : start + size]))
            start += size

    def send(self, line: str, scrub: str | None = None) -> None:
        """aioimaplib's ``send`` without its debug line, which formats every command's bytes
        (``'Sending : %s' % data``) even when debug logging is off; with debug on, its own."""
        if _AIOIMAPLIB_LOG.isEnabledFor(logging.DEBUG):
            super().send(line, scrub=scrub)
            return
        self.transport.write(f"{line}\r\n".encode())

    def _feed(self, data: bytes) -> None:
        """aioimaplib's ``data_received`` without its debug line, which formats each chunk's
        bytes (``'Received : %s' % d``) even when debug logging is off."""
        try:
            self._handle_responses(
                self.incomplete_line + data, self._handle_line, self.current_command
            )
            self.incomplete_line = b""
            self.current_command = None
        except aioimaplib.IncompleteRead as incomplete:
            self.current_command = incomplete.cmd
            self.incomplete_line = incomplete.data

    async def welcome(self, command: bytes) -> None:
        # aioimaplib runs the greeting handler as a fire-and-forget task; a BYE greeting
        # (e.g. too many connections) would raise there unseen and leave us waiting. Record it.
        self.greeting = command
        try:
            if not self._greeting_capabilities(command):
                await super().welcome(command)  # asks CAPABILITY
        except Exception as exc:  # aioimaplib.Error for BYE / non-IMAP4 servers
            self.welcome_error = exc
        if not self.greeted.done():
            self.greeted.set_result(None)

    def _greeting_capabilities(self, greeting: bytes) -> bool:
        """Take the capabilities from an ``OK``/``PREAUTH`` greeting's ``[CAPABILITY ...]``
        response code (RFC 3501 section 7.1, as Dovecot sends it) instead of asking with a
        CAPABILITY command, as aioimaplib would: one round trip less per connection. False
        when the greeting lists none (or no IMAP4 version): aioimaplib asks then."""
        status = greeting.split(None, 2)[1:2]
        if status not in ([b"OK"], [b"PREAUTH"]):
            return False
        match = _CAPABILITY_RE.search(greeting.decode("utf-8", "replace"))
        if match is None:
            return False
        listed = match.group(1).split()
        versions = [c.upper() for c in listed if c.upper() in aioimaplib.AllowedVersions]
        if not versions:
            return False
        self.state = aioimaplib.AUTH if status == [b"PREAUTH"] else aioimaplib.NONAUTH
        self.capabilities = set(listed)
        self.imap_version = versions[-1]
        return True


class _FetchCommand(aioimaplib.FetchCommand):  # type: ignore[misc]
    """aioimaplib's FETCH command, told whether a FETCH response is complete in constant time.

    aioimaplib's own ``wait_data`` scans every response line received so far, and joins the
    lines of the last ``N FETCH (`` response, each time a piece of data arrives: quadratic in
    the number of messages of a batch. This keeps the same answer (the parentheses of the lines
    since the last ``N FETCH (`` line, literals not counted, do not balance) incrementally.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scanned = 0  # response lines counted so far
        self._balance = 0  # '(' minus ')' since the last "N FETCH (" line

    def wait_data(self) -> bool:
        lines = self._resp_lines
        for line in lines[self._scanned :]:
            if isinstance(line, bytes):  # a literal is a bytearray: not counted
                if self.FETCH_MESSAGE_DATA_RE.match(line):
                    self._balance = 0
                self._balance += line.count(b"(") - line.count(b")")
        self._scanned = len(lines)
        return self._balance != 0


# -- the session -----------------------------------------------------------------------------


class ImapSession:
    """A logged-in IMAP connection for one account. Create with :meth:`open`.

    ``capabilities`` is the upper-case set the server announced after login (RFC 3501 section
    6.2.3 / RFC 9051 section 6.2.3: capabilities may change after authentication). It is a plain
    attribute so tests can force fallbacks, e.g. ``session.capabilities -= {"MOVE"}`` makes
    :meth:`move` use COPY + STORE + UID EXPUNGE.
    """

    capabilities: frozenset[str]

    def __init__(
        self,
        account: AccountSettings,
        protocol: _Protocol,
        transport: asyncio.Transport,
        lost: asyncio.Future[BaseException | None],
        secret: str,
    ) -> None:
        self.account = account
        self.capabilities = frozenset()
        self.selected: str | None = None
        self.uidvalidity: int | None = None
        # Whether the last SELECT had an EXISTS line (RFC 3501 7.3.1 requires one; without it
        # the count it returned, 0, says nothing about the folder).
        self.exists_reported = False
        self._protocol = protocol
        self._transport = transport
        self._lost = lost
        self._secret = secret
        self._timeout = account.imap.timeout_seconds
        self._lock = asyncio.Lock()
        self._broken = False
        self._closed = False
        self._log = log.bind(account=account.name)

    # -- opening --------------------------------------------------------------------------

    @classmethod
    async def open(cls, account: AccountSettings, *, secret: str | None = None) -> ImapSession:
        """Connect per ``account.imap`` (implicit TLS, STARTTLS or plain) and log in.

        ``secret`` overrides ``account.auth.secret()`` (e.g. a freshly read password).

        OAuth2 accounts (``auth.method`` microsoft/google) sign in with OAUTHBEARER or XOAUTH2
        and a token from the account's provider. A token the server refuses is refreshed once
        and tried on a new connection (it may have expired or been revoked since it was
        issued); refused again, it raises ``mailbox_not_connected`` - the identity provider
        vouched for the user, so what is missing is on the mailbox's side.
        """
        if account.auth.is_oauth and secret is None:
            return await with_token_retry(account, lambda token: cls._open(account, token), "imap")
        return await cls._open(account, secret)

    @classmethod
    async def _open(cls, account: AccountSettings, secret: str | None) -> ImapSession:
        imap = account.imap
        host, port = imap.host, imap.port
        assert port is not None  # ImapSettings fills it from tls
        password = secret if secret is not None else account.auth.secret()
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[BaseException | None] = loop.create_future()

        def on_lost(exc: BaseException | None) -> None:
            if not lost.done():
                lost.set_result(exc)

        bound = log.bind(account=account.name)
        context = _ssl_context(account) if imap.tls != "none" else None
        if context is not None and not imap.verify_certificate:
            bound.warning(
                "imap_tls_unverified",
                host=host,
                port=port,
                detail="verify_certificate is false: the server's identity is not checked",
            )
        protocol = _Protocol(loop, on_lost)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(
                    lambda: protocol,
                    host,
                    port,
                    ssl=context if imap.tls == "implicit" else None,
                    ssl_handshake_timeout=imap.timeout_seconds if imap.tls == "implicit" else None,
                ),
                imap.timeout_seconds,
            )
        except Exception as exc:
            raise _map_error(exc, f"connect to {host}:{port}", imap.timeout_seconds) from exc
        # A connection a NAT or firewall drops silently is reported dead by the kernel within
        # minutes instead of hours (mailbridge.mail.net).
        enable_keepalive(transport.get_extra_info("socket"))

        session = cls(account, protocol, transport, lost, password)
        try:
            await session._handshake(context)
        except BaseException:
            await session._shutdown()
            raise
        bound.info(
            "imap_connected",
            host=host,
            port=port,
            tls=imap.tls,
            capabilities=sorted(session.capabilities),
        )
        return session

    async def _handshake(self, context: ssl.SSLContext | None) -> None:
        imap = self.account.imap
        where = f"{imap.host}:{imap.port}"
        await self._await(self._protocol.greeted, f"greeting from {where}")
        if self._protocol.welcome_error is not None:
            text = self._protocol.greeting.decode("utf-8", "replace")
            raise ServerError(
                f"{where} refused the connection: {self._scrub(text)}",
                code=classify_server_text(text, default="server_error"),
            )
        caps = {c.upper() for c in self._protocol.capabilities}
        if imap.tls == "starttls":
            assert context is not None
            await self._starttls(context, caps, where)
            caps = {c.upper() for c in self._protocol.capabilities}
        if "LOGINDISABLED" in caps:
            # RFC 3501 section 6.2.3: the server forbids LOGIN on this (unencrypted) connection.
            raise ServerError(
                f"{where} refuses to log in without TLS (LOGINDISABLED); set imap.tls to "
                "starttls or implicit",
                code="tls_failed",
            )
        await self._login()

    async def _starttls(self, context: ssl.SSLContext, caps: set[str], where: str) -> None:
        # RFC 3501 section 6.2.1. aioimaplib has no STARTTLS method: send the command on the
        # protocol, then upgrade the transport in place with loop.start_tls().
        if "STARTTLS" not in caps:
            # Never fall back to plaintext when TLS was asked for.
            raise ServerError(f"{where} does not offer STARTTLS", code="starttls_unavailable")
        protocol = self._protocol
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await self._await(protocol.execute(command), "STARTTLS")
        if response.result != "OK":
            text = _text(response.lines)
            raise ServerError(f"{where} refused STARTTLS: {text}", code="tls_failed")
        loop = asyncio.get_running_loop()
        new_transport = await self._await(
            loop.start_tls(
                self._transport,
                protocol,
                context,
                server_hostname=self.account.imap.host,
                ssl_handshake_timeout=self._timeout,
            ),
            "TLS handshake",
        )
        if new_transport is None:
            raise ServerError(f"{where}: TLS handshake failed", code="tls_failed")
        self._transport = new_transport
        protocol.transport = new_transport
        # RFC 3501 section 6.2.1: discard capabilities learned before TLS and ask again.
        await self._await(protocol.capability(), "CAPABILITY")

    async def _login(self) -> None:
        if self.account.auth.is_oauth:
            response = await self._authenticate_oauth()
        else:
            response = await self._login_password()
        self._protocol.state = aioimaplib.AUTH
        # Dovecot and most servers put the new list in the tagged OK (RFC 3501 section 7.1);
        # aioimaplib mis-parses that response code, so read it here or ask explicitly.
        match = _CAPABILITY_RE.search(_text(response.lines[-1:]))
        if match is not None:
            self.capabilities = frozenset(c.upper() for c in match.group(1).split())
        else:
            await self._await(self._protocol.capability(), "CAPABILITY")
            self.capabilities = frozenset(c.upper() for c in self._protocol.capabilities)
        # aioimaplib checks its own set before IDLE/MOVE; keep it in step with ours.
        self._protocol.capabilities = set(self.capabilities)

    async def _authenticate_oauth(self) -> Any:
        """AUTHENTICATE OAUTHBEARER (RFC 7628) where offered and wanted, else XOAUTH2, with
        the initial response on the command line (SASL-IR, RFC 4959). The user is the mailbox
        (the account's address): a shared mailbox is opened with its delegate's token."""
        account = self.account
        protocol = self._protocol
        caps = {c.upper() for c in protocol.capabilities}
        wanted = account.auth.sasl
        if wanted == "oauthbearer" or (wanted == "auto" and "AUTH=OAUTHBEARER" in caps):
            mechanism = "OAUTHBEARER"
            imap = account.imap
            assert imap.port is not None
            initial = sasl_oauthbearer(account.address, self._secret, imap.host, imap.port)
        else:
            mechanism = "XOAUTH2"
            initial = sasl_xoauth2(account.address, self._secret)
        protocol.sasl_mechanism = mechanism
        protocol.sasl_challenge = b""
        command = aioimaplib.Command(
            "AUTHENTICATE", protocol.new_tag(), mechanism, initial, loop=protocol.loop
        )
        response = await self._await(protocol.execute(command, scrub=initial), "AUTHENTICATE")
        if response.result == "OK":
            return response
        text = self._scrub(_text(response.lines))
        detail = sasl_error_text(protocol.sasl_challenge)
        code = classify_server_text(text, default="auth_failed")
        if code == "server_error":
            code = "auth_failed"
        message = f"{mechanism} login to {account.address} refused: {text}" + (
            f" ({detail})" if detail else ""
        )
        if code in _AUTH_CODES:
            raise AuthError(message, code=code)
        raise ServerError(message, code=code)

    async def _login_password(self) -> Any:
        username = self.account.login_name
        protocol = self._protocol
        secret_arg = quote(self._secret)
        try:
            command = aioimaplib.Command(
                "LOGIN", protocol.new_tag(), quote(username), secret_arg, loop=protocol.loop
            )
        except ValueError as exc:  # aioimaplib refuses CR/LF/NUL in arguments
            raise AuthError(
                f"the username or password for {username} contains CR, LF or NUL",
                code="auth_failed",
            ) from exc
        # aioimaplib's own login() scrubs the raw password from its debug log but sends it quoted,
        # so a password with '"' or '\\' would leak; scrub exactly what goes on the wire.
        response = await self._await(protocol.execute(command, scrub=secret_arg), "LOGIN")
        if response.result != "OK":
            text = self._scrub(_text(response.lines))
            code = classify_server_text(text, default="auth_failed")
            if code == "server_error":
                code = "auth_failed"
            message = f"login as {username} refused: {text}"
            if code in _AUTH_CODES:
                raise AuthError(message, code=code)
            raise ServerError(message, code=code)
        return response

    # -- properties -----------------------------------------------------------------------

    @property
    def has_idle(self) -> bool:
        return "IDLE" in self.capabilities

    @property
    def has_move(self) -> bool:
        return "MOVE" in self.capabilities

    @property
    def has_uidplus(self) -> bool:
        return "UIDPLUS" in self.capabilities

    @property
    def usable(self) -> bool:
        """False once the connection is lost, broken by an error or closed."""
        return not (self._broken or self._closed or self._lost.done())

    # -- commands ---------------------------------------------------------------------------

    async def ensure_folders(self, names: Iterable[str]) -> None:
        """LIST, then CREATE (and SUBSCRIBE) the folders that are missing."""
        wanted = list(dict.fromkeys(names))
        async with self._lock:
            response = await self._await(self._protocol.simple_command("LIST", '""', '"*"'), "LIST")
            self._check(response, "LIST", FolderError, default="folder_unavailable")
            existing = set(_parse_list(response.lines))
            existing_folded = {n.casefold() for n in existing}
            for name in wanted:
                # INBOX is case-insensitive (RFC 3501 section 5.1); other names are matched
                # exactly first, then case-insensitively for servers that fold case.
                if name in existing or name.casefold() in existing_folded:
                    continue
                arg = _mailbox_arg(name)
                response = await self._await(
                    self._protocol.simple_command("CREATE", arg), f"CREATE {name}"
                )
                if response.result != "OK":
                    text = self._scrub(_text(response.lines))
                    if "ALREADYEXISTS" in text.upper():  # created concurrently: fine
                        continue
                    raise FolderError(
                        f"cannot create folder {name!r}: {text}",
                        code=classify_server_text(text, default="folder_unavailable"),
                    )
                self._log.info("imap_folder_created", folder=name)
                # Many clients show only subscribed folders; failure here is harmless.
                await self._await(
                    self._protocol.execute(
                        aioimaplib.Command(
                            "SUBSCRIBE", self._protocol.new_tag(), arg, loop=self._protocol.loop
                        )
                    ),
                    f"SUBSCRIBE {name}",
                )

    async def select(self, folder: str) -> int:
        """SELECT ``folder`` (read-write); returns its EXISTS count. Sets ``uidvalidity``: the
        folder's, or None if the server left it out (RFC 3501 6.3.1 requires it), never the
        value of the folder selected before."""
        async with self._lock:
            self.uidvalidity = None
            response = await self._await(
                self._protocol.select(_mailbox_arg(folder)), f"SELECT {folder}"
            )
            if response.result != "OK":
                self.selected = None
                # Without the untagged OK lines that only inform (RFC 3501 7.1.1), such as
                # Dovecot's "OK [CLOSED] Previous mailbox closed." (RFC 7162 3.2.11): the
                # reason is the refusal's own text.
                refusal = [line for line in response.lines if not _informs(line)]
                text = self._scrub(_text(refusal))
                raise FolderError(
                    f"cannot select folder {folder!r}: {text}",
                    code=classify_server_text(text, default="folder_unavailable"),
                )
            exists = 0
            self.exists_reported = False
            for line in response.lines:
                if not isinstance(line, bytes):
                    continue
                match = re.match(rb"(\d+) EXISTS", line)
                if match:
                    exists = int(match.group(1))
                    self.exists_reported = True
                match = re.search(rb"\[UIDVALIDITY (\d+)\]", line)
                if match:
                    self.uidvalidity = int(match.group(1))
            self.selected = folder
            return exists

    async def search(self, *criteria: str) -> list[int]:
        """UID SEARCH (RFC 3501 section 6.4.4) with raw criteria; UIDs ascending.

        Criteria are sent as given (``search("BEFORE", "01-Jan-2026")``); quote string
        arguments yourself. CHARSET UTF-8 is added only for non-ASCII criteria, because some
        servers reject a CHARSET they need not support.
        """
        if not criteria:
            criteria = ("ALL",)
        charset = None if all(c.isascii() for c in criteria) else "UTF-8"
        async with self._lock:
            self._require_selected("SEARCH")
            response = await self._await(
                self._protocol.search(*criteria, charset=charset, by_uid=True), "UID SEARCH"
            )
            self._check(response, "UID SEARCH")
            uids: set[int] = set()
            # aioimaplib strips "* SEARCH" and keeps the numbers; the last line is the tagged
            # status text (which may contain digits), so it is left out.
            for line in response.lines[:-1]:
                if isinstance(line, bytes):
                    uids.update(int(tok) for tok in line.split() if tok.isdigit())
            return sorted(uids)

    async def undeleted_uids(self) -> list[int]:
        """UIDs of every message not flagged \\Deleted: the Inbox is mailbridge's queue.

        Read or unread does not matter (a person may open shared mail before mailbridge sees
        it); \\Deleted mail is on its way out (another client's, or our own originals left by
        :meth:`move` without UIDPLUS).
        """
        return await self.search("UNDELETED")

    async def fetch_meta(self, uids: Sequence[int]) -> list[MessageMeta]:
        """``UID FETCH set (UID FLAGS INTERNALDATE RFC822.SIZE)``: sizes and arrival times without
        the bodies (a few dozen bytes per message), in UID order, in chunks of
        ``_META_CHUNK`` UIDs. Missing UIDs are absent from the result."""
        wanted = sorted(set(uids))
        metas: dict[int, MessageMeta] = {}
        for start in range(0, len(wanted), _META_CHUNK):
            chunk = wanted[start : start + _META_CHUNK]
            lines = await self._uid_fetch(chunk, "(UID FLAGS INTERNALDATE RFC822.SIZE)")
            asked = set(chunk)
            metas.update((m.uid, m) for m in parse_meta_response(lines) if m.uid in asked)
        return [metas[uid] for uid in sorted(metas)]

    async def fetch_headers(
        self,
        uids: Sequence[int],
        fields: Sequence[str] = ("MESSAGE-ID", "SUBJECT", "FROM", "DATE"),
    ) -> list[FetchedMessage]:
        """Some header fields (by default those a failure record shows), as
        ``FetchedMessage.raw``, without the body: ``BODY.PEEK[HEADER.FIELDS (...)]`` (RFC 3501
        section 6.4.5). For messages too large to download."""
        names = " ".join(f.upper() for f in fields)
        return await self._fetch_messages(
            uids, f"(UID FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS ({names})])"
        )

    async def fetch(self, uids: Sequence[int]) -> list[FetchedMessage]:
        """One ``UID FETCH set (UID FLAGS INTERNALDATE BODY.PEEK[])``; results in UID order.

        BODY.PEEK[] never sets \\Seen (RFC 3501 section 6.4.5). UIDs that no longer exist are
        simply absent from the result (RFC 3501 section 6.4.8: a UID FETCH of a missing UID is
        not an error).
        """
        return await self._fetch_messages(uids, "(UID FLAGS INTERNALDATE BODY.PEEK[])")

    async def _fetch_messages(self, uids: Sequence[int], items: str) -> list[FetchedMessage]:
        if not uids:
            return []
        wanted = set(uids)
        lines = await self._uid_fetch(sorted(wanted), items)
        by_uid = {m.uid: m for m in parse_fetch_response(lines) if m.uid in wanted}
        return [by_uid[uid] for uid in sorted(by_uid)]

    async def _uid_fetch(self, uids: Sequence[int], items: str) -> Sequence[Any]:
        """One ``UID FETCH`` of ``items`` for ``uids``; the response lines."""
        async with self._lock:
            self._require_selected("FETCH")
            protocol = self._protocol
            command = _FetchCommand(
                protocol.new_tag(), uid_set(uids), items, prefix="UID", loop=protocol.loop
            )
            response = await self._await(protocol.execute(command), "UID FETCH")
            self._check(response, "UID FETCH")
        lines: Sequence[Any] = response.lines
        return lines

    async def move(
        self, uids: Sequence[int], folder: str, *, mark_seen: bool = True
    ) -> dict[int, int]:
        """Move messages to ``folder``; returns {source_uid: destination_uid} when known.

        With ``mark_seen``, ``UID STORE +FLAGS.SILENT (\\Seen)`` runs first so the copy arrives
        read. Then ``UID MOVE`` (RFC 6851) when advertised; else ``UID COPY``, ``UID STORE
        +FLAGS.SILENT (\\Deleted)`` and ``UID EXPUNGE`` (RFC 4315 section 2.1), which removes
        only our UIDs. Without UIDPLUS a plain EXPUNGE would also remove messages other clients
        marked \\Deleted, so it runs only when a ``UID SEARCH DELETED`` finds no \\Deleted mail
        besides ours; otherwise the originals stay behind flagged \\Deleted (and are skipped by
        :meth:`undeleted_uids`) until someone expunges, and a warning is logged. The mapping comes
        from COPYUID (RFC 4315 section 3), so it is ``{}`` without UIDPLUS.
        """
        if not uids:
            return {}
        ids = uid_set(uids)
        target = _mailbox_arg(folder)
        protocol = self._protocol
        async with self._lock:
            self._require_selected("MOVE")
            if mark_seen:
                response = await self._await(
                    protocol.store(ids, "+FLAGS.SILENT", "(\\Seen)", by_uid=True), "UID STORE"
                )
                self._check(response, "UID STORE \\Seen")
            if self.has_move:
                response = await self._await(protocol.move(ids, target, by_uid=True), "UID MOVE")
                self._check_folder(response, "UID MOVE", folder)
                return _copyuid_map(response.lines)
            response = await self._await(protocol.copy(ids, target, by_uid=True), "UID COPY")
            self._check_folder(response, "UID COPY", folder)
            mapping = _copyuid_map(response.lines)
            response = await self._await(
                protocol.store(ids, "+FLAGS.SILENT", "(\\Deleted)", by_uid=True), "UID STORE"
            )
            self._check(response, "UID STORE \\Deleted")
            if self.has_uidplus:
                response = await self._await(protocol.expunge(ids, by_uid=True), "UID EXPUNGE")
                self._check(response, "UID EXPUNGE")
                return mapping
            response = await self._await(
                protocol.search("DELETED", charset=None, by_uid=True), "UID SEARCH DELETED"
            )
            self._check(response, "UID SEARCH DELETED")
            deleted = {
                int(tok)
                for line in response.lines[:-1]
                if isinstance(line, bytes)
                for tok in line.split()
                if tok.isdigit()
            }
            if deleted - set(uids):
                self._log.warning(
                    "imap_expunge_skipped",
                    folder=self.selected,
                    reason="no UIDPLUS and other messages are marked \\Deleted",
                    uids=ids,
                )
                return mapping
            response = await self._await(protocol.expunge(), "EXPUNGE")
            self._check(response, "EXPUNGE")
            return mapping

    async def wait_for_mail(self, timeout: float) -> bool:  # noqa: ASYNC109 - the agreed API
        """IDLE (RFC 2177) until the server announces new mail or ``timeout`` passes.

        Returns True when an ``EXISTS`` or ``RECENT`` arrived. Either way it ends with DONE and
        waits for the tagged OK, so the session is ready for the next command. Raises
        RuntimeError without the IDLE capability (check :attr:`has_idle`; poll instead).
        Keep ``timeout`` under 29 minutes (RFC 2177 section 3). Cancelling the call drops the
        connection.
        """
        if not self.has_idle:
            raise RuntimeError("the server does not support IDLE; poll with noop()/search()")
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._require_selected("IDLE")
            new_mail = _drain_pushes(protocol.idle_queue)  # stale pushes of an earlier IDLE
            idle = asyncio.ensure_future(protocol.idle())
            try:
                ack = asyncio.ensure_future(protocol.wait_for_idle_response())
                try:
                    # The "+ idling" continuation, or the tagged NO/BAD if the server refuses.
                    await self._await(_first_of(idle, ack), "IDLE")
                finally:
                    ack.cancel()
                if idle.done():
                    response = idle.result()
                    self._check(response, "IDLE")
                    return new_mail
                deadline = loop.time() + max(0.0, timeout)
                while not new_mail:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    push = await self._wait_push(remaining)
                    if push is None:
                        break
                    new_mail = _announces_mail(push)
                protocol.idle_done()  # sends DONE
                response = await self._await(_shielded(idle), "IDLE DONE")
                self._check(response, "IDLE")
                # Pushes that raced with DONE still count.
                return _drain_pushes(protocol.idle_queue) or new_mail
            except BaseException:
                if not idle.done():
                    idle.cancel()
                    self._abort()
                raise

    async def noop(self) -> None:
        """NOOP: keeps the connection alive and lets the server report changes."""
        async with self._lock:
            response = await self._await(self._protocol.simple_command("NOOP"), "NOOP")
            self._check(response, "NOOP")

    async def append(
        self,
        folder: str,
        raw: bytes,
        flags: Sequence[str] = (),
        date: datetime | None = None,
    ) -> int | None:
        """APPEND a message; returns its UID from APPENDUID (UIDPLUS), else None.

        A naive ``date`` is taken as UTC.
        """
        if date is not None and date.tzinfo is None:
            date = date.replace(tzinfo=UTC)
        async with self._lock:
            response = await self._await(
                self._protocol.append(
                    raw,
                    mailbox=_mailbox_arg(folder),
                    flags=" ".join(flags) if flags else None,
                    date=date,
                ),
                f"APPEND {folder}",
            )
            self._check_folder(response, "APPEND", folder)
            match = _APPENDUID_RE.search(_text(response.lines))
            return int(match.group(2)) if match else None

    async def close(self) -> None:
        """LOGOUT (best effort, short timeout) and close the connection. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._broken and not self._lost.done() and not self._lock.locked():
                async with asyncio.timeout(min(_LOGOUT_TIMEOUT, self._timeout)):
                    await self._protocol.logout()
        except Exception as exc:  # best effort: the server may be gone already
            self._log.debug("imap_logout_failed", error=type(exc).__name__)
        await self._shutdown()

    # -- internals ------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """Remove the password from server words we quote (in case a server echoes it)."""
        if self._secret and len(self._secret) >= 3:
            text = text.replace(quote(self._secret), "***").replace(self._secret, "***")
        return text

    def _require_selected(self, what: str) -> None:
        if self.selected is None:
            raise RuntimeError(f"{what} needs a selected folder: call select() first")

    def _check(
        self,
        response: Any,
        what: str,
        error: type[ServerError] = ServerError,
        *,
        default: str = "server_error",
    ) -> None:
        if response.result == "OK":
            return
        text = self._scrub(_text(response.lines))
        raise error(
            f"{what} failed: {response.result} {text}",
            code=classify_server_text(text, default=default),
        )

    def _check_folder(self, response: Any, what: str, folder: str) -> None:
        if response.result == "OK":
            return
        text = self._scrub(_text(response.lines))
        code = classify_server_text(text, default="server_error")
        # [TRYCREATE] (RFC 3501 section 6.3.11): the target folder does not exist.
        if code == "folder_unavailable" or "TRYCREATE" in text.upper():
            raise FolderError(f"{what} to {folder!r} failed: {text}", code="folder_unavailable")
        raise ServerError(f"{what} to {folder!r} failed: {response.result} {text}", code=code)

    async def _wait_push(self, seconds: float) -> list[bytes] | None:
        """The next batch of untagged lines pushed during IDLE, or None after ``seconds``."""
        getter = asyncio.ensure_future(self._protocol.idle_queue.get())
        try:
            done, _ = await asyncio.wait(
                {getter, self._lost}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not getter.done():
                getter.cancel()
        if getter in done:
            push: list[bytes] = getter.result()
            return push
        if self._lost.done():
            self._abort()
            raise ServerError(
                f"connection to {self._where} lost during IDLE", code="connection_lost"
            )
        return None

    @property
    def _where(self) -> str:
        return f"{self.account.imap.host}:{self.account.imap.port}"

    async def _await(self, aw: Awaitable[T], what: str) -> T:
        """Await one protocol step, raced against connection loss and an inactivity timeout.

        The timeout counts from the last byte received, so a large FETCH that keeps streaming
        is not cut off while a server that goes silent is.
        """
        if self._closed or self._broken or self._lost.done():
            if inspect.iscoroutine(aw):
                aw.close()  # never started: close it so it is not reported as never awaited
            raise ServerError(
                f"{what}: the connection to {self._where} is closed", code="connection_lost"
            )
        task = asyncio.ensure_future(aw)
        waiting: set[asyncio.Future[Any]] = {task, self._lost}
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while True:
                quiet_since = max(started, self._protocol.last_activity)
                wait = quiet_since + self._timeout - loop.time()
                if wait <= 0:
                    break
                done, _ = await asyncio.wait(
                    waiting, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if task in done or self._lost in done:
                    break
        except asyncio.CancelledError:
            task.cancel()
            self._abort()
            raise
        if task.done():
            try:
                return task.result()
            except Exception as exc:
                self._abort()
                raise _map_error(exc, f"{what} on {self._where}", self._timeout) from exc
        task.cancel()
        self._abort()
        if self._lost.done():
            cause = self._lost.result()
            raise ServerError(
                f"{what}: connection to {self._where} lost", code="connection_lost"
            ) from cause
        raise ServerError(
            f"{what}: no answer from {self._where} within {self._timeout:g}s", code="timeout"
        )

    def _abort(self) -> None:
        """Drop the connection now; the session is unusable afterwards."""
        self._broken = True
        for task in list(self._protocol.tasks):
            task.cancel()
        self._transport.abort()

    async def _shutdown(self) -> None:
        """Close the transport and wait briefly for asyncio to release the socket."""
        self._closed = True
        for task in list(self._protocol.tasks):
            task.cancel()
        if not self._lost.done():
            self._transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), 1.0)
            except (TimeoutError, asyncio.CancelledError):
                self._transport.abort()
        if not self._lost.done():
            # abort() reports connection_lost on the next loop iteration.
            await asyncio.sleep(0)


def _ssl_context(account: AccountSettings) -> ssl.SSLContext:
    imap = account.imap
    ca_file = str(imap.ca_file) if imap.ca_file is not None else None
    # A replaced CA file (or system store) is read again at the next connection, as before.
    store = ca_file or ssl.get_default_verify_paths().cafile
    try:
        stat = os.stat(store) if store else None
        version = (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None
    except OSError:
        version = None  # a missing ca_file: create_default_context says so
    return _shared_ssl_context(ca_file, imap.verify_certificate, version)


@functools.lru_cache(maxsize=64)
def _shared_ssl_context(
    ca_file: str | None, verify: bool, version: tuple[int, int, int] | None
) -> ssl.SSLContext:
    """One context per (CA file and its version, verification) for every connection:
    building one loads the CA store (a few ms of CPU), which a fleet of 10,000 accounts paid
    per connect. A context is safe to share (asyncio only reads it). Not cached when it
    raises."""
    try:
        # With ca_file only that CA is trusted (create_default_context skips the system store).
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ServerError(
            f"cannot load imap.ca_file {ca_file}: {exc}", code="tls_untrusted"
        ) from exc
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _map_error(exc: BaseException, what: str, timeout: float) -> ServerError:
    """Map an aioimaplib/ssl/socket/asyncio exception to our tree (never quoting secrets)."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "certificate verify failed"
        return ServerError(f"{what}: TLS certificate not trusted ({reason})", code="tls_untrusted")
    if isinstance(exc, ssl.SSLError):
        return ServerError(f"{what}: TLS failed ({exc.reason or exc})", code="tls_failed")
    if isinstance(exc, TimeoutError | aioimaplib.CommandTimeout):
        # str(CommandTimeout) is the command line itself - never quote it (LOGIN has the password).
        return ServerError(f"{what}: no answer within {timeout:g}s", code="timeout")
    if isinstance(exc, socket.gaierror):
        return ServerError(f"{what}: host name lookup failed ({exc.strerror})", code="unreachable")
    if isinstance(exc, ConnectionRefusedError):
        return ServerError(f"{what}: connection refused", code="unreachable")
    if isinstance(exc, ConnectionError | asyncio.IncompleteReadError | EOFError):
        return ServerError(
            f"{what}: connection lost ({type(exc).__name__})", code="connection_lost"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        # Out of file descriptors (too many accounts for RLIMIT_NOFILE): not a lost connection.
        return ServerError(f"{what}: {exc.strerror or 'too many open files'}", code="fd_limit")
    if isinstance(exc, OSError):
        unreachable = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EHOSTDOWN}
        code = "unreachable" if exc.errno in unreachable else "connection_lost"
        return ServerError(f"{what}: {exc.strerror or type(exc).__name__}", code=code)
    if isinstance(exc, aioimaplib.AioImapException):
        # Abort/Error texts can embed a pending command's repr, i.e. a LOGIN line: name only.
        return ServerError(f"{what}: IMAP protocol error ({type(exc).__name__})")
    return ServerError(f"{what}: unexpected {type(exc).__name__}", code="internal")


def _copyuid_map(lines: Sequence[Any]) -> dict[int, int]:
    match = _COPYUID_RE.search(_text(lines))
    if match is None:
        return {}
    source = parse_uid_set(match.group(2))
    dest = parse_uid_set(match.group(3))
    if len(source) != len(dest):
        return {}
    return dict(zip(source, dest, strict=True))


def _announces_mail(push: Sequence[Any]) -> bool:
    return any(
        isinstance(line, bytes) and re.search(rb"\d+ (EXISTS|RECENT)\b", line) is not None
        for line in push
    )


def _drain_pushes(queue: asyncio.Queue[Any]) -> bool:
    found = False
    while not queue.empty():
        push = queue.get_nowait()
        if push is not aioimaplib.STOP_WAIT_SERVER_PUSH and _announces_mail(push):
            found = True
    return found


async def _first_of(*futures: asyncio.Future[Any]) -> None:
    await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)


async def _shielded(future: asyncio.Future[T]) -> T:
    # The IDLE task must survive our timeout wrapper being cancelled so we can inspect it.
    return await asyncio.shield(future)
