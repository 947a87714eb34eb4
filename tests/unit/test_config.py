"""Tests for mailbridge.config: defaults, key paths in errors, and the secret sources."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mailbridge.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    load_config,
    parse_config,
    resolve_config_path,
)
from mailbridge.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
accounts:
  - name: support
    address: support@example.com
    imap:
      host: imap.example.com
    auth:
      username: support@example.com
      password_file: {password_file}
"""


@pytest.fixture(autouse=True)
def _no_ambient_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (CONFIG_ENV, "CREDENTIALS_DIRECTORY", "MAILBRIDGE_TEST_PW"):
        monkeypatch.delenv(name, raising=False)


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _account(**overrides: object) -> dict[str, object]:
    account: dict[str, object] = {
        "name": "support",
        "address": "support@example.com",
        "imap": {"host": "imap.example.com"},
        "auth": {"username": "support@example.com", "password": "pw"},
    }
    account.update(overrides)
    return account


def _error(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    secret = tmp_path / "support.pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    path = _write(tmp_path, MINIMAL.format(password_file=secret))

    settings = load_config(path)

    assert settings.source == path
    assert settings.database == Path("/var/lib/mailbridge/mailbridge.db")
    assert settings.log.level == "info"
    assert settings.log.format == "auto"
    assert settings.limits.attachment_max_size_mb == 25.0
    (account,) = settings.accounts
    assert account.imap.tls == "implicit"
    assert account.imap.port == 993
    assert account.imap.verify_certificate is True
    assert account.smtp is None
    assert account.folders.inbox == "INBOX"
    assert account.mode == "idle"
    assert account.auth.secret() == "s3cret"
    assert settings.account("support") is account


def test_starttls_imap_defaults_to_143_and_smtp_to_587_starttls() -> None:
    settings = parse_config(
        {
            "accounts": [
                _account(
                    imap={"host": "imap.example.com", "tls": "starttls"},
                    smtp={"host": "smtp.example.com"},
                )
            ]
        }
    )
    account = settings.accounts[0]
    assert account.imap.port == 143
    assert account.smtp is not None
    assert account.smtp.tls == "starttls"
    assert account.smtp.port == 587


def test_smtp_connections_default_to_three_and_are_bounded() -> None:
    smtp = {"host": "smtp.example.com"}
    settings = parse_config({"accounts": [_account(smtp=smtp)]})
    assert settings.accounts[0].smtp is not None
    assert settings.accounts[0].smtp.connections == 3  # Exchange Online's limit per mailbox
    one = parse_config({"accounts": [_account(smtp={**smtp, "connections": 1})]})
    assert one.accounts[0].smtp is not None
    assert one.accounts[0].smtp.connections == 1
    for wrong in (0, 11, "two", 2.5):
        error = _error({"accounts": [_account(smtp={**smtp, "connections": wrong})]})
        assert error.path == "accounts[0].smtp.connections"
        assert error.code == "config_invalid"


def test_explicit_port_is_kept() -> None:
    settings = parse_config({"accounts": [_account(imap={"host": "h", "port": "10993"})]})
    assert settings.accounts[0].imap.port == 10993


def test_bad_port_names_path_and_key() -> None:
    error = _error({"accounts": [_account(imap={"host": "h", "port": "not-a-port"})]})
    assert error.path == "accounts[0].imap.port"
    assert "port" in str(error)
    assert "not-a-port" in str(error)
    assert error.code == "config_invalid"


@pytest.mark.parametrize(
    ("top", "path", "said"),
    [
        ({"cluster": {"lease_seconds": "ten"}}, "cluster.lease_seconds", "expected a number"),
        (
            {"outbox": {"attachment_directories": "/srv"}},
            "outbox.attachment_directories",
            "expected a list",
        ),
        ({"recovery": {"enabled": "maybe"}}, "recovery.enabled", "expected true or false"),
        ({"limits": "big"}, "limits", "expected a mapping"),
    ],
)
def test_a_value_of_the_wrong_kind_is_said_in_plain_words(
    top: dict[str, object], path: str, said: str
) -> None:
    error = _error({"accounts": [_account()], **top})
    assert error.path == path
    assert said in str(error)
    assert "Input should be" not in str(error)  # pydantic's own wording


@pytest.mark.parametrize("key", ["prot", "Port", "port2"])
def test_unknown_key_is_named_with_its_path(key: str) -> None:
    error = _error({"accounts": [_account(imap={"host": "h", key: 993})]})
    assert error.path == f"accounts[0].imap.{key}"
    assert f"accounts[0].imap.{key}" in str(error)
    assert "unknown key" in str(error)


def test_unknown_top_level_key_including_internal_source() -> None:
    assert _error({"accounts": [_account()], "databse": "/x"}).path == "databse"
    assert _error({"accounts": [_account()], "source": "/x"}).path == "source"


def test_missing_key_is_named() -> None:
    error = _error({"accounts": [_account(imap={})]})
    assert error.path == "accounts[0].imap.host"
    assert "missing" in str(error)


def test_two_accounts_with_the_same_name() -> None:
    error = _error({"accounts": [_account(), _account(address="other@example.com")]})
    assert error.path == "accounts"
    assert "'support'" in str(error)
    assert "twice" in str(error)


def test_no_accounts() -> None:
    assert _error({"accounts": []}).path == "accounts"


@pytest.mark.parametrize(
    "auth",
    [
        {"username": "u"},
        {"username": "u", "password": "pw", "password_env": "MAILBRIDGE_TEST_PW"},
        {"username": "u", "password_file": "/a", "password_credential": "support"},
    ],
)
def test_exactly_one_secret(auth: dict[str, str]) -> None:
    error = _error({"accounts": [_account(auth=auth)]})
    assert error.path == "accounts[0].auth"
    assert "exactly one of" in str(error)
    for given in set(auth) - {"username"}:
        assert given in str(error)


def test_password_file_strips_only_the_trailing_newline(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(" spaces kept \n", encoding="utf-8")
    settings = parse_config(
        {"accounts": [_account(auth={"username": "u", "password_file": secret})]}
    )
    assert settings.accounts[0].auth.secret() == " spaces kept "


def test_inline_password_keeps_its_spaces() -> None:
    # The model strips whitespace from strings; a password must not be changed by that.
    settings = parse_config({"accounts": [_account(auth={"username": " u ", "password": " pw "})]})
    auth = settings.accounts[0].auth
    assert auth.secret() == " pw "
    assert auth.username == "u"
    assert "pw" not in repr(settings)  # SecretStr keeps it out of reprs


def test_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_config(
        {"accounts": [_account(auth={"username": "u", "password_env": "MAILBRIDGE_TEST_PW"})]}
    )
    auth = settings.accounts[0].auth
    with pytest.raises(ConfigError) as info:
        auth.secret()
    assert info.value.code == "secret_missing"
    assert "MAILBRIDGE_TEST_PW" in str(info.value)

    monkeypatch.setenv("MAILBRIDGE_TEST_PW", "from-env")
    assert auth.secret() == "from-env"


def test_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_config(
        {"accounts": [_account(auth={"username": "u", "password_credential": "support.pw"})]}
    )
    auth = settings.accounts[0].auth
    with pytest.raises(ConfigError) as info:
        auth.secret()
    assert info.value.code == "secret_missing"
    assert "CREDENTIALS_DIRECTORY" in str(info.value)

    (tmp_path / "support.pw").write_text("from-credential\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert auth.secret() == "from-credential"


def test_missing_secret_file_is_secret_missing_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pw"
    settings = parse_config(
        {"accounts": [_account(auth={"username": "u", "password_file": missing})]}
    )
    with pytest.raises(ConfigError) as info:
        settings.accounts[0].auth.secret()
    assert info.value.code == "secret_missing"
    assert str(missing) in str(info.value)
    assert info.value.path == "auth.password_file"


def test_empty_secret_file_is_secret_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pw"
    empty.write_text("\n", encoding="utf-8")
    settings = parse_config(
        {"accounts": [_account(auth={"username": "u", "password_file": empty})]}
    )
    with pytest.raises(ConfigError) as info:
        settings.accounts[0].auth.secret()
    assert info.value.code == "secret_missing"


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        accounts:
          - name: support
            imap: {host: imap.example.com
            auth: x
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4" in str(info.value)
    assert str(path) in str(info.value)
    # No key is named: the fix speaks of the YAML, not of "the named key".
    assert info.value.code == "config_syntax"
    assert "line and column" in info.value.remedy


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- just\n- a list\n"))


def test_missing_config_file_names_it_and_the_env_var(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)
    assert CONFIG_ENV in str(info.value)


def test_default_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH

    secret = tmp_path / "pw"
    secret.write_text("x\n", encoding="utf-8")
    from_env = _write(tmp_path, MINIMAL.format(password_file=secret), "env.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    assert resolve_config_path(None) == from_env
    assert load_config().source == from_env

    explicit = tmp_path / "explicit.yaml"
    assert resolve_config_path(explicit) == explicit  # -c beats the environment
    assert resolve_config_path(str(explicit)) == explicit


def test_example_config_loads() -> None:
    example = REPO_ROOT / "config.example.yaml"
    if not example.is_file():
        pytest.skip("config.example.yaml not present")
    settings = load_config(example)
    assert settings.accounts


def test_check_config_warns_about_world_readable_inline_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailbridge.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(
        "database: /tmp/x.db\n"
        "accounts:\n"
        "  - name: support\n"
        "    address: support@example.com\n"
        "    imap: {host: imap.example.com}\n"
        "    auth: {username: u, password: inline-secret}\n"
    )
    path.chmod(0o644)
    assert main(["-c", str(path), "check-config"]) == 0
    err = capsys.readouterr().err
    assert "readable by every user" in err
    assert "support" in err
    assert "inline-secret" not in err

    path.chmod(0o600)
    assert main(["-c", str(path), "check-config"]) == 0
    assert "readable by every user" not in capsys.readouterr().err


# -- database: a SQLite path or a PostgreSQL URL ------------------------------------------------


def test_database_url_is_parsed_without_a_password() -> None:
    settings = parse_config(
        {"database": "postgresql://mailbridge@db.example.com:6432/mail", "accounts": [_account()]}
    )
    url = settings.postgres
    assert url is not None
    assert settings.sqlite_path is None
    assert (url.user, url.host, url.port, url.dbname) == (
        "mailbridge",
        "db.example.com",
        6432,
        "mail",
    )
    assert str(url) == "postgresql://mailbridge@db.example.com:6432/mail"
    # Off the loopback interface, TLS is verified unless the URL says otherwise.
    params = url.connection_parameters()
    assert (params["sslmode"], params["sslrootcert"]) == ("verify-full", "system")
    assert url.tls_verified
    assert settings.database_password() is None  # none configured: libpq's own ways


def test_database_path_is_still_sqlite() -> None:
    settings = parse_config({"database": "/srv/mb/mail.db", "accounts": [_account()]})
    assert settings.sqlite_path == Path("/srv/mb/mail.db")
    assert settings.postgres is None


@pytest.mark.parametrize(
    ("url", "params"),
    [
        ("postgresql://mb@127.0.0.1/mb", {"host": "127.0.0.1", "port": "5432"}),
        ("postgres://mb@localhost:5433/mb", {"host": "localhost", "port": "5433"}),
        ("postgresql://mb@%2Fvar%2Frun%2Fpostgresql/mb", {"host": "/var/run/postgresql"}),
        ("postgresql://mb@db/mb?sslmode=require", {"sslmode": "require"}),
    ],
)
def test_database_url_forms(url: str, params: dict[str, str]) -> None:
    parsed = parse_config({"database": url, "accounts": [_account()]}).postgres
    assert parsed is not None
    got = parsed.connection_parameters()
    assert {k: got[k] for k in params} == params
    if "sslmode" not in params:  # loopback or socket: no TLS default forced
        assert "sslmode" not in got


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("postgresql://mb:secret@db/mb", "do not put the password in the URL"),
        ("postgresql://db/mb", "lacks the user"),
        ("postgresql://mb@db/", "lacks the database name"),
        ("postgresql://mb@db:99999/mb", "port"),
        ("postgresql://mb@db/mb?sslmode=sometimes", "sslmode must be one of"),
        ("postgresql://mb@db/mb?options=-c%20x", "unknown URL parameter 'options'"),
        ("mysql://mb@db/mb", "only postgresql:// URLs"),
    ],
)
def test_bad_database_url_names_the_key(url: str, why: str) -> None:
    error = _error({"database": url, "accounts": [_account()]})
    assert error.path == "database"
    assert why in str(error)
    assert "secret" not in str(error) or "password" in why


def test_database_password_only_for_postgresql_and_only_one() -> None:
    error = _error({"database_password_env": "PGPW", "accounts": [_account()]})
    assert "only for a postgresql:// database" in str(error)
    # Located at its key, named once: not "(top level): database_password_env: ...".
    assert error.path == "database_password_env"
    assert str(error).startswith("database_password_env: a password is only")
    assert str(error).count("database_password_env") == 1
    error = _error(
        {
            "database": "postgresql://mb@db/mb",
            "database_password_env": "PGPW",
            "database_password_file": "/x",
            "accounts": [_account()],
        }
    )
    assert "at most one of" in str(error)


def test_database_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailbridge.log import _secrets

    pw = tmp_path / "db.pw"
    pw.write_text("db-s3cret-1\n", encoding="utf-8")
    url = "postgresql://mb@db/mb"
    base = {"database": url, "accounts": [_account()]}
    assert parse_config({**base, "database_password_file": str(pw)}).database_password() == (
        "db-s3cret-1"
    )
    assert "db-s3cret-1" in _secrets  # masked in every log line from now on
    monkeypatch.setenv("MAILBRIDGE_TEST_PW", "db-s3cret-2")
    settings = parse_config({**base, "database_password_env": "MAILBRIDGE_TEST_PW"})
    assert settings.database_password() == "db-s3cret-2"
    (tmp_path / "dbpw").write_text("db-s3cret-3", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = parse_config({**base, "database_password_credential": "dbpw"})
    assert settings.database_password() == "db-s3cret-3"

    missing = parse_config({**base, "database_password_file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError) as info:
        missing.database_password()
    assert (info.value.path, info.value.code) == ("database_password_file", "secret_missing")


def test_missing_database_password_exits_78_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailbridge.cli import main

    path = _write(
        tmp_path,
        f"""\
        database: postgresql://mb@127.0.0.1:1/mb
        database_password_file: {tmp_path / "absent"}
        accounts:
          - name: support
            address: support@example.com
            imap: {{host: imap.example.com}}
            auth: {{username: u, password: p}}
        """,
    )
    assert main(["-c", str(path), "status"]) == 78
    err = capsys.readouterr().err
    assert "database_password_file" in err
    assert main(["-c", str(path), "check-config"]) == 78
    assert "database_password_file" in capsys.readouterr().err


def test_cluster_lease_seconds_default_and_minimum() -> None:
    assert parse_config({"accounts": [_account()]}).cluster.lease_seconds == 30
    error = _error({"cluster": {"lease_seconds": 2}, "accounts": [_account()]})
    assert error.path == "cluster.lease_seconds"


def test_check_config_warns_about_unverified_database_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailbridge.cli import main

    path = _write(
        tmp_path,
        """\
        database: postgresql://mb@db.example.com/mb?sslmode=require
        accounts:
          - name: support
            address: support@example.com
            imap: {host: imap.example.com}
            auth: {username: u, password_env: MAILBRIDGE_TEST_PW}
        """,
    )
    main(["-c", str(path), "check-config"])
    assert "sslmode=require does not verify the server's certificate" in capsys.readouterr().err


def test_check_config_checks_the_parent_tables_of_an_existing_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config that `status` and `run` refuse (a parent table without a configured column)
    is refused by check-config too, naming the key: its fix says to run check-config."""
    import sqlite3

    from mailbridge.cli import main

    database = tmp_path / "data" / "mailbridge.db"
    database.parent.mkdir()
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE ticket (id INTEGER PRIMARY KEY, title TEXT)")
    conn.commit()
    conn.close()
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {database}\n"
        "conversation_parents:\n"
        "  - table: ticket\n"
        "    properties:\n"
        "      - {column: title, message_property: subject}\n"
        "      - {column: description, message_property: plain_text}\n"
        "accounts:\n"
        "  - name: support\n"
        "    address: support@example.com\n"
        "    imap: {host: imap.example.com}\n"
        "    auth: {username: u, password: check-config-parents-pw}\n"
    )
    path.chmod(0o600)
    assert main(["-c", str(path), "check-config"]) == 78
    err = capsys.readouterr().err
    assert "conversation_parents[0].properties[1].column" in err
    assert "description" in err


def test_a_yaml_boolean_where_a_word_is_expected_is_explained(tmp_path: Path) -> None:
    # `tls: yes` is the boolean true in YAML 1.1; the error must say so, not just "got True".
    password = tmp_path / "pw"
    password.write_text("s3cret")
    text = MINIMAL.format(password_file=password).replace(
        "host: imap.example.com", "host: imap.example.com\n      tls: yes"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    message = str(caught.value)
    assert "accounts[0].imap.tls" in message
    assert "YAML boolean true" in message
    assert "got True" not in message
