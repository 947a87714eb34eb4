"""The one exception tree of mailbridge and the error catalogue (code -> meaning and remedy).

Every failure mailbridge reports carries a stable *code* from :data:`CATALOGUE`. The code is what
logs, ``mailbridge status`` and ``mailbridge doctor`` show beside a one-line remedy, and what
monitoring can alert on. Third-party exceptions are mapped into this tree at the boundary
(``raise ... from exc``) so nothing above the I/O layer ever sees an aioimaplib, ssl or sqlite3
exception.

::

    MailbridgeError                   code, remedy, transient
    ├── ConfigError                   bad YAML, unknown key, missing secret   (exit 78, EX_CONFIG)
    ├── ServerError                   an IMAP/SMTP/OAuth server said no or could not be reached
    │   │                             (code from classify_server_text / the TLS and socket mapping)
    │   ├── AuthError                 credentials, tokens, MFA, disabled account/protocol
    │   └── FolderError               a configured folder is missing or not selectable
    ├── MessageError                  one message cannot be imported -> the Failed folder
    └── StoreError                    the database refused (locked, disk full, corrupt)
                                      (exit 75; 78 for database_auth_failed: exit_status)

``transient`` says whether retrying soon may help (a dropped connection, a locked database) or an
operator must act first (a wrong password). The daemon's backoff follows it.

A remedy names only what exists: ``mailbridge`` commands in quotes ('mailbridge doctor ACCOUNT')
and config keys by their path below the account (``auth.password_file``, ``imap.tls``).
Sign-in is by password or OAuth2 (``auth.method: microsoft`` / ``google``); the OAuth2 codes
(AADSTS numbers, ``invalid_grant``, "authenticated but not connected", SMTP AUTH disabled,
``SendAsDenied``) name the check or the command that fixes them. tests/unit/test_errors.py checks
every command against the CLI's parser and every key against the config model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What one error code means and what to do about it."""

    code: str
    title: str
    remedy: str
    transient: bool


def _info(code: str, title: str, remedy: str, *, transient: bool) -> tuple[str, ErrorInfo]:
    return code, ErrorInfo(code, title, remedy, transient)


CATALOGUE: Final[dict[str, ErrorInfo]] = dict(
    [
        _info(
            "config_invalid",
            "The configuration is invalid",
            "Fix the named key in the config file, then run 'mailbridge check-config'.",
            transient=False,
        ),
        _info(
            "config_syntax",
            "The config file is not valid YAML",
            "Fix the YAML at the line and column named (indentation, a missing colon, an "
            "unclosed quote), then run 'mailbridge check-config'.",
            transient=False,
        ),
        _info(
            "config_missing",
            "The config file cannot be read",
            "Pass the config file with -c FILE or set MAILBRIDGE_CONFIG (config.example.yaml is a "
            "starting point) and make it readable by the user the daemon runs as.",
            transient=False,
        ),
        _info(
            "database_in_use",
            "Another mailbridge daemon already serves this SQLite database",
            "Stop the other daemon (its pid is named), or give this one its own database (a "
            "SQLite file serves one daemon); several daemons share accounts only through "
            "PostgreSQL (database: postgresql://...).",
            transient=False,
        ),
        _info(
            "account_unknown",
            "No account has that name",
            "Name one of the accounts of the config ('mailbridge status' lists them).",
            transient=False,
        ),
        _info(
            "secret_missing",
            "A password or token could not be read",
            "Check that the file, environment variable or systemd credential named by "
            "auth.password_file, auth.password_env or auth.password_credential (OAuth2: "
            "auth.client_secret_file, auth.client_secret_env, auth.client_secret_credential, "
            "auth.service_account_file; PostgreSQL: database_password_file, "
            "database_password_env or database_password_credential) exists and is readable by "
            "the user the daemon runs as, then run 'mailbridge check-config'.",
            transient=False,
        ),
        _info(
            "auth_failed",
            "The server rejected the username or password",
            "Check auth.username and the password; if it was changed or has expired, put the new "
            "one where auth names it (e.g. auth.password_file) and send SIGHUP (systemctl reload "
            "mailbridge).",
            transient=False,
        ),
        _info(
            "account_disabled",
            "The mailbox is disabled, locked or blocked",
            "Ask the mail administrator to unlock or re-enable the mailbox (or to say why the "
            "server refuses it), then run 'mailbridge doctor ACCOUNT'.",
            transient=False,
        ),
        _info(
            "app_password_required",
            "The account uses multi-factor authentication",
            "Sign in with OAuth2 instead (auth.method: microsoft or google, set up as the README "
            "says, then 'mailbridge auth ACCOUNT'), or create an app password for the mailbox "
            "and put it in auth.password_file.",
            transient=False,
        ),
        _info(
            "token_expired",
            "The OAuth2 token has expired or was revoked",
            "The refresh token expired, was revoked, or the user's password changed: sign in "
            "again with 'mailbridge auth ACCOUNT' (as auth.username), then send SIGHUP "
            "(systemctl reload mailbridge).",
            transient=False,
        ),
        _info(
            "consent_missing",
            "The OAuth2 application lacks the permissions (consent) it needs",
            "Grant the permissions and admin consent: Entra app registration, API permissions, "
            "IMAP.AccessAsUser.All and SMTP.Send (delegated) or IMAP.AccessAsApp and "
            "SMTP.SendAsApp (application), then 'Grant admin consent'; Google: the service "
            "account's client ID with scope https://mail.google.com/ under domain-wide "
            "delegation. Then run 'mailbridge doctor ACCOUNT'.",
            transient=False,
        ),
        _info(
            "client_secret_invalid",
            "The identity provider rejected the client secret or key (AADSTS7000215)",
            "Copy the secret's Value (not its Secret ID) from the app registration's "
            "'Certificates & secrets' into auth.client_secret_file and check auth.client_id and "
            "auth.tenant_id (Google service account: a current JSON key in "
            "auth.service_account_file); then run 'mailbridge doctor ACCOUNT' and send SIGHUP "
            "(systemctl reload mailbridge).",
            transient=False,
        ),
        _info(
            "sign_in_required",
            "No OAuth2 sign-in is stored for this account yet",
            "Run 'mailbridge auth ACCOUNT' as the user the daemon runs as (it stores the token "
            "cache in auth.token_cache), then send SIGHUP (systemctl reload mailbridge).",
            transient=False,
        ),
        _info(
            "client_secret_expired",
            "The OAuth2 client secret has expired (AADSTS7000222)",
            "Create a new client secret in the app registration ('Certificates & secrets'), put "
            "it in auth.client_secret_file, set auth.client_secret_expires to its end date, then "
            "send SIGHUP (systemctl reload mailbridge).",
            transient=False,
        ),
        _info(
            "mailbox_not_connected",
            "Signed in, but the mail server refused the mailbox (authenticated but not connected)",
            "The token is valid, so check the mailbox side: 1. the signing-in user (or the app's "
            "service principal: Add-MailboxPermission) has Full Access to the mailbox of the "
            "account's address; 2. IMAP (and Authenticated SMTP) is enabled for that user and "
            "for the mailbox (Set-CASMailbox -ImapEnabled $true); 3. no Conditional Access "
            "policy blocks IMAP for them; 4. the address is the mailbox's primary address or "
            "UPN. Then run 'mailbridge doctor ACCOUNT'.",
            transient=False,
        ),
        _info(
            "smtp_auth_disabled",
            "SMTP AUTH is disabled for the tenant or the mailbox",
            "Enable authenticated SMTP: Exchange Online PowerShell 'Set-TransportConfig "
            "-SmtpClientAuthenticationDisabled $false' (tenant) or 'Set-CASMailbox ADDRESS "
            "-SmtpClientAuthenticationDisabled $false' (mailbox), or 'Authenticated SMTP' under "
            "the user's email apps; allow about 30 minutes, then run 'mailbridge doctor ACCOUNT'.",
            transient=False,
        ),
        _info(
            "send_as_denied",
            "The signed-in user may not send as this mailbox (SendAsDenied)",
            "Grant the signing-in user (or the app's service principal) Send As on the mailbox: "
            "Exchange admin centre, the mailbox, Delegation, Send As (or 'Add-RecipientPermission "
            "ADDRESS -AccessRights SendAs -Trustee USER'); it may take minutes to apply.",
            transient=False,
        ),
        _info(
            "upn_mismatch",
            "The signed-in user is not the one configured, or the mailbox address is not its UPN",
            "Sign in as auth.username with 'mailbridge auth ACCOUNT' (or change auth.username to "
            "the user who signs in); for a mailbox whose user principal name differs from its "
            "address, use the UPN as the account's address or change the UPN in Entra.",
            transient=False,
        ),
        _info(
            "idp_unavailable",
            "The identity provider (token endpoint) could not be reached or failed",
            "Check the network or proxy to the sign-in host (auth.authority, auth.token_uri) and, "
            "behind a TLS-inspecting proxy, auth.ca_file; it is retried by itself.",
            transient=True,
        ),
        _info(
            "protocol_disabled",
            "IMAP or SMTP access is turned off for this account",
            "Enable IMAP (and authenticated SMTP) for the mailbox in the provider's admin centre, "
            "then run 'mailbridge doctor ACCOUNT'.",
            transient=False,
        ),
        _info(
            "connection_limit",
            "Too many connections to the server from this user or address",
            "Close other IMAP clients of this mailbox or ask the administrator to raise the limit; "
            "for SMTP, the mailbox's other sending clients share the server's limit (Exchange "
            "Online: 3 at once): lower smtp.connections. It is retried by itself.",
            transient=True,
        ),
        _info(
            "quota_exceeded",
            "The mailbox is over its storage quota",
            "Free space in the mailbox (empty the Processed folder) or raise the quota.",
            transient=False,
        ),
        _info(
            "folder_unavailable",
            "A configured folder does not exist or cannot be opened",
            "Check folders.inbox, folders.processed, folders.failed and folders.sent against "
            "the server's folder names and permissions; 'mailbridge doctor ACCOUNT' checks each.",
            transient=False,
        ),
        _info(
            "tls_untrusted",
            "The server's TLS certificate could not be verified",
            "Set imap.ca_file (or smtp.ca_file) to the PEM file of the CA that signed the "
            "server's certificate; only as a last resort set imap.verify_certificate: false.",
            transient=False,
        ),
        _info(
            "starttls_unavailable",
            "The server does not offer STARTTLS on this port",
            "TLS was asked for (imap.tls or smtp.tls: starttls) but this port offers none: if the "
            "server listens for implicit TLS, set imap.tls: implicit with imap.port 993 (SMTP: "
            "smtp.tls: implicit, port 465); imap.tls: none only on a network you trust.",
            transient=False,
        ),
        _info(
            "tls_failed",
            "The server requires TLS, or the TLS handshake failed",
            "Set imap.tls (or smtp.tls) to starttls or implicit, with the matching imap.port "
            "(IMAP: 993 implicit, 143 starttls; SMTP: 465 implicit, 587 starttls); if TLS is "
            "already on, check the server supports TLS 1.2 or later.",
            transient=False,
        ),
        _info(
            "unreachable",
            "The server could not be reached (DNS failure or connection refused)",
            "Check imap.host and imap.port (or smtp.host and smtp.port) and that the server is "
            "up; it is retried by itself.",
            transient=True,
        ),
        _info(
            "timeout",
            "The server did not answer in time",
            "Check the network and the server's load (or raise imap.timeout_seconds); it is "
            "retried by itself.",
            transient=True,
        ),
        _info(
            "connection_lost",
            "The connection to the server was lost",
            "Nothing to do if it happens rarely; it reconnects by itself.",
            transient=True,
        ),
        _info(
            "message_unreadable",
            "The server broke the connection every time it sent this message",
            "The message's file on the server is probably damaged: ask the mail administrator to "
            "repair the mailbox (Dovecot: doveadm force-resync), then run "
            "'mailbridge failed retry UID --account ACCOUNT'. The scheduled sweep does not "
            "retry it.",
            transient=False,
        ),
        _info(
            "fd_limit",
            "Too few open files allowed for the number of accounts",
            "Raise the open-files limit: LimitNOFILE= in the service unit (the shipped "
            "systemd/mailbridge.service sets 65536) or 'ulimit -n' in the shell that starts "
            "the daemon; each account needs about 2 (its IDLE connection and its sweep's), "
            "plus a few for the process. It is retried by itself.",
            transient=True,
        ),
        _info(
            "server_unavailable",
            "The server is temporarily unavailable",
            "Wait; it is retried by itself. If it persists, contact the mail provider.",
            transient=True,
        ),
        _info(
            "server_error",
            "The server answered with an unexpected error",
            "Read the server's words in the log line; retry, or contact the mail provider.",
            transient=True,
        ),
        _info(
            "too_large",
            "The message is over limits.message_max_size_mb, or its attachments over "
            "limits.attachment_max_size_mb",
            "Raise limits.attachment_max_size_mb or limits.message_max_size_mb, whichever the "
            "reason names (a message over limits.message_max_size_mb was not downloaded), "
            "reload, and run 'mailbridge failed retry UID'; or handle the message by hand.",
            transient=False,
        ),
        _info(
            "unparseable",
            "The message could not be parsed",
            "Inspect it with 'mailbridge failed show UID'; it stays in the Failed folder.",
            transient=False,
        ),
        _info(
            "import_failed",
            "The message could not be written to the database",
            "Read the reason in 'mailbridge failed show UID'; fix the cause, then run "
            "'mailbridge failed retry UID'.",
            transient=False,
        ),
        _info(
            "message_rejected",
            "The SMTP server refused the outgoing message for good (a 5xx reply)",
            "Read the server's words in 'mailbridge outbox --failed' (a wrong recipient address, "
            "a policy or spam refusal); correct the row and run 'mailbridge outbox retry ID'.",
            transient=False,
        ),
        _info(
            "send_deferred",
            "The SMTP server deferred the outgoing message (a 4xx reply)",
            "Nothing to do: it is retried by itself (first after outbox.first_retry_seconds, "
            "then up to hourly) until outbox.max_age_hours.",
            transient=True,
        ),
        _info(
            "send_expired",
            "An outgoing message could not be sent within outbox.max_age_hours",
            "Fix what its last error says ('mailbridge outbox --failed', 'mailbridge doctor "
            "ACCOUNT'), then run 'mailbridge outbox retry ID'.",
            transient=False,
        ),
        _info(
            "outbox_invalid",
            "An outbox row cannot be sent as written",
            "Read the reason in 'mailbridge outbox --failed' (no recipient, an entry that is "
            "not an address or needs SMTPUTF8, an unknown conversation or account, an "
            "unreadable attachment, a message action naming no parent column); correct the "
            "row and run 'mailbridge outbox retry ID'.",
            transient=False,
        ),
        _info(
            "outgoing_too_large",
            "The outgoing message is over outbox.max_outgoing_size_mb",
            "Send smaller or fewer attachments (or raise outbox.max_outgoing_size_mb if the "
            "server accepts more), then run 'mailbridge outbox retry ID'.",
            transient=False,
        ),
        _info(
            "database_locked",
            "The database is locked by another writer",
            "Keep integrators' write transactions short; the daemon retries by itself, a command "
            "can simply be run again.",
            transient=True,
        ),
        _info(
            "disk_full",
            "The disk holding the database is full",
            "Free space on the file system that holds the database file; it is retried by itself.",
            transient=True,
        ),
        _info(
            "database_error",
            "The database could not be opened or is damaged",
            "Read what the database said: SQLite: check the database key's path, that the "
            "daemon's user owns the file and its directory, and 'sqlite3 FILE \"PRAGMA "
            "integrity_check\"'; PostgreSQL: grant what the message names (e.g. GRANT CREATE "
            "ON SCHEMA public TO the database user).",
            transient=False,
        ),
        _info(
            "database_unavailable",
            "The PostgreSQL server cannot be reached",
            "Check that PostgreSQL runs and that the host and port in the database URL are "
            "right ('mailbridge doctor' checks it); it is retried by itself.",
            transient=True,
        ),
        _info(
            "database_auth_failed",
            "PostgreSQL refused the database user or password",
            "Check the user in the database URL and the password where database_password_file, "
            "database_password_env or database_password_credential names it, then run "
            "'mailbridge doctor'.",
            transient=False,
        ),
        _info(
            "lease_lost",
            "Another daemon now serves this account",
            "Nothing to do when a daemon was restarted or paused: the account is served by the "
            "daemon 'mailbridge status' names. If it happens often, check that the database is "
            "reachable and cluster.lease_seconds is not too short for it.",
            transient=True,
        ),
        _info(
            "internal",
            "An unexpected internal error (a bug in mailbridge)",
            "Report it with the traceback logged with it; the other messages and accounts go "
            "on. A message it hit waits in the Failed folder (the sweep does not retry it): "
            "after an upgrade, run 'mailbridge failed retry UID'.",
            transient=True,
        ),
    ]
)


