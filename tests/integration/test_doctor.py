"""``mailbridge doctor`` against a real Dovecot and a real SMTP server (aiosmtpd on loopback).

A good account passes every line (exit 0); a wrong password fails the login line with
``auth_failed`` and its remedy (exit 1); SMTP login is checked with good and bad credentials.
A Dovecot that refuses passwords over plaintext (``disable_plaintext_auth = yes``) is a TLS
problem, not a wrong password: ``tls_failed``, whose remedy (tls: starttls) then works.
"""

from __future__ import annotations

import imaplib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailbridge.cli import main as cli_main
from mailbridge.config import AccountSettings
from mailbridge.daemon.doctor import diagnose, failing
from mailbridge.errors import AuthError, ServerError, classify_server_text, describe
from mailbridge.mail import net
from mailbridge.mail import smtp as smtp_module
from mailbridge.mail.imap import ImapSession
from mailbridge.mail.smtp import check_smtp
from mailbridge.testing.dovecot import Dovecot, free_port
from tests.conftest import running_dovecot
from tests.integration.test_import_loop import config_data

pytestmark = pytest.mark.dovecot

SMTP_USER = "smtp-user"
SMTP_PASSWORD = "smtp-secret-42"


class _Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return "250 OK"


class _Authenticator:
    """aiosmtpd authenticator: accepts the logins in ``accepted`` (login -> password)."""

    def __init__(self) -> None:
        self.accepted = {SMTP_USER: SMTP_PASSWORD}

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.accepted.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    """An SMTP server with AUTH on loopback (plain text: the test is about the login)."""
    # aiosmtpd logs every connection from its own thread; keep that out of the root logger,
    # whose handler an earlier CLI test may have bound to a capture stream closed since.
    monkeypatch.setattr(logging.getLogger("mail.log"), "propagate", False)
    controller = Controller(
        _Sink(),
        hostname="127.0.0.1",
        port=free_port(),
        authenticator=_Authenticator(),
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def smtp_account(controller: Controller, password: str) -> AccountSettings:
    return AccountSettings.model_validate(
        {
            "name": "support",
            "address": "support@example.test",
            "imap": {"host": "127.0.0.1", "tls": "none"},
            "smtp": {
                "host": controller.hostname,
                "port": controller.port,
                "tls": "none",
                "timeout_seconds": 10,
            },
            "auth": {"username": SMTP_USER, "password": password},
        }
    )


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_doctor_passes_a_good_account(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, config_data(tmp_path, dovecot, imap_user))
    assert cli_main(["-c", str(path), "doctor"]) == 0
    out = capsys.readouterr().out
    for line in (
        "✓ config valid",
        "✓ database writable",
        "✓ secret readable",
        f"✓ reachable {dovecot.host}:{dovecot.port}",
        f"✓ login as {imap_user.login}",
        "✓ capability IDLE",
        "✓ capability MOVE",
        "✓ capability UIDPLUS",
        "✓ folder 'INBOX' selectable",
        "✓ folders 'Mailbridge Processed' and 'Mailbridge Failed'",
    ):
        assert line in out, line
    assert "! TLS" in out  # tls: none is a warning, not a failure
    assert "all checks passed" in out
    # The folders it checked are really there now.
    assert "Mailbridge Failed" in dovecot.folders(imap_user.login, imap_user.password)


def test_doctor_checks_the_sent_folder_without_creating_it(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """folders.sent is the server's folder: a missing one fails its line (exit 1) with the
    code and remedy, and is not created; once it exists the line passes."""
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["folders"] = {"sent": "Sent Items"}
    path = write(tmp_path, data)
    assert cli_main(["-c", str(path), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "✗ folder 'Sent Items' (folders.sent) selectable" in out
    assert "folder_unavailable" in out
    # The server's reason, not the untagged OK [CLOSED] of the folder selected before.
    assert "Mailbox doesn't exist" in out
    assert "CLOSED" not in out
    assert "Sent Items" not in dovecot.folders(imap_user.login, imap_user.password)

    with imaplib.IMAP4(dovecot.host, dovecot.port) as conn:
        conn.login(imap_user.login, imap_user.password)
        assert conn.create('"Sent Items"')[0] == "OK"
    assert cli_main(["-c", str(path), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "✓ folder 'Sent Items' (folders.sent) selectable" in out
    assert "searched for a Message-ID after a crash" in out


def test_doctor_wrong_password_fails_with_code_and_remedy(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"]["password"] = "wrong-password"
    path = write(tmp_path, data)
    assert cli_main(["-c", str(path), "doctor", "support"]) == 1
    out = capsys.readouterr().out
    assert f"✗ login as {imap_user.login}: auth_failed" in out
    assert describe("auth_failed").remedy in out
    assert "- capabilities" in out  # not checked after a failed login
    assert "wrong-password" not in out


def test_doctor_names_an_unreachable_server(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["imap"]["port"] = free_port()  # nothing listens there
    path = write(tmp_path, data)
    assert cli_main(["-c", str(path), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "✗ reachable" in out
    assert "unreachable" in out
    assert describe("unreachable").remedy in out


async def test_smtp_login_good_and_bad(smtp_server: Controller) -> None:
    await check_smtp(smtp_account(smtp_server, SMTP_PASSWORD))
    with pytest.raises(AuthError) as caught:
        await check_smtp(smtp_account(smtp_server, "wrong-smtp"))
    assert caught.value.code == "auth_failed"
    assert "wrong-smtp" not in str(caught.value)


async def test_smtp_without_starttls_is_its_own_code(smtp_server: Controller) -> None:
    """smtp.tls: starttls against a server that offers none: never a plaintext fallback, and
    a remedy that does not say "set it to starttls" when it already is."""
    account = smtp_account(smtp_server, SMTP_PASSWORD)
    assert account.smtp is not None
    account = account.model_copy(
        update={"smtp": account.smtp.model_copy(update={"tls": "starttls"})}
    )
    with pytest.raises(ServerError) as caught:
        await check_smtp(account)
    assert caught.value.code == "starttls_unavailable"
    assert "smtp.tls: implicit" in caught.value.remedy


async def test_smtp_unreachable_is_classified() -> None:
    account = AccountSettings.model_validate(
        {
            "name": "support",
            "address": "support@example.test",
            "imap": {"host": "127.0.0.1", "tls": "none"},
            "smtp": {"host": "127.0.0.1", "port": free_port(), "tls": "none"},
            "auth": {"username": "u", "password": "p"},
        }
    )
    with pytest.raises(ServerError) as caught:
        await check_smtp(account)
    assert caught.value.code == "unreachable"


async def test_doctor_checks_smtp_with_the_account(
    dovecot: Any, imap_user: Any, smtp_server: Controller
) -> None:
    # One auth block serves IMAP and SMTP, as with a real provider.
    account = dovecot.account(imap_user.login, imap_user.password, name="support").model_copy(
        update={"smtp": smtp_account(smtp_server, "unused").smtp}
    )

    checks = await diagnose(account)  # the SMTP server does not know this user yet
    assert checks[-1].name.startswith("SMTP ")
    assert (checks[-1].status, checks[-1].code) == ("fail", "auth_failed")
    assert checks[-1].remedy == describe("auth_failed").remedy
    assert all(c.status in {"ok", "warn"} for c in checks[:-1])  # IMAP is fine
    assert failing(checks)

    smtp_server.SMTP_kwargs["authenticator"].accepted[imap_user.login] = imap_user.password
    checks = await diagnose(account)
    assert checks[-1].status == "ok"
    assert not failing(checks)


# -- a Dovecot that wants TLS before a password ------------------------------------------------

# Dovecot counts a connection whose two ends have the same address as secure (nobody can overhear
# it), so on 127.0.0.1 it always takes a plaintext password. A client that connects to 127.0.0.2
# comes from 127.0.0.1: two addresses, an insecure connection, as from another host.
INSECURE_HOST = "127.0.0.2"


class _NoPlaintextDovecot(Dovecot):
    """The test Dovecot with ``disable_plaintext_auth = yes``, listening on 127.0.0.2 as well.

    Its helpers (add_user, append) keep using 127.0.0.1, where plaintext stays allowed.
    """

    def _configure(self) -> None:
        super()._configure()
        conf = self.config_path.read_text(encoding="utf-8")
        conf = conf.replace("disable_plaintext_auth = no", "disable_plaintext_auth = yes")
        conf = conf.replace(f"address = {self.host}\n", f"address = {self.host}, {INSECURE_HOST}\n")
        self.config_path.write_text(conf, encoding="utf-8")


@pytest.fixture(scope="module")
def no_plaintext_dovecot() -> Iterator[Dovecot]:
    yield from running_dovecot("noplain", tls=True, kind=_NoPlaintextDovecot)


def test_plaintext_login_refused_is_a_tls_problem(
    tmp_path: Path, no_plaintext_dovecot: Dovecot, capsys: pytest.CaptureFixture[str]
) -> None:
    server = no_plaintext_dovecot
    server.add_user("plain", "plain-secret-7")

    # What Dovecot itself answers to a LOGIN sent anyway (as clients that ignore LOGINDISABLED
    # do): read as tls_failed, not as a wrong password.
    with imaplib.IMAP4(INSECURE_HOST, server.port, timeout=10) as conn:
        assert "LOGINDISABLED" in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error) as refused:
            conn.login("plain", "plain-secret-7")
    words = refused.value.args[0]
    words = words.decode() if isinstance(words, bytes) else str(words)
    assert words.startswith("[PRIVACYREQUIRED] Plaintext authentication disallowed")
    assert classify_server_text(words) == "tls_failed"

    # mailbridge never sends that LOGIN (RFC 3501 section 6.2.3), and says the same.
    data: dict[str, Any] = {
        "database": str(tmp_path / "mailbridge.db"),
        "accounts": [
            {
                "name": "support",
                "address": "plain@example.test",
                "imap": {
                    "host": INSECURE_HOST,
                    "port": server.port,
                    "tls": "none",
                    "timeout_seconds": 10,
                },
                "auth": {"username": "plain", "password": "plain-secret-7"},
            }
        ],
    }
    path = write(tmp_path, data)
    assert cli_main(["-c", str(path), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "tls_failed" in out
    assert describe("tls_failed").remedy in out
    assert "imap.tls (or smtp.tls) to starttls or implicit" in out
    assert "plain-secret-7" not in out

    # The remedy works: STARTTLS on the same port, and the password is taken. (The throwaway
    # certificate names 127.0.0.1, not 127.0.0.2: verification is not what this is about.)
    data["accounts"][0]["imap"].update(tls="starttls", verify_certificate=False)
    path = write(tmp_path, data)
    assert cli_main(["-c", str(path), "doctor"]) == 0
    out = capsys.readouterr().out
    assert "✓ login as plain" in out
    assert "all checks passed" in out


async def test_plaintext_refusal_reaches_the_daemon_as_tls_failed(
    no_plaintext_dovecot: Dovecot,
) -> None:
    server = no_plaintext_dovecot
    server.add_user("plain2", "plain-secret-8")
    account = AccountSettings.model_validate(
        {
            "name": "support",
            "address": "plain2@example.test",
            "imap": {"host": INSECURE_HOST, "port": server.port, "tls": "none"},
            "auth": {"username": "plain2", "password": "plain-secret-8"},
        }
    )
    with pytest.raises(ServerError) as caught:
        await ImapSession.open(account)
    assert caught.value.code == "tls_failed"
    assert not isinstance(caught.value, AuthError)  # not the credentials: no auth backoff
    assert "starttls or implicit" in caught.value.remedy


async def test_the_smtp_socket_has_tcp_keepalive(
    smtp_server: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10: every IMAP and SMTP socket notices a silently dropped peer in minutes."""
    options: list[tuple[int, int]] = []

    def checked(sock: Any) -> bool:
        done = net.enable_keepalive(sock)
        options.append(
            (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            )
        )
        return done

    monkeypatch.setattr(smtp_module, "enable_keepalive", checked)
    await check_smtp(smtp_account(smtp_server, SMTP_PASSWORD))
    assert options == [(1, net.KEEPIDLE_SECONDS)]
