"""OAuth2 settings (auth.method microsoft/google), token cache files and the pure helpers of
mailbridge.mail.auth: validation with key paths, defaults per flow, secret expiry, 0600 atomic
cache writes, the CA file winning over REQUESTS_CA_BUNDLE, SASL strings, error classification."""

from __future__ import annotations

import base64
import json
import stat
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import requests

from mailbridge.config import (
    MICROSOFT_APP_SCOPES,
    MICROSOFT_DELEGATED_SCOPES,
    AccountSettings,
    parse_config,
)
from mailbridge.errors import AuthError, ConfigError
from mailbridge.mail.auth.httpsession import CaSession
from mailbridge.mail.auth.tokens import (
    AccessToken,
    oauth_error,
    read_cache_file,
    sasl_error_text,
    sasl_oauthbearer,
    sasl_xoauth2,
    write_cache_file,
)


def config(auth: dict[str, Any], database: str = "/var/lib/mailbridge/mb.db") -> dict[str, Any]:
    return {
        "database": database,
        "accounts": [
            {
                "name": "support",
                "address": "Support@Example.com",
                "imap": {"host": "h"},
                "auth": auth,
            }
        ],
    }


MS = {"method": "microsoft", "tenant_id": "contoso", "client_id": "app"}


def test_microsoft_defaults_to_device_code_with_delegated_scopes_and_a_cache_by_the_db() -> None:
    account = parse_config(config(dict(MS))).accounts[0]
    auth = account.auth
    assert auth.flow == "device_code"
    assert auth.oauth_scopes() == MICROSOFT_DELEGATED_SCOPES
    assert auth.microsoft_authority() == "https://login.microsoftonline.com/contoso"
    assert auth.token_cache == Path("/var/lib/mailbridge/tokens/support.json")
    assert account.login_name == "support@example.com"  # XOAUTH2 names the mailbox
    assert auth.secret() == ""  # a public client sends no secret


def test_client_credentials_uses_the_app_scope_and_needs_a_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value\n")
    auth = {**MS, "flow": "client_credentials", "client_secret_file": str(secret)}
    account = parse_config(config(auth)).accounts[0]
    assert account.auth.oauth_scopes() == MICROSOFT_APP_SCOPES
    assert account.auth.secret() == "s3cret-value"
    assert "client_secret_file" in account.auth.secret_source()
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.auth.*client_credentials needs"):
        parse_config(config({**MS, "flow": "client_credentials"}))


@pytest.mark.parametrize(
    ("auth", "words"),
    [
        ({**MS, "client_secret": "x"}, "device_code signs in as a public client"),
        ({**MS, "password": "x"}, "OAuth2 uses no password"),
        ({"method": "microsoft", "client_id": "app"}, "tenant_id: required"),
        ({**MS, "service_account_file": "/etc/hostname"}, "only for method google"),
        ({**MS, "flow": "service_account"}, "client_credentials"),
        ({**MS, "client_secret": "a", "client_secret_env": "B", "flow": "authorization_code"},
         "at most one of"),
        ({"method": "google"}, "authorization_code"),
        ({"method": "google", "tenant_id": "t", "client_id": "c", "client_secret": "s"},
         "only for method microsoft"),
        ({"username": "u", "password": "p", "client_id": "c"},
         "only for method microsoft or google"),
        ({**MS, "authority": "http://plain.example"}, "authority"),
        ({**MS, "flow": "client_credentials", "client_secret": "s", "username": "u"},
         "signs in as the app"),
        ({**MS, "unknown": 1}, "unknown key"),
    ],
)  # fmt: skip
def test_wrong_oauth_settings_name_the_key_and_the_fix(auth: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(auth))
    assert words in str(caught.value)
    assert caught.value.path.startswith("accounts[0].auth")


def test_google_service_account_acts_as_the_mailbox(tmp_path: Path) -> None:
    key = tmp_path / "sa.json"
    key.write_text("{}")
    auth = (
        parse_config(config({"method": "google", "service_account_file": str(key)}))
        .accounts[0]
        .auth
    )
    assert auth.flow == "service_account"
    assert auth.subject == "support@example.com"
    assert auth.oauth_scopes() == ("https://mail.google.com/",)


def test_a_missing_client_secret_file_is_secret_missing_with_its_key(tmp_path: Path) -> None:
    auth = {**MS, "flow": "client_credentials", "client_secret_file": str(tmp_path / "nope")}
    account = parse_config(config(auth)).accounts[0]
    with pytest.raises(ConfigError) as caught:
        account.auth.secret()
    assert caught.value.code == "secret_missing"
    assert caught.value.path == "auth.client_secret_file"


@pytest.mark.parametrize(
    ("days", "expected"),
    [(30, None), (15, None), (14, "in 14 days"), (1, "in 1 days"), (0, "in 0 days"),
     (-3, "expired on")],
)  # fmt: skip
def test_secret_expiry_warns_from_14_days_before(days: int, expected: str | None) -> None:
    today = date(2026, 3, 1)
    expires = date.fromordinal(today.toordinal() + days)
    auth = {**MS, "client_secret_expires": expires.isoformat()}
    account = parse_config(config(auth)).accounts[0]
    warning = account.auth.secret_expiry_warning(today)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None
        assert expected in warning
        assert "auth.client_secret_file" in warning


