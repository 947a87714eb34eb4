"""Shared fixtures: one real Dovecot and one throwaway PostgreSQL per test session; a fresh IMAP
user and a fresh database per test.

Starting and stopping Dovecot costs seconds, so ``dovecot`` (plain + STARTTLS-less) and
``tls_dovecot`` (STARTTLS and implicit TLS with a throwaway CA) are session-scoped; tests are
isolated by ``imap_user``, which creates a new user (with its own empty mailbox) every time.
A missing Dovecot is a failure with instructions, never a silent skip.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailbridge.testing.dovecot import Dovecot, DovecotNotInstalledError, find_binaries
from mailbridge.testing.postgres import PostgresCluster, PostgresNotInstalledError, find_bindir

_user_numbers = itertools.count(1)
_database_numbers = itertools.count(1)


@dataclass(frozen=True, slots=True)
class ImapUser:
    """A Dovecot test user: log in with ``login``/``password``; mail goes to ``address``."""

    login: str
    password: str
    address: str


@pytest.fixture(autouse=True)
def _no_ambient_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands' tables are as wide as ``COLUMNS`` says; a terminal's value must not narrow them."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture(autouse=True)
def _detach_cli_log_handler() -> Iterator[None]:
    """Undo what a CLI test's ``configure_logging(stream=sys.stderr)`` left on the root logger.

    That handler holds the test's capture stream, closed once the test ends; later tests (and
    threads such as aiosmtpd's) would log into it and print "--- Logging error ---" noise.
    """
    yield
    from mailbridge import log as mailbridge_log

    handler = mailbridge_log._handler
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        mailbridge_log._handler = None


def _require_dovecot() -> None:
    try:
        find_binaries()
    except DovecotNotInstalledError as exc:
        pytest.fail(f"{exc} (tests marked 'dovecot' need it)", pytrace=False)


def running_dovecot(name: str, *, tls: bool, kind: type[Dovecot] = Dovecot) -> Iterator[Dovecot]:
    """A throwaway Dovecot (``kind``, for a variant's config) for a fixture to yield."""
    _require_dovecot()
    # Not under pytest's basetemp: every pytest session that starts (another checkout, a
    # colleague's run) resets /tmp/pytest-of-USER to mode 0700, which locks this session's
    # Dovecot processes (users 'dovecot', 'mail') out of their passwd-files and mail store:
    # "Temporary authentication failure" in the middle of a run.
    workdir = Path(tempfile.mkdtemp(prefix=f"mailbridge-{name}-", dir="/tmp"))
    server = kind(workdir, tls=tls)
    server.start()
    try:
        yield server
    finally:
        # Don't wait the ~2.5 s Dovecot takes to exit: the processes finish on their own.
        server.stop(wait=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """A plain-IMAP Dovecot shared by the whole session (``ssl = no``)."""
    yield from running_dovecot("dovecot", tls=False)


@pytest.fixture(scope="session")
def tls_dovecot() -> Iterator[Dovecot]:
    """A Dovecot with STARTTLS on ``port`` and implicit TLS on ``tls_port``; CA in ``ca_file``."""
    yield from running_dovecot("dovecot-tls", tls=True)


def _new_user(server: Dovecot) -> ImapUser:
    login = f"user{next(_user_numbers)}-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    server.add_user(login, password)
    return ImapUser(login=login, password=password, address=f"{login}@example.test")


@pytest.fixture
def imap_user(dovecot: Dovecot) -> ImapUser:
    """A fresh user on ``dovecot`` with an empty INBOX."""
    return _new_user(dovecot)


@pytest.fixture
def tls_imap_user(tls_dovecot: Dovecot) -> ImapUser:
    """A fresh user on ``tls_dovecot``."""
    return _new_user(tls_dovecot)


@pytest.fixture
def path_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket to pass as $NOTIFY_SOCKET, with a 2 s receive timeout. In a short
    directory: AF_UNIX paths are limited to 108 bytes and pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="mb-") as directory:
        address = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(address)
            sock.settimeout(2)
            yield sock, address


@dataclass(frozen=True, slots=True)
class PostgresDatabase:
    """A fresh, empty database on the session's throwaway cluster: connect to ``url`` (no
    password in it) with ``password``."""

    url: str
    password: str
    name: str
    cluster: PostgresCluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster shared by the whole session (never the system one on
    5432). A missing PostgreSQL is a failure with instructions, never a silent skip."""
    try:
        find_bindir()
    except PostgresNotInstalledError as exc:
        pytest.fail(f"{exc} (tests of the PostgreSQL backend need it)", pytrace=False)
    # Under /tmp, not pytest's basetemp: the server runs as 'postgres', which must enter it,
    # and another pytest session resets /tmp/pytest-of-USER to mode 0700 (see running_dovecot).
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-pg-", dir="/tmp"))
    cluster = PostgresCluster(workdir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres: PostgresCluster) -> Iterator[PostgresDatabase]:
    """A new database per test, dropped afterwards (ending any connection left open)."""
    name = f"t{next(_database_numbers)}_{secrets.token_hex(3)}"
    url = postgres.create_database(name)
    yield PostgresDatabase(url=url, password=postgres.password, name=name, cluster=postgres)
    postgres.drop_database(name)
