"""``mailbridge doctor``: check an account end to end and say what to fix, line by line.

:func:`diagnose` returns a checklist; each line is ``ok``, ``warn`` (works, but worse than it
could: no IDLE, an unverified certificate), ``fail`` (with the catalogue code and its remedy) or
``skip`` (an earlier line failed, so this one could not be checked). The order follows a
connection's life, so the first failing line is the one to fix first: secret, DNS/TCP, TLS,
login, capabilities, folders, SMTP. The database check is shared by every account.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from typing import Literal

from mailbridge.config import AccountSettings, Settings
from mailbridge.daemon.account import backlog_remedy, inbox_backlog
from mailbridge.errors import MailbridgeError, describe
from mailbridge.mail.imap import ImapSession
from mailbridge.mail.smtp import check_smtp
from mailbridge.store import factory as store_factory

Status = Literal["ok", "warn", "fail", "skip"]

_TLS_CODES = frozenset({"tls_untrusted", "tls_failed"})
_CONNECT_CODES = frozenset({"unreachable", "timeout", "connection_lost"})


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the checklist."""

    name: str
    status: Status
    detail: str = ""
    code: str | None = None

    @property
    def remedy(self) -> str | None:
        return describe(self.code).remedy if self.code else None

    @classmethod
    def failed(cls, name: str, exc: MailbridgeError) -> Check:
        return cls(name, "fail", str(exc), exc.code)


def failing(checks: list[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


def check_database(settings: Settings) -> Check:
    """The database can be written (or created), without changing it."""
    name = "database writable"
    try:
        return Check(name, "ok", store_factory.check_database(settings))
    except MailbridgeError as exc:
        return Check.failed(name, exc)


async def diagnose(account: AccountSettings, *, backlog_warning: int = 1000) -> list[Check]:
    """Every check of one account, in connection order (see the module docstring).

    ``backlog_warning`` is ``limits.backlog_warning``: more Inbox mail older than a day than
    this is a warning (0: not checked)."""
    try:
        account.auth.secret()
    except MailbridgeError as exc:
        skipped = ["login", "capabilities", "folders"] + (["smtp"] if account.smtp else [])
        return [Check.failed("secret readable", exc), *_skipped(*skipped, account=account)]
    checks = [Check("secret readable", "ok", account.auth.secret_source())]
    if account.auth.is_oauth:
        oauth = await _oauth(account)
        checks.extend(oauth)
        if failing(oauth):
            skipped = ["login", "capabilities", "folders"] + (["smtp"] if account.smtp else [])
            return [*checks, *_skipped(*skipped, account=account)]
    checks.extend(await _imap(account, backlog_warning))
    if account.smtp is not None:  # independent of IMAP: checked whatever IMAP said
        checks.append(await _smtp(account))
    return checks


async def _imap(account: AccountSettings, backlog_warning: int) -> list[Check]:
    imap = account.imap
    where = f"{imap.host}:{imap.port}"
    reach = await _reachable(imap.host, imap.port or 0, imap.timeout_seconds)
    if reach.status == "fail":
        return [reach, *_skipped("tls", "login", "capabilities", "folders", account=account)]
    checks = [reach]
    try:
        session = await ImapSession.open(account)
    except MailbridgeError as exc:
        if exc.code in _TLS_CODES:
            checks.append(Check.failed("TLS verified", exc))
            return [*checks, *_skipped("login", "capabilities", "folders", account=account)]
        checks.append(_tls_line(account))
        if exc.code in _CONNECT_CODES:
            checks.append(Check.failed(f"IMAP greeting from {where}", exc))
        else:
            checks.append(Check.failed(f"login as {account.login_name}", exc))
        return [*checks, *_skipped("capabilities", "folders", account=account)]
    try:
        checks.append(_tls_line(account))
        checks.append(Check(f"login as {account.login_name}", "ok"))
        checks.extend(_capabilities(session.capabilities, account))
        checks.extend(await _folders(session, account, backlog_warning))
    finally:
        await session.close()
    return checks


# -- the lines --------------------------------------------------------------------------------


async def _oauth(account: AccountSettings) -> list[Check]:
    """The identity provider's part of the chain: the secret's expiry, then a fresh token."""
    from mailbridge.mail.auth.tokens import provider_for

    auth = account.auth
    lines: list[Check] = []
    days = auth.secret_expiry_days()
    if days is not None:
        name = "client secret expiry"
        warning = auth.secret_expiry_warning()
        if days < 0:
            lines.append(Check(name, "fail", warning or "", "client_secret_expired"))
        elif warning is not None:
            lines.append(Check(name, "warn", warning))
        else:
            lines.append(Check(name, "ok", f"{auth.client_secret_expires} (in {days} days)"))
    where = auth.microsoft_authority() if auth.method == "microsoft" else auth.token_uri
    name = f"OAuth2 token ({auth.method} {auth.flow})"
    try:
        # force_refresh: prove the refresh token / secret / key works now, not a cached token.
        token = await provider_for(account).token(force_refresh=True)
    except MailbridgeError as exc:
        lines.append(Check.failed(name, exc))
        return lines
    lifetime = max(0, round(token.expires_at - token.issued_at))
    detail = f"issued by {where or 'Google'} for {account.address}, valid {lifetime}s"
    lines.append(Check(name, "ok", detail))
    return lines


async def _reachable(host: str, port: int, timeout: float) -> Check:  # noqa: ASYNC109
    name = f"reachable {host}:{port}"
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return Check(name, "fail", f"host name lookup failed ({exc.strerror})", "unreachable")
    except TimeoutError:
        return Check(name, "fail", f"host name lookup took over {timeout:g}s", "timeout")
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return Check(name, "fail", f"no TCP answer within {timeout:g}s", "timeout")
    except OSError as exc:
        return Check(name, "fail", f"TCP connect failed ({exc.strerror or exc})", "unreachable")
    writer.close()
    # Closed from the other end first is fine: the port answered, which is what was checked.
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return Check(name, "ok", "DNS and TCP")


def _tls_line(account: AccountSettings) -> Check:
    imap = account.imap
    if imap.tls == "none":
        return Check(
            "TLS", "warn", "imap.tls is none: the password and mail cross the network in clear"
        )
    if not imap.verify_certificate:
        return Check(
            "TLS verified",
            "warn",
            f"{imap.tls} TLS, but verify_certificate is false: the server's identity is not "
            "checked; set imap.ca_file to its CA instead",
        )
    return Check(
        "TLS verified", "ok", f"{imap.tls}" + (f", CA {imap.ca_file}" if imap.ca_file else "")
    )


def _capabilities(caps: frozenset[str], account: AccountSettings) -> list[Check]:
    lines: list[Check] = []
    if "IDLE" in caps:
        lines.append(Check("capability IDLE", "ok", "new mail is pushed"))
    else:
        lines.append(
            Check(
                "capability IDLE",
                "warn",
                f"missing: mailbridge polls every {account.poll_interval_seconds:g}s instead",
            )
        )
    if "MOVE" in caps:
        lines.append(Check("capability MOVE", "ok"))
    else:
        lines.append(
            Check(
                "capability MOVE",
                "warn",
                "missing: mailbridge copies, flags \\Deleted and expunges",
            )
        )
    if "UIDPLUS" in caps:
        lines.append(Check("capability UIDPLUS", "ok"))
    else:
        lines.append(
            Check(
                "capability UIDPLUS",
                "warn",
                "missing: Failed-folder UIDs are not recorded, and without MOVE an expunge waits "
                "until no other message is flagged \\Deleted",
            )
        )
    return lines


async def _folders(
    session: ImapSession, account: AccountSettings, backlog_warning: int
) -> list[Check]:
    folders = account.folders
    lines: list[Check] = []
    try:
        await session.select(folders.inbox)
    except MailbridgeError as exc:
        lines.append(Check.failed(f"folder {folders.inbox!r} selectable", exc))
    else:
        lines.append(Check(f"folder {folders.inbox!r} selectable", "ok"))
        if backlog_warning > 0:
            lines.append(await _backlog(session, account, backlog_warning))
    name = f"folders {folders.processed!r} and {folders.failed!r}"
    try:
        await session.ensure_folders([folders.processed, folders.failed])
        await session.select(folders.failed)
    except MailbridgeError as exc:
        lines.append(Check.failed(name, exc))
    else:
        lines.append(Check(name, "ok", "exist (created if they were missing)"))
    if folders.sent is not None:
        lines.append(await _sent_folder(session, folders.sent, append=folders.append_sent))
    return lines


async def _sent_folder(session: ImapSession, sent: str, *, append: bool) -> Check:
    """``folders.sent`` is the server's own folder (never created by mailbridge): it must be
    selectable, or sent copies cannot be APPENDed and a crash cannot be checked against it."""
    name = f"folder {sent!r} (folders.sent) selectable"
    try:
        await session.select(sent)
    except MailbridgeError as exc:
        return Check.failed(name, exc)
    use = "a copy of each sent message is appended; " if append else ""
    return Check(name, "ok", f"{use}searched for a Message-ID after a crash")


async def _backlog(session: ImapSession, account: AccountSettings, threshold: int) -> Check:
    """The Inbox is the queue: every message in it is imported, read or not."""
    name = f"{account.folders.inbox!r} backlog"
    try:
        old = await inbox_backlog(session)
    except MailbridgeError as exc:
        return Check.failed(name, exc)
    detail = f"{old} message(s) older than a day (limits.backlog_warning: {threshold})"
    if old > threshold:
        return Check(name, "warn", f"{detail}; all are imported. {backlog_remedy(account)}")
    return Check(name, "ok", detail)


async def _smtp(account: AccountSettings) -> Check:
    smtp = account.smtp
    assert smtp is not None
    name = f"SMTP {smtp.host}:{smtp.port} login"
    try:
        await check_smtp(account)
    except MailbridgeError as exc:
        return Check.failed(name, exc)
    if smtp.tls != "none" and not smtp.verify_certificate:
        return Check(name, "warn", "logged in, but smtp.verify_certificate is false")
    return Check(name, "ok", f"{smtp.tls} TLS" if smtp.tls != "none" else "no TLS")


def _skipped(*what: str, account: AccountSettings) -> list[Check]:
    names = {
        "tls": "TLS verified",
        "login": f"login as {account.login_name}",
        "capabilities": "capabilities",
        "folders": "folders",
        "smtp": "SMTP login",
    }
    return [Check(names[w], "skip", "not checked: an earlier line failed") for w in what]
