"""Tests for the error catalogue and the mapping of real server wording to error codes."""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from mailbridge import errors
from mailbridge.cli import _parser
from mailbridge.config import (
    AuthSettings,
    ClusterSettings,
    FolderSettings,
    ImapSettings,
    LimitSettings,
    LogSettings,
    OutboxSettings,
    RecoverySettings,
    SmtpSettings,
)
from mailbridge.errors import (
    CATALOGUE,
    AuthError,
    ConfigError,
    FolderError,
    MailbridgeError,
    MessageError,
    ServerError,
    StoreError,
    classify_server_text,
    describe,
    exit_status,
)


def test_every_catalogue_entry_has_title_and_remedy() -> None:
    for code, info in CATALOGUE.items():
        assert info.code == code
        assert info.title.strip(), code
        assert info.remedy.strip(), code
        assert isinstance(info.transient, bool)


# The config sections a remedy may name a key of, as "section.key" (below the account for auth,
# imap, smtp and folders; at the top level for the rest).
_SECTIONS: dict[str, type[BaseModel]] = {
    "auth": AuthSettings,
    "imap": ImapSettings,
    "smtp": SmtpSettings,
    "folders": FolderSettings,
    "limits": LimitSettings,
    "recovery": RecoverySettings,
    "log": LogSettings,
    "cluster": ClusterSettings,
    "outbox": OutboxSettings,
}
_KEY = re.compile(r"\b(" + "|".join(_SECTIONS) + r")\.([A-Za-z_]+)(?:(?: to|:) ([\w-]+))?")
# What a remedy's command placeholders stand for when the command is parsed.
_PLACEHOLDERS = {"ACCOUNT": "support", "UID": "7", "ID": "3"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_remedies_name_only_real_commands(code: str) -> None:
    """'mailbridge auth ACCOUNT' once sent operators to a command that does not exist."""
    remedy = CATALOGUE[code].remedy
    commands = _subcommands()
    for word in re.findall(r"\bmailbridge\s+([A-Za-z][\w-]*)", remedy):
        assert word in commands, f"{code}: 'mailbridge {word}' is not a command"
    # Every quoted command line must also parse, arguments and all.
    for line in re.findall(r"'mailbridge ([^']+)'", remedy):
        argv = [_PLACEHOLDERS.get(w, w) for w in line.split()]
        try:
            _parser().parse_args(argv)
        except SystemExit:  # argparse's way of saying no
            pytest.fail(f"{code}: 'mailbridge {line}' does not parse")


@pytest.mark.parametrize("code", sorted(CATALOGUE))
def test_remedies_name_only_real_config_keys_and_values(code: str) -> None:
    """'switch auth.method to OAuth2' named a value config.py does not accept."""
    remedy = CATALOGUE[code].remedy
    for section, key, value in _KEY.findall(remedy):
        fields = _SECTIONS[section].model_fields
        assert key in fields, f"{code}: {section}.{key} is not a config key"
        if not value:
            continue
        annotation = fields[key].annotation
        if typing.get_origin(annotation) is typing.Literal:
            allowed = {str(v) for v in typing.get_args(annotation)}
        elif annotation is bool:
            allowed = {"true", "false"}
        else:
            continue
        assert value in allowed, f"{code}: {section}.{key} cannot be {value!r} ({allowed})"


def test_the_key_check_catches_what_it_is_for() -> None:
    # The checks above are only as good as their patterns: they must see the old mistakes.
    assert _KEY.findall("switch auth.method to OAuth2.") == [("auth", "method", "OAuth2")]
    assert "OAuth2" not in typing.get_args(AuthSettings.model_fields["method"].annotation)
    assert re.findall(r"\bmailbridge\s+([A-Za-z][\w-]*)", "Run 'mailbridge auth2 ACCOUNT'") == [
        "auth2"
    ]
    assert "auth2" not in _subcommands()
    assert _KEY.findall("set imap.verify_certificate: false") == [
        ("imap", "verify_certificate", "false")
    ]


def test_oauth2_remedies_name_the_way_back_in() -> None:
    # OAuth2 sign-in exists: no remedy may still say it does not, and a lost sign-in is fixed
    # with 'mailbridge auth ACCOUNT' (the command the remedy names is checked above).
    methods = set(typing.get_args(AuthSettings.model_fields["method"].annotation))
    assert methods == {"password", "microsoft", "google"}
    for code, info in CATALOGUE.items():
        assert "not supported yet" not in info.remedy, code
    for code in ("token_expired", "app_password_required", "upn_mismatch"):
        assert "'mailbridge auth ACCOUNT'" in CATALOGUE[code].remedy, code
    assert "AADSTS7000215" in CATALOGUE["client_secret_invalid"].title
    assert "Full Access" in CATALOGUE["mailbox_not_connected"].remedy
    assert "Conditional Access" in CATALOGUE["mailbox_not_connected"].remedy


def test_every_code_used_by_the_rules_exists() -> None:
    assert errors._RULES
    for code, _pattern in errors._RULES:
        assert code in CATALOGUE, code


@pytest.mark.parametrize(
    "cls", [MailbridgeError, ConfigError, ServerError, AuthError, FolderError, MessageError,
            StoreError]
)  # fmt: skip
def test_default_codes_exist(cls: type[MailbridgeError]) -> None:
    assert cls.default_code in CATALOGUE
    assert cls("detail").remedy == CATALOGUE[cls.default_code].remedy


def test_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown error code"):
        ServerError("x", code="no_such_code")
    assert describe("no_such_code") is CATALOGUE["internal"]


# Real responses as servers send them (after the tag and NO/BAD, or the SMTP reply line).
REAL_RESPONSES: list[tuple[str, str]] = [
    # --- Dovecot (RFC 5530 response codes) ---
    ("[AUTHENTICATIONFAILED] Authentication failed.", "auth_failed"),
    ("[UNAVAILABLE] Temporary authentication failure. [mail1:2024-05-01 09:00:00]",
     "server_unavailable"),
    ("[UNAVAILABLE] Temporary authentication failure.", "server_unavailable"),
    ("[LIMIT] Maximum number of connections from user+IP exceeded "
     "(mail_max_userip_connections=10)", "connection_limit"),
    ("[NONEXISTENT] Mailbox doesn't exist: Foo", "folder_unavailable"),
    # a folder name must not decide the code: the response code wins
    ("[NONEXISTENT] Mailbox doesn't exist: Account locked", "folder_unavailable"),
    ("[TRYCREATE] Mailbox doesn't exist: Mailbridge Processed", "folder_unavailable"),
    ("[NOPERM] Permission denied", "folder_unavailable"),
    ("[OVERQUOTA] Quota exceeded (mailbox for user is full)", "quota_exceeded"),
    ("[INUSE] Mailbox is locked by another process", "server_unavailable"),
    ("[EXPIRED] Password expired", "auth_failed"),
    # Plaintext LOGIN on a connection without TLS when disable_plaintext_auth = yes: not a wrong
    # password, the tls mode is wrong. The untagged ALERT comes first, then the tagged NO.
    ("[PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS) "
     "connections.", "tls_failed"),
    ("[ALERT] Plaintext authentication not allowed without SSL/TLS, but your client did it "
     "anyway. If anyone was listening, the password was exposed.", "tls_failed"),
    # --- RFC 5530 section 3's own examples ---
    ("[AUTHORIZATIONFAILED] No such authorization-ID", "auth_failed"),
    ("[EXPIRED] That password isn't valid any more", "auth_failed"),
    ("[PRIVACYREQUIRED] Connection offers no privacy", "tls_failed"),
    ("[CONTACTADMIN] You may not login to this server", "account_disabled"),
    # an implementation limit, not the connection limit [LIMIT] means at login
    ("[LIMIT] At most 32 flags in one mailbox supported", "server_error"),
    # --- Exchange Online ---
    ("AUTHENTICATE failed.", "auth_failed"),
    ("LOGIN failed.", "auth_failed"),
    ("User is authenticated but not connected.", "mailbox_not_connected"),
    ("NO User is authenticated but not connected.", "mailbox_not_connected"),
    ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
     "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
     "smtp_auth_disabled"),
    ("554 5.2.252 SendAsDenied; support@example.com not allowed to send as "
     "sales@example.com; STOREDRV.Submission.Exception:"
     "SendAsDeniedException.MapiExceptionSendAsDenied",
     "send_as_denied"),
    ("invalid_client: AADSTS7000215: Invalid client secret provided. Ensure the secret being sent "
     "in the request is the client secret value, not the client secret ID, for a secret added to "
     "app '6731de76-14a6-49ae-97bc-6eba6914391e'.", "client_secret_invalid"),
    ("invalid_client: AADSTS7000222: The provided client secret keys for app "
     "'6731de76-14a6-49ae-97bc-6eba6914391e' are expired. Visit the Azure portal to create new "
     "keys for your app.", "client_secret_expired"),
    ("Resource does not exist or one of its queried reference-property objects are not present.",
     "upn_mismatch"),
    ("535 5.7.139 Authentication unsuccessful, user is locked by your organization's security "
     "defaults policy. Contact your administrator.", "protocol_disabled"),
    ("535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
     "authenticated successfully. Contact your administrator.", "protocol_disabled"),
    ("535 5.7.3 Authentication unsuccessful", "auth_failed"),
    ("AADSTS50076: Due to a configuration change made by your administrator, or because you "
     "moved to a new location, you must use multi-factor authentication to access "
     "'00000002-0000-0ff1-ce00-000000000000'.", "app_password_required"),
    ("interaction_required: AADSTS50076: Due to a configuration change made by your "
     "administrator ... you must use multi-factor authentication", "app_password_required"),
    ("AADSTS65001: The user or administrator has not consented to use the application with ID "
     "'1234'. Send an interactive authorization request for this user and resource.",
     "consent_missing"),
    ("AADSTS700082: The refresh token has expired due to inactivity. The token was issued on "
     "2024-01-01 and was inactive for 90.00:00:00.", "token_expired"),
    ("AADSTS50173: The provided grant has expired due to it being revoked", "token_expired"),
    ("AADSTS50057: The user account is disabled.", "account_disabled"),
    ("AADSTS50126: Error validating credentials due to invalid username or password.",
     "auth_failed"),
    ("Server Unavailable. 15", "server_unavailable"),
    # --- Gmail ---
    ("[AUTHENTICATIONFAILED] Invalid credentials (Failure)", "auth_failed"),
    ("[ALERT] Application-specific password required: "
     "https://support.google.com/accounts/answer/185833 (Failure)", "app_password_required"),
    ("[ALERT] Please log in via your web browser: "
     "https://support.google.com/mail/accounts/answer/78754 (Failure)", "app_password_required"),
    ("[ALERT] Please log in via your web browser", "app_password_required"),
    ("[ALERT] Web login required: https://support.google.com/mail/answer/78754 (Failure)",
     "app_password_required"),
    ("534-5.7.9 Application-specific password required.", "app_password_required"),
    ("Your account is not enabled for IMAP use. Please visit your Gmail settings page and enable "
     "your account for IMAP access. (Failure)", "protocol_disabled"),
    ("invalid_grant: Token has been expired or revoked.", "token_expired"),
    ("535-5.7.8 Username and Password not accepted. For more information, go to\n"
     "535 5.7.8  https://support.google.com/mail/?p=BadCredentials", "auth_failed"),
    ("535-5.7.8 Username and Password not accepted", "auth_failed"),
    # The server is up and throttling this user's logins: a per-user limit, transient.
    ("454 4.7.0 Too many login attempts, please try again later.", "connection_limit"),
    ("[ALERT] Too many simultaneous connections. (Failure)", "connection_limit"),
    # Gmail's OVERQUOTA for a daily throttle: transient, not a full mailbox.
    ("[OVERQUOTA] Account exceeded command or bandwidth limits. (Failure)", "server_unavailable"),
    ("[UNAVAILABLE] Temporary System Error", "server_unavailable"),
    ("421 4.7.0 Try again later, closing connection.", "server_unavailable"),
    # --- the reference mailbox error guide ---
    ("Temporary Authentication failure; Please contact your mailbox provider or try again later",
     "server_unavailable"),
    ("Authentication Failure - Incorrect credentials; Please connect your mailbox again with the "
     "right credentials and try again", "auth_failed"),
    ("Incorrect credentials; Please connect your mailbox again with the right credentials and "
     "try again", "auth_failed"),
    ("Mailbox limit exceeded; Please contact your mailbox provider to increase the limit or try "
     "again later", "quota_exceeded"),
    ("Authentication failure due to account locked/disabled or unreachable. Please contact your "
     "mailbox provider or try again later", "account_disabled"),
    ("Account blocked / Unavailable. Please check with mailbox provider", "account_disabled"),
    ("Mailbox access restricted; Please check with your mailbox provider or try again later.",
     "account_disabled"),
    ("Connection limit exceeded;", "connection_limit"),
    ("Maximum connection limit for user IP exceeded.", "connection_limit"),
    ("Access denied, contact mailbox admin.", "account_disabled"),
    ("Multi-factor authentication required; Please use application password to login.",
     "app_password_required"),
    ("Token has been expired or revoked, please update the correct token", "token_expired"),
    ("Mailbox error, please check the folder used", "folder_unavailable"),
    ("SSL Exception, please use the correct CA certificate", "tls_untrusted"),
    ("Server connection issue; Contact your mailbox provider or try again later",
     "server_unavailable"),
    # --- SMTP replies (Gmail, Exchange Online, Postfix, aiosmtpd) ---
    ("530 5.7.0 Must issue a STARTTLS command first. d2-20020a05600c", "tls_failed"),
    ("538 5.7.11 Encryption required for requested authentication mechanism", "tls_failed"),
    ("535 5.7.8 Authentication credentials invalid", "auth_failed"),
    ("535 5.7.8 Error: authentication failed: authentication failure", "auth_failed"),
    ("552-5.2.2 The email account that you tried to reach is over quota.", "quota_exceeded"),
    ("554 5.2.2 mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException",
     "quota_exceeded"),
    ("451 4.7.0 Temporary server error. Please try again later. PRX5", "server_unavailable"),
    ("421 4.3.2 Service not available, closing transmission channel", "server_unavailable"),
    # Exchange Online past its limit of connections per mailbox (Microsoft: "Message storage
    # and concurrent connection throttling for SMTP Authenticated Submission").
    ("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", "connection_limit"),
    ("432 4.3.2 Concurrent connections limit exceeded", "connection_limit"),
    # --- TLS failures as some servers and relays word them ---
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
     "certificate (_ssl.c:1006)", "tls_untrusted"),
    ("certificate verify failed: self-signed certificate in certificate chain", "tls_untrusted"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "code"), REAL_RESPONSES)
