"""The YAML configuration: loading, validation into frozen typed settings, and secrets.

``load_config(path)`` returns a :class:`Settings` or raises :class:`~mailbridge.errors.ConfigError`
whose message names the key path (``accounts[0].imap.port``) and what is expected. Unknown keys
are errors (a typo must not silently fall back to a default). Secrets are never stored in the
settings as plain strings: :meth:`AuthSettings.secret` reads them when a connection needs them,
from ``password``, ``password_file``, ``password_env`` or a systemd credential
(``password_credential`` under ``$CREDENTIALS_DIRECTORY``), so a fixed password file takes effect
at the next connection attempt.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from mailbridge.core.policy import AutomaticEmails, AutomaticPolicy, BotLists
from mailbridge.core.tables import CONVERSATION_COLUMNS, FOLLOWER_COLUMNS, TABLES
from mailbridge.errors import ConfigError
from mailbridge.log import register_secret

DEFAULT_CONFIG_PATH = Path("/etc/mailbridge/config.yaml")
CONFIG_ENV = "MAILBRIDGE_CONFIG"

Port = Annotated[int, Field(ge=1, le=65535, strict=False)]
AccountName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
EmailAddress = Annotated[
    str,
    StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[^@\s]+@[^@\s]+$"),
]


class _Model(BaseModel):
    """Frozen, strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ServerSettings(_Model):
    """Connection settings shared by IMAP and SMTP."""

    host: Annotated[str, StringConstraints(min_length=1)]
    port: Port | None = None  # filled from tls in the subclasses
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    verify_certificate: bool = True
    ca_file: Path | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 60.0

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"CA file {str(value)!r} does not exist")
        return value


class ImapSettings(ServerSettings):
    @model_validator(mode="after")
    def _default_port(self) -> ImapSettings:
        if self.port is None:
            object.__setattr__(self, "port", 993 if self.tls == "implicit" else 143)
        return self


class SmtpSettings(ServerSettings):
    tls: Literal["implicit", "starttls", "none"] = "starttls"
    # How many connections the outbox may send an account's rows on at once (one per 4 rows
    # due). 3 is Exchange Online's limit per mailbox for SMTP AUTH submission ("Message storage
    # and concurrent connection throttling for SMTP Authenticated Submission"); a server that
    # refuses a further connection is used with fewer for 10 minutes.
    connections: Annotated[int, Field(ge=1, le=10, strict=True)] = 3

    @model_validator(mode="after")
    def _default_port(self) -> SmtpSettings:
        if self.port is None:
            ports = {"implicit": 465, "starttls": 587, "none": 25}
            object.__setattr__(self, "port", ports[self.tls])
        return self


OAuthMethod = Literal["microsoft", "google"]
OAuthFlow = Literal["device_code", "client_credentials", "authorization_code", "service_account"]

# The public cloud's sign-in host (Microsoft identity platform); national clouds differ
# (login.microsoftonline.us, login.partner.microsoftonline.cn): set auth.authority for them.
MICROSOFT_LOGIN = "https://login.microsoftonline.com"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
GOOGLE_AUTH_URI = "https://accounts.google.com/o/oauth2/v2/auth"
# Scopes by flow (Microsoft: "Authenticate an IMAP, POP or SMTP connection using OAuth";
# Google: "IMAP, POP and SMTP - OAuth 2.0 mechanism": only the full mail scope works for IMAP).
MICROSOFT_DELEGATED_SCOPES = (
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
)
MICROSOFT_APP_SCOPES = ("https://outlook.office365.com/.default",)
GOOGLE_SCOPES = ("https://mail.google.com/",)
_SECRET_KEYS = ("secret", "secret_file", "secret_env", "secret_credential")
# Warn about an expiring client secret from this many days before (the reference: "Set a
# calendar reminder 2 weeks before expiration").
SECRET_EXPIRY_WARNING_DAYS = 14


