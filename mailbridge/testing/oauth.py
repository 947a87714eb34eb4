"""A local OpenID Connect / OAuth2 identity provider for tests (no internet needed).

HTTPS (certificate from a throwaway CA made with trustme; trust it with ``ca_file``) on
``base_url``, plus a plain-HTTP token introspection endpoint (RFC 7662) for Dovecot's
``passdb oauth2``. It speaks what msal and google-auth send:

* ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (msal's discovery),
* ``POST /{tenant}/oauth2/v2.0/devicecode`` (RFC 8628) and ``GET .../authorize`` (the user's
  side of the authorization-code flow: a 302 back to ``redirect_uri`` with the code),
* ``POST /{tenant}/oauth2/v2.0/token`` and ``POST /token`` (Google): grants
  ``client_credentials``, ``refresh_token`` (rotated at every use, the old one then refused),
  ``urn:ietf:params:oauth:grant-type:device_code``, ``authorization_code`` (PKCE checked) and
  ``urn:ietf:params:oauth:grant-type:jwt-bearer`` (RFC 7523; a service account's RS256
  signature is verified against its registered public key, ``sub`` against its delegations),
* ``POST /introspect`` on ``introspection_url``: ``{"active": "true", "username": ...}`` for a
  live access token, ``{"active": "false"}`` otherwise.

Errors are the real ones' shapes: ``invalid_client`` with AADSTS7000215 (wrong secret) or
AADSTS7000222 (expired secret), ``invalid_grant`` with AADSTS50173 (revoked), AADSTS65001
(no consent), ``unauthorized_client`` for a service account without domain-wide delegation.
The test plays the user with :meth:`approve_device_code` and :meth:`authorize`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

HOST = "127.0.0.1"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description


@dataclass
class Client:
    """A registered application (Entra app registration or Google OAuth client)."""

    client_id: str
    secret: str | None = None
    secret_expired: bool = False
    consented: bool = True
    # client_credentials: which mailboxes the app's service principal may open
    # (Add-MailboxPermission); its tokens are introspected as the mailbox XOAUTH2 names.
    mailboxes: set[str] = field(default_factory=set)


@dataclass
class Grant:
    username: str
    client_id: str
    scope: str


@dataclass
class ServiceAccount:
    client_email: str
    public_key: Any
    subjects: set[str]  # domain-wide delegation: the mailboxes it may act as


class OAuthTestServer:
    """The identity provider; use as a context manager. See the module docstring."""

    def __init__(self, workdir: Path, *, tenant: str = "test-tenant") -> None:
        import trustme

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tenant = tenant
        ca = trustme.CA()
        self.ca_file = self.workdir / "oauth-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert = ca.issue_cert(HOST, "localhost")
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self._context)
        self.lock = threading.Lock()
        self.clients: dict[str, Client] = {}
        self.service_accounts: dict[str, ServiceAccount] = {}
        self.access_tokens: dict[str, tuple[str, float]] = {}  # token -> (username, expires_at)
        self.refresh_tokens: dict[str, Grant] = {}
        self.device_codes: dict[str, dict[str, Any]] = {}
        self.auth_codes: dict[str, dict[str, Any]] = {}
        self.grants: Counter[str] = Counter()  # successful grants by grant_type
        self.access_token_lifetime = 3600
        self.fail_with: tuple[int, str, str] | None = None  # every token request fails so
        self.delays: dict[str, float] = {}  # client_id -> seconds its token requests hang
        # user -> the mailbox they have Full Access to: their tokens open that mailbox (XOAUTH2
        # user= is the mailbox), as Exchange lets a delegate open a shared mailbox.
        self.full_access: dict[str, str] = {}
        self._https: ThreadingHTTPServer | None = None
        self._http: ThreadingHTTPServer | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._https is not None
        return f"https://{HOST}:{self._https.server_address[1]}"

    @property
    def authority(self) -> str:
        """What auth.authority is set to (msal appends /v2.0/... and /oauth2/v2.0/...)."""
        return f"{self.base_url}/{self.tenant}"

    @property
    def google_token_uri(self) -> str:
        return f"{self.base_url}/token"

    @property
    def google_auth_uri(self) -> str:
        return f"{self.base_url}/google/auth"

    @property
    def introspection_url(self) -> str:
        assert self._http is not None
        return f"http://{HOST}:{self._http.server_address[1]}/introspect"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> OAuthTestServer:
        handler = _handler_for(self)
        self._https = ThreadingHTTPServer((HOST, 0), handler)
        self._https.socket = self._context.wrap_socket(self._https.socket, server_side=True)
        self._http = ThreadingHTTPServer((HOST, 0), handler)
        for server in (self._https, self._http):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self._https, self._http):
            if server is not None:
                server.shutdown()
                server.server_close()

    def __enter__(self) -> OAuthTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- set-up by tests -------------------------------------------------------------------

    def add_client(
        self, client_id: str, secret: str | None = None, *, mailboxes: set[str] | None = None
    ) -> Client:
        client = Client(client_id, secret, mailboxes=set(mailboxes or ()))
        with self.lock:
            self.clients[client_id] = client
        return client

    def add_service_account(self, path: Path, client_email: str, subjects: set[str]) -> Path:
        """Write a service account key file (JSON, like Google's) and register its key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        info = {
            "type": "service_account",
            "project_id": "mailbridge-test",
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": client_email,
            "client_id": str(secrets.randbelow(10**20)),
            "token_uri": self.google_token_uri,
        }
        path.write_text(json.dumps(info), encoding="utf-8")
        path.chmod(0o600)
        with self.lock:
            self.service_accounts[client_email] = ServiceAccount(
                client_email, key.public_key(), set(subjects)
            )
        return path

    def approve_device_code(self, user_code: str, username: str) -> None:
        """The user signs in at the verification URL and enters ``user_code``."""
        with self.lock:
            for entry in self.device_codes.values():
                if entry["user_code"] == user_code:
                    entry["username"] = username
                    return
        raise KeyError(f"no device code with user code {user_code!r}")

    def authorize(self, url: str, username: str) -> str:
        """The user opens the sign-in ``url`` and consents: returns the redirected URL."""
        params = dict(parse_qsl(urlsplit(url).query))
        code = secrets.token_urlsafe(24)
        with self.lock:
            self.auth_codes[code] = {
                "client_id": params["client_id"],
                "username": username,
                "redirect_uri": params["redirect_uri"],
                "nonce": params.get("nonce"),
                "challenge": params.get("code_challenge"),
                "scope": params.get("scope", ""),
            }
        query = urlencode({"code": code, "state": params.get("state", "")})
        return f"{params['redirect_uri']}?{query}"

    def revoke_user(self, username: str) -> None:
        """Revoke every refresh token of ``username`` (a password reset, an admin's revoke)."""
        with self.lock:
            for token in [t for t, g in self.refresh_tokens.items() if g.username == username]:
                del self.refresh_tokens[token]

    def expire_access_tokens(self) -> None:
        with self.lock:
            self.access_tokens = {t: (u, 0.0) for t, (u, _e) in self.access_tokens.items()}

    def username_of(self, token: str) -> str | None:
        """Who a live access token belongs to (what introspection says), or None."""
        with self.lock:
            entry = self.access_tokens.get(token)
        if entry is None or entry[1] < time.time():
            return None
        return entry[0]

    # -- protocol --------------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        base = f"{self.authority}/oauth2/v2.0"
        return {
            "issuer": f"{self.authority}/v2.0",
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "device_authorization_endpoint": f"{base}/devicecode",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", DEVICE_CODE_GRANT],
        }

    def device_code(self, form: dict[str, str]) -> dict[str, Any]:
        self._client(form, need_secret=False)
        device = secrets.token_urlsafe(24)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))
        with self.lock:
            self.device_codes[device] = {
                "user_code": user_code,
                "client_id": form["client_id"],
                "scope": form.get("scope", ""),
                "username": None,
            }
        verification = f"{self.base_url}/devicelogin"
        return {
            "device_code": device,
            "user_code": user_code,
            "verification_uri": verification,
            "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, open {verification} and enter the code {user_code}.",
        }

    def token(self, form: dict[str, str]) -> dict[str, Any]:
        delay = self.delays.get(form.get("client_id", ""), 0.0)
        if delay:
            time.sleep(delay)  # this client's identity provider hangs; others are served
        if self.fail_with is not None:
            raise OAuthError(*self.fail_with)
        grant_type = form.get("grant_type", "")
        if grant_type == "client_credentials":
            client = self._client(form, need_secret=True)
            if not client.consented:
                raise OAuthError(
                    400,
                    "invalid_client",
                    "AADSTS7000229: The client application is missing service principal in the "
                    "tenant.",
                )
            # The app's tokens act for whichever mailbox it was granted; tests grant one.
            username = next(iter(sorted(client.mailboxes)), client.client_id)
            result = self._issue(username, client.client_id, form.get("scope", ""), refresh=False)
        elif grant_type == "refresh_token":
            client = self._client(form, need_secret=False)
            with self.lock:
                grant = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if grant is None or grant.client_id != client.client_id:
                raise OAuthError(
                    400,
                    "invalid_grant",
                    "AADSTS50173: The provided grant has expired due to it being revoked, a "
                    "fresh auth token is needed. The user might have changed or reset their "
                    "password.",
                )
            result = self._issue(grant.username, grant.client_id, form.get("scope", grant.scope))
        elif grant_type == DEVICE_CODE_GRANT:
            self._client(form, need_secret=False)
            with self.lock:
                entry = self.device_codes.get(form.get("device_code", ""))
                if entry is None:
                    raise OAuthError(400, "expired_token", "AADSTS70019: code expired")
                if entry["username"] is None:
                    raise OAuthError(
                        400, "authorization_pending", "AADSTS70016: pending user sign-in"
                    )
                del self.device_codes[form["device_code"]]
            result = self._issue(entry["username"], entry["client_id"], entry["scope"])
        elif grant_type == "authorization_code":
            self._client(form, need_secret=False)
            with self.lock:
                entry = self.auth_codes.pop(form.get("code", ""), None)
            if entry is None or entry["redirect_uri"] != form.get("redirect_uri"):
                raise OAuthError(400, "invalid_grant", "AADSTS70000: the code is invalid")
            challenge = entry["challenge"]
            if challenge is not None:
                verifier = form.get("code_verifier", "")
                digest = hashlib.sha256(verifier.encode()).digest()
                if base64.urlsafe_b64encode(digest).decode().rstrip("=") != challenge:
                    raise OAuthError(400, "invalid_grant", "PKCE verification failed")
            result = self._issue(
                entry["username"], entry["client_id"], entry["scope"], nonce=entry["nonce"]
            )
        elif grant_type == JWT_BEARER_GRANT:
            result = self._jwt_bearer(form.get("assertion", ""))
        else:
            raise OAuthError(400, "unsupported_grant_type", grant_type)
        with self.lock:
            self.grants[grant_type] += 1
        return result

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        username = self.username_of(form.get("token", ""))
        if username is None:
            return {"active": "false"}
        return {"active": "true", "username": username}

    # -- internals -------------------------------------------------------------------------

    def _client(self, form: dict[str, str], *, need_secret: bool) -> Client:
        with self.lock:
            client = self.clients.get(form.get("client_id", ""))
        if client is None:
            raise OAuthError(
                400,
                "unauthorized_client",
                f"AADSTS700016: Application with identifier '{form.get('client_id')}' was not "
                "found in the directory.",
            )
        given = form.get("client_secret")
        if client.secret is not None and (need_secret or given is not None):
            if given != client.secret:
                raise OAuthError(
                    401,
                    "invalid_client",
                    "AADSTS7000215: Invalid client secret provided. Ensure the secret being "
                    "sent in the request is the client secret value, not the client secret ID.",
                )
            if client.secret_expired:
                raise OAuthError(
                    401,
                    "invalid_client",
                    f"AADSTS7000222: The provided client secret keys for app "
                    f"'{client.client_id}' are expired.",
                )
        if not client.consented:
            raise OAuthError(
                400,
                "invalid_grant",
                "AADSTS65001: The user or administrator has not consented to use the "
                f"application with ID '{client.client_id}'.",
            )
        return client

    def _issue(
        self,
        username: str,
        client_id: str,
        scope: str,
        *,
        refresh: bool = True,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(32)
        now = time.time()
        result: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": self.access_token_lifetime,
            "ext_expires_in": self.access_token_lifetime,
            "scope": " ".join(
                s for s in scope.split() if s not in {"openid", "profile", "offline_access"}
            ),
        }
        with self.lock:
            mailbox = self.full_access.get(username, username)
            self.access_tokens[access] = (mailbox, now + self.access_token_lifetime)
            if refresh:
                rt = "rt-" + secrets.token_urlsafe(32)
                self.refresh_tokens[rt] = Grant(username, client_id, scope)
                result["refresh_token"] = rt
        if refresh:
            oid = hashlib.sha256(username.encode()).hexdigest()[:32]
            claims = {
                "iss": f"{self.authority}/v2.0",
                "aud": client_id,
                "sub": oid,
                "oid": oid,
                "tid": self.tenant,
                "preferred_username": username,
                "name": username,
                "iat": int(now),
                "nbf": int(now),
                "exp": int(now) + 3600,
            }
            if nonce:
                claims["nonce"] = nonce
            result["id_token"] = _unsigned_jwt(claims)
            result["client_info"] = _b64url(json.dumps({"uid": oid, "utid": self.tenant}))
        return result

    def _jwt_bearer(self, assertion: str) -> dict[str, Any]:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        try:
            head, body, signature = assertion.split(".")
            claims = json.loads(_unb64url(body))
        except ValueError as exc:
            raise OAuthError(400, "invalid_grant", "Invalid JWT: malformed") from exc
        with self.lock:
            account = self.service_accounts.get(claims.get("iss", ""))
        if account is None:
            raise OAuthError(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            account.public_key.verify(
                _unb64url(signature),
                f"{head}.{body}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature as exc:
            raise OAuthError(400, "invalid_grant", "Invalid JWT Signature.") from exc
        # google-auth always names Google's endpoint as the audience, whatever token_uri is.
        audiences = {self.google_token_uri, "https://oauth2.googleapis.com/token"}
        if claims.get("aud") not in audiences or claims.get("exp", 0) < time.time():
            raise OAuthError(400, "invalid_grant", "Invalid JWT: Token must be a short-lived token")
        subject = claims.get("sub") or account.client_email
        if subject not in account.subjects:
            raise OAuthError(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client "
                "not authorized for any of the scopes requested.",
            )
        return self._issue(subject, account.client_email, claims.get("scope", ""), refresh=False)


def _b64url(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _unsigned_jwt(claims: dict[str, Any]) -> str:
    # msal reads the id token's claims without checking a signature (it came over TLS from the
    # token endpoint, OpenID Connect Core 3.1.3.7), so the test server need not sign it.
    return f"{_b64url(json.dumps({'alg': 'none', 'typ': 'JWT'}))}.{_b64url(json.dumps(claims))}."


def _handler_for(server: OAuthTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: pytest's filterwarnings/capture need no access log

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            return dict(parse_qsl(body))

        def _send(
            self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.endswith("/v2.0/.well-known/openid-configuration"):
                self._send(200, server.discovery())
            elif path.endswith("/authorize") or path == "/google/auth":
                # A browser with the user signed in: straight back with a code.
                location = server.authorize(self.path, username="user@example.test")
                self._send(302, {}, {"Location": location})
            else:
                self._send(404, {"error": "not_found"})

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            form = self._form()
            try:
                if path.endswith("/devicecode"):
                    self._send(200, server.device_code(form))
                elif path.endswith("/token"):
                    self._send(200, server.token(form))
                elif path == "/introspect":
                    self._send(200, server.introspect(form))
                else:
                    self._send(404, {"error": "not_found"})
            except OAuthError as exc:
                self._send(
                    exc.status,
                    {
                        "error": exc.error,
                        "error_description": exc.description,
                        "error_codes": [],
                    },
                )

    return Handler