def test_real_server_responses(text: str, code: str) -> None:
    assert classify_server_text(text) == code


# Every RFC 5530 response code a login or a folder command can meet, with what it must read as
# whatever free text follows it (here: wording that would on its own suggest another code).
RFC5530_CODES: list[tuple[str, str]] = [
    ("UNAVAILABLE", "server_unavailable"),  # temporary: retry by itself
    ("AUTHENTICATIONFAILED", "auth_failed"),
    ("AUTHORIZATIONFAILED", "auth_failed"),
    ("EXPIRED", "auth_failed"),  # the password is no longer valid: set a new one
    ("PRIVACYREQUIRED", "tls_failed"),  # the connection needs TLS first
    ("CONTACTADMIN", "account_disabled"),  # only the administrator can let it in
    ("NOPERM", "folder_unavailable"),
    ("INUSE", "server_unavailable"),
    ("LIMIT", "connection_limit"),
    ("OVERQUOTA", "quota_exceeded"),
    ("NONEXISTENT", "folder_unavailable"),
]


@pytest.mark.parametrize(("response_code", "code"), RFC5530_CODES)
def test_rfc5530_response_codes(response_code: str, code: str) -> None:
    assert classify_server_text(f"[{response_code}] Failed.") == code
    if code != "auth_failed":  # the code decides over a generic wording, never the reverse
        assert classify_server_text(f"[{response_code}] Authentication failed.") == code
    remedy = CATALOGUE[code].remedy
    if response_code == "PRIVACYREQUIRED":
        assert "starttls or implicit" in remedy
        assert "imap.tls" in remedy