class AuthSettings(_Model):
    """How to log in: a password (``method: password``) or OAuth2 (``microsoft``, ``google``).

    Password: ``username`` and exactly one of ``password``, ``password_file``, ``password_env``,
    ``password_credential``. OAuth2: ``client_id`` and, depending on ``flow``, a client secret
    (``client_secret``, ``client_secret_file``, ``client_secret_env``,
    ``client_secret_credential``), ``tenant_id`` (Microsoft), ``service_account_file`` and
    ``subject`` (Google with domain-wide delegation). XOAUTH2 names the account's ``address``
    as the mailbox; ``username`` is who signs in (delegated flows).
    """

    # A password may begin or end with spaces; the model-wide stripping must not touch it, so it
    # is switched off here and asked for per field instead.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    method: Literal["password", "microsoft", "google"] = "password"
    username: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    # a systemd credential name (LoadCredential=)
    password_credential: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    # -- OAuth2 (method microsoft or google) --
    flow: OAuthFlow | None = None  # default: device_code (microsoft); see _oauth_rules
    tenant_id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = None
    client_id: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | None = None
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    client_secret_env: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    client_secret_credential: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    client_secret_expires: date | None = None
    service_account_file: Path | None = None
    subject: EmailAddress | None = None
    # Where tokens come from: the Microsoft authority (default MICROSOFT_LOGIN/tenant_id), the
    # Google token and consent endpoints, a private CA for them (TLS-inspecting proxy).
    authority: Annotated[str, StringConstraints(pattern=r"^https://\S+$")] | None = None
    token_uri: Annotated[str, StringConstraints(pattern=r"^https://\S+$")] | None = None
    auth_uri: Annotated[str, StringConstraints(pattern=r"^https://\S+$")] | None = None
    ca_file: Path | None = None
    redirect_uri: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] | None = None
    scopes: tuple[Annotated[str, StringConstraints(min_length=1)], ...] | None = None
    # Where the token cache (refresh token) lives; default: tokens/ACCOUNT.json beside the
    # database, mode 0600 (filled in by Settings).
    token_cache: Path | None = None
    token_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    # SASL mechanism: auto = OAUTHBEARER (RFC 7628) where the server offers it, else XOAUTH2.
    sasl: Literal["auto", "xoauth2", "oauthbearer"] = "auto"

    @field_validator("ca_file", "service_account_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> AuthSettings:
        if self.method != "password":
            return self._oauth_rules()
        oauth = [k for k in _OAUTH_ONLY if getattr(self, k) is not None]
        if oauth:
            raise ValueError(
                f"{', '.join(oauth)}: only for method microsoft or google (method is password)"
            )
        if self.username is None:
            raise ValueError("username: required key is missing")
        given = [
            k
            for k in ("password", "password_file", "password_env", "password_credential")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of password, password_file, password_env, password_credential"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    def _oauth_rules(self) -> AuthSettings:
        """Which keys each OAuth2 method and flow needs (see the README's set-up steps)."""
        password = [
            k
            for k in ("password", "password_file", "password_env", "password_credential")
            if getattr(self, k) is not None
        ]
        if password:
            raise ValueError(
                f"{', '.join(password)}: OAuth2 uses no password; "
                "use client_secret_file (or remove the key)"
            )
        secrets = [f"client_{k}" for k in _SECRET_KEYS if getattr(self, f"client_{k}") is not None]
        if len(secrets) > 1:
            raise ValueError(f"give at most one of {', '.join(secrets)}")
        if self.method == "microsoft":
            flow = self.flow or "device_code"
            object.__setattr__(self, "flow", flow)
            missing = [k for k in ("tenant_id", "client_id") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"{missing[0]}: required for method microsoft")
            for key in ("service_account_file", "subject", "token_uri", "auth_uri"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only for method google")
            if flow == "service_account":
                raise ValueError(
                    "flow service_account is Google's; Microsoft app-only access "
                    "is flow: client_credentials"
                )
            if flow == "client_credentials" and not secrets:
                raise ValueError(
                    "flow client_credentials needs client_secret_file (or "
                    "client_secret, client_secret_env, client_secret_credential)"
                )
            if flow == "device_code" and secrets:
                raise ValueError(
                    f"{secrets[0]}: device_code signs in as a public client and sends no secret; "
                    "remove it (and allow public client flows in the app registration)"
                )
            if flow == "client_credentials" and self.username is not None:
                raise ValueError(
                    "username: client_credentials signs in as the app, not a user; "
                    "the mailbox is the account's address"
                )
        else:
            flow = self.flow or (
                "service_account" if self.service_account_file is not None else "authorization_code"
            )
            object.__setattr__(self, "flow", flow)
            for key in ("tenant_id", "authority"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: only for method microsoft")
            if flow == "service_account":
                if self.service_account_file is None:
                    raise ValueError("service_account_file: required for flow service_account")
                if secrets or self.client_id is not None:
                    raise ValueError(
                        "a service account signs in with its key file: remove "
                        "client_id and the client secret"
                    )
            elif flow == "authorization_code":
                if self.client_id is None or not secrets:
                    raise ValueError(
                        "flow authorization_code (Google installed app) needs "
                        "client_id and client_secret_file (or client_secret ...)"
                    )
                if self.service_account_file is not None or self.subject is not None:
                    raise ValueError(
                        "service_account_file and subject belong to flow service_account"
                    )
            else:
                raise ValueError(
                    f"flow {flow} is not available for method google "
                    "(service_account or authorization_code)"
                )
        return self

    @property
    def is_oauth(self) -> bool:
        return self.method != "password"

    @property
    def has_secret(self) -> bool:
        """True when a secret source is configured (a password or an OAuth2 client secret)."""
        if not self.is_oauth:
            return True
        return any(getattr(self, f"client_{k}") is not None for k in _SECRET_KEYS)

    def oauth_scopes(self) -> tuple[str, ...]:
        if self.scopes:
            return self.scopes
        if self.method == "google":
            return GOOGLE_SCOPES
        if self.flow == "client_credentials":
            return MICROSOFT_APP_SCOPES
        return MICROSOFT_DELEGATED_SCOPES

    def microsoft_authority(self) -> str:
        if self.authority is not None:
            return self.authority.rstrip("/")
        return f"{MICROSOFT_LOGIN}/{self.tenant_id}"

    def secret_expiry_days(self, today: date | None = None) -> int | None:
        """Days until ``client_secret_expires`` (negative: expired), or None when not set."""
        if self.client_secret_expires is None:
            return None
        return (self.client_secret_expires - (today or date.today())).days

    def secret_expiry_warning(self, today: date | None = None) -> str | None:
        """A warning from SECRET_EXPIRY_WARNING_DAYS days before the client secret expires."""
        days = self.secret_expiry_days(today)
        if days is None or days > SECRET_EXPIRY_WARNING_DAYS:
            return None
        when = self.client_secret_expires
        if days < 0:
            return (
                f"the client secret expired on {when} ({-days} days ago): create a new one "
                "in the app registration, put it in auth.client_secret_file, update "
                "auth.client_secret_expires and reload"
            )
        return (
            f"the client secret expires on {when} (in {days} days): create a new one in the "
            "app registration, put it in auth.client_secret_file, update "
            "auth.client_secret_expires and reload"
        )

    def secret_source(self) -> str:
        """Where the secret comes from, for messages (never the secret itself)."""
        if self.is_oauth:
            for key in _SECRET_KEYS:
                value = getattr(self, f"client_{key}")
                if value is not None:
                    shown = "" if key == "secret" else f" {value}"
                    return f"auth.client_{key}{shown}"
            if self.service_account_file is not None:
                return f"service_account_file {self.service_account_file}"
            return "no client secret (public client)"
        if self.password is not None:
            return "auth.password"
        if self.password_file is not None:
            return f"password_file {self.password_file}"
        if self.password_env is not None:
            return f"environment variable {self.password_env}"
        return f"systemd credential {self.password_credential}"

    def secret(self) -> str:
        """Read the secret now. Raises ConfigError(code=secret_missing) naming the source.

        For ``method: password`` the password; for OAuth2 the client secret, or ``""`` when the
        flow needs none (a service account's key file is read by its provider). The value is
        registered with the log redactor, so it is masked in any log line, including
        third-party debug output such as aioimaplib's echo of LOGIN.
        """
        value = self._read_secret()
        register_secret(value)
        return value

    def _read_secret(self) -> str:
        if self.is_oauth:
            return self._read_client_secret()
        if self.password is not None:
            return self.password.get_secret_value()
        return read_secret(
            file=self.password_file,
            env=self.password_env,
            credential=self.password_credential,
            key="auth.password",
        )

    def _read_client_secret(self) -> str:
        if self.client_secret is not None:
            return self.client_secret.get_secret_value()
        if not self.has_secret:
            if self.service_account_file is not None:
                _read_secret_file(self.service_account_file, "auth.service_account_file")
            return ""
        return read_secret(
            file=self.client_secret_file,
            env=self.client_secret_env,
            credential=self.client_secret_credential,
            key="auth.client_secret",
        )


_OAUTH_ONLY = (
    "flow",
    "tenant_id",
    "client_id",
    "client_secret",
    "client_secret_file",
    "client_secret_env",
    "client_secret_credential",
    "client_secret_expires",
    "service_account_file",
    "subject",
    "authority",
    "token_uri",
    "auth_uri",
    "ca_file",
    "redirect_uri",
    "scopes",
    "token_cache",
)


def read_secret(*, file: Path | None, env: str | None, credential: str | None, key: str) -> str:
    """A secret from the one source given: a file, an environment variable or a systemd
    credential (``LoadCredential=``, under ``$CREDENTIALS_DIRECTORY``). Raises
    ConfigError(code=secret_missing) whose path is ``key`` + ``_file``/``_env``/``_credential``.
    """
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(
                f"environment variable {env} is not set", path=f"{key}_env", code="secret_missing"
            )
        return value
    if file is not None:
        return _read_secret_file(file, f"{key}_file")
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    name = key.rpartition(".")[2]
    if not credentials:
        raise ConfigError(
            f"{name}_credential needs $CREDENTIALS_DIRECTORY (set by systemd LoadCredential=)",
            path=f"{key}_credential",
            code="secret_missing",
        )
    assert credential is not None  # the caller gives exactly one source
    return _read_secret_file(Path(credentials) / credential, f"{key}_credential")


def _read_secret_file(path: Path, key: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror}", path=key, code="secret_missing"
        ) from exc
    value = text.strip("\r\n")
    if not value:
        raise ConfigError(f"{path} is empty", path=key, code="secret_missing")
    return value


def world_readable(path: Path) -> bool:
    """True when a secret file can be read by users other than its owner and group."""
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


class FolderSettings(_Model):
    inbox: Annotated[str, StringConstraints(min_length=1)] = "INBOX"
    processed: Annotated[str, StringConstraints(min_length=1)] = "Mailbridge Processed"
    failed: Annotated[str, StringConstraints(min_length=1)] = "Mailbridge Failed"
    # Where the account's sent mail is filed. Set, it is searched for a Message-ID after a crash
    # in the middle of sending (to avoid a resend), and a copy of what mailbridge sends is
    # APPENDed there unless append_sent is false (servers that file SMTP submissions
    # themselves, such as Gmail and Exchange Online, need no copy).
    sent: Annotated[str, StringConstraints(min_length=1)] | None = None
    append_sent: bool = True

    @model_validator(mode="after")
    def _distinct(self) -> FolderSettings:
        names = [self.inbox, self.processed, self.failed]
        if len({n.casefold() for n in names}) != 3:
            raise ValueError("inbox, processed and failed must be three different folders")
        if self.sent is not None and self.sent.casefold() in {n.casefold() for n in names}:
            raise ValueError("sent must differ from inbox, processed and failed")
        return self


def _time_zone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"{value!r} is not a time zone (an IANA name such as 'Europe/Stockholm' or 'UTC')"
        ) from exc
    return value


class AutoReplySettings(_Model):
    """An automatic answer to each message that starts a new conversation (README "Automatic
    replies"); never to automatic mail, the account's own addresses, or a sender answered
    automatically loop_protection.max_auto_replies times within its window."""

    enabled: bool = False
    subject: Annotated[str, StringConstraints(max_length=200)] | None = None  # default: Re: ...
    body_text: str | None = None
    body_html: str | None = None
    # Older mail (recovered by the sweep after an outage, say) gets no automatic reply.
    max_age_hours: Annotated[float, Field(gt=0, le=24 * 365)] = 24.0

    @model_validator(mode="after")
    def _has_body(self) -> AutoReplySettings:
        if self.enabled and self.body_text is None and self.body_html is None:
            raise ValueError("enabled: true needs body_text or body_html")
        return self


def _bot_pattern(value: str) -> str:
    """An address (``alerts@monitor.example``), a domain (``monitor.example``, ``@monitor.example``,
    ``*.monitor.example`` for its subdomains too) or an address with ``*`` wildcards
    (``noreply*@*.example``). Stored lower-case."""
    text = value.strip().lower()
    body = text.lstrip("@")
    if not body or any(c.isspace() for c in text) or body.count("@") > 1 or ".." in body:
        raise ValueError(
            f"{value!r} is not an address or domain pattern (e.g. alerts@monitor.example, "
            "monitor.example, *.monitor.example, noreply*@*)"
        )
    local, at, domain = body.rpartition("@")
    if at and not local:
        raise ValueError(f"{value!r}: the part before @ is empty")
    if domain != "*" and not re.fullmatch(r"(\*\.)?[a-z0-9*](?:[a-z0-9*.-]*[a-z0-9*])?", domain):
        raise ValueError(f"{value!r}: {domain!r} is not a domain")
    return text


BotPattern = Annotated[str, AfterValidator(_bot_pattern)]


class BotSettings(_Model):
    """Senders whose mail the automatic-mail policy does not decide (``bots.allow``: always
    imported, may start a conversation; ``bots.deny``: never imported)."""

    allow: tuple[BotPattern, ...] = ()
    deny: tuple[BotPattern, ...] = ()


class AccountSettings(_Model):
    name: AccountName
    address: EmailAddress
    aliases: tuple[EmailAddress, ...] = ()
    imap: ImapSettings
    smtp: SmtpSettings | None = None
    auth: AuthSettings
    folders: FolderSettings = FolderSettings()
    mode: Literal["idle", "poll"] = "idle"
    poll_interval_seconds: Annotated[float, Field(ge=1, le=86400)] = 60.0
    # RFC 2177 section 3: a server may drop an IDLE after 30 minutes; re-issue well before.
    # Re-issuing is also how a connection dropped silently (a NAT, a firewall) is noticed: the
    # server must answer DONE within imap.timeout_seconds, so 10 minutes, as common clients do.
    idle_timeout_seconds: Annotated[float, Field(ge=1, le=29 * 60)] = 10 * 60.0
    enabled: bool = True
    # Per-account overrides of the global keys of the same names (None: the global value).
    automatic_emails: AutomaticEmails | None = None
    bots: BotSettings | None = None
    # The account's name in From of what it sends ("Support" <support@...>); with
    # personalized_emails the sending coworker's name comes first ("Jane Doe - Support") and
    # every recipient gets an own copy with its own Message-ID.
    display_name: Annotated[str, StringConstraints(max_length=200)] = ""
    personalized_emails: bool = False
    auto_reply: AutoReplySettings = AutoReplySettings()
    # The HTML template every message of the account is sent in (README "Templates and merge
    # codes"), its signature, the language of its fixed texts and the zone of its dates.
    template_file: Path | None = None
    signature: str = ""
    language: Literal["en", "de", "sv", "fr", "es"] = "en"
    time_zone: Annotated[str, AfterValidator(_time_zone)] = "UTC"

    def own_addresses(self) -> frozenset[str]:
        """The account's address and its aliases: one identity."""
        return frozenset((self.address, *self.aliases))

    @model_validator(mode="after")
    def _oauth_subject(self) -> AccountSettings:
        # Google domain-wide delegation acts as the mailbox: subject defaults to the address.
        if self.auth.flow == "service_account" and self.auth.subject is None:
            object.__setattr__(self.auth, "subject", self.address)
        return self

    @property
    def login_name(self) -> str:
        """Who logs in: auth.username (password), else the mailbox (XOAUTH2 user=)."""
        if self.auth.is_oauth or self.auth.username is None:
            return self.address
        return self.auth.username

    def token_cache_path(self, database: Path | None = None) -> Path:
        """auth.token_cache, else tokens/NAME.json beside ``database`` (or the state dir)."""
        if self.auth.token_cache is not None:
            return self.auth.token_cache
        base = (
            database.parent
            if database is not None
            else Path(os.environ.get("STATE_DIRECTORY", "/var/lib/mailbridge").split(":")[0])
        )
        return base / "tokens" / f"{self.name}.json"


class LimitSettings(_Model):
    attachment_max_size_mb: Annotated[float, Field(gt=0, le=10_000)] = 25.0
    # RFC822.SIZE, read before the download: a larger message goes to Failed without its bytes.
    message_max_size_mb: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    fetch_batch_size: Annotated[int, Field(ge=1, le=1000)] = 100
    # Bytes per UID FETCH (and per transaction): with the batch read ahead, about twice this
    # much raw mail is in memory at once, whatever the message count.
    fetch_batch_max_mb: Annotated[float, Field(gt=0, le=10_000)] = 50.0
    # Inbox mail older than a day above this count is a backlog worth a warning; 0: never warn.
    backlog_warning: Annotated[int, Field(ge=0)] = 1000

    @property
    def max_message_bytes(self) -> int:
        """The attachment limit in bytes (decoded attachments of one message, checked by the
        parser)."""
        return int(self.attachment_max_size_mb * 1024 * 1024)

    @property
    def message_max_bytes(self) -> int:
        """The raw message size limit in bytes (RFC822.SIZE, checked before fetching)."""
        return int(self.message_max_size_mb * 1024 * 1024)

    @property
    def fetch_batch_max_bytes(self) -> int:
        return int(self.fetch_batch_max_mb * 1024 * 1024)


class OutboxSettings(_Model):
    """Sending from the ``outbox`` table (see README "The outbox")."""

    # A row still failing temporarily (4xx, connection lost) this long after it was queued
    # fails for good (code send_expired); 72 hours as a mail server's queue lifetime.
    max_age_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 72.0
    # Temporary failures are retried after first_retry_seconds, doubling up to
    # max_retry_seconds (hourly).
    first_retry_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    max_retry_seconds: Annotated[float, Field(ge=1, le=86400)] = 3600.0
    # An outgoing message (attachments included, as encoded) over this size fails before sending.
    max_outgoing_size_mb: Annotated[float, Field(gt=0, le=1000)] = 25.0
    # Directories attachments may be read from by path (outboxattachment.path). None by default:
    # a row must not be able to mail out any file the daemon can read (its password files).
    attachment_directories: tuple[Path, ...] = ()

    @property
    def max_outgoing_bytes(self) -> int:
        return int(self.max_outgoing_size_mb * 1024 * 1024)


class LoopProtectionSettings(_Model):
    """At most max_auto_replies automatic replies to one sender within window_hours."""

    max_auto_replies: Annotated[int, Field(ge=0, le=1000)] = 3
    window_hours: Annotated[float, Field(gt=0, le=24 * 365)] = 24.0


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON


def _listen_address(value: str) -> str:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6): where the metrics endpoint listens."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464)")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{value!r}: an IPv6 address goes in brackets, e.g. [::1]:9464")
    elif ":" in host or not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise ValueError(f"{value!r}: the host must be an address or a name, e.g. 127.0.0.1")
    return value


