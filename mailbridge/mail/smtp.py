"""SMTP over aiosmtplib: :func:`check_smtp` (the connect-and-log-in check of ``mailbridge
doctor``) and :class:`SmtpSender` (one connection sending the outbox's messages).

Like :mod:`mailbridge.mail.imap`, this is a boundary: every aiosmtplib/ssl/socket exception is
mapped into :mod:`mailbridge.errors` here, SMTP replies are classified by their code and words
(:func:`~mailbridge.errors.classify_server_text`), and the password never appears in a message.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import aiosmtplib
import structlog

from mailbridge.config import AccountSettings
from mailbridge.errors import AuthError, ServerError, classify_server_text
from mailbridge.mail.auth.tokens import (
    exception_chain,
    sasl_error_text,
    sasl_oauthbearer,
    sasl_xoauth2,
    with_token_retry,
)
from mailbridge.mail.net import enable_keepalive

log = structlog.get_logger("mailbridge.smtp")

T = TypeVar("T")

# Classified SMTP refusals that mean "this login cannot work" (raised as AuthError).
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
        "smtp_auth_disabled",
        "send_as_denied",
    }
)


# What may not appear in an envelope address placed on a command line as ``<address>``: a
# control character anywhere (CR/LF would start a new command, NUL ends it for some servers);
# outside a quoted-string local part, whitespace (a new ESMTP parameter: `` SIZE=1 NOTIFY=...``),
# angle brackets (the end of the path) and a double quote. The rule of aiosmtplib's
# ``email._validate_address``, which ``sendmail`` applied, plus its command-line control check.
_UNSAFE_IN_PATH: Final = re.compile(r'[\s<>"\x00-\x1f\x7f]')
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 section 4.1.2 Quoted-string as aiosmtplib reads it (``QUOTED_LOCAL_PART_REGEX``).
_QUOTED_LOCAL_PART: Final = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


def _unsafe_address(address: str) -> bool:
    """True when ``address`` cannot be sent as ``<address>`` in MAIL FROM or RCPT TO without
    possibly adding parameters or commands (see ``_UNSAFE_IN_PATH``)."""
    if not address.startswith('"'):
        return _UNSAFE_IN_PATH.search(address) is not None
    if _CONTROL.search(address):
        return True
    return _UNSAFE_IN_PATH.search(_QUOTED_LOCAL_PART.sub("", address, count=1)) is not None


def transmitted_size(raw: bytes) -> int:
    """The octets of ``raw`` as DATA transmits it (lone CR and LF as CRLF, a CRLF at the end),
    without the dot-stuffing and the final ``.``: the RFC 1870 SIZE value. Counted, not
    converted: ``len(aiosmtplib.protocol.normalize_message_line_endings(raw))``, which
    ``SMTP.data`` computes again anyway."""
    cr = raw.count(b"\r")
    crlf = raw.count(b"\r\n") if cr else 0
    size = len(raw) + (raw.count(b"\n") - crlf) + (cr - crlf)
    return size if raw.endswith((b"\n", b"\r")) else size + 2


def _client(account: AccountSettings) -> tuple[aiosmtplib.SMTP, str]:
    """An unconnected client per ``account.smtp``, and ``host:port`` for messages."""
    smtp = account.smtp
    if smtp is None:
        raise ValueError(f"account {account.name} has no smtp settings")
    where = f"{smtp.host}:{smtp.port}"
    context: ssl.SSLContext | None = None
    if smtp.tls != "none":
        try:
            context = ssl.create_default_context(
                cafile=str(smtp.ca_file) if smtp.ca_file is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ServerError(
                f"cannot load smtp.ca_file {smtp.ca_file}: {exc}", code="tls_untrusted"
            ) from exc
        if not smtp.verify_certificate:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    client = aiosmtplib.SMTP(
        hostname=smtp.host,
        port=smtp.port,
        timeout=smtp.timeout_seconds,
        use_tls=smtp.tls == "implicit",
        # True: STARTTLS required (never a plaintext fallback); False, not None: no guessing.
        start_tls=smtp.tls == "starttls",
        tls_context=context,
        # EHLO names this host; socket.getfqdn() (aiosmtplib's default) may wait on DNS.
        local_hostname=socket.gethostname() or "mailbridge",
    )
    return client, where


async def _connect(client: aiosmtplib.SMTP, account: AccountSettings, where: str) -> None:
    """Connect, EHLO, and check that AUTH is offered (RFC 4954)."""
    await client.connect()
    if client.transport is not None:  # a silently dropped connection is noticed in minutes
        enable_keepalive(client.transport.get_extra_info("socket"))
    if client.last_ehlo_response is None:  # STARTTLS/implicit TLS already sent EHLO
        await client.ehlo()
    if not client.supports_extension("auth"):
        assert account.smtp is not None
        raise ServerError(
            f"{where} offers no SMTP AUTH on this connection (tls: {account.smtp.tls}); "
            "authenticated SMTP may be off for the account, or need TLS",
            code="protocol_disabled",
        )


async def login(client: aiosmtplib.SMTP, account: AccountSettings, where: str, secret: str) -> None:
    """Authenticate ``client`` as the account (RFC 4954 AUTH) with ``secret``: the password,
    or for OAuth2 accounts the access token (OAUTHBEARER where offered, else XOAUTH2). The one
    place sign-in happens for SMTP.

    Raises :class:`AuthError` for a refused login, :class:`ServerError` for other refusals.
    """
    try:
        if account.auth.is_oauth:
            await _login_oauth(client, account, secret)
        else:
            await client.login(account.login_name, secret)
    except aiosmtplib.SMTPResponseException as exc:
        text = _scrub(f"{exc.code} {exc.message}", secret)
        code = classify_server_text(text, default="auth_failed")
        message = f"SMTP login as {account.login_name} at {where} refused: {text}"
        raise (AuthError if code in _AUTH_CODES else ServerError)(message, code=code) from exc


async def signed_in(account: AccountSettings, open_with: Callable[[str], Awaitable[T]]) -> T:
    """``open_with(secret)`` with the account's password, or for OAuth2 with its token (a
    refused token is refreshed once and tried again on a new connection, as for IMAP)."""
    if not account.auth.is_oauth:
        return await open_with(account.auth.secret())
    return await with_token_retry(account, open_with, "smtp")


async def check_smtp(account: AccountSettings) -> None:
    """Connect per ``account.smtp`` (implicit TLS, STARTTLS or plain), EHLO, log in, QUIT.

    Raises :class:`AuthError` when the login is refused and :class:`ServerError` for anything
    else (unreachable, timeout, TLS, a refusal before login). ``account.smtp`` must be set.
    """
    if account.smtp is None:
        raise ValueError(f"account {account.name} has no smtp settings")
    await signed_in(account, lambda secret: _check_smtp(account, secret))


async def _check_smtp(account: AccountSettings, secret: str) -> None:
    client, where = _client(account)
    assert account.smtp is not None
    try:
        await _connect(client, account, where)
        await login(client, account, where, secret)
        log.info(
            "smtp_login_ok", account=account.name, host=account.smtp.host, port=account.smtp.port
        )
    except ServerError:
        raise
    except Exception as exc:
        raise map_smtp_error(exc, where, account.smtp.timeout_seconds, secret) from exc
    finally:
        await _quit(client)


async def _quit(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await client.quit()
        except Exception:  # best effort: what was to be done is decided already
            client.close()


class SendError(ServerError):
    """The server answered MAIL FROM, RCPT TO or DATA with a refusal.

    ``permanent`` is True for a 5xx reply (RFC 5321 section 4.2.1: do not repeat the same
    request), False for 4xx. ``reply`` is the server's code and words, password scrubbed.
    """

    def __init__(
        self, message: str, *, reply: str, permanent: bool, code: str | None = None
    ) -> None:
        default = "message_rejected" if permanent else "send_deferred"
        super().__init__(message, code=code or default)
        self.reply = reply
        self.permanent = permanent


class SmtpSender:
    """One logged-in SMTP connection of an account, reused for several messages.

    ``await SmtpSender.open(account)``, then :meth:`send` per message, then :meth:`close`.
    Errors are mapped at this boundary: :class:`SendError` for a refusal of the message,
    :class:`ServerError` (``unreachable``, ``timeout``, ``connection_lost``, ``auth_failed`` ...)
    for everything else. After any error the connection is closed (open a new one), except
    an envelope address refused before MAIL FROM (not ASCII, or a character that could
    smuggle a parameter in): the connection stays usable.
    """

    def __init__(self, account: AccountSettings, client: aiosmtplib.SMTP, where: str) -> None:
        self.account = account
        self._client = client
        self._where = where
        self._secret = ""

    @classmethod
    async def open(cls, account: AccountSettings) -> SmtpSender:
        return await signed_in(account, lambda secret: cls._open(account, secret))

    @classmethod
    async def _open(cls, account: AccountSettings, secret: str) -> SmtpSender:
        client, where = _client(account)
        sender = cls(account, client, where)
        assert account.smtp is not None
        try:
            await _connect(client, account, where)
            await login(client, account, where, secret)
            sender._secret = secret
        except ServerError:
            client.close()
            raise
        except Exception as exc:
            client.close()
            raise map_smtp_error(exc, where, account.smtp.timeout_seconds, secret) from exc
        return sender

    @property
    def usable(self) -> bool:
        return self._client.is_connected

    async def send(self, raw: bytes, sender: str, recipients: Sequence[str]) -> dict[str, str]:
        """MAIL FROM ``sender``, RCPT TO each of ``recipients``, DATA ``raw`` (sent as is:
        ``message.as_bytes()``, so ids stay unfolded). Returns the recipients the server
        refused while accepting others (address -> reply); raises :class:`SendError` when the
        message or every recipient is refused."""
        assert self.account.smtp is not None
        unsendable = next((a for a in (sender, *recipients) if not a.isascii()), None)
        if unsendable is not None:
            # RFC 5321 envelopes are ASCII; a UTF-8 address needs SMTPUTF8 (RFC 6531), which
            # mailbridge does not send. Refused before MAIL FROM: the connection stays usable
            # for the account's other messages (before, an encoding error closed it).
            why = f"{unsendable!r} is not ASCII: it needs SMTPUTF8 (RFC 6531), not sent"
            raise SendError(
                f"{self._where}: {why}", reply=why, permanent=True, code="outbox_invalid"
            )
        unsafe = next((a for a in (sender, *recipients) if _unsafe_address(a)), None)
        if unsafe is not None:
            # Sent as "<address>" (below), an address with a space, an angle bracket or a
            # line break could add ESMTP parameters or a command: refused by aiosmtplib's rule
            # (sendmail raised ValueError, which closed the connection here as "internal"),
            # before MAIL FROM, and the connection stays usable.
            why = f"{unsafe!r} cannot be an SMTP envelope address (RFC 5321 section 4.1.2)"
            raise SendError(
                f"{self._where}: {why}", reply=why, permanent=True, code="outbox_invalid"
            )
        try:
            errors = await self._transaction(raw, sender, recipients)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            replies = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            permanent = all(r.code >= 500 for r in exc.recipients)
            await self.close()
            raise self._refusal(replies, permanent) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()
            if 400 <= exc.code < 600:
                reply = f"{exc.code} {exc.message}"
                raise self._refusal(reply, exc.code >= 500) from exc
            raise map_smtp_error(
                exc, self._where, self.account.smtp.timeout_seconds, self._secret
            ) from exc
        except Exception as exc:
            self._client.close()
            raise map_smtp_error(
                exc, self._where, self.account.smtp.timeout_seconds, self._secret
            ) from exc
        return {error.recipient: f"{error.code} {error.message}" for error in errors}

    async def _transaction(
        self, raw: bytes, sender: str, recipients: Sequence[str]
    ) -> list[aiosmtplib.SMTPRecipientRefused]:
        """One mail transaction (RFC 5321 section 3.3: MAIL, RCPT per recipient, DATA) as
        aiosmtplib's ``SMTP.sendmail`` runs it, with the same exceptions and the same RSET
        after a refusal, but with the commands sent as they are: the addresses were checked
        by :meth:`send` and are quoted here, not parsed again per command (``sendmail`` parsed
        each one twice), and the SIZE value is counted once, not converted (``sendmail``
        converted the line endings for it, then ``data`` again to send). Returns the refused
        recipients when others were accepted.

        ``sendmail`` holds a lock for the whole transaction so that two tasks sharing a client
        cannot interleave their commands; an :class:`SmtpSender` is one worker's connection,
        sending one message after another, so none is taken here. Each command still waits
        for its reply (aiosmtplib's command lock) within the client's ``timeout`` (the
        account's ``smtp.timeout_seconds``, see :func:`_client`), as in ``sendmail``.
        """
        client = self._client
        if client.is_ehlo_or_helo_needed:  # after a reconnect; _connect sent EHLO
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                if not client.is_connected:
                    raise
                await client.helo()
        # RFC 5321 section 4.1.1.2: MAIL FROM:<reverse-path> [SP Mail-parameters]; the ASCII
        # and unsafe-character checks of send() make "<address>" the whole path. RFC 1870:
        # SIZE=<octets as transmitted> when the server announced SIZE in its EHLO reply.
        mail = [b"MAIL", b"FROM:<" + sender.encode("ascii") + b">"]
        if client.supports_extension("size"):
            mail.append(b"SIZE=%d" % transmitted_size(raw))
        try:
            response = await client.execute_command(*mail)
            if response.code != 250:
                raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
            # RFC 5321 section 4.1.1.3: RCPT TO:<forward-path>, one per recipient; 250 or 251
            # accepts it, anything else refuses this recipient only (the others may go on).
            refused: list[aiosmtplib.SMTPRecipientRefused] = []
            for address in recipients:
                response = await client.execute_command(
                    b"RCPT", b"TO:<" + address.encode("ascii") + b">"
                )
                if response.code not in (250, 251):
                    refused.append(
                        aiosmtplib.SMTPRecipientRefused(response.code, response.message, address)
                    )
            if len(refused) == len(recipients):
                raise aiosmtplib.SMTPRecipientsRefused(refused)
            # RFC 5321 section 4.1.1.4: DATA, 354, the message (dot-stuffed, CRLF line
            # endings, by aiosmtplib), "." and 250; SMTPDataError on any other reply.
            await client.data(raw)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
            # As sendmail: RSET (RFC 5321 section 4.1.1.5) ends the refused transaction; a
            # lost connection or a refused RSET is not what the caller is told.
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                await client.rset()
            raise
        return refused

    async def reset(self) -> bool:
        """RSET (RFC 5321 section 4.1.1.5) on a connection kept idle since an earlier batch:
        True when the server answered 250, so the connection can carry the next message;
        False (the connection closed) when it timed out, went away or refused."""
        if not self._client.is_connected:
            return False
        try:
            await self._client.rset()
        except Exception:  # any failure only means: open a new connection
            self._client.close()
            return False
        return True

    def _refusal(self, reply: str, permanent: bool) -> SendError:
        reply = _scrub(" ".join(reply.split()), self._secret)
        return SendError(f"{self._where} refused: {reply}", reply=reply, permanent=permanent)

    async def close(self) -> None:
        """QUIT (best effort) and close. Never raises."""
        await _quit(self._client)


async def _login_oauth(client: aiosmtplib.SMTP, account: AccountSettings, token: str) -> None:
    """AUTH OAUTHBEARER (RFC 7628) where offered and wanted, else AUTH XOAUTH2, with the
    initial response (RFC 4954 section 4). A 334 challenge is the server's JSON error: answer it
    (%x01 for OAUTHBEARER, an empty line for XOAUTH2) to get the final reply."""
    smtp = account.smtp
    assert smtp is not None
    assert smtp.port is not None
    offered = {m.upper() for m in client.server_auth_methods}
    wanted = account.auth.sasl
    if wanted == "oauthbearer" or (wanted == "auto" and "OAUTHBEARER" in offered):
        mechanism = b"OAUTHBEARER"
        initial = sasl_oauthbearer(account.address, token, smtp.host, smtp.port)
        answer = b"AQ=="
    else:
        mechanism = b"XOAUTH2"
        initial = sasl_xoauth2(account.address, token)
        answer = b""
    response = await client.execute_command(b"AUTH", mechanism, initial.encode())
    if response.code == 334:
        detail = sasl_error_text(response.message)
        response = await client.execute_command(answer)
        if detail:
            response = aiosmtplib.SMTPResponse(response.code, f"{response.message} ({detail})")
    if response.code != 235:
        raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)


def map_smtp_error(exc: BaseException, where: str, timeout: float, secret: str = "") -> ServerError:
    """An aiosmtplib/ssl/socket exception as a :class:`ServerError` with a catalogue code."""
    # aiosmtplib wraps the socket/TLS cause (SMTPConnectError from OSError): look at the chain.
    for cause in exception_chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "certificate verify failed"
            return ServerError(
                f"{where}: TLS certificate not trusted ({reason})", code="tls_untrusted"
            )
        if isinstance(cause, ssl.SSLError):
            return ServerError(f"{where}: TLS failed ({cause.reason or cause})", code="tls_failed")
        if isinstance(cause, socket.gaierror):
            return ServerError(
                f"{where}: host name lookup failed ({cause.strerror})", code="unreachable"
            )
        if isinstance(cause, ConnectionRefusedError):
            return ServerError(f"{where}: connection refused", code="unreachable")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return ServerError(f"{where}: no answer within {timeout:g}s", code="timeout")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = _scrub(f"{exc.code} {exc.message}", secret)
        return ServerError(f"{where} refused: {text}", code=classify_server_text(text))
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
        return ServerError(f"{where}: connection lost", code="connection_lost")
    if isinstance(exc, aiosmtplib.SMTPException):
        text = _scrub(str(exc), secret)
        upper = text.upper()
        code = (
            "starttls_unavailable"  # aiosmtplib: "SMTP STARTTLS extension not supported by server."
            if "STARTTLS" in upper and "NOT SUPPORTED" in upper
            else "tls_failed"
            if "STARTTLS" in upper
            else classify_server_text(text)
        )
        return ServerError(f"{where}: {text}", code=code)
    if isinstance(exc, OSError):
        return ServerError(f"{where}: {exc.strerror or type(exc).__name__}", code="unreachable")
    return ServerError(f"{where}: unexpected {type(exc).__name__}", code="internal")


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret and len(secret) >= 3 else text
