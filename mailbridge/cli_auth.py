"""``mailbridge auth ACCOUNT``: sign an OAuth2 account in from a terminal, no browser needed here.

* Microsoft ``device_code``: prints the verification URL and the code; the operator signs in on
  any device (MFA works, the password never reaches this server); the token cache is stored.
* Microsoft ``authorization_code``: prints the sign-in URL; the operator pastes back the URL the
  browser was redirected to (``auth.redirect_uri``; the page itself need not load).
* Google installed app (``authorization_code``): prints the consent URL and catches the
  redirect on a loopback port (``http://127.0.0.1:PORT/``), or takes the pasted redirected URL
  or code; with ``auth.redirect_uri`` set it only takes the paste.
* App-only flows (Microsoft ``client_credentials``, Google ``service_account``) need no sign-in:
  the command asks for a token and says whether it worked.

Every flow ends by asking for a token the way the daemon will, so a success here means the
daemon can sign in. Exit codes: 0 signed in, 64 a password account, 69 the identity provider
refused or could not be reached (the code and remedy are printed), 78 a config error.
"""

from __future__ import annotations

import asyncio
import http.server
import queue
import sys
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mailbridge.config import AccountSettings, Settings
from mailbridge.errors import EX_UNAVAILABLE, ConfigError, MailbridgeError
from mailbridge.mail.auth.tokens import provider_for

EX_USAGE = 64


def auth(settings: Settings, name: str) -> int:
    account = settings.account(name)
    if not account.auth.is_oauth:
        print(
            f"mailbridge: {name} signs in with a password (auth.method: password); "
            "'mailbridge auth' is for OAuth2 accounts",
            file=sys.stderr,
        )
        return EX_USAGE
    try:
        who = _sign_in(account)
        provider = provider_for(account)
        provider.invalidate()
        token = asyncio.run(provider.token())
    except ConfigError:
        raise  # printed by the command line's handler, exit 78
    except MailbridgeError as exc:
        print(f"mailbridge: {name}: {exc.code}: {exc}\n  fix: {exc.remedy}", file=sys.stderr)
        return EX_UNAVAILABLE
    lifetime = max(0, round(token.expires_at - time.time()))
    print(f"{name}: signed in{f' as {who}' if who else ''}")
    print(f"  token for {account.address}: valid {lifetime}s, renewed before it expires")
    if account.auth.flow in {"device_code", "authorization_code"}:
        print(f"  token cache: {account.token_cache_path()} (mode 0600)")
    print(f"  next: mailbridge doctor {name}; then systemctl reload mailbridge")
    return 0


def _sign_in(account: AccountSettings) -> str:
    """The interactive step of the account's flow; returns who signed in ('' if no one)."""
    auth = account.auth
    backend: Any = provider_for(account).backend
    if auth.flow in {"client_credentials", "service_account"}:
        print(f"{account.name}: {auth.flow} needs no sign-in; asking for a token ...")
        return ""
    if auth.method == "microsoft" and auth.flow == "device_code":
        flow = backend.start_device_flow()
        print(flow.get("message") or f"Open {flow['verification_uri']}, enter {flow['user_code']}")
        who = auth.username or "the user with Full Access to " + account.address
        print(f"Sign in as {who}. Waiting ...", flush=True)
        return str(backend.finish_device_flow(flow))
    if auth.method == "microsoft":
        flow = backend.start_auth_code_flow()
        print("Open this URL in a browser and sign in:")
        print(flow["auth_uri"])
        print("Then paste the whole URL the browser was sent to (its page need not load):")
        line = sys.stdin.readline()
        return str(backend.finish_auth_code_flow(flow, line))
    return _google_consent(account, backend)


def _google_consent(account: AccountSettings, backend: Any) -> str:
    answers: queue.Queue[str] = queue.Queue()
    server: http.server.HTTPServer | None = None
    redirect_uri = account.auth.redirect_uri
    if redirect_uri is None:
        server = _loopback(answers)
        redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/"
    url, state, verifier = backend.consent_url(redirect_uri)
    print("Open this URL in a browser and allow access:")
    print(url)
    if server is not None:
        print(
            "Waiting for the browser to return to this machine; on a headless server, paste "
            "the URL the browser was sent to (or its code) instead:",
            flush=True,
        )
    else:
        print("Then paste the URL the browser was sent to (or its code):", flush=True)

    def read_paste() -> None:
        line = sys.stdin.readline()
        # End of input (no terminal) leaves the loopback listener to answer, if there is one.
        if line.strip() or server is None:
            answers.put(line)

    threading.Thread(target=read_paste, daemon=True).start()
    try:
        answer = answers.get().strip()
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    params = dict(parse_qsl(urlsplit(answer).query)) if "?" in answer else {"code": answer}
    if params.get("error"):
        raise MailbridgeError(f"consent refused: {params['error']}", code="consent_missing")
    if "state" in params and params["state"] != state:
        raise MailbridgeError("the answer belongs to another sign-in (state differs)")
    if not params.get("code"):
        raise MailbridgeError("no authorization code in the answer", code="auth_failed")
    backend.redeem(params["code"], redirect_uri, verifier)
    return account.address


def _loopback(answers: queue.Queue[str]) -> http.server.HTTPServer:
    """A one-page HTTP listener on 127.0.0.1 for Google's redirect (RFC 8252 section 7.3)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answers.put(f"http://127.0.0.1{self.path}")
            body = b"mailbridge: signed in. You can close this window.\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
