"""OAuth2 sign-in end to end with no internet: msal and google-auth against the local identity
provider (``mailbridge.testing.oauth``, HTTPS with a test CA), a real Dovecot accepting XOAUTH2
and OAUTHBEARER through ``passdb oauth2`` (introspection at the same provider), SMTP XOAUTH2
against aiosmtpd checking the token, and the real daemon code and CLI.

Dovecot's oauth2 passdb refuses a token whose introspected user is not the login user, which is
what lets it stand in for Exchange: XOAUTH2 names the mailbox, and only a token of someone with
Full Access to it (``OAuthTestServer.full_access``) opens it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from mailbridge.cli import main as cli_main
from mailbridge.config import AccountSettings, Settings, parse_config
from mailbridge.daemon.account import AccountWorker
from mailbridge.daemon.doctor import diagnose
from mailbridge.daemon.supervisor import once_exit_code, run_once
from mailbridge.errors import AuthError, ServerError
from mailbridge.mail.auth.tokens import provider_for, sasl_oauthbearer, sasl_xoauth2
from mailbridge.mail.imap import ImapSession
from mailbridge.mail.smtp import check_smtp
from mailbridge.store.factory import open_repository
from mailbridge.testing.dovecot import Dovecot, free_port
from mailbridge.testing.oauth import OAuthTestServer
from tests.conftest import running_dovecot
from tests.integration.test_import_loop import eventually

pytestmark = pytest.mark.dovecot

PROCESSED = "Mailbridge Processed"
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def idp() -> Iterator[OAuthTestServer]:
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-idp-", dir="/tmp"))
    with OAuthTestServer(workdir) as server:
        yield server
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def oauth_dovecot(idp: OAuthTestServer) -> Iterator[Dovecot]:
    url = idp.introspection_url

    class OAuthDovecot(Dovecot):
        def __init__(self, workdir: Path, *, tls: bool = False) -> None:
            super().__init__(workdir, tls=tls, oauth2_introspection_url=url)

    yield from running_dovecot("dovecot-oauth", tls=False, kind=OAuthDovecot)


def new_mailbox(dovecot: Dovecot) -> tuple[str, str]:
    """A Dovecot user named like an address (XOAUTH2 user= is the mailbox's address)."""
    login = f"box{next(_numbers)}-{secrets.token_hex(3)}@example.test"
    password = secrets.token_urlsafe(12)
    dovecot.add_user(login, password)
    return login, password


def new_client(idp: OAuthTestServer, *, secret: bool = True, **kwargs: Any) -> tuple[str, str]:
    client_id = f"app-{secrets.token_hex(4)}"
    value = secrets.token_urlsafe(16) if secret else None
    idp.add_client(client_id, value, **kwargs)
    return client_id, value or ""


def account_data(
    tmp_path: Path, dovecot: Dovecot, idp: OAuthTestServer, address: str, auth: dict[str, Any],
    name: str = "support", **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "address": address,
        "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none", "timeout_seconds": 10},
        "auth": {"ca_file": str(idp.ca_file), **auth},
        **extra,
    }


def microsoft(idp: OAuthTestServer, client_id: str, **auth: Any) -> dict[str, Any]:
    return {
        "method": "microsoft",
        "tenant_id": idp.tenant,
        "client_id": client_id,
        "authority": idp.authority,
        **auth,
    }


def settings_for(tmp_path: Path, *accounts: dict[str, Any]) -> Settings:
    return parse_config({"database": str(tmp_path / "mailbridge.db"), "accounts": list(accounts)})


def write_config(tmp_path: Path, *accounts: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    data = {"database": str(tmp_path / "mailbridge.db"), "accounts": list(accounts)}
    path.write_text(yaml.safe_dump(data))
    return path


def message(subject: str) -> bytes:
    return (
        f"From: John <john@customer.example>\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{secrets.token_hex(8)}@customer.example>\r\n\r\nHello\r\n"
    ).encode()


def run_auth(config: Path, account: str, act: Callable[[str], str | None]) -> str:
    """Run 'mailbridge auth ACCOUNT' as an operator would; ``act`` plays the user: it sees each
    line printed and returns what to paste (None: keep reading). Returns all that was shown."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(config), "auth", account],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    shown = []
    answer: str | None = None
    try:
        for line in process.stdout:
            shown.append(line)
            answer = act(line)
            if answer is not None:
                break
        out, err = process.communicate(answer or "", timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(shown) + out + err
    return "".join(shown) + out


def sign_in_by_device_code(config: Path, account: str, idp: OAuthTestServer, user: str) -> str:
    """'mailbridge auth' with the device code flow; the user enters the code it shows."""

    def enter_code(line: str) -> str | None:
        if "enter the code" not in line:
            return None
        assert "/devicelogin" in line  # the verification URL is shown too
        idp.approve_device_code(line.rsplit(" ", 1)[1].strip().rstrip("."), user)
        return ""

    return run_auth(config, account, enter_code)


def paste_redirect(idp: OAuthTestServer, user: str, seen: list[str]) -> Callable[[str], str | None]:
    """The user opens the printed sign-in URL, consents, and pastes where the browser went."""

    def act(line: str) -> str | None:
        if not line.startswith("https://"):
            return None
        seen.append(line.strip())
        return idp.authorize(line.strip(), user) + "\n"

    return act


# -- Microsoft -------------------------------------------------------------------------------


async def test_client_credentials_imports_with_no_human_step(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    # The app's service principal was granted the mailbox (Add-MailboxPermission).
    client_id, secret = new_client(idp, mailboxes={address})
    (tmp_path / "secret").write_text(secret + "\n")
    (tmp_path / "secret").chmod(0o600)
    auth = microsoft(
        idp, client_id, flow="client_credentials", client_secret_file=str(tmp_path / "secret")
    )
    settings = settings_for(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
    oauth_dovecot.append(address, password, message("app-only"))

    results = await run_once(settings)

    assert once_exit_code(results) == 0, results
    assert results[0].summary is not None
    assert results[0].summary.imported == 1
    assert len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1
    assert not (tmp_path / "tokens").exists()  # app tokens have no refresh token to keep


async def test_oauthbearer_is_used_where_offered_and_xoauth2_on_request(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, _password = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp, mailboxes={address})
    for sasl in ("auto", "xoauth2", "oauthbearer"):
        auth = microsoft(idp, client_id, flow="client_credentials", client_secret=secret, sasl=sasl)
        data = account_data(tmp_path, oauth_dovecot, idp, address, auth)
        account = settings_for(tmp_path, data).accounts[0]
        session = await ImapSession.open(account)
        await session.close()

    def mechanisms() -> list[str]:
        return [
            line.split("method=")[1].split(",")[0]
            for line in oauth_dovecot.log_text().splitlines()
            if f"Login: user=<{address}>" in line and "method=" in line
        ]

    # Dovecot writes its log lines a moment after answering: poll for all three logins.
    await eventually(lambda: len(mechanisms()) >= 3, what="three logins in Dovecot's log")
    # auto picks OAUTHBEARER (Dovecot offers it); the others as configured
    assert mechanisms() == ["OAUTHBEARER", "XOAUTH2", "OAUTHBEARER"]


def test_device_code_sign_in_opens_a_shared_mailbox_as_its_delegate(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    shared, password = new_mailbox(oauth_dovecot)
    delegate = f"delegate-{secrets.token_hex(3)}@example.test"
    idp.full_access[delegate] = shared  # Full Access for the dedicated user
    client_id, _ = new_client(idp, secret=False)  # public client: device code sends no secret
    auth = microsoft(idp, client_id, username=delegate)
    config = write_config(tmp_path, account_data(tmp_path, oauth_dovecot, idp, shared, auth))

    shown = sign_in_by_device_code(config, "support", idp, delegate)

    assert f"signed in as {delegate}" in shown
    cache = tmp_path / "tokens" / "support.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    # The daemon signs in silently from the stored cache; XOAUTH2 names the shared mailbox.
    oauth_dovecot.append(shared, password, message("to the shared mailbox"))
    assert cli_main(["-c", str(config), "run", "--once"]) == 0
    assert len(oauth_dovecot.folder_uids(shared, password, PROCESSED)) == 1


async def test_sign_in_as_the_wrong_user_is_a_upn_mismatch_and_stores_nothing(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = new_mailbox(oauth_dovecot)
    client_id, _ = new_client(idp, secret=False)
    auth = microsoft(idp, client_id, username="wanted@example.test")
    settings = settings_for(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
    account = settings.accounts[0]
    backend: Any = provider_for(account).backend
    flow = backend.start_device_flow()
    idp.approve_device_code(flow["user_code"], "someone-else@example.test")
    with pytest.raises(AuthError) as caught:
        await asyncio.to_thread(backend.finish_device_flow, flow)
    assert caught.value.code == "upn_mismatch"
    assert not account.token_cache_path().exists()


def test_authorization_code_sign_in_with_a_pasted_redirect(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp)
    auth = microsoft(
        idp,
        client_id,
        flow="authorization_code",
        client_secret=secret,
        username=address,
        redirect_uri="https://localhost/mailbridge",
    )
    config = write_config(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
    urls: list[str] = []
    run_auth(config, "support", paste_redirect(idp, address, urls))
    assert "redirect_uri=https%3A%2F%2Flocalhost%2Fmailbridge" in urls[0]
    oauth_dovecot.append(address, password, message("after authorization code"))
    assert cli_main(["-c", str(config), "run", "--once"]) == 0
    assert len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1


def test_run_once_exits_69_for_a_wrong_client_secret_with_the_code_in_status(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = new_mailbox(oauth_dovecot)
    client_id, _ = new_client(idp, mailboxes={address})
    auth = microsoft(idp, client_id, flow="client_credentials", client_secret="the-secret-id")
    config = write_config(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))

    assert cli_main(["-c", str(config), "run", "--once"]) == 69
    assert "client_secret_invalid" in capsys.readouterr().out

    assert cli_main(["-c", str(config), "status", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["accounts"][0]
    assert row["code"] == "client_secret_invalid"
    assert row["state"] == "client_secret_invalid"
    assert "AADSTS7000215" in row["detail"]
    assert "Value (not its Secret ID)" in row["remedy"]
    assert "the-secret-id" not in json.dumps(row)


async def test_expired_secret_and_missing_consent_are_classified(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, _ = new_mailbox(oauth_dovecot)
    for change, code in (("secret_expired", "client_secret_expired"), ("consented", "")):
        client_id, secret = new_client(idp, mailboxes={address})
        client = idp.clients[client_id]
        if change == "secret_expired":
            client.secret_expired = True
        else:
            client.consented = False
            code = "consent_missing"
        auth = microsoft(idp, client_id, flow="client_credentials", client_secret=secret)
        data = account_data(tmp_path, oauth_dovecot, idp, address, auth)
        account = settings_for(tmp_path, data).accounts[0]
        with pytest.raises(AuthError) as caught:
            await ImapSession.open(account)
        assert caught.value.code == code, caught.value


async def test_refused_token_with_valid_sign_in_is_authenticated_but_not_connected(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    # The app got a token, but its service principal was never granted the mailbox.
    address, _ = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp, mailboxes={"someone-else@example.test"})
    auth = microsoft(idp, client_id, flow="client_credentials", client_secret=secret)
    account = settings_for(
        tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth)
    ).accounts[0]
    before = idp.grants["client_credentials"]
    with pytest.raises(AuthError) as caught:
        await ImapSession.open(account)
    assert caught.value.code == "mailbox_not_connected"
    assert idp.grants["client_credentials"] == before + 2  # one refresh, then it gives up
    assert "Full Access" in caught.value.remedy


# -- Google ----------------------------------------------------------------------------------


async def test_google_service_account_with_domain_wide_delegation_imports(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    key = idp.add_service_account(
        tmp_path / "sa.json", f"sa-{secrets.token_hex(3)}@project.iam.test", {address}
    )
    auth = {
        "method": "google",
        "service_account_file": str(key),
        "token_uri": idp.google_token_uri,
    }
    settings = settings_for(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
    assert settings.accounts[0].auth.subject == address  # the mailbox, by default
    oauth_dovecot.append(address, password, message("via a service account"))

    results = await run_once(settings)

    assert once_exit_code(results) == 0, results
    assert len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1


async def test_google_service_account_without_delegation_is_consent_missing(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, _ = new_mailbox(oauth_dovecot)
    key = idp.add_service_account(
        tmp_path / "sa.json", f"sa-{secrets.token_hex(3)}@project.iam.test", set()
    )
    auth = {"method": "google", "service_account_file": str(key), "token_uri": idp.google_token_uri}
    account = settings_for(
        tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth)
    ).accounts[0]
    with pytest.raises(AuthError) as caught:
        await ImapSession.open(account)
    assert caught.value.code == "consent_missing"
    assert "domain-wide" in caught.value.remedy


# -- the daemon: refresh, revocation, isolation ----------------------------------------------


async def test_silent_refresh_while_idling_saves_the_rotated_refresh_token(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    client_id, _ = new_client(idp, secret=False)
    auth = microsoft(idp, client_id, username=address, token_timeout_seconds=10)
    data = account_data(tmp_path, oauth_dovecot, idp, address, auth, idle_timeout_seconds=600)
    settings = settings_for(tmp_path, data)
    account = settings.accounts[0]
    # Tokens live 4 s: each is due for refresh after 2 s, while the IDLE would last 600 s.
    idp.access_token_lifetime = 4
    backend: Any = provider_for(account).backend
    flow = await asyncio.to_thread(backend.start_device_flow)
    idp.approve_device_code(flow["user_code"], address)
    await asyncio.to_thread(backend.finish_device_flow, flow)
    provider_for(account).invalidate()

    repo = await open_repository(settings.database, settings)
    worker = AccountWorker(settings, account, repo)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.state.state == "idle")
        refreshes = idp.grants["refresh_token"]
        await eventually(lambda: idp.grants["refresh_token"] >= refreshes + 2)

        # Each refresh rotated the refresh token (the old one is refused by the server): the
        # one in the cache file is the live one. Polled: a refresh may be between the server's
        # rotation and the save at the moment of a single look.
        def rotated_token_saved() -> bool:
            cached = json.loads(account.token_cache_path().read_text())
            stored = {e["secret"] for e in cached["RefreshToken"].values()}
            with idp.lock:
                return bool(stored & set(idp.refresh_tokens))

        await eventually(rotated_token_saved)
        oauth_dovecot.append(address, password, message("after refreshes"))
        await eventually(lambda: len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1)
        assert worker.state.code is None
    finally:
        idp.access_token_lifetime = 3600
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()


async def test_token_rejected_mid_session_means_one_refresh_and_a_reconnect(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp, mailboxes={address})
    auth = microsoft(idp, client_id, flow="client_credentials", client_secret=secret)
    settings = settings_for(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
    account = settings.accounts[0]
    repo = await open_repository(settings.database, settings)
    worker = AccountWorker(settings, account, repo)
    states: list[str] = []
    worker.on_state = lambda state: states.append(state.state)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.state.state == "idle")
        before = idp.grants["client_credentials"]
        # The token dies while the session idles (it expired / was revoked) and the server
        # drops the session: the next login with it is refused.
        idp.expire_access_tokens()
        await asyncio.to_thread(
            subprocess.run,
            ["doveadm", "-c", str(oauth_dovecot.config_path), "kick", address],
            check=True,
            capture_output=True,
            env={**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"},
        )
        oauth_dovecot.append(address, password, message("after the kick"))
        await eventually(lambda: len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1)
        assert idp.grants["client_credentials"] == before + 1  # exactly one new token
        assert not {"auth_failed", "mailbox_not_connected"} & set(states)
    finally:
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()


def test_revoked_refresh_token_is_classified_while_another_account_imports(
    tmp_path: Path,
    oauth_dovecot: Dovecot,
    idp: OAuthTestServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    revoked, _ = new_mailbox(oauth_dovecot)
    other, other_password = new_mailbox(oauth_dovecot)
    public_id, _ = new_client(idp, secret=False)
    app_id, app_secret = new_client(idp, mailboxes={other})
    first = account_data(
        tmp_path, oauth_dovecot, idp, revoked, microsoft(idp, public_id, username=revoked)
    )
    second = account_data(
        tmp_path,
        oauth_dovecot,
        idp,
        other,
        microsoft(idp, app_id, flow="client_credentials", client_secret=app_secret),
        name="sales",
    )
    config = write_config(tmp_path, first, second)
    sign_in_by_device_code(config, "support", idp, revoked)
    idp.revoke_user(revoked)  # a password reset: every refresh token of the user is dead
    idp.expire_access_tokens()  # and the cached access token has expired
    cache = tmp_path / "tokens" / "support.json"
    data = json.loads(cache.read_text())
    for entry in data["AccessToken"].values():
        entry["expires_on"] = entry["extended_expires_on"] = "0"
    cache.write_text(json.dumps(data))
    oauth_dovecot.append(other, other_password, message("for the healthy account"))

    assert cli_main(["-c", str(config), "run", "--once"]) == 69

    out = capsys.readouterr().out
    assert "support: token_expired" in out
    assert "mailbridge auth ACCOUNT" in out
    assert "sales: imported 1" in out
    assert cli_main(["-c", str(config), "status", "--json"]) == 0
    rows = {r["account"]: r for r in json.loads(capsys.readouterr().out)["accounts"]}
    assert rows["support"]["code"] == "token_expired"
    assert "AADSTS50173" in rows["support"]["detail"]
    assert rows["sales"]["code"] is None


async def test_one_accounts_hanging_identity_provider_never_delays_another(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    slow, _ = new_mailbox(oauth_dovecot)
    fast, fast_password = new_mailbox(oauth_dovecot)
    slow_id, slow_secret = new_client(idp, mailboxes={slow})
    fast_id, fast_secret = new_client(idp, mailboxes={fast})
    idp.delays[slow_id] = 60.0  # its token endpoint hangs
    settings = settings_for(
        tmp_path,
        account_data(
            tmp_path, oauth_dovecot, idp, slow,
            microsoft(idp, slow_id, flow="client_credentials", client_secret=slow_secret,
                      token_timeout_seconds=50),
        ),
        account_data(
            tmp_path, oauth_dovecot, idp, fast,
            microsoft(idp, fast_id, flow="client_credentials", client_secret=fast_secret),
            name="fast",
        ),
    )  # fmt: skip
    oauth_dovecot.append(fast, fast_password, message("not held up"))
    repo = await open_repository(settings.database, settings)
    stuck = asyncio.create_task(AccountWorker(settings, settings.accounts[0], repo).run_once())
    try:
        summary = await AccountWorker(settings, settings.accounts[1], repo).run_once()
        assert summary.imported == 1
        assert not stuck.done()  # still waiting for its identity provider, alone
    finally:
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck
        await repo.aclose()


async def test_a_token_request_that_hangs_times_out_as_idp_unavailable(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, _ = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp, mailboxes={address})
    idp.delays[client_id] = 30.0  # far beyond the 1 s timeout below
    auth = microsoft(
        idp, client_id, flow="client_credentials", client_secret=secret, token_timeout_seconds=1
    )
    account = settings_for(
        tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth)
    ).accounts[0]
    with pytest.raises(ServerError) as caught:
        await ImapSession.open(account)
    assert caught.value.code == "idp_unavailable"
    assert caught.value.transient  # retried by the account's backoff, within a minute


# -- SMTP and doctor -------------------------------------------------------------------------


class _TokenCheckingSmtp:
    """aiosmtpd handler with XOAUTH2 and OAUTHBEARER that asks the identity provider whose the
    token is; a refused token gets the JSON error challenge (RFC 7628 3.2.2) before the 535."""

    def __init__(self, idp: OAuthTestServer) -> None:
        self.idp = idp
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return "250 OK"

    async def _check(self, server: Any, args: list[str], mechanism: str) -> AuthResult:
        text = base64.b64decode(args[1]).decode()
        fields = dict(
            part.split("=", 1) for part in text.replace(",", "\x01").split("\x01") if "=" in part
        )
        user = fields.get("user") or fields.get("a", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        if self.idp.username_of(token) == user:
            self.logins.append((mechanism, user))
            return AuthResult(success=True, auth_data=user)
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"})
        await server.challenge_auth(error)
        return AuthResult(
            success=False, handled=False, message="535 5.7.3 Authentication unsuccessful"
        )

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:  # noqa: N802
        return await self._check(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> AuthResult:  # noqa: N802
        return await self._check(server, args, "OAUTHBEARER")


@pytest.fixture
def oauth_smtp(idp: OAuthTestServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    monkeypatch.setattr(logging.getLogger("mail.log"), "propagate", False)
    controller = Controller(
        _TokenCheckingSmtp(idp), hostname="127.0.0.1", port=free_port(), auth_require_tls=False
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def app_account_with_smtp(
    tmp_path: Path, dovecot: Dovecot, idp: OAuthTestServer, smtp: Controller, **auth: Any
) -> tuple[AccountSettings, str, str]:
    """An app-only account on ``dovecot`` with SMTP at ``smtp``: (account, client id, secret)."""
    address, _ = new_mailbox(dovecot)
    client_id, secret = new_client(idp, mailboxes={address})
    server = {"host": "127.0.0.1", "port": smtp.port, "tls": "none", "timeout_seconds": 10}
    settings = microsoft(idp, client_id, flow="client_credentials", client_secret=secret, **auth)
    data = account_data(tmp_path, dovecot, idp, address, settings, smtp=server)
    return settings_for(tmp_path, data).accounts[0], client_id, secret


async def test_smtp_xoauth2_login_is_checked_by_the_server(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, oauth_smtp: Controller
) -> None:
    account, client_id, _secret = app_account_with_smtp(tmp_path, oauth_dovecot, idp, oauth_smtp)
    address = account.address

    await check_smtp(account)  # auto: OAUTHBEARER, which the server offers
    xoauth2 = account.model_copy(
        update={"auth": account.auth.model_copy(update={"sasl": "xoauth2"})}
    )
    await check_smtp(xoauth2)

    handler: _TokenCheckingSmtp = oauth_smtp.handler
    assert handler.logins == [("OAUTHBEARER", address), ("XOAUTH2", address)]

    # A token the server refuses is refreshed once; refused again, the cause is named.
    idp.full_access.clear()
    idp.clients[client_id].mailboxes = {"elsewhere@example.test"}
    idp.expire_access_tokens()
    with pytest.raises(AuthError) as caught:
        await check_smtp(account)
    assert caught.value.code == "mailbox_not_connected"


async def test_doctor_checks_the_whole_chain(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, oauth_smtp: Controller
) -> None:
    from datetime import date, timedelta

    soon = (date.today() + timedelta(days=10)).isoformat()
    account, client_id, _ = app_account_with_smtp(
        tmp_path, oauth_dovecot, idp, oauth_smtp, client_secret_expires=soon
    )
    address = account.address

    checks = {c.name: c for c in await diagnose(account)}

    assert checks["client secret expiry"].status == "warn"
    assert "in 10 days" in checks["client secret expiry"].detail
    token_line = checks["OAuth2 token (microsoft client_credentials)"]
    assert token_line.status == "ok", token_line
    assert checks[f"login as {address}"].status == "ok"
    assert checks[f"SMTP 127.0.0.1:{oauth_smtp.port} login"].status == "ok"
    assert not [c for c in checks.values() if c.status == "fail"]

    # With the secret wrong, the token line fails with the code and everything after is skipped.
    idp.clients[client_id].secret = "rotated-elsewhere"
    failed = await diagnose(account)
    token_line = next(c for c in failed if c.name.startswith("OAuth2 token"))
    assert token_line.status == "fail"
    assert token_line.code == "client_secret_invalid"
    assert {c.status for c in failed[failed.index(token_line) + 1 :]} == {"skip"}


def test_status_warns_about_an_expiring_client_secret(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import date, timedelta

    address, _ = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp, mailboxes={address})
    rows = []
    for days in (3, 30):
        expires = (date.today() + timedelta(days=days)).isoformat()
        auth = microsoft(
            idp, client_id, flow="client_credentials", client_secret=secret,
            client_secret_expires=expires,
        )  # fmt: skip
        config = write_config(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
        assert cli_main(["-c", str(config), "status", "--json"]) == 0
        rows.append(json.loads(capsys.readouterr().out)["accounts"][0])
    assert rows[0]["warnings"]
    assert "in 3 days" in rows[0]["warnings"][0]
    assert rows[1]["warnings"] == []


def google_app_config(tmp_path: Path, dovecot: Dovecot, idp: OAuthTestServer, address: str) -> Path:
    """A config with one Google installed-app account ("Desktop app" OAuth client)."""
    client_id, secret = new_client(idp)
    auth = {
        "method": "google",
        "client_id": client_id,
        "client_secret": secret,
        "token_uri": idp.google_token_uri,
        "auth_uri": idp.google_auth_uri,
    }
    return write_config(tmp_path, account_data(tmp_path, dovecot, idp, address, auth))


def test_google_installed_app_consent_with_a_pasted_code_then_refresh(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    config = google_app_config(tmp_path, oauth_dovecot, idp, address)
    urls: list[str] = []
    # Headless: the browser elsewhere cannot reach the loopback port; paste what it shows.
    run_auth(config, "support", paste_redirect(idp, address, urls))
    assert urls[0].startswith(idp.google_auth_uri)
    assert "access_type=offline" in urls[0]
    assert "code_challenge_method=S256" in urls[0]
    cache = tmp_path / "tokens" / "support.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    first = json.loads(cache.read_text())["refresh_token"]

    oauth_dovecot.append(address, password, message("gmail-like"))
    assert cli_main(["-c", str(config), "run", "--once"]) == 0
    assert len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1
    # The test provider rotates refresh tokens: the new one was saved at once.
    rotated = json.loads(cache.read_text())["refresh_token"]
    assert rotated != first
    with idp.lock:
        assert rotated in idp.refresh_tokens
        assert first not in idp.refresh_tokens


async def test_no_token_or_secret_reaches_a_debug_log(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, oauth_smtp: Controller
) -> None:
    import io

    from mailbridge.log import configure_logging

    account, _client_id, secret = app_account_with_smtp(tmp_path, oauth_dovecot, idp, oauth_smtp)
    address = account.address
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    try:
        checks = await diagnose(account)
    finally:
        configure_logging("warning", "json", stream=io.StringIO())
    assert not [c for c in checks if c.status == "fail"], checks
    text = out.getvalue()
    assert "AUTHENTICATE" in text  # aioimaplib's debug echo of the command is there ...
    with idp.lock:
        issued = [t for t, (user, _) in idp.access_tokens.items() if user == address]
    assert issued
    for value in [secret, *issued]:
        assert value not in text  # ... but never the token or the secret
    token = provider_for(account).current
    assert token is not None
    port = oauth_dovecot.port
    for initial in (
        sasl_xoauth2(address, token.token),
        sasl_oauthbearer(address, token.token, "127.0.0.1", port),
        sasl_oauthbearer(address, token.token, "127.0.0.1", oauth_smtp.port),  # SMTP's
    ):
        assert initial not in text  # the base64 SASL response carries the token too


async def test_identity_provider_down_at_refresh_time_keeps_the_idle_session(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    address, password = new_mailbox(oauth_dovecot)
    client_id, secret = new_client(idp, mailboxes={address})
    auth = microsoft(idp, client_id, flow="client_credentials", client_secret=secret)
    data = account_data(tmp_path, oauth_dovecot, idp, address, auth, idle_timeout_seconds=600)
    settings = settings_for(tmp_path, data)
    idp.access_token_lifetime = 6  # due for refresh after 3 s
    repo = await open_repository(settings.database, settings)
    worker = AccountWorker(settings, settings.accounts[0], repo)
    states: list[str] = []
    worker.on_state = lambda state: states.append(state.state)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.state.state == "idle")
        idp.fail_with = (503, "temporarily_unavailable", "AADSTS90033: A transient error.")
        # The refresh failed (transient) and is scheduled again later: logged, not fatal.
        await eventually(lambda: worker._refresh_retry_at > 0)
        # The session did not need a new token: it stays up and keeps importing.
        oauth_dovecot.append(address, password, message("during the outage"))
        await eventually(lambda: len(oauth_dovecot.folder_uids(address, password, PROCESSED)) == 1)
        assert "backoff" not in states
        assert states.count("connecting") == 1
    finally:
        idp.fail_with = None
        idp.access_token_lifetime = 3600
        worker.stopping.set()
        await asyncio.wait_for(task, 30)
        await repo.aclose()


def test_a_device_code_account_never_signed_in_says_so(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = new_mailbox(oauth_dovecot)
    client_id, _ = new_client(idp, secret=False)
    auth = microsoft(idp, client_id, username=address)
    config = write_config(tmp_path, account_data(tmp_path, oauth_dovecot, idp, address, auth))
    assert cli_main(["-c", str(config), "check-config"]) == 0
    assert "not signed in yet" in capsys.readouterr().err
    assert cli_main(["-c", str(config), "run", "--once"]) == 69
    assert "support: sign_in_required" in capsys.readouterr().out
    assert cli_main(["-c", str(config), "status", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["accounts"][0]
    assert row["code"] == "sign_in_required"
    assert "'mailbridge auth ACCOUNT'" in row["remedy"]


def test_google_installed_app_consent_caught_on_the_loopback_port(
    tmp_path: Path, oauth_dovecot: Dovecot, idp: OAuthTestServer
) -> None:
    import urllib.request
    from urllib.parse import parse_qsl, urlsplit

    address, _ = new_mailbox(oauth_dovecot)
    config = google_app_config(tmp_path, oauth_dovecot, idp, address)

    def browser(line: str) -> str | None:
        if not line.startswith("https://"):
            return None
        redirect_uri = dict(parse_qsl(urlsplit(line.strip()).query))["redirect_uri"]
        assert redirect_uri.startswith("http://127.0.0.1:")  # RFC 8252 loopback redirect
        redirected = idp.authorize(line.strip(), address)
        with urllib.request.urlopen(redirected, timeout=30) as page:  # noqa: S310 - loopback
            assert b"signed in" in page.read()
        return ""  # nothing pasted

    shown = run_auth(config, "support", browser)
    assert "signed in" in shown
    assert (tmp_path / "tokens" / "support.json").exists()
