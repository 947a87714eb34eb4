"""Microsoft Entra ID tokens with msal: device code, client credentials, authorization code.

* ``device_code`` (delegated, the default): ``mailbridge auth ACCOUNT`` shows a URL and a code;
  the operator signs in anywhere (MFA works; the credentials never touch this server). msal
  keeps the refresh token in the account's token cache file (0600, written atomically, saved
  at once whenever msal changed it, so a rotated refresh token is never lost).
* ``client_credentials`` (app-only: ``IMAP.AccessAsApp`` / ``SMTP.SendAsApp`` granted to the
  app's service principal): the daemon asks for a token whenever it needs one; no human step.
* ``authorization_code``: ``mailbridge auth`` prints the sign-in URL; the operator pastes back
  the URL the browser was redirected to (``auth.redirect_uri``).

Scopes: "Authenticate an IMAP, POP or SMTP connection using OAuth" (Microsoft Learn):
``https://outlook.office.com/IMAP.AccessAsUser.All`` and ``.../SMTP.Send`` delegated,
``https://outlook.office365.com/.default`` app-only. msal adds ``offline_access``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msal

from mailbridge.config import AccountSettings
from mailbridge.errors import AuthError, ServerError
from mailbridge.log import register_secret, unregister_secret
from mailbridge.mail.auth.httpsession import CaSession
from mailbridge.mail.auth.tokens import (
    cache_mtime,
    http_error,
    oauth_error_from,
    read_cache_file,
    write_cache_file,
)

DEFAULT_REDIRECT_URI = "http://localhost"


class MicrosoftBackend:
    """msal for one account. Thread-safe: the provider calls it from worker threads."""

    def __init__(self, account: AccountSettings) -> None:
        self.account = account
        self.auth = account.auth
        self.scopes = list(self.auth.oauth_scopes())
        self.cache_path: Path = account.token_cache_path()
        self.where = f"token from {self.auth.microsoft_authority()}"
        self._lock = threading.Lock()
        self._cache = msal.SerializableTokenCache()
        self._cache_mtime: float | None = None
        self._app: msal.ClientApplication | None = None
        self._secret = ""
        self._masked: set[str] = set()

    # -- the daemon's side -----------------------------------------------------------------

    def acquire(self, *, force_refresh: bool) -> tuple[str, float]:
        with self._lock:
            try:
                if self.auth.flow == "client_credentials":
                    if force_refresh:
                        self._app = None  # a new app has an empty cache: a fresh token
                        self._cache = msal.SerializableTokenCache()
                    result = self._application().acquire_token_for_client(self.scopes)
                else:
                    result = self._silent(force_refresh)
            except (AuthError, ServerError):
                raise
            except Exception as exc:  # requests' errors, raised through msal
                raise http_error(exc, self.where, self.auth.token_timeout_seconds) from exc
            finally:
                self._save()
            return self._token_of(result)

    def _silent(self, force_refresh: bool) -> dict[str, Any]:
        self._load()
        app = self._application()
        accounts = app.get_accounts(username=self.auth.username) if self.auth.username else []
        if not accounts and self.auth.username is None:
            accounts = app.get_accounts()
        if not accounts:
            who = f" as {self.auth.username}" if self.auth.username else ""
            raise AuthError(
                f"no sign-in{who} stored in {self.cache_path}: run 'mailbridge auth "
                f"{self.account.name}'",
                code="sign_in_required",
            )
        result = app.acquire_token_silent_with_error(
            self.scopes, account=accounts[0], force_refresh=force_refresh
        )
        if result is None:
            raise AuthError(
                f"the stored sign-in in {self.cache_path} has no usable refresh token: run "
                f"'mailbridge auth {self.account.name}'",
                code="sign_in_required",
            )
        return dict(result)

    def _token_of(self, result: dict[str, Any]) -> tuple[str, float]:
        if "access_token" not in result:
            raise oauth_error_from(result, where=self.where)
        token = str(result["access_token"])
        register_secret(token)
        return token, float(result.get("expires_in", 3600))

    # -- interactive sign-in (mailbridge auth) ---------------------------------------------

    def start_device_flow(self) -> dict[str, Any]:
        """Ask for a device code: the flow dict has ``verification_uri``, ``user_code``,
        ``message``. Raises a classified error if the identity provider refuses."""
        with self._lock:
            try:
                flow = dict(self._application().initiate_device_flow(scopes=self.scopes))
            except Exception as exc:
                raise http_error(exc, self.where, self.auth.token_timeout_seconds) from exc
        if "user_code" not in flow:
            raise oauth_error_from(
                flow, where=f"device code from {self.auth.microsoft_authority()}"
            )
        return flow

    def finish_device_flow(self, flow: dict[str, Any]) -> str:
        """Wait for the operator's sign-in (polls as the flow says); returns who signed in."""
        try:
            result = dict(self._application().acquire_token_by_device_flow(flow))
        except Exception as exc:
            raise http_error(exc, self.where, self.auth.token_timeout_seconds) from exc
        return self._signed_in(result)

    def start_auth_code_flow(self) -> dict[str, Any]:
        """The authorization-code flow: ``flow['auth_uri']`` is the URL to open."""
        with self._lock:
            flow = self._application().initiate_auth_code_flow(
                self.scopes,
                redirect_uri=self.auth.redirect_uri or DEFAULT_REDIRECT_URI,
                login_hint=self.auth.username,
            )
        return dict(flow)

    def finish_auth_code_flow(self, flow: dict[str, Any], redirected_url: str) -> str:
        """Redeem the code in the URL the browser was sent to; returns who signed in."""
        params = dict(parse_qsl(urlsplit(redirected_url.strip()).query))
        if not params:
            raise AuthError(
                "the pasted text is not the redirected URL (it has no ?code=...&state=...)",
                code="auth_failed",
            )
        try:
            result = dict(self._application().acquire_token_by_auth_code_flow(flow, params))
        except ValueError as exc:  # msal: state mismatch
            raise AuthError(f"sign-in not accepted: {exc}", code="auth_failed") from exc
        except Exception as exc:
            raise http_error(exc, self.where, self.auth.token_timeout_seconds) from exc
        return self._signed_in(result)

    def _signed_in(self, result: dict[str, Any]) -> str:
        self._token_of(result)  # raises the classified error
        claims = result.get("id_token_claims") or {}
        who = str(claims.get("preferred_username") or claims.get("upn") or "")
        wanted = self.auth.username
        if wanted is not None and who and who.casefold() != wanted.casefold():
            with self._lock:  # forget the wrong user's tokens: nothing of them may be saved
                self._cache = msal.SerializableTokenCache()
                self._app = None
                self._cache_mtime = None
            raise AuthError(
                f"signed in as {who}, but auth.username is {wanted}: sign in as {wanted}, or "
                "change auth.username (nothing was stored)",
                code="upn_mismatch",
            )
        with self._lock:
            self._save(force=True)
        return who

    # -- internals --------------------------------------------------------------------------

    def _application(self) -> msal.ClientApplication:
        # The secret is read at every request: a rotated client_secret_file takes effect at
        # the next token request, without a restart.
        secret = self.auth.secret()
        if self._app is not None and secret == self._secret:
            return self._app
        self._secret = secret
        auth = self.auth
        common: dict[str, Any] = {
            "authority": auth.microsoft_authority(),
            "token_cache": self._cache,
            "http_client": CaSession(auth.ca_file),
            "timeout": auth.token_timeout_seconds,
            # The authority is used as configured (national clouds, a test server): no
            # instance discovery call to the public cloud first.
            "instance_discovery": False,
            "validate_authority": auth.authority is None,
        }
        if secret:
            self._app = msal.ConfidentialClientApplication(
                auth.client_id, client_credential=secret, **common
            )
        else:
            self._app = msal.PublicClientApplication(auth.client_id, **common)
        return self._app

    def _load(self) -> None:
        """(Re)read the cache file when it changed on disk (e.g. 'mailbridge auth' ran)."""
        if self.auth.flow == "client_credentials":
            return  # app tokens are kept in memory only; there is no refresh token
        mtime = cache_mtime(self.cache_path)
        if mtime is None or mtime == self._cache_mtime:
            return
        text = read_cache_file(self.cache_path)
        if text:
            self._cache.deserialize(text)
            self._mask(_secrets_in(text))
        self._cache_mtime = mtime

    def _mask(self, secrets: list[str]) -> None:
        """Register the cache's tokens with the log redactor, dropping the replaced ones (the
        redactor's pattern must not grow with every refresh)."""
        for old in self._masked.difference(secrets):
            unregister_secret(old)
        for secret in secrets:
            register_secret(secret)
        self._masked = set(secrets)

    def _save(self, *, force: bool = False) -> None:
        if self.auth.flow == "client_credentials":
            return
        if force or self._cache.has_state_changed:
            text = self._cache.serialize()
            write_cache_file(self.cache_path, text)
            self._mask(_secrets_in(text))
            self._cache.has_state_changed = False
            self._cache_mtime = cache_mtime(self.cache_path)


def _secrets_in(cache_text: str) -> list[str]:
    """Refresh and access tokens in an msal cache (registered with the log redactor)."""
    import json

    try:
        data = json.loads(cache_text)
    except ValueError:
        return []
    found = []
    for section in ("AccessToken", "RefreshToken", "IdToken"):
        for entry in (data.get(section) or {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("secret"), str):
                found.append(entry["secret"])
    return found