class MetricsSettings(_Model):
    """The opt-in Prometheus endpoint (``GET /metrics``); plain HTTP without authentication,
    so keep it on loopback or a monitoring network."""

    listen: Annotated[str, AfterValidator(_listen_address)]

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _cron(value: str) -> str:
    from croniter import croniter  # only needed when the key is given or the sweep is scheduled

    if not croniter.is_valid(value):
        raise ValueError(
            f"{value!r} is not a cron expression (five fields: minute hour day month weekday, "
            "and an optional sixth for seconds; e.g. '*/20 * * * *')"
        )
    return value


class RecoverySettings(_Model):
    """The recovery sweep: retry the Failed folder and import Inbox mail the live loop missed."""

    enabled: bool = True
    # Five-field cron, in the host's local time zone (like crontab).
    schedule: Annotated[str, AfterValidator(_cron)] = "*/20 * * * *"
    # Failed mail older than this is left alone: an operator handles it with 'failed retry'.
    max_failed_age_days: Annotated[float, Field(gt=0, le=3650)] = 1.0
    # Unseen Inbox mail younger than this belongs to the live loop; fractions are allowed.
    grace_period_minutes: Annotated[float, Field(ge=0, le=1440)] = 2.0


class ClusterSettings(_Model):
    """Several daemons sharing one PostgreSQL database (unused with SQLite: one daemon)."""

    # How long an account's lease lasts without renewal: a daemon that dies has its accounts
    # taken over by the others within this time. Renewed every third of it.
    lease_seconds: Annotated[float, Field(ge=5, le=3600)] = 30.0


