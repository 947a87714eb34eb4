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
from mailbridge.errors import ConfigError
from mailbridge.log import register_secret
from mailbridge.store.schema import CONVERSATION_COLUMNS, FOLLOWER_COLUMNS, TABLES

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

    @model_validator(mode="after")
    def _default_port(self) -> SmtpSettings:
        if self.port is None:
            ports = {"implicit": 465, "starttls": 587, "none": 25}
            object.__setattr__(self, "port", ports[self.tls])
        return self


class AuthSettings(_Model):
    """How to log in. Exactly one secret source for ``method: password``."""

    # A password may begin or end with spaces; the model-wide stripping must not touch it, so it
    # is switched off here and asked for per field instead.
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    method: Literal["password"] = "password"
    username: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None
    # a systemd credential name (LoadCredential=)
    password_credential: Annotated[str, StringConstraints(strip_whitespace=True)] | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> AuthSettings:
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

    def secret_source(self) -> str:
        """Where the secret comes from, for messages (never the secret itself)."""
        if self.password is not None:
            return "auth.password"
        if self.password_file is not None:
            return f"password_file {self.password_file}"
        if self.password_env is not None:
            return f"environment variable {self.password_env}"
        return f"systemd credential {self.password_credential}"

    def secret(self) -> str:
        """Read the secret now. Raises ConfigError(code=secret_missing) naming the source.

        The value is registered with the log redactor, so it is masked in any log line,
        including third-party debug output such as aioimaplib's echo of LOGIN.
        """
        value = self._read_secret()
        register_secret(value)
        return value

    def _read_secret(self) -> str:
        if self.password is not None:
            return self.password.get_secret_value()
        return read_secret(
            file=self.password_file,
            env=self.password_env,
            credential=self.password_credential,
            key="auth.password",
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

    @model_validator(mode="after")
    def _distinct(self) -> FolderSettings:
        names = [self.inbox, self.processed, self.failed]
        if len({n.casefold() for n in names}) != 3:
            raise ValueError("inbox, processed and failed must be three different folders")
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
    idle_timeout_seconds: Annotated[float, Field(ge=1, le=29 * 60)] = 25 * 60.0
    enabled: bool = True
    # Per-account overrides of the global keys of the same names (None: the global value).
    automatic_emails: AutomaticEmails | None = None
    bots: BotSettings | None = None

    def own_addresses(self) -> frozenset[str]:
        """The account's address and its aliases: one identity."""
        return frozenset((self.address, *self.aliases))


class LimitSettings(_Model):
    attachment_max_size_mb: Annotated[float, Field(gt=0, le=10_000)] = 25.0
    fetch_batch_size: Annotated[int, Field(ge=1, le=1000)] = 100

    @property
    def max_message_bytes(self) -> int:
        return int(self.attachment_max_size_mb * 1024 * 1024)


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, else JSON


def _cron(value: str) -> str:
    from croniter import croniter  # only needed when the key is given or the sweep is scheduled

    if not croniter.is_valid(value):
        raise ValueError(
            f"{value!r} is not a cron expression (five fields: minute hour day month weekday, "
            "e.g. '*/20 * * * *')"
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

    def account(self, name: str) -> AccountSettings:
        for account in self.accounts:
            if account.name == name:
                return account
        names = ", ".join(a.name for a in self.accounts)
        raise ConfigError(f"no account named {name!r} (configured: {names})", path="accounts")


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
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return f"expected a whole number, got {error.get('input')!r}"
    if kind in {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}:
        return f"{error['msg'].lower()}, got {error.get('input')!r}"
    if kind == "literal_error":
        return f"{error['msg'].lower()}, got {error.get('input')!r}"
    if kind == "string_pattern_mismatch":
        return f"not a valid value: {error.get('input')!r}"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def parse_config(data: object, *, source: Path | None = None) -> Settings:
    """Validate already-loaded YAML data. Raises ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping (key: value)", path="(top level)")
    if "source" in data:  # an internal field; in the file it is as unknown as any typo
        raise ConfigError("source: unknown key", path="source")
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = [(_format_loc(e["loc"], data), _explain(e)) for e in exc.errors()]
        first_path = problems[0][0] if problems else ""
        text = "; ".join(f"{path}: {why}" for path, why in problems)
        raise ConfigError(text, path=first_path) from exc
    check_model(settings)
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


def load_config(path: Path | str | None = None) -> Settings:
    """Read and validate the config file (``-c``, else $MAILBRIDGE_CONFIG, else /etc/...)."""
    resolved = resolve_config_path(path)
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {resolved} does not exist (pass -c FILE or set {CONFIG_ENV})",
            path=str(resolved),
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {resolved}: {exc.strerror}", path=str(resolved)) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{resolved}{where}: {problem}", path=str(resolved)) from exc
    return parse_config(data, source=resolved)


def resolve_config_path(path: Path | str | None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH
