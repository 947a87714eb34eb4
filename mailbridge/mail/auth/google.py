"""Google Workspace tokens with google-auth: service account (domain-wide delegation) or an
installed app's refresh token.

* ``service_account``: ``auth.service_account_file`` (the JSON key) signs a JWT bearer grant
  (RFC 7523) for ``subject`` = the mailbox; the Workspace admin must authorise the service
  account's client ID for ``https://mail.google.com/`` under domain-wide delegation. No human
  step, no refresh token, nothing cached on disk.
* ``authorization_code`` (installed app, "Desktop app" OAuth client): ``mailbridge auth
  ACCOUNT`` prints the consent URL (PKCE, RFC 7636) and catches the loopback redirect or takes
  the pasted code; the refresh token is kept in the token cache file (0600, atomic), and a new
  one, should Google rotate it, is saved at once.

``auth.token_uri`` and ``auth.auth_uri`` default to Google's endpoints; ``auth.ca_file`` makes
the requests trust a private CA (a TLS-inspecting proxy).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.credentials
import google.oauth2.service_account

from mailbridge.config import GOOGLE_AUTH_URI, GOOGLE_TOKEN_URI, AccountSettings
from mailbridge.errors import AuthError, ConfigError, ServerError
from mailbridge.log import register_secret
from mailbridge.mail.auth.httpsession import CaSession
from mailbridge.mail.auth.tokens import (
    http_error,
    oauth_error,
    oauth_error_from,
    read_cache_file,
    write_cache_file,
)


class _Request(google.auth.transport.requests.Request):
    """google-auth's transport with our timeout (its default is 120 s)."""

    def __init__(self, session: CaSession, timeout: float) -> None:
        super().__init__(session=session)
        self._timeout = timeout

    def __call__(
        self,
        url: Any,
        method: Any = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> Any:
        return super().__call__(  # type: ignore[no-untyped-call]
            url, method, body, headers, self._timeout, **kwargs
        )


class GoogleBackend:
    """google-auth for one account. Thread-safe: the provider calls it from worker threads."""

    def __init__(self, account: AccountSettings) -> None:
        self.account = account
        self.auth = account.auth
        self.token_uri = self.auth.token_uri or GOOGLE_TOKEN_URI
        self.cache_path: Path = account.token_cache_path()
        self.where = f"token from {self.token_uri}"
        self.session = CaSession(self.auth.ca_file)
        self._lock = threading.Lock()

    def acquire(self, *, force_refresh: bool) -> tuple[str, float]:
        with self._lock:
            credentials = (
                self._service_account()
                if self.auth.flow == "service_account"
                else self._installed_app()
            )
            try:
                credentials.refresh(_Request(self.session, self.auth.token_timeout_seconds))
            except google.auth.exceptions.RefreshError as exc:
                raise self._refresh_error(exc) from exc
            except google.auth.exceptions.TransportError as exc:
                raise http_error(exc, self.where, self.auth.token_timeout_seconds) from exc
            token = str(credentials.token)
            register_secret(token)
            if self.auth.flow != "service_account":
                self._keep_refresh_token(credentials.refresh_token)
            lifetime = 3600.0
            if credentials.expiry is not None:
                from datetime import UTC, datetime

                expiry = credentials.expiry.replace(tzinfo=UTC)
                lifetime = (expiry - datetime.now(UTC)).total_seconds()
            return token, lifetime

    def _refresh_error(self, exc: google.auth.exceptions.RefreshError) -> ServerError:
        data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        error = str(data.get("error", ""))
        description = str(data.get("error_description", ""))
        if not error:
            text = str(exc.args[0]) if exc.args else str(exc)
            error, _, description = text.partition(": ")
        if self.auth.flow == "service_account" and error == "invalid_grant":
            # For a JWT bearer grant invalid_grant means the key (deleted, wrong file) or the
            # clock, never a refresh token to renew by signing in.
            return AuthError(
                f"{self.where}: {error}: {description} (service account key "
                f"{self.auth.service_account_file} refused; or this host's clock is wrong)",
                code="client_secret_invalid",
            )
        return oauth_error(error, description, where=self.where)

    def _service_account(self) -> Any:
        path = self.auth.service_account_file
        assert path is not None  # the config requires it for this flow
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the service account key {path}: {exc}",
                path="auth.service_account_file",
                code="secret_missing",
            ) from exc
        if self.auth.token_uri is not None:
            info["token_uri"] = self.auth.token_uri
        if isinstance(info.get("private_key"), str):
            register_secret(info["private_key"])
        try:
            return google.oauth2.service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=list(self.auth.oauth_scopes()), subject=self.auth.subject
            )
        except (ValueError, KeyError) as exc:
            raise ConfigError(
                f"{path} is not a service account key file (JSON with client_email, "
                f"private_key, token_uri): {exc}",
                path="auth.service_account_file",
                code="secret_missing",
            ) from exc

    def _installed_app(self) -> Any:
        stored = self._stored()
        refresh_token = stored.get("refresh_token")
        if not isinstance(refresh_token, str) or not refresh_token:
            raise AuthError(
                f"no sign-in stored in {self.cache_path}: run 'mailbridge auth "
                f"{self.account.name}'",
                code="sign_in_required",
            )
        register_secret(refresh_token)
        return google.oauth2.credentials.Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=refresh_token,
            token_uri=self.token_uri,
            client_id=self.auth.client_id,
            client_secret=self.auth.secret(),
            scopes=list(self.auth.oauth_scopes()),
        )

    def _stored(self) -> dict[str, Any]:
        text = read_cache_file(self.cache_path)
        if not text:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _keep_refresh_token(self, refresh_token: str | None) -> None:
        if not refresh_token:
            return
        stored = self._stored()
        if stored.get("refresh_token") != refresh_token:  # rotated: save at once
            register_secret(refresh_token)
            stored["refresh_token"] = refresh_token
            write_cache_file(self.cache_path, json.dumps(stored))

    # -- installed-app consent (mailbridge auth) -------------------------------------------

    def consent_url(self, redirect_uri: str) -> tuple[str, str, str]:
        """(URL to open, state, PKCE verifier) for Google's consent page."""
        verifier = secrets.token_urlsafe(64)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .decode()
            .rstrip("=")
        )
        state = secrets.token_urlsafe(16)
        query = {
            "response_type": "code",
            "client_id": self.auth.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(self.auth.oauth_scopes()),
            "access_type": "offline",  # a refresh token
            "prompt": "consent",  # ... every time, even when consent was given before
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "login_hint": self.account.address,
        }
        return f"{self.auth.auth_uri or GOOGLE_AUTH_URI}?{urlencode(query)}", state, verifier

    def redeem(self, code: str, redirect_uri: str, verifier: str) -> None:
        """Exchange the consent code for a refresh token and store it."""
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": self.auth.client_id,
            "client_secret": self.auth.secret(),
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        try:
            response = self.session.post(
                self.token_uri, data=data, timeout=self.auth.token_timeout_seconds
            )
            body = response.json()
        except ValueError as exc:
            raise ServerError(f"{self.where}: not a JSON answer", code="idp_unavailable") from exc
        except Exception as exc:
            raise http_error(exc, self.where, self.auth.token_timeout_seconds) from exc
        if "refresh_token" not in body:
            raise oauth_error_from(body, where=self.where, missing="no refresh token in the answer")
        register_secret(str(body["refresh_token"]))
        write_cache_file(
            self.cache_path,
            json.dumps({"refresh_token": body["refresh_token"], "account": self.account.address}),
        )