_DATABASE_SECRETS = (
    "database_password_file",
    "database_password_env",
    "database_password_credential",
)


# SQLite's keywords (https://sqlite.org/lang_keywords.html). A table or column named after one
# would need quoting in every integrator's query, so configured identifiers may not use them.
_SQL_KEYWORDS_TEXT = """
    abort action add after all alter always analyze and as asc attach autoincrement before
    begin between by cascade case cast check collate column commit conflict constraint create
    cross current current_date current_time current_timestamp database default deferrable
    deferred delete desc detach distinct do drop each else end escape except exclude exclusive
    exists explain fail filter first following for foreign from full generated glob group groups
    having if ignore immediate in index indexed initially inner insert instead intersect into is
    isnull join key last left like limit match materialized natural no not nothing notnull null
    nulls of offset on or order others outer over partition plan pragma preceding primary query
    raise range recursive references regexp reindex release rename replace restrict returning
    right rollback row rows savepoint select set table temp temporary then ties to transaction
    trigger unbounded union unique update using vacuum values view virtual when where window with
    without"""
SQL_KEYWORDS: frozenset[str] = frozenset(_SQL_KEYWORDS_TEXT.split())


def _not_keyword(value: str) -> str:
    if value in SQL_KEYWORDS:
        raise ValueError(f"{value!r} is an SQL keyword; choose another name")
    return value


