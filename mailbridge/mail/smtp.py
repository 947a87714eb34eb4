"""SMTP over aiosmtplib: for now only :func:`check_smtp`, the connect-and-log-in check of
``mailbridge doctor`` (sending arrives with outgoing mail).

Like :mod:`mailbridge.mail.imap`, this is a boundary: every aiosmtplib/ssl/socket exception is
mapped into :mod:`mailbridge.errors` here, SMTP replies are classified by their code and words
(:func:`~mailbridge.errors.classify_server_text`), and the password never appears in a message.
"""

from __future__ import annotations

import socket
import ssl
from typing import Final

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


async def check_smtp(account: AccountSettings) -> None:
    """Connect per ``account.smtp`` (implicit TLS, STARTTLS or plain), EHLO, log in, QUIT.

    Raises :class:`AuthError` when the login is refused and :class:`ServerError` for anything
    else (unreachable, timeout, TLS, a refusal before login). ``account.smtp`` must be set.
    OAuth2 accounts log in with OAUTHBEARER where offered, else XOAUTH2 (a refused token is
    refreshed once and tried again on a new connection, as for IMAP).
    """
    smtp = account.smtp
    if smtp is None:
        raise ValueError(f"account {account.name} has no smtp settings")
    if not account.auth.is_oauth:
        await _check_smtp(account, account.auth.secret())
        return
    await with_token_retry(account, lambda token: _check_smtp(account, token), "smtp")


async def _check_smtp(account: AccountSettings, password: str) -> None:
    smtp = account.smtp
    assert smtp is not None
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
    try:
        await client.connect()
        if client.transport is not None:  # a silently dropped connection is noticed in minutes
            enable_keepalive(client.transport.get_extra_info("socket"))
        if client.last_ehlo_response is None:  # STARTTLS/implicit TLS already sent EHLO
            await client.ehlo()
        if not client.supports_extension("auth"):
            raise ServerError(
                f"{where} offers no SMTP AUTH on this connection (tls: {smtp.tls}); "
                "authenticated SMTP may be off for the account, or need TLS",
                code="protocol_disabled",
            )
        try:
            if account.auth.is_oauth:
                await _login_oauth(client, account, password)
            else:
                await client.login(account.login_name, password)
        except aiosmtplib.SMTPResponseException as exc:
            text = _scrub(f"{exc.code} {exc.message}", password)
            code = classify_server_text(text, default="auth_failed")
            message = f"SMTP login as {account.login_name} at {where} refused: {text}"
            raise (AuthError if code in _AUTH_CODES else ServerError)(message, code=code) from exc
        log.info("smtp_login_ok", account=account.name, host=smtp.host, port=smtp.port)
    except ServerError:
        raise
    except Exception as exc:
        raise map_smtp_error(exc, where, smtp.timeout_seconds, password) from exc
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except Exception:  # best effort: the check's result is already decided
                client.close()


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
        code = "tls_failed" if "STARTTLS" in text.upper() else classify_server_text(text)
        return ServerError(f"{where}: {text}", code=code)
    if isinstance(exc, OSError):
        return ServerError(f"{where}: {exc.strerror or type(exc).__name__}", code="unreachable")
    return ServerError(f"{where}: unexpected {type(exc).__name__}", code="internal")


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret and len(secret) >= 3 else text