def test_cache_files_are_written_atomically_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens" / "support.json"
    write_cache_file(path, '{"a": 1}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    write_cache_file(path, '{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["support.json"]  # no temp file left
    path.chmod(0o644)
    assert read_cache_file(path) == '{"a": 2}'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened on read
    assert read_cache_file(tmp_path / "absent.json") is None


def test_ca_file_wins_over_requests_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    with CaSession(ca) as session:
        settings = session.merge_environment_settings(
            "https://login.example/token", {}, None, None, None
        )
    assert settings["verify"] == str(ca)
    assert settings["proxies"].get("https") == "http://proxy.example:3128"  # still honoured
    with requests.Session() as plain:  # what the note warns about
        assert (
            plain.merge_environment_settings("https://x/", {}, None, None, None)["verify"]
            == "/etc/ssl/certs/ca-certificates.crt"
        )
    with CaSession(None) as default:
        assert (
            default.merge_environment_settings("https://x/", {}, None, None, None)["verify"]
            == "/etc/ssl/certs/ca-certificates.crt"
        )


def test_refresh_is_due_five_minutes_early_or_half_way_for_short_tokens() -> None:
    assert AccessToken("t", 4000.0, 400.0).refresh_at() == 3700.0
    assert AccessToken("t", 104.0, 100.0).refresh_at() == 102.0


def test_sasl_initial_responses() -> None:
    assert base64.b64decode(sasl_xoauth2("box@example.com", "TOKEN")) == (
        b"user=box@example.com\x01auth=Bearer TOKEN\x01\x01"
    )
    # RFC 7628 section 3.1 (and its example in 4.1): gs2 header, host, port, auth.
    assert base64.b64decode(sasl_oauthbearer("a,b=c@x", "T", "imap.example", 993)) == (
        b"n,a=a=2Cb=3Dc@x,\x01host=imap.example\x01port=993\x01auth=Bearer T\x01\x01"
    )
    challenge = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')
    assert sasl_error_text(challenge) == "status=401 schemes=bearer scope=mail"
    assert sasl_error_text(b"not base64 json") == ""


@pytest.mark.parametrize(
    ("error", "description", "code"),
    [
        ("invalid_client", "AADSTS7000215: Invalid client secret provided.",
         "client_secret_invalid"),
        ("invalid_client", "AADSTS7000222: The provided client secret keys for app 'x' are "
         "expired.", "client_secret_expired"),
        ("invalid_grant", "AADSTS65001: The user or administrator has not consented to use the "
         "application with ID 'x'.", "consent_missing"),
        ("invalid_grant", "AADSTS50173: The provided grant has expired due to it being revoked.",
         "token_expired"),
        ("invalid_grant", "Token has been expired or revoked.", "token_expired"),
        ("unauthorized_client", "Client is unauthorized to retrieve access tokens using this "
         "method, or client not authorized for any of the scopes requested.", "consent_missing"),
        ("invalid_scope", "AADSTS70011: The provided value for scope is not valid.",
         "consent_missing"),
        ("temporarily_unavailable", "AADSTS90033: A transient error has occurred.",
         "idp_unavailable"),
        ("interaction_required", "AADSTS50076: you must use multi-factor authentication",
         "app_password_required"),
        ("invalid_request", "something new", "auth_failed"),
    ],
)  # fmt: skip
def test_token_endpoint_errors_are_classified(error: str, description: str, code: str) -> None:
    exc = oauth_error(error, description, where="token from https://login.example")
    assert exc.code == code
    assert isinstance(exc, AuthError) == (code != "idp_unavailable")


def test_account_settings_stay_hashable_for_the_provider_registry() -> None:
    account = AccountSettings.model_validate(
        {"name": "a", "address": "a@b.c", "imap": {"host": "h"}, "auth": dict(MS)}
    )
    assert hash((account.name, account.auth)) == hash((account.name, account.auth))


def test_the_daemon_logs_an_expiring_secret_once_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog

    from mailbridge.daemon import account as account_module
    from mailbridge.daemon.account import AccountWorker

    settings = parse_config(config({**MS, "client_secret_expires": "2026-03-10"}))
    worker = AccountWorker(settings, settings.accounts[0], repo=None)  # type: ignore[arg-type]

    class Today(date):
        value = date(2026, 3, 1)

        @classmethod
        def today(cls) -> date:
            return cls.value

    monkeypatch.setattr(account_module, "date", Today)
    with structlog.testing.capture_logs() as logs:
        worker.warn_secret_expiry()
        worker.warn_secret_expiry()  # the same day: no second line
        Today.value = date(2026, 3, 2)
        worker.warn_secret_expiry()  # the next day: again
        Today.value = date(2026, 2, 1)  # more than 14 days before: nothing
        worker.warn_secret_expiry()
    events = [e for e in logs if e["event"] == "client_secret_expiring"]
    assert [e["days_left"] for e in events] == [9, 8]
    assert all(e["log_level"] == "warning" for e in events)