# Table and column names from the config end up in SQL (quoted, but still): only plain
# lower-case identifiers are accepted, so no quoting trick or keyword can reach a statement.
Identifier = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[a-z_][a-z0-9_]*$", max_length=63),
    AfterValidator(_not_keyword),
]
Identification = Literal["message_id", "plus_address", "subject"]
MessageProperty = Literal[
    "subject",
    "plain_text",
    "html",
    "from_address",
    "from_name",
    "date",
    "account",
    "message_id",
    "to_addresses",
]


def _search_path(value: str) -> str:
    table, dot, column = value.partition(".")
    if not dot:
        raise ValueError(f"expected table.column, got {value!r}")
    for part in (table, column):
        _not_keyword(part)
    return value


SearchPath = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, pattern=r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$", max_length=127
    ),
    AfterValidator(_search_path),
]


class FollowerParentSettings(_Model):
    """A table the integrator fills (``person``, ``coworker``); followers link to its rows."""

    table: Identifier
    address_column: Identifier = "email"
    name_column: Identifier | None = "name"


class ParentPropertySettings(_Model):
    """One column of a conversation parent's new record and where its value comes from."""

    column: Identifier
    message_property: MessageProperty | None = None
    search_path: SearchPath | None = None
    default: str | int | float | bool | None = None

    @model_validator(mode="after")
    def _has_source(self) -> ParentPropertySettings:
        if self.message_property is None and self.search_path is None and self.default is None:
            raise ValueError("give message_property, search_path or default (or a combination)")
        if self.column == "id":
            raise ValueError("column 'id' is the record's own id; it cannot be set")
        return self

    @property
    def search_table(self) -> str | None:
        return self.search_path.partition(".")[0] if self.search_path else None

    @property
    def search_column(self) -> str | None:
        return self.search_path.partition(".")[2] if self.search_path else None