class MailbridgeError(Exception):
    """The root of every error mailbridge raises on purpose.

    ``code`` picks the catalogue entry; the message is the specific detail (the server's words,
    the key path, the file name). Never put a secret in the message.
    """

    default_code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        if self.code not in CATALOGUE:  # a programming error, caught by the catalogue tests
            raise ValueError(f"unknown error code {self.code!r}")

    @property
    def info(self) -> ErrorInfo:
        return CATALOGUE[self.code]

    @property
    def remedy(self) -> str:
        return self.info.remedy

    @property
    def transient(self) -> bool:
        return self.info.transient

    @property
    def detail(self) -> str:
        return str(self)


class ConfigError(MailbridgeError):
    """The configuration is wrong. ``path`` is the key path such as ``accounts[0].imap.port``."""

    default_code = "config_invalid"

    def __init__(self, message: str, *, path: str = "", code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.path = path


class ServerError(MailbridgeError):
    """An IMAP, SMTP or OAuth2 server could not be reached or refused a command."""

    default_code = "server_error"


class AuthError(ServerError):
    """Login was refused: credentials, token, MFA, a disabled account or protocol."""

    default_code = "auth_failed"


class FolderError(ServerError):
    """A configured folder is missing or cannot be selected or created."""

    default_code = "folder_unavailable"


class MessageError(MailbridgeError):
    """One message cannot be imported; it goes to the Failed folder with this reason."""

    default_code = "unparseable"


class StoreError(MailbridgeError):
    """The database refused a read or write."""

    default_code = "database_error"


# Server wording -> code. Checked in order; the first match wins, and a code may appear more than
# once so that a narrow wording can win before a broad one. Sources: RFC 5530 response codes (as
# Dovecot and Gmail send them), Exchange Online's SMTP AUTH replies and AADSTS codes, Gmail's IMAP
# and SMTP replies, and the wording quoted in the reference error guide. tests/unit/test_errors.py
# holds the real responses each rule exists for.
#
# Precedence, top to bottom:
# 1. Unambiguous RFC 5530 / RFC 3501 response codes that name the *condition* ([NONEXISTENT],
#    [OVERQUOTA], [LIMIT], [UNAVAILABLE], [PRIVACYREQUIRED] ...). The free text after them can
#    quote a folder name or server prose ("[UNAVAILABLE] Temporary authentication failure"), so
#    the code must win. Exceptions first: Gmail sends "[OVERQUOTA] Account exceeded command or
#    bandwidth limits" for a daily *throttle* that resets by itself - transient, not a full
#    mailbox; and [LIMIT] about flags or keywords is an implementation limit (RFC 5530 section 3),
#    not the connection limit it means at login.
#    RFC 5530 codes that name no condition of their own are left to the wording: [CONTACTADMIN]
#    ("ask the administrator") joins account_disabled in 2., [EXPIRED] (a password that is no
#    longer valid) and [AUTHORIZATIONFAILED] join the generic auth failure in 4.
# 2. Specific causes (MFA/app password, expired token, missing consent, protocol disabled,
#    disabled account). They often arrive inside a generic failure ("535 5.7.139 Authentication
#    unsuccessful, SmtpClientAuthentication is disabled for the Tenant", "[ALERT] Application-
#    specific password required ... (Failure)"), so they come before the generic auth rule.
# 3. Limits, quota and folders by wording.
# 4. Generic authentication failure ([AUTHENTICATIONFAILED], 535, "LOGIN failed").
# 5. Generic "try later" (transient) last, so "... or try again later" appended to a specific
#    reason never hides that reason.
#
# "454 4.7.0 Too many login attempts, please try again later" (Gmail SMTP) is connection_limit,
# not server_unavailable: the server is up and is throttling *this user's* logins (too many
# clients or retries). connection_limit says exactly that, is transient like server_unavailable,
# and its remedy (other clients of this mailbox) is the one that helps.
_RULES: Final[tuple[tuple[str, re.Pattern[str]], ...]] = tuple(
    (code, re.compile(pattern, re.IGNORECASE))
    for code, pattern in (
        # -- 1. response codes ------------------------------------------------------------------
        ("server_unavailable", r"command or bandwidth limits|bandwidth limits? exceeded"),
        ("folder_unavailable", r"\[(?:NONEXISTENT|NOPERM|TRYCREATE)\]"),
        ("quota_exceeded", r"\[OVERQUOTA\]"),
        ("server_error", r"\[LIMIT\].{0,80}\b(?:flags?|keywords?)\b"),
        ("connection_limit", r"\[LIMIT\]"),
        ("server_unavailable", r"\[(?:UNAVAILABLE|INUSE)\]"),
        # The connection is not encrypted and the server will not take a password over it
        # (Dovecot: "[PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS)
        # connections."). Not a wrong password: the tls mode is what to change.
        ("tls_failed", r"\[PRIVACYREQUIRED\]"),
        # -- 2. specific causes -----------------------------------------------------------------
        # OAuth2 first: Entra's AADSTS codes and the reference's wording are unambiguous, and
        # some arrive inside a generic "535 Authentication unsuccessful".
        ("client_secret_expired", r"AADSTS7000222|client secret keys? .{0,80}(?:are|is) expired"),
        ("client_secret_invalid", r"AADSTS7000215|invalid client secret"),
        # Entra sends "invalid_grant: AADSTS65001 ..." for missing consent: before invalid_grant.
        ("consent_missing", r"AADSTS65001|AADSTS650057"),
        ("send_as_denied", r"SendAsDenied|not (?:allowed|authorized) to send as"),
        (
            "upn_mismatch",
            r"queried reference-(?:property )?objects? (?:are|is) not present|"
            r"user principal name.{0,40}(?:does not|doesn't) match",
        ),
        ("mailbox_not_connected", r"authenticated but not connected"),
        (
            "smtp_auth_disabled",
            r"SmtpClientAuthentication is disabled|SMTP AUTH(?:entication)? is disabled",
        ),
        (
            "app_password_required",
            r"application[- ]specific password|app password|application password|multi-?factor|"
            r"two[- ]step|\b2fa\b|\bmfa\b|InvalidSecondFactor|web login required|WEBALERT|"
            # Gmail: 534-5.7.14 / [ALERT] "Please log in via your web browser" - Google refuses a
            # plain password from a mail client; an app password (or OAuth2) is the way in.
            r"log ?in via your web browser|"
            # Entra ID: AADSTS50076 MFA required, AADSTS50079 MFA registration required.
            r"AADSTS50076|AADSTS50079",
        ),
        (
            "token_expired",
            r"token has been expired|expired or revoked|invalid_grant|token.{0,20}expired|"
            # AADSTS70008/700082 expired refresh token, 50173 revoked by a password change,
            # 70043 expired by a sign-in frequency policy; interaction_required: sign in again.
            r"AADSTS70008\b|AADSTS700082|AADSTS50173|AADSTS70043|interaction_required",
        ),
        (
            "consent_missing",
            r"consent|AADSTS65001|AADSTS650057|insufficient.?scope|unauthorized_client",
        ),
        (
            "protocol_disabled",
            r"IMAP (?:access )?is disabled|not enabled for IMAP|IMAP use|"
            r"basic authentication is disabled|protocol.{0,20}disabled|"
            # Exchange Online's 5.7.139 is always a policy block: SMTP AUTH off for the tenant or
            # the mailbox, security defaults or Conditional Access refusing basic auth.
            r"\b5\.7\.139\b",
        ),
        (
            "account_disabled",
            r"account (?:is )?(?:disabled|locked|blocked|suspended)|"
            r"mailbox (?:is )?(?:disabled|blocked)|user is (?:disabled|blocked)|"
            r"\[ACCOUNTDISABLED\]|\[CONTACTADMIN\]|AADSTS50057|AADSTS50053|access restricted|"
            r"access denied",
            # Not "mailbox unavailable": that is RFC 5321's stock 550 text for a rejected
            # *recipient*, which must not read as "our account is disabled".
        ),
        # -- 3. limits, quota, folders by wording -----------------------------------------------
        (
            "connection_limit",
            r"too many (?:\w+ ){0,2}connections|concurrent connections? limit|"
            r"maximum number of connections|connections? limit|mail_max_userip_connections|"
            r"too many login|thread limit exceeded",
        ),
        (
            "quota_exceeded",
            r"quota exceeded|over quota|mailbox (?:is )?full|mailbox limit exceeded|\b5\.2\.2\b",
        ),
        (
            "folder_unavailable",
            r"mailbox doesn't exist|mailbox does not exist|no such (?:mailbox|folder)|"
            r"unknown mailbox|folder not found|check the folder",
        ),
        # TLS by wording: SMTP servers and relaying services describe it instead of failing the
        # handshake ("530 5.7.0 Must issue a STARTTLS command first": the tls mode is wrong).
        (
            "tls_untrusted",
            r"certificate verify failed|SSL Exception|CA certificate|self[- ]signed certificate|"
            r"unable to get local issuer certificate",
        ),
        (
            "tls_failed",
            r"must issue a STARTTLS|STARTTLS (?:is )?required|(?:TLS|encryption) (?:is )?required|"
            # Dovecot's untagged "* BAD [ALERT]" before its [PRIVACYREQUIRED] refusal.
            r"plaintext authentication (?:is )?(?:disallowed|not allowed)",
        ),
        # -- 4. generic authentication failure --------------------------------------------------
        (
            "auth_failed",
            r"\[AUTHENTICATIONFAILED\]|\[AUTHORIZATIONFAILED\]|\[EXPIRED\]|authentication failed|"
            r"authentication unsuccessful|invalid credentials|login failed|AUTHENTICATE failed|"
            r"incorrect (?:password|credentials)|bad credentials|"
            r"username and password not accepted|"
            # AADSTS50126 wrong password, 50034 no such user; invalid_client (RFC 6749 5.2)
            # without an AADSTS code: a wrong client ID or secret elsewhere.
            r"AADSTS50126|AADSTS50034|invalid_client|"
            r"\b5\.7\.8\b|\b535\b",
        ),
        # -- 5. generic transient ---------------------------------------------------------------
        (
            "server_unavailable",
            r"temporar(?:il)?y (?:unavailable|failure|system error)|try again later|"
            r"server (?:is )?(?:busy|unavailable)|"
            # Any SMTP 4xx reply or 4.x.x enhanced status code is transient by definition
            # (RFC 5321 4.2.1, RFC 3463); anchored so a "450" inside prose does not count.
            r"(?:^|\s)4\d\d(?:[ -]|$)|\b4\.\d{1,3}\.\d{1,3}\b",
        ),
    )
)


def classify_server_text(text: str, *, default: str = "server_error") -> str:
    """Map a server's words (an IMAP NO/BAD line, an SMTP reply, an OAuth error) to a code."""
    for code, pattern in _RULES:
        if pattern.search(text):
            return code
    return default


def describe(code: str) -> ErrorInfo:
    """The catalogue entry for ``code``; unknown codes read as ``internal``."""
    return CATALOGUE.get(code, CATALOGUE["internal"])


EX_OK: Final = 0
EX_UNAVAILABLE: Final = 69  # sysexits.h: a service (the mail server) is unavailable
EX_TEMPFAIL: Final = 75  # a temporary failure: run again later
EX_CONFIG: Final = 78  # the configuration (or what it names) is wrong: fix it first


def exit_status(errors: Sequence[MailbridgeError]) -> int:
    """The sysexits.h status of a command that met ``errors`` (0 for none).

    The one an operator must act on first wins: a config error (a missing secret, another
    daemon on the SQLite file) or a database password PostgreSQL refuses
    (``database_auth_failed``) is 78, which the systemd unit's ``RestartPreventExitStatus``
    does not restart in a loop; then a mail server that cannot be reached or refused the
    login, 69; anything else is 75, restarted: a locked database, a full disk, PostgreSQL
    unreachable, and ``database_error`` too — the catch-all of both backends, which also
    covers what passes by itself (a file system mounted late at boot, a standby during a
    fail-over), so a fleet is never left down by one.
    """
    if any(isinstance(e, ConfigError) for e in errors):
        return EX_CONFIG
    if any(isinstance(e, StoreError) and e.code == "database_auth_failed" for e in errors):
        return EX_CONFIG
    if any(isinstance(e, ServerError) for e in errors):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL if errors else EX_OK