@pytest.mark.parametrize(
    "text",
    [
        "Completed",
        "[CANNOT] Invalid mailbox name",
        # a number inside prose is not an SMTP status code
        "Message 4501 has an unknown charset",
        # RFC 5321's stock 550 text is about a recipient, not our account
        "550 5.1.1 <nobody@example.com>: mailbox unavailable",
    ],
)
def test_unmatched_text_falls_back_to_default(text: str) -> None:
    assert classify_server_text(text) == "server_error"
    assert classify_server_text(text, default="internal") == "internal"


def test_every_rule_is_exercised_by_a_real_response() -> None:
    # A rule no real wording needs is dead weight (or a sign the table lost a case).
    for index, (code, pattern) in enumerate(errors._RULES):
        hits = [text for text, expected in REAL_RESPONSES if pattern.search(text)]
        assert hits, f"rule {index} ({code}) matches none of the real responses"


def test_the_readme_troubleshooting_table_is_the_catalogue() -> None:
    """Operators read the README's table; it must say what the code says, row for row."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = {
        cells[0].strip("`"): cells[1:]
        for line in readme.splitlines()
        if line.startswith("| `")
        for cells in [[c.strip() for c in line.strip().strip("|").split("|")]]
        if len(cells) == 4
    }
    for code, info in CATALOGUE.items():
        assert code in rows, f"README troubleshooting table lacks {code}"
        assert rows[code] == [info.title, "yes" if info.transient else "no", info.remedy], code


@pytest.mark.parametrize(
    ("errors", "status"),
    [
        ([], 0),
        ([StoreError("locked", code="database_locked")], 75),
        ([StoreError("full", code="disk_full")], 75),
        ([StoreError("down", code="database_unavailable")], 75),
        ([StoreError("wrong password", code="database_auth_failed")], 78),
        ([StoreError("file is not a database", code="database_error")], 75),
        ([ServerError("refused", code="unreachable")], 69),
        (
            [
                ServerError("refused", code="unreachable"),
                StoreError("x", code="database_auth_failed"),
            ],
            78,
        ),
        ([ServerError("refused", code="unreachable"), StoreError("x", code="disk_full")], 69),
        ([ConfigError("no secret", code="secret_missing"), ServerError("x")], 78),
    ],
)
def test_exit_status_puts_what_the_operator_must_fix_first(
    errors: list[MailbridgeError], status: int
) -> None:
    # systemd restarts 75 and does not restart 78: 78 only where a restart cannot help.
    assert exit_status(errors) == status