class ConversationParentSettings(_Model):
    """A table that gets a new record for every new conversation (``ticket``, ``deal``)."""

    table: Identifier
    accounts: tuple[AccountName, ...] | None = None  # None: every account
    properties: tuple[ParentPropertySettings, ...] = ()

    @field_validator("properties")
    @classmethod
    def _unique_columns(
        cls, properties: tuple[ParentPropertySettings, ...]
    ) -> tuple[ParentPropertySettings, ...]:
        seen: set[str] = set()
        for prop in properties:
            if prop.column in seen:
                raise ValueError(f"column {prop.column!r} is set twice")
            seen.add(prop.column)
        return properties

    def applies_to(self, account: str) -> bool:
        return self.accounts is None or account in self.accounts


# libpq connection parameters an operator may add to the URL's query (TLS, time-outs).
_URL_PARAMETERS = frozenset(
    {"sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name"}
)
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


class PostgresUrl(_Model):
    """``database: postgresql://user@host:port/dbname`` (a PostgreSQL database for a fleet).

    The password never sits in the URL (it would show in ``status`` and in logs): it comes from
    ``database_password_file``, ``_env`` or ``_credential``. TLS is verified by default
    (``sslmode=verify-full`` against the system's CAs) unless the host is the loopback
    interface or a Unix socket directory; ``?sslmode=...`` overrides it.
    """

    user: str
    host: str
    port: Port = 5432
    dbname: str
    parameters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> PostgresUrl:
        """Raises ValueError saying what is wrong with ``text``."""
        parts = urlsplit(text)
        if parts.password is not None:
            raise ValueError(
                "do not put the password in the URL; give it with database_password_file, "
                "database_password_env or database_password_credential"
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"the port in {text!r} is not a number from 1 to 65535") from exc
        host = unquote(parts.hostname or "")
        # hostname is lower-cased by urlsplit; a socket directory keeps its case.
        if parts.netloc.rpartition("@")[2].startswith("%2F"):
            host = unquote(parts.netloc.rpartition("@")[2].partition(":")[0])
        user = unquote(parts.username or "")
        dbname = unquote(parts.path.lstrip("/"))
        missing = [
            n for n, v in (("user", user), ("host", host), ("database name", dbname)) if not v
        ]
        if missing:
            raise ValueError(
                f"{text!r} lacks the {' and '.join(missing)}: "
                "write postgresql://USER@HOST:PORT/DBNAME"
            )
        parameters = tuple(parse_qsl(parts.query, keep_blank_values=True))
        for name, value in parameters:
            if name not in _URL_PARAMETERS:
                allowed = ", ".join(sorted(_URL_PARAMETERS))
                raise ValueError(f"unknown URL parameter {name!r} (allowed: {allowed})")
            if name == "sslmode" and value not in _SSLMODES:
                raise ValueError(f"sslmode must be one of {', '.join(_SSLMODES)}, got {value!r}")
        return cls(user=user, host=host, port=port or 5432, dbname=dbname, parameters=parameters)

    @property
    def local(self) -> bool:
        """The loopback interface or a Unix socket directory: no network to protect."""
        if self.host.startswith("/") or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def connection_parameters(self) -> dict[str, str]:
        """libpq keyword parameters (no password), with the TLS default filled in."""
        given = dict(self.parameters)
        if "sslmode" not in given and not self.local:
            given["sslmode"] = "verify-full"
            given.setdefault("sslrootcert", "system")
        return {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.dbname,
            **given,
        }

    @property
    def tls_verified(self) -> bool:
        return self.local or self.connection_parameters()["sslmode"] in ("verify-ca", "verify-full")

    def __str__(self) -> str:
        host = quote(self.host, safe="") if self.host.startswith("/") else self.host
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        query = f"?{urlencode(self.parameters)}" if self.parameters else ""
        return f"postgresql://{quote(self.user, safe='')}@{host}:{self.port}/{self.dbname}{query}"


def _database(value: object) -> object:
    """A ``postgresql://`` URL becomes a PostgresUrl; anything else is a SQLite file path."""
    if isinstance(value, str) and re.match(r"^postgres(ql)?://", value.strip()):
        return PostgresUrl.parse(value.strip())
    if isinstance(value, str) and re.match(r"^[a-z][a-z0-9+.-]*://", value.strip()):
        raise ValueError(
            f"{value!r}: only postgresql:// URLs are supported (or a SQLite file path)"
        )
    return value


Database = Annotated[PostgresUrl | Path, BeforeValidator(_database)]


