"""OAuth2 access tokens for IMAP/SMTP sign-in: one :class:`TokenProvider` per account.

The provider hands out a current access token (``await provider.token()``), asking the identity
provider only when the cached one is within :data:`REFRESH_MARGIN_SECONDS` of expiry (or
half its lifetime for short-lived tokens), or when a server rejected it (``force_refresh``).
The libraries are the design's: **msal** for Microsoft (device code, client credentials,
authorization code), **google-auth** for Google (service account with domain-wide delegation,
installed-app refresh token); see :mod:`mailbridge.mail.auth.microsoft` and
:mod:`mailbridge.mail.auth.google`.

Isolation: both libraries block (requests). Every token request runs on a thread of its own,
started for that request, never on the event loop and never in a shared pool, and is awaited
with ``auth.token_timeout_seconds``. So one account's identity provider hanging or refusing
never delays another account: at most one request per account is in flight (a timed-out one is
joined by the next attempt instead of starting a second).

Errors come back classified (:mod:`mailbridge.errors`): ``client_secret_invalid``
(AADSTS7000215), ``client_secret_expired`` (AADSTS7000222), ``consent_missing`` (AADSTS65001,
``unauthorized_client``), ``token_expired`` (``invalid_grant``), ``sign_in_required`` (no stored
sign-in), ``idp_unavailable`` (network, TLS, 5xx, timeout; transient). Tokens and secrets are
registered with the log redactor before anything can log them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import structlog

from mailbridge.config import AccountSettings
from mailbridge.errors import AuthError, ServerError, classify_server_text
from mailbridge.log import register_secret, unregister_secret

log = structlog.get_logger("mailbridge.oauth")

T = TypeVar("T")

# Refresh this long before expiry (msal itself treats a token expiring within 5 minutes as
# expired). Tokens that live shorter than twice this are refreshed at half their lifetime.
REFRESH_MARGIN_SECONDS: Final = 300.0


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it expires (``time.time()`` seconds)."""

    token: str
    expires_at: float
    issued_at: float

    def refresh_at(self) -> float:
        """When to ask for a new one: REFRESH_MARGIN_SECONDS early, or half-way for short ones."""
        lifetime = self.expires_at - self.issued_at
        margin = min(REFRESH_MARGIN_SECONDS, lifetime / 2)
        return self.expires_at - margin


class TokenBackend(Protocol):
    """A provider's blocking half (runs on a worker thread). Raises classified errors."""

    def acquire(self, *, force_refresh: bool) -> tuple[str, float]:
        """A token and its lifetime in seconds, from the cache or the identity provider."""


def oauth_error(
    error: str, description: str, *, where: str, default: str = "auth_failed"
) -> ServerError:
    """An RFC 6749 section 5.2 error response as a classified error.

    ``invalid_grant`` is an expired or revoked refresh token (sign in again), AADSTS codes name
    their cause; ``temporarily_unavailable`` / ``server_error`` are the provider's own trouble.
    """
    text = f"{error}: {description}".strip(": ")
    if error in {"temporarily_unavailable", "server_error"}:
        code = "idp_unavailable"
    elif error == "invalid_scope":
        code = "consent_missing"
    else:
        code = classify_server_text(text, default=default)
        if code in {"server_error", "server_unavailable"}:
            code = default
    first_line = text.splitlines()[0] if text else "no reason given"
    message = f"{where}: {first_line}"
    if code == "idp_unavailable":
        return ServerError(message, code=code)
    return AuthError(message, code=code)


def oauth_error_from(
    body: Mapping[str, Any], *, where: str, missing: str = "no token in the answer"
) -> ServerError:
    """:func:`oauth_error` for a token endpoint's JSON answer (or msal's result dict)."""
    return oauth_error(
        str(body.get("error") or missing), str(body.get("error_description", "")), where=where
    )


def http_error(exc: Exception, where: str, timeout: float) -> ServerError:
    """A requests/transport failure talking to the identity provider (transient)."""
    import requests  # imported already by whoever raised ``exc`` (not at start-up)

    for cause in exception_chain(exc):
        if isinstance(cause, requests.exceptions.SSLError):
            return ServerError(
                f"{where}: TLS certificate of the identity provider not trusted ({cause}); "
                "behind a TLS-inspecting proxy set auth.ca_file",
                code="idp_unavailable",
            )
        if isinstance(cause, requests.Timeout | TimeoutError):
            return ServerError(f"{where}: no answer within {timeout:g}s", code="idp_unavailable")
        if isinstance(cause, requests.ConnectionError | ConnectionError):
            return ServerError(
                f"{where}: cannot connect ({type(cause).__name__})", code="idp_unavailable"
            )
    return ServerError(f"{where}: {type(exc).__name__}: {exc}", code="idp_unavailable")


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (libraries wrap socket and TLS errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


# -- owner-only, atomic token cache files --------------------------------------------------


def read_cache_file(path: Path) -> str | None:
    """The cache's text, or None when there is none. Tightens a too-open mode to 0600."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & 0o077:
        log.warning(
            "token_cache_mode_fixed", path=str(path), mode=oct(stat.S_IMODE(mode)), now="0o600"
        )
        path.chmod(0o600)
    return path.read_text(encoding="utf-8")


def write_cache_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically (temp file, fsync, rename), created 0600 in a 0700 dir."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cache_mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns / 1e9
    except FileNotFoundError:
        return None


# -- the provider --------------------------------------------------------------------------


class TokenProvider:
    """Access tokens for one account; shared by its IMAP loop, sweep and SMTP (see module doc)."""

    def __init__(self, account: AccountSettings, backend: TokenBackend) -> None:
        self.account = account
        self.backend = backend
        self.timeout = account.auth.token_timeout_seconds
        self._token: AccessToken | None = None
        self._inflight: tuple[threading.Thread, _Outcome] | None = None
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self.requests = 0  # how many times the identity provider (or msal's cache) was asked
        self._log = log.bind(account=account.name)

    @property
    def current(self) -> AccessToken | None:
        return self._token

    def refresh_due_in(self) -> float | None:
        """Seconds until the token should be refreshed (0 if due); None without a token."""
        if self._token is None:
            return None
        return max(0.0, self._token.refresh_at() - time.time())

    def invalidate(self) -> None:
        """Forget the in-memory token (a server rejected it)."""
        self._token = None

    async def token(self, *, force_refresh: bool = False) -> AccessToken:
        """A token valid for a while yet; asks the identity provider only when needed."""
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        async with lock:
            current = self._token
            if not force_refresh and current is not None and time.time() < current.refresh_at():
                return current
            value, lifetime = await self._off_loop(
                lambda: self.backend.acquire(force_refresh=force_refresh)
            )
            now = time.time()
            register_secret(value)
            if current is not None and current.token != value:
                unregister_secret(current.token)
            self._token = AccessToken(value, now + max(lifetime, 1.0), now)
            if current is not None and current.token != value:
                self._log.debug("oauth_token_refreshed", expires_in=round(lifetime))
            elif current is None:
                self._log.info("oauth_token_obtained", expires_in=round(lifetime))
            return self._token

    async def _off_loop(self, call: Callable[[], T]) -> T:
        """Run ``call`` on a thread of its own, awaited with the account's token timeout."""
        loop = asyncio.get_running_loop()
        if self._inflight is not None and self._inflight[0].is_alive():
            thread, outcome = self._inflight  # a timed-out request is still running: join it
        else:
            outcome = _Outcome()
            thread = threading.Thread(
                target=outcome.run, args=(call,), name=f"oauth-{self.account.name}", daemon=True
            )
            self._inflight = (thread, outcome)
            thread.start()
        self.requests += 1
        deadline = loop.time() + self.timeout
        # Polled rather than signalled: the thread may outlive this event loop (CLI commands
        # run one loop each), and a poll needs no call into a loop that may be closed.
        delay = 0.005
        while thread.is_alive():
            if loop.time() >= deadline:
                raise ServerError(
                    f"token request for {self.account.name}: no answer from the identity "
                    f"provider within {self.timeout:g}s",
                    code="idp_unavailable",
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        self._inflight = None
        return outcome.result()  # type: ignore[no-any-return]


class _Outcome:
    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self, call: Callable[[], Any]) -> None:
        try:
            self.value = call()
        except BaseException as exc:  # handed to the awaiting coroutine
            self.error = exc

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


_providers: dict[tuple[str, Any], TokenProvider] = {}
_providers_lock = threading.Lock()


def provider_for(account: AccountSettings) -> TokenProvider:
    """The account's provider (one per account and auth settings in this process)."""
    key = (account.name, account.auth)
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            for old in [k for k in _providers if k[0] == account.name]:
                del _providers[old]  # settings changed (reload): the old one is done
            provider = _providers[key] = TokenProvider(account, make_backend(account))
        return provider


def make_backend(account: AccountSettings) -> TokenBackend:
    if account.auth.method == "microsoft":
        from mailbridge.mail.auth.microsoft import MicrosoftBackend

        return MicrosoftBackend(account)
    if account.auth.method == "google":
        from mailbridge.mail.auth.google import GoogleBackend

        return GoogleBackend(account)
    raise ValueError(f"account {account.name} signs in with a password, not OAuth2")


def sasl_xoauth2(user: str, token: str) -> str:
    """The XOAUTH2 initial client response, base64 (Google's and Microsoft's XOAUTH2 spec)."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def sasl_oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """The OAUTHBEARER initial client response, base64 (RFC 7628 section 3.1)."""
    authzid = user.replace("=", "=3D").replace(",", "=2C")  # RFC 5801 saslname
    text = f"n,a={authzid},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(text.encode()).decode()


def sasl_error_text(challenge: bytes | str) -> str:
    """The server's base64 JSON error challenge (XOAUTH2/OAUTHBEARER failure), as text."""
    raw = challenge.encode() if isinstance(challenge, str) else challenge
    try:
        data = json.loads(base64.b64decode(raw.strip(), validate=False))
    except (ValueError, binascii.Error):
        return ""
    if not isinstance(data, dict):
        return ""
    return " ".join(f"{k}={v}" for k, v in data.items() if k in {"status", "schemes", "scope"})


async def with_token_retry(
    account: AccountSettings, login: Callable[[str], Awaitable[T]], what: str
) -> T:
    """Log in with the account's token; refused, refresh it once and log in again.

    A token may be refused although it looked valid (expired while a session idled, revoked):
    one refresh and a new connection, never a loop. Refused again with a fresh token, the
    identity provider vouched for the user, so what is missing is on the mailbox's side
    (Full Access, IMAP/SMTP enabled, Conditional Access): ``mailbox_not_connected``.
    """
    provider = provider_for(account)
    token = await provider.token()
    try:
        return await login(token.token)
    except AuthError as exc:
        if exc.code not in {"auth_failed", "token_expired"}:
            raise
        log.warning(f"{what}_token_refused_refreshing", account=account.name, error=str(exc))
    token = await provider.token(force_refresh=True)
    try:
        return await login(token.token)
    except AuthError as exc:
        if exc.code != "auth_failed":
            raise
        raise AuthError(
            f"{exc} (with a freshly issued token for {account.address})",
            code="mailbox_not_connected",
        ) from exc