class Settings(_Model):
    # A SQLite file path (the default), or a postgresql:// URL (several daemons, one database).
    database: Database = Path("/var/lib/mailbridge/mailbridge.db")
    # The PostgreSQL password, from one of these (none: libpq's own ways, e.g. peer or .pgpass).
    database_password_file: Path | None = None
    database_password_env: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    # a systemd credential name (LoadCredential=)
    database_password_credential: (
        Annotated[str, StringConstraints(strip_whitespace=True)] | None
    ) = None
    cluster: ClusterSettings = ClusterSettings()
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()
    recovery: RecoverySettings = RecoverySettings()
    outbox: OutboxSettings = OutboxSettings()
    loop_protection: LoopProtectionSettings = LoopProtectionSettings()
    metrics: MetricsSettings | None = None  # None: no metrics endpoint
    identification: Identification = "message_id"
    # What becomes of automatic mail (out-of-office, notifications, lists): the reference's
    # "import automatic emails even if conversation not found" = false is the default.
    automatic_emails: AutomaticEmails = "import_if_conversation_exists"
    bots: BotSettings = BotSettings()
    follower_parents: tuple[FollowerParentSettings, ...] = ()
    conversation_parents: tuple[ConversationParentSettings, ...] = ()
    accounts: tuple[AccountSettings, ...]
    source: Path | None = Field(default=None, exclude=True)  # the file it came from

    # A field validator (not a model validator) so the error's path is "accounts", not the top.
    @field_validator("accounts")
    @classmethod
    def _unique_names(cls, accounts: tuple[AccountSettings, ...]) -> tuple[AccountSettings, ...]:
        if not accounts:
            raise ValueError("list at least one account")
        seen: set[str] = set()
        for account in accounts:
            if account.name in seen:
                raise ValueError(f"account name {account.name!r} is used twice")
            seen.add(account.name)
        return accounts

    def automatic_policy(self, account: AccountSettings) -> AutomaticPolicy:
        """The account's automatic-mail policy: its own ``automatic_emails`` else the global
        one; its ``bots`` lists consulted before the global ones."""
        levels = [b for b in (account.bots, self.bots) if b is not None]
        return AutomaticPolicy(
            automatic_emails=account.automatic_emails or self.automatic_emails,
            bots=tuple(BotLists(allow=b.allow, deny=b.deny) for b in levels),
        )

    @model_validator(mode="after")
    def _database_password(self) -> Settings:
        given = [k for k in _DATABASE_SECRETS if getattr(self, k) is not None]
        if given and not isinstance(self.database, PostgresUrl):
            raise ValueError(
                f"{given[0]}: a password is only for a postgresql:// database "
                "(a SQLite file needs none)"
            )
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(given)}")
        return self

    @property
    def postgres(self) -> PostgresUrl | None:
        """The PostgreSQL database, or None when ``database`` is a SQLite file."""
        return self.database if isinstance(self.database, PostgresUrl) else None

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None when ``database`` is a PostgreSQL URL."""
        return self.database if isinstance(self.database, Path) else None

    def database_password(self) -> str | None:
        """Read the PostgreSQL password now (None when no source is configured). Raises
        ConfigError(code=secret_missing) naming the key; the value is registered with the log
        redactor, so it is masked in any log line."""
        if all(getattr(self, k) is None for k in _DATABASE_SECRETS):
            return None
        try:
            value = read_secret(
                file=self.database_password_file,
                env=self.database_password_env,
                credential=self.database_password_credential,
                key="database_password",
            )
        except ConfigError as exc:  # the message names the key: it is a top-level one
            raise ConfigError(f"{exc.path}: {exc}", path=exc.path, code=exc.code) from exc
        register_secret(value)
        return value

    @model_validator(mode="after")
    def _token_caches(self) -> Settings:
        # OAuth2 token caches default to tokens/NAME.json beside the database (owner-only).
        for account in self.accounts:
            if account.auth.is_oauth and account.auth.token_cache is None:
                path = account.token_cache_path(self.sqlite_path)
                object.__setattr__(account.auth, "token_cache", path)
        return self

    def account(self, name: str) -> AccountSettings:
        for account in self.accounts:
            if account.name == name:
                return account
        names = ", ".join(sorted(a.name for a in self.accounts))
        raise ConfigError(
            f"no account named {name!r} (configured: {names})",
            path="accounts",
            code="account_unknown",
        )


def _format_loc(loc: tuple[int | str, ...], data: object) -> str:
    """Render pydantic's error location as a key path, walking the input alongside it.

    pydantic mixes type tags ('int', 'function-after[...]') into ``loc``; they mean nothing to
    users. Walking the input tells keys from tags whatever their spelling, so an unknown key such
    as ``Port`` or ``imap2`` is named exactly as the user wrote it.
    """
    out = ""
    node: object = data
    for part in loc:
        if isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
        elif isinstance(node, dict) and part in node:
            out += f".{part}" if out else str(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and re.fullmatch(r"[a-z_]+", part):
            # a field missing from the input (error type 'missing')
            out += f".{part}" if out else part
            node = None
        # anything else is a pydantic tag: skip it and stay at the same place in the input
    return out or "(top level)"


def _explain(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling against config.example.yaml)"
    if kind == "missing":
        return "required key is missing"
    given = error.get("input")
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return f"expected a whole number, got {given!r}"
    if kind in {"float_parsing", "float_type"}:
        return f"expected a number, got {given!r}"
    if kind in {"bool_parsing", "bool_type"}:
        return f"expected true or false, got {given!r}"
    if kind in {"string_type"}:
        return f"expected text, got {given!r}"
    if kind in {"list_type", "tuple_type", "set_type"}:
        return f"expected a list (YAML: [a, b] or one '- item' per line), got {given!r}"
    if kind in {"dict_type", "model_type", "model_attributes_type"}:
        return f"expected a mapping (key: value lines), got {given!r}"
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}:
        return f"{error['msg'].lower()}, got {error.get('input')!r}"
    if kind == "literal_error":
        given = error.get("input")
        if isinstance(given, bool):
            # YAML 1.1 reads yes/no/on/off/true/false as booleans, so `tls: yes` never arrives
            # as the word the operator typed: say so instead of the bare "got True".
            return (
                f"{error['msg'].lower()}, got the YAML boolean {str(given).lower()} "
                "(yes/no/on/off/true/false are booleans in YAML: write one of the words above)"
            )
        return f"{error['msg'].lower()}, got {given!r}"
    if kind == "string_pattern_mismatch":
        return f"not a valid value: {error.get('input')!r}"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _located(path: str, why: str) -> tuple[str, str]:
    """A check of the whole file that names its key first (``database_password_file: a
    password is only for ...``) is located at that key, not at ``(top level)``."""
    if path == "(top level)":
        key, sep, rest = why.partition(": ")
        if sep and key in Settings.model_fields:
            return key, rest
    return path, why


def parse_config(data: object, *, source: Path | None = None) -> Settings:
    """Validate already-loaded YAML data. Raises ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping (key: value)", path="(top level)")
    if "source" in data:  # an internal field; in the file it is as unknown as any typo
        raise ConfigError("source: unknown key", path="source")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = [_located(_format_loc(e["loc"], data), _explain(e)) for e in exc.errors()]
        first_path = problems[0][0] if problems else ""
        text = "; ".join(f"{path}: {why}" for path, why in problems)
        raise ConfigError(text, path=first_path) from exc
    check_model(settings)
    check_templates(settings)
    # Set after validation so the file cannot set it (model_copy does not re-validate).
    return settings.model_copy(update={"source": source})


def check_model(settings: Settings) -> None:
    """Cross-checks of the conversation model that no single key can make; ConfigError names
    the key path. What depends on the database (an existing table's columns) is checked when
    the repository prepares it at start-up."""
    own_tables = set(TABLES)
    follower_tables: set[str] = set()
    for i, fp in enumerate(settings.follower_parents):
        path = f"follower_parents[{i}].table"
        if fp.table in own_tables:
            raise ConfigError(f"{path}: {fp.table!r} is one of mailbridge's tables", path=path)
        if fp.table in FOLLOWER_COLUMNS:
            raise ConfigError(
                f"{path}: {fp.table!r} collides with the column follower.{fp.table}", path=path
            )
        if fp.table in follower_tables:
            raise ConfigError(f"{path}: {fp.table!r} is listed twice", path=path)
        if fp.address_column == "id" or fp.name_column == "id":
            key = "address_column" if fp.address_column == "id" else "name_column"
            where = f"follower_parents[{i}].{key}"
            raise ConfigError(f"{where}: 'id' is the record's own id", path=where)
        follower_tables.add(fp.table)
    names = {a.name for a in settings.accounts}
    parent_tables: set[str] = set()
    for i, cp in enumerate(settings.conversation_parents):
        path = f"conversation_parents[{i}].table"
        if cp.table in own_tables or cp.table in follower_tables:
            kind = "mailbridge's tables" if cp.table in own_tables else "the follower_parents"
            raise ConfigError(f"{path}: {cp.table!r} is one of {kind}", path=path)
        if cp.table in CONVERSATION_COLUMNS:
            raise ConfigError(
                f"{path}: {cp.table!r} collides with the column conversation.{cp.table}",
                path=path,
            )
        if cp.table in parent_tables:
            raise ConfigError(f"{path}: {cp.table!r} is listed twice", path=path)
        parent_tables.add(cp.table)
        for j, name in enumerate(cp.accounts or ()):
            if name not in names:
                where = f"conversation_parents[{i}].accounts[{j}]"
                configured = ", ".join(sorted(names))
                raise ConfigError(
                    f"{where}: no account named {name!r} (configured: {configured})", path=where
                )
        for j, prop in enumerate(cp.properties):
            where = f"conversation_parents[{i}].properties[{j}].search_path"
            table = prop.search_table
            if table is None:
                continue
            if table in own_tables:
                raise ConfigError(f"{where}: {table!r} is one of mailbridge's tables", path=where)
            if prop.message_property is None and table not in follower_tables:
                raise ConfigError(
                    f"{where}: without message_property, {table!r} must be one of the "
                    "follower_parents tables (its row is found by the sender's address)",
                    path=where,
                )


def check_templates(settings: Settings) -> None:
    """Every account's template file readable and using only known merge codes (plus the
    configured parent tables), and the same for its automatic reply's body; ConfigError
    naming the key, the template and the code (exit 78)."""
    tables = {p.table for p in settings.conversation_parents} | {
        p.table for p in settings.follower_parents
    }
    for i, account in enumerate(settings.accounts):
        sources: list[tuple[str, str, str]] = []
        if account.template_file is not None:
            key = f"accounts[{i}].template_file"
            try:
                text = account.template_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"{key}: cannot read {account.template_file}: {exc.strerror}", path=key
                ) from exc
            sources.append((key, str(account.template_file), text))
        for field in ("body_text", "body_html"):
            body = getattr(account.auto_reply, field)
            if body is not None:
                key = f"accounts[{i}].auto_reply.{field}"
                sources.append((key, key, body))
        for key, name, text in sources:
            # Jinja2 is imported only when a template is configured (start-up time).
            from mailbridge.core.templates import unknown_codes

            try:
                unknown = unknown_codes(text, tables)
            except ValueError as exc:
                raise ConfigError(
                    f"{key}: template {name} does not parse: {exc}", path=key
                ) from exc
            if unknown:
                codes = ", ".join(f"{{{{ {code} }}}}" for code in unknown)
                raise ConfigError(
                    f"{key}: template {name} uses unknown merge code {codes}; known: the merge "
                    "codes listed in README 'Templates and merge codes', body, signature, "
                    "subject and the configured parent tables",
                    path=key,
                )


def load_config(path: Path | str | None = None) -> Settings:
    """Read and validate the config file (``-c``, else $MAILBRIDGE_CONFIG, else /etc/...)."""
    resolved = resolve_config_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {resolved} does not exist (pass -c FILE or set {CONFIG_ENV})",
            path=str(resolved),
            code="config_missing",
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"cannot read {resolved}: {exc.strerror}", path=str(resolved), code="config_missing"
        ) from exc
    try:
        data = _safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"{resolved}{where}: {problem}", path=str(resolved), code="config_syntax"
        ) from exc
    return parse_config(data, source=resolved)


def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` with libyaml's parser when PyYAML has it (``CSafeLoader``: the same
    constructors, ~10x faster; a 10,000-account config took seconds of start-up in pure
    Python). A document it refuses is read again by the pure-Python parser, whose error
    (problem and line) the operator is shown, as before."""
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            return yaml.load(text, Loader=loader)  # noqa: S506 - CSafeLoader is the safe loader
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def resolve_config_path(path: Path | str | None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH
