"""Contract tests of the Repository protocol, run against every backend.

The ``backend`` fixture (and ``make_repo`` and ``repo`` on it) is parametrised over
:data:`BACKENDS` (SQLite, and PostgreSQL on a throwaway cluster); a backend joins with one
line there. Every
conversation rule is run here through the Repository protocol (threading by each
identification method, late parents, siblings, followers, parents, follower parents,
duplicates, reused ids, ignored own mail, failures), the database read and written beside it
as an integrator would (``Backend.query``/``Backend.execute``). Tests that check SQLite
specifics (file permissions, locking, the raw rows) say so in their names and use
:class:`SqliteRepository` directly. The ``store`` fixture serves the tests of the methods
outside the import path on every backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import make_conninfo

from mailbridge.config import ConversationParentSettings, Identification
from mailbridge.core import planner
from mailbridge.core.html import rewrite_inline_images
from mailbridge.core.identify import plus_address, tag_subject
from mailbridge.core.model import ParsedMessage
from mailbridge.core.policy import AutomaticPolicy
from mailbridge.errors import ConfigError, StoreError
from mailbridge.store import sqlite as sqlite_backend
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import (
    RESOLVED_IMPORTED,
    RESOLVED_REMOVED,
    AccountState,
    ConversationDetail,
    FailureInfo,
    ImportContext,
    ImportItem,
    ImportResult,
    Outcome,
    Repository,
)
from mailbridge.store.postgres import PostgresRepository
from mailbridge.store.schema import (
    MIGRATIONS,
    POSTGRES_NOW,
    SCHEMA_VERSION,
    TABLES,
    for_postgres,
)
from mailbridge.store.sql import SqlRepository
from mailbridge.store.sqlite import SqliteRepository
from mailbridge.testing.postgres import PostgresCluster
from tests.conftest import PostgresDatabase
from tests.unit.factories import (
    COWORKER,
    PERSON,
    TICKET,
    at,
    attachment,
    inline_image,
    message,
    reply,
)

ACCOUNT = "support"
# Mixed case on purpose: the account's identity must not depend on how the config spells it.
OWN = frozenset({"Support@Acme.test", "help@acme.test"})
CTX = ImportContext(ACCOUNT, own_addresses=OWN)

MakeRepo = Callable[[Path], Repository]


class Backend(Protocol):
    """A backend as the contract tests drive it: fresh repositories, and the database read and
    written on a separate connection, as an integrator would (statements with ``?``
    placeholders, in SQL every backend accepts)."""

    def make(self, directory: Path) -> Repository:
        """A fresh, migrated repository (``directory`` is the test's own)."""

    def again(self, repo: Repository) -> Repository:
        """A second repository on the same database (another daemon)."""

    def refusal(self, text: str) -> Exception:
        """The error the database raises when it refuses one row (a constraint)."""

    def query(self, repo: Repository, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Rows of a query, read beside ``repo`` on another connection."""

    def execute(self, repo: Repository, sql: str, *params: object) -> None:
        """One committed statement, written beside ``repo`` on another connection."""


class SqliteBackend:
    def make(self, directory: Path) -> Repository:
        repo = SqliteRepository(directory / "data" / "mailbridge.db")
        repo.migrate()
        return repo

    def again(self, repo: Repository) -> Repository:
        assert isinstance(repo, SqliteRepository)
        return SqliteRepository(repo.path)

    def refusal(self, text: str) -> Exception:
        return sqlite3.IntegrityError(text)

    def query(self, repo: Repository, sql: str, *params: object) -> list[tuple[Any, ...]]:
        assert isinstance(repo, SqliteRepository)
        return raw(repo.path, sql, params)

    def execute(self, repo: Repository, sql: str, *params: object) -> None:
        assert isinstance(repo, SqliteRepository)
        conn = sqlite3.connect(repo.path)
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()


class PostgresBackend:
    """A fresh database on the session's throwaway cluster for each repository."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster
        self.numbers = itertools.count(1)

    def make(self, directory: Path) -> Repository:
        url = self.cluster.create_database(f"contract{next(self.numbers)}")
        repo = PostgresRepository(url, password=self.cluster.password)
        repo.migrate()
        return repo

    def again(self, repo: Repository) -> Repository:
        assert isinstance(repo, PostgresRepository)
        return PostgresRepository(repo.url, password=self.cluster.password)

    def refusal(self, text: str) -> Exception:
        return psycopg.errors.CheckViolation(text)

    def _connect(self, repo: Repository) -> psycopg.Connection[tuple[Any, ...]]:
        assert isinstance(repo, PostgresRepository)
        conninfo = make_conninfo("", **repo.url.connection_parameters())
        return psycopg.connect(conninfo, password=self.cluster.password, autocommit=True)

    def query(self, repo: Repository, sql: str, *params: object) -> list[tuple[Any, ...]]:
        with self._connect(repo) as conn:
            return conn.execute(
                sql.replace("%", "%%").replace("?", "%s").encode(), params
            ).fetchall()

    def execute(self, repo: Repository, sql: str, *params: object) -> None:
        with self._connect(repo) as conn:
            conn.execute(sql.replace("%", "%%").replace("?", "%s").encode(), params)


# Backend name -> how to get one (a fixture request, for backends that need a server fixture).
# A backend joins every contract test with one line here.
BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Backend]] = {
    "sqlite": lambda _request: SqliteBackend(),
    "postgres": lambda request: PostgresBackend(request.getfixturevalue("postgres")),
}


@pytest.fixture(scope="session", params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each backend in turn (session-scoped so that hypothesis tests can use it)."""
    return BACKENDS[str(request.param)](request)


@pytest.fixture(scope="session")
def make_repo(backend: Backend) -> MakeRepo:
    """A factory of fresh, migrated repositories in a given directory."""
    return backend.make


@pytest.fixture
def repo(make_repo: MakeRepo, tmp_path: Path) -> Iterator[Repository]:
    repository = make_repo(tmp_path)
    yield repository
    repository.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlRepository]:
    """A fresh, migrated repository on each backend, for everything but importing."""
    repository: SqlRepository
    if request.param == "postgres":
        database: PostgresDatabase = request.getfixturevalue("postgres_database")
        repository = PostgresRepository(database.url, password=database.password)
    else:
        repository = SqliteRepository(tmp_path / "data" / "mailbridge.db")
    try:
        repository.migrate()
        yield repository
    finally:
        repository.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mailbridge.db"


@pytest.fixture
def sqlite_repo(sqlite_path: Path) -> Iterator[SqliteRepository]:
    """A SQLite repository, for the tests of SQLite specifics."""
    repository = SqliteRepository(sqlite_path)
    repository.migrate()
    yield repository
    repository.close()


def run(repo: Repository, *messages: ParsedMessage, first_uid: int = 1) -> list[ImportResult]:
    items = [ImportItem(uid=first_uid + i, message=m) for i, m in enumerate(messages)]
    return repo.import_batch(CTX, items)


def detail(repo: Repository | SqlRepository, conversation_id: int | None) -> ConversationDetail:
    assert conversation_id is not None
    found = repo.conversation(conversation_id)
    assert found is not None
    return found


def active_followers(found: ConversationDetail) -> set[str]:
    return {email for email, _name, active in found.followers if active}


def raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Read the SQLite file with a separate connection, as an integrator would."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


# -- schema -----------------------------------------------------------------------------------


def test_migrations_are_consecutive_and_migrate_is_idempotent(sqlite_path: Path) -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
    repo = SqliteRepository(sqlite_path)
    try:
        assert repo.schema_version() == 0
        repo.migrate()
        repo.migrate()
        assert repo.schema_version() == SCHEMA_VERSION
    finally:
        repo.close()
    names = {
        row[0] for row in raw(sqlite_path, "SELECT name FROM sqlite_master WHERE type='table'")
    }
    assert set(TABLES) <= names
    assert raw(sqlite_path, "PRAGMA journal_mode") == [("wal",)]


def test_sqlite_refuses_a_newer_schema(sqlite_path: Path) -> None:
    repo = SqliteRepository(sqlite_path)
    repo.close()
    conn = sqlite3.connect(sqlite_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    repo = SqliteRepository(sqlite_path)
    try:
        with pytest.raises(StoreError) as info:
            repo.migrate()
        assert info.value.code == "database_error"
    finally:
        repo.close()


def test_migrations_are_translated_for_postgres_in_one_place() -> None:
    created = for_postgres(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, b BLOB,"
        " at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))) WITHOUT ROWID"
    )
    assert created == (
        "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
        " n BIGINT NOT NULL, b BYTEA,"
        f" at TEXT NOT NULL DEFAULT ({POSTGRES_NOW}))"
    )
    assert for_postgres("PRAGMA legacy_alter_table = ON") is None  # SQLite's business only
    assert all("PRAGMA" not in (for_postgres(s) or "") for m in MIGRATIONS for s in m.statements)


def test_postgres_migrates_into_a_version_table_once(postgres_database: PostgresDatabase) -> None:
    repo = PostgresRepository(postgres_database.url, password=postgres_database.password)
    try:
        assert repo.schema_version() == 0
        repo.migrate()
        repo.migrate()
        assert repo.schema_version() == SCHEMA_VERSION
        with repo._sql("read", write=False) as sql:
            tables = {
                row["table_name"]
                for row in sql.rows(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = current_schema()"
                )
            }
            versions = sql.rows("SELECT version FROM schemaversion")
        assert set(TABLES) | {"schemaversion"} == tables
        assert versions == [{"version": SCHEMA_VERSION}]
        # A newer schema (a newer mailbridge migrated it) is refused, not downgraded.
        with repo._sql("bump", write=True) as sql:
            sql.execute("UPDATE schemaversion SET version = ?", (SCHEMA_VERSION + 1,))
        with pytest.raises(StoreError, match="newer than this mailbridge") as info:
            repo.migrate()
        assert info.value.code == "database_error"
    finally:
        repo.close()


def test_postgres_daemons_starting_together_migrate_once(
    postgres_database: PostgresDatabase,
) -> None:
    repos = [
        PostgresRepository(postgres_database.url, password=postgres_database.password)
        for _ in range(3)
    ]
    errors: list[BaseException] = []

    def migrate(repo: PostgresRepository) -> None:
        try:
            repo.migrate()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(repo,)) for repo in repos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert {repo.schema_version() for repo in repos} == {SCHEMA_VERSION}
    finally:
        for repo in repos:
            repo.close()


def test_postgres_reads_are_read_only(store: SqlRepository) -> None:
    if not isinstance(store, PostgresRepository):
        return  # SQLite's read transactions are plain BEGIN: a write there would succeed
    with (
        pytest.raises(StoreError, match="read-only transaction"),
        store._sql("x", write=False) as sql,
    ):
        sql.execute("DELETE FROM accountstate")


def test_postgres_wrong_password_is_named(postgres_database: PostgresDatabase) -> None:
    with pytest.raises(StoreError, match="password authentication failed") as info:
        PostgresRepository(postgres_database.url, password="wrong")
    assert info.value.code == "database_auth_failed"
    assert not info.value.transient


def test_postgres_unreachable_server_is_transient(postgres_database: PostgresDatabase) -> None:
    url = postgres_database.url.replace(
        f":{postgres_database.cluster.port}/", f":{_closed_port()}/"
    )
    with pytest.raises(StoreError, match="cannot connect") as info:
        PostgresRepository(url, password=postgres_database.password, connect_timeout=5)
    assert info.value.code == "database_unavailable"
    assert info.value.transient


def _closed_port() -> int:
    from mailbridge.testing.dovecot import free_port

    return free_port()


# -- threading --------------------------------------------------------------------------------


def test_three_message_thread_is_one_conversation_with_the_right_followers(
    repo: Repository,
) -> None:
    m1 = message(
        "m1@example.com",
        subject="Printer on fire",
        sender="Ann Example <ann@example.com>",
        to=["support@acme.test"],
        cc=["bob@example.com"],
        date=at(0),
    )
    m2 = reply(
        m1,
        "m2@acme.test",
        minutes=10,
        sender="support@acme.test",
        to=["ann@example.com"],
        cc=["bob@example.com"],
    )
    m3 = reply(
        m2,
        "m3@example.com",
        minutes=20,
        sender="Bob B <bob@example.com>",
        to=["support@acme.test", "ann@example.com"],
    )
    # Given out of order: the repository imports in UID order, so m1 starts the conversation.
    items = [ImportItem(3, m3), ImportItem(1, m1), ImportItem(2, m2)]
    results = repo.import_batch(CTX, items)

    assert [r.uid for r in results] == [3, 1, 2]  # one result per item, in the items' order
    assert all(r.outcome is Outcome.IMPORTED for r in results)
    assert len({r.conversation_id for r in results}) == 1
    assert [r.new_conversation for r in results] == [False, True, False]

    found = detail(repo, results[0].conversation_id)
    assert found.summary.subject == "Printer on fire"
    assert found.summary.messages == 3
    assert found.summary.followers == 2
    assert found.summary.first_message == at(0)
    assert found.summary.last_message == at(20)
    assert sorted(found.followers) == [
        ("ann@example.com", "Ann Example", True),
        ("bob@example.com", "Bob B", True),
    ]
    first, second, third = found.messages
    assert [m.message_id for m in found.messages] == [
        "m1@example.com",
        "m2@acme.test",
        "m3@example.com",
    ]
    assert set(first.followers) == {("ann@example.com", "from"), ("bob@example.com", "cc")}
    assert set(second.followers) == {("ann@example.com", "to"), ("bob@example.com", "cc")}
    assert set(third.followers) == {("bob@example.com", "from"), ("ann@example.com", "to")}
    assert first.uid == 1
    assert first.plain_text == "Hello there"
    assert "Hello there" in first.html  # text-only mail gets an HTML rendering


def test_reply_arriving_before_its_parent_joins_the_parents_conversation(
    repo: Repository,
) -> None:
    parent = message("p@example.com", subject="Invoice 42", date=at(0))
    child = reply(parent, "c@example.com", minutes=5)
    [first] = run(repo, child, first_uid=7)
    [second] = run(repo, parent, first_uid=8)
    assert first.new_conversation
    assert not second.new_conversation
    assert second.conversation_id == first.conversation_id
    found = detail(repo, first.conversation_id)
    # The real start of the thread names the conversation once it arrives.
    assert found.summary.subject == "Invoice 42"
    assert found.summary.first_message == at(0)
    assert [m.message_id for m in found.messages] == ["p@example.com", "c@example.com"]


def test_siblings_whose_parent_never_arrived_share_a_conversation(repo: Repository) -> None:
    parent = message("root@example.com", date=at(0))
    a = reply(parent, "a@example.com", minutes=1)
    b = reply(parent, "b@example.com", minutes=2)
    [ra] = run(repo, a)
    [rb] = run(repo, b, first_uid=2)
    [rp] = run(repo, parent, first_uid=3)
    assert ra.conversation_id == rb.conversation_id == rp.conversation_id


def test_threading_stays_within_the_account(repo: Repository) -> None:
    parent = message("p@example.com")
    child = reply(parent, "c@example.com", minutes=1)
    [rp] = repo.import_batch(
        ImportContext("other", own_addresses=frozenset({"other@acme.test"})),
        [ImportItem(1, parent)],
    )
    [rc] = run(repo, child)
    assert rc.new_conversation
    assert rc.conversation_id != rp.conversation_id


# -- threading by each identification method --------------------------------------------------


def ctx_for(
    identification: Identification = "message_id", account: str = ACCOUNT, **kw: Any
) -> ImportContext:
    own = OWN if account == ACCOUNT else frozenset({f"{account}@acme.test"})
    return ImportContext(account, own_addresses=own, identification=identification, **kw)


_uids = itertools.count(1000)


def imp(repo: Repository, ctx: ImportContext, *messages: ParsedMessage) -> list[ImportResult]:
    return repo.import_batch(ctx, [ImportItem(next(_uids), m) for m in messages])


def key_of(repo: Repository, conversation_id: int | None) -> str:
    return detail(repo, conversation_id).summary.uniqueid


def test_cc_replying_to_the_original_lands_in_the_same_conversation(repo: Repository) -> None:
    original = message("orig@customer.test", to=["support@acme.test"], cc=["Jane <jane@x.test>"])
    ours = reply(
        original, "ours@acme.test", minutes=1, sender="support@acme.test", to=["ann@example.com"]
    )
    # Jane answers the original (not our reply); Ann answers ours.
    jane = reply(original, "jane1@x.test", minutes=2, sender="Jane <jane@x.test>")
    ann = reply(ours, "ann2@customer.test", minutes=3)
    results = imp(repo, ctx_for(), original, ours, jane, ann)
    assert [r.outcome for r in results] == [Outcome.IMPORTED] * 4
    assert {r.conversation_id for r in results} == {results[0].conversation_id}
    assert len(repo.conversations()) == 1
    found = detail(repo, results[0].conversation_id)
    assert [m.threaded_by for m in found.messages] == ["new"] + ["message_id"] * 3


def test_reply_to_a_message_inserted_by_the_integrator_threads_to_it(
    repo: Repository, backend: Backend
) -> None:
    [first] = imp(repo, ctx_for(), message("first@customer.test"))
    # The integrator's sending code stored the message it sent, with a per-recipient copy id.
    backend.execute(
        repo,
        "INSERT INTO conversationmessage (conversation, account, messageid, messagekey, uniqueid,"
        " direction, date) VALUES (?, 'support', 'sent@acme.test', 'sent@acme.test', 'u1',"
        " 'outgoing', ?)",
        first.conversation_id,
        "2024-03-01T09:05:00Z",
    )
    [(mid,)] = backend.query(
        repo, "SELECT id FROM conversationmessage WHERE messageid = 'sent@acme.test'"
    )
    [(fid,)] = backend.query(repo, "SELECT id FROM follower")
    backend.execute(
        repo,
        "INSERT INTO messagefollower (conversationmessage, follower, participationlevel,"
        " messageid) VALUES (?, ?, 'to', 'copy-for-ann@acme.test')",
        mid,
        fid,
    )
    to_sent = message("r1@customer.test", in_reply_to=["sent@acme.test"], date=at(10))
    to_copy = message("r2@customer.test", in_reply_to=["copy-for-ann@acme.test"], date=at(11))
    results = imp(repo, ctx_for(), to_sent, to_copy)
    assert [r.conversation_id for r in results] == [first.conversation_id] * 2
    assert backend.query(
        repo,
        "SELECT threadedby FROM conversationmessage WHERE messageid LIKE 'r%' ORDER BY id",
    ) == [("message_id",), ("message_id",)]


def test_plus_address_joins_the_conversation_without_any_message_id(repo: Repository) -> None:
    ctx = ctx_for("plus_address")
    [first] = imp(repo, ctx, message("p1@customer.test", subject="Broken"))
    key = key_of(repo, first.conversation_id)
    # A client that drops In-Reply-To and References, writing to our Reply-To.
    answer = message(
        "p2@customer.test", subject="other words", to=[plus_address("help@acme.test", key)]
    )
    delivered = message(
        "p3@customer.test", to=["someone@else.test"], delivered_to=[f"support+{key}@acme.test"]
    )
    results = imp(repo, ctx, answer, delivered)
    assert [r.conversation_id for r in results] == [first.conversation_id] * 2
    found = detail(repo, first.conversation_id)
    # The plus-address is the account itself: no follower, and the reply-from address is plain.
    assert all("+" not in email for email, _n, _a in found.followers)
    assert [m.threaded_by for m in found.messages] == ["new", "plus_address", "plus_address"]


def test_plus_address_key_wins_over_message_id_threading(repo: Repository) -> None:
    ctx = ctx_for("plus_address")
    a, b = imp(repo, ctx, message("a@customer.test"), message("b@customer.test", date=at(1)))
    key_b = key_of(repo, b.conversation_id)
    cross = message(
        "c@customer.test", in_reply_to=["a@customer.test"], to=[f"support+{key_b}@acme.test"]
    )
    [result] = imp(repo, ctx, cross)
    assert result.conversation_id == b.conversation_id != a.conversation_id


@pytest.mark.parametrize("prefix", ["Re: ", "AW: ", "SV: ", "Antw: ", "回复：", "Re[2]: Fwd: ", ""])
def test_subject_tag_joins_whatever_the_prefixes(repo: Repository, prefix: str) -> None:
    ctx = ctx_for("subject")
    [first] = imp(repo, ctx, message("s1@customer.test", subject="Invoice " + "x" * 200))
    tagged = tag_subject("Invoice " + "x" * 200, key_of(repo, first.conversation_id))
    assert len(tagged) == 128
    [answer] = imp(repo, ctx, message("s2@customer.test", subject=prefix + tagged, date=at(5)))
    assert answer.conversation_id == first.conversation_id
    assert answer.new_conversation is False
    assert detail(repo, first.conversation_id).messages[-1].threaded_by == "subject"


def test_the_chosen_marker_only_is_read(repo: Repository) -> None:
    [first] = imp(repo, ctx_for("message_id"), message("m1@customer.test"))
    key = key_of(repo, first.conversation_id)
    # With message_id identification a tag or plus-address alone starts a new conversation.
    tagged = message("m2@customer.test", subject=f"Hi [ID-{key}]", to=[f"support+{key}@acme.test"])
    [result] = imp(repo, ctx_for("message_id"), tagged)
    assert result.new_conversation


@pytest.mark.parametrize("identification", ["plus_address", "subject"])
def test_a_forged_or_foreign_key_never_joins_someone_elses_conversation(
    repo: Repository, identification: Identification
) -> None:
    ours, theirs = ctx_for(identification), ctx_for(identification, account="sales")
    [victim] = imp(repo, theirs, message("v@customer.test", to=["sales@acme.test"]))
    foreign = key_of(repo, victim.conversation_id)
    [mine] = imp(repo, ours, message("mine@customer.test", date=at(1)))

    def carrying(mid: str, key: str, **kw: Any) -> ParsedMessage:
        if identification == "subject":
            return message(mid, subject=f"Re: hello [ID-{key}]", date=at(9), **kw)
        return message(mid, to=[f"support+{key}@acme.test"], date=at(9), **kw)

    # Another account's real key, and a well-formed key nobody was given: both start anew.
    stolen, guessed = imp(
        repo, ours, carrying("f1@evil.test", foreign), carrying("f2@evil.test", "a" * 16)
    )
    assert stolen.new_conversation
    assert guessed.new_conversation
    assert stolen.conversation_id != victim.conversation_id
    # A forged key next to a real In-Reply-To falls back to Message-ID threading.
    [fallback] = imp(
        repo, ours, carrying("f3@evil.test", foreign, in_reply_to=["mine@customer.test"])
    )
    assert fallback.conversation_id == mine.conversation_id
    assert detail(repo, victim.conversation_id).summary.messages == 1


def test_a_reply_after_its_parent_in_one_batch_sees_the_parents_writes(repo: Repository) -> None:
    parent = message("bp@example.com", subject="Order", cc=["Bob <bob@example.com>"], date=at(0))
    child = reply(parent, "bc@example.com", minutes=1, cc=["carol@example.com"])
    grandchild = reply(child, "bg@example.com", minutes=2, sender="Bob <bob@example.com>")
    results = run(repo, grandchild, child, parent)  # UIDs 1-3; imported in UID order
    assert [r.new_conversation for r in results] == [True, False, False]
    found = detail(repo, results[0].conversation_id)
    assert found.summary.messages == 3
    assert found.summary.subject == "Order"  # the real start names the conversation
    assert found.summary.last_message == at(2)
    # The newest message (grandchild) decides who is active, whatever the UID order.
    assert active_followers(found) == {"bob@example.com"}


def _import_beside(
    backend: Backend,
    repo: Repository,
    start: threading.Barrier,
    item: ImportItem,
    found: dict[int, list[ImportResult]],
) -> None:
    """Import ``item`` through a repository of its own (another daemon), opened on this
    thread, once every importer is ready."""
    other = backend.again(repo)
    try:
        start.wait(timeout=30)
        found[item.uid] = other.import_batch(CTX, [item])
    finally:
        other.close()


def test_two_daemons_importing_one_thread_at_once_make_one_conversation(
    repo: Repository, backend: Backend
) -> None:
    """Per-account serialisation: two repositories (two daemons, or a daemon and ``sync``)
    each import one message of a thread at the same moment; neither may miss the other's rows
    and start a second conversation."""
    for round_ in range(8):
        parent = message(f"race{round_}@example.com", subject=f"Race {round_}", date=at(0))
        child = reply(parent, f"race{round_}-re@example.com", minutes=1)
        start = threading.Barrier(2)
        found: dict[int, list[ImportResult]] = {}
        workers = [
            threading.Thread(
                target=_import_beside, args=(backend, repo, start, ImportItem(uid, m), found)
            )
            for uid, m in ((2 * round_ + 1, parent), (2 * round_ + 2, child))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        [p], [c] = found[2 * round_ + 1], found[2 * round_ + 2]
        assert p.outcome is c.outcome is Outcome.IMPORTED
        assert p.conversation_id == c.conversation_id, f"round {round_}: two conversations"
        assert [p.new_conversation, c.new_conversation].count(True) == 1
    assert len(repo.conversations()) == 8


# -- conversation parents and follower parents ------------------------------------------------


def _text(row: tuple[Any, ...]) -> tuple[str | None, ...]:
    # Property columns are untyped in SQLite and text in PostgreSQL: compare as text.
    return tuple(None if value is None else str(value) for value in row)


def test_conversation_parent_gets_a_record_with_every_property_source(
    repo: Repository, backend: Backend
) -> None:
    ctx = ctx_for(follower_parents=(PERSON,), conversation_parents=(TICKET,))
    repo.prepare(ctx.follower_parents, ctx.conversation_parents)
    # Tables mailbridge created, with the columns search paths read; the integrator fills them.
    assert backend.query(repo, "SELECT id, email, name, company FROM person") == []
    backend.execute(
        repo,
        "INSERT INTO person (id, email, name, company) VALUES (7, 'Ann@Example.com', 'Ann', 42)",
    )
    first = message(
        "t1@customer.test", subject="Printer on fire", text="Help!", sender="ann@example.com"
    )
    nameless = message("t2@customer.test", subject="Who", sender="nobody@else.test", date=at(3))
    a, b = imp(repo, ctx, first, nameless)
    select = (
        "SELECT id, subject, description, person, company, source, sender, received, mailbox"
        " FROM ticket WHERE id = (SELECT ticket FROM conversation WHERE id = ?)"
    )
    [ticket] = backend.query(repo, select, a.conversation_id)
    assert _text(ticket[1:]) == (
        "Printer on fire",
        "Help!",
        "7",
        "42",
        "email",
        "unknown",
        "2024-03-01T09:00:00Z",
        "support",
    )
    [other] = backend.query(repo, select, b.conversation_id)
    assert _text(other[3:7]) == (None, None, "email", "unknown")  # unknown sender
    # A reply creates no second ticket.
    imp(repo, ctx, reply(first, "t3@customer.test", minutes=5))
    assert backend.query(repo, "SELECT COUNT(*) FROM ticket") == [(2,)]
    found = detail(repo, a.conversation_id)
    assert found.parents == (("ticket", ticket[0]),)
    assert ("ann@example.com", "person", 7) in found.follower_parents


def test_a_parent_without_properties_still_gets_a_record(
    repo: Repository, backend: Backend
) -> None:
    bare = ConversationParentSettings.model_validate({"table": "lead"})
    ctx = ctx_for(conversation_parents=(bare,))
    repo.prepare((), ctx.conversation_parents)
    [result] = imp(repo, ctx, message("lead@customer.test"))
    [(record,)] = backend.query(repo, "SELECT id FROM lead")
    assert detail(repo, result.conversation_id).parents == (("lead", record),)


def test_follower_parents_link_every_conversation_of_a_person(
    repo: Repository, backend: Backend
) -> None:
    ctx = ctx_for(follower_parents=(PERSON, COWORKER))
    repo.prepare(ctx.follower_parents, ())
    backend.execute(
        repo, "INSERT INTO person (id, email, name) VALUES (3, 'ann@example.com', 'Ann Person')"
    )
    backend.execute(
        repo, "INSERT INTO coworker (id, email, name) VALUES (9, 'BOB@acme.test', 'Bob')"
    )
    one = message("f1@customer.test", sender="ann@example.com", cc=["bob@acme.test"])
    two = message("f2@customer.test", sender="Ann <ann@example.com>", date=at(2))
    results = imp(repo, ctx, one, two)
    rows = backend.query(
        repo, "SELECT conversation, email, name, person, coworker FROM follower ORDER BY id"
    )
    assert rows == [
        (results[0].conversation_id, "ann@example.com", "Ann Person", 3, None),
        (results[0].conversation_id, "bob@acme.test", "Bob", None, 9),
        (results[1].conversation_id, "ann@example.com", "Ann", 3, None),
    ]


def test_a_follower_parent_link_set_by_hand_is_kept_and_lends_its_name(
    repo: Repository, backend: Backend
) -> None:
    ctx = ctx_for(follower_parents=(PERSON,))
    repo.prepare(ctx.follower_parents, ())
    backend.execute(repo, "INSERT INTO person (id, email, name) VALUES (4, 'robert@x.test', 'Rob')")
    first = message("h1@customer.test", sender="bob@example.com", date=at(0))
    [r1] = imp(repo, ctx, first)
    # The integrator knows bob@ is Robert and links him by hand; no person has bob's address.
    backend.execute(repo, "UPDATE follower SET person = 4 WHERE email = 'bob@example.com'")
    imp(repo, ctx, reply(first, "h2@customer.test", minutes=1, sender="bob@example.com"))
    found = detail(repo, r1.conversation_id)
    assert found.follower_parents == (("bob@example.com", "person", 4),)
    assert found.followers == (("bob@example.com", "Rob", True),)
    # A person with his address appears: the next message links him to it.
    backend.execute(repo, "INSERT INTO person (id, email, name) VALUES (5, 'BOB@example.com', 'B')")
    imp(repo, ctx, reply(first, "h3@customer.test", minutes=2, sender="Bobby <bob@example.com>"))
    found = detail(repo, r1.conversation_id)
    assert found.follower_parents == (("bob@example.com", "person", 5),)
    assert found.followers == (("bob@example.com", "Bobby", True),)


def test_parent_only_for_the_accounts_it_names(repo: Repository, backend: Backend) -> None:
    only_sales = ConversationParentSettings.model_validate(
        {
            "table": "deal",
            "accounts": ["sales"],
            "properties": [{"column": "title", "message_property": "subject"}],
        }
    )
    repo.prepare((), (only_sales,))
    imp(repo, ctx_for(), message("d1@customer.test"))
    imp(
        repo,
        ctx_for(account="sales", conversation_parents=(only_sales,)),
        message("d2@customer.test", subject="Big deal"),
    )
    assert backend.query(repo, "SELECT title FROM deal") == [("Big deal",)]
    assert backend.query(
        repo,
        "SELECT account, CASE WHEN deal IS NULL THEN 0 ELSE 1 END FROM conversation ORDER BY id",
    ) == [("support", 0), ("sales", 1)]


# -- unread -----------------------------------------------------------------------------------


def test_earliest_unread_is_the_oldest_incoming_and_mark_read_clears_it(repo: Repository) -> None:
    first = message("u1@customer.test", date=at(10))
    late_older = reply(first, "u0@customer.test", minutes=5)
    [a] = imp(repo, ctx_for(), first)
    imp(repo, ctx_for(), late_older)
    [summary] = repo.conversations()
    assert summary.earliest_unread == at(5)
    assert repo.mark_read(a.conversation_id or 0)
    [summary] = repo.conversations()
    assert summary.earliest_unread is None
    ours = reply(first, "u3@acme.test", minutes=15, sender="support@acme.test")
    imp(repo, ctx_for(), ours)  # our own answer leaves it read
    assert repo.conversations()[0].earliest_unread is None
    imp(repo, ctx_for(), reply(first, "u2@customer.test", minutes=20))
    [summary] = repo.conversations()
    assert summary.earliest_unread == at(20)
    assert not repo.mark_read(12345)


# -- de-duplication ---------------------------------------------------------------------------


def test_duplicate_message_key_is_reported_and_writes_nothing(repo: Repository) -> None:
    m = message("dup@example.com", cc=["bob@example.com"])
    [first] = run(repo, m)
    [again] = run(repo, m, first_uid=2)
    assert again.outcome is Outcome.DUPLICATE
    assert again.conversation_id == first.conversation_id
    assert again.message_row_id == first.message_row_id
    assert not again.new_conversation
    assert len(repo.conversations()) == 1
    found = detail(repo, first.conversation_id)
    assert found.summary.messages == 1
    assert len(found.messages[0].followers) == 2


def test_duplicate_within_one_batch(repo: Repository) -> None:
    m = message("twice@example.com")
    first, second = run(repo, m, m)
    assert first.outcome is Outcome.IMPORTED
    assert second.outcome is Outcome.DUPLICATE
    assert second.message_row_id == first.message_row_id


def test_outgoing_copy_coming_back_is_a_duplicate(repo: Repository) -> None:
    incoming = message("in@example.com")
    sent = reply(incoming, "sent@acme.test", minutes=1, sender="support@acme.test", to=["ann@x"])
    first, stored = run(repo, incoming, sent)
    [back] = run(repo, sent, first_uid=3)
    assert stored.outcome is Outcome.IMPORTED
    assert stored.conversation_id == first.conversation_id
    assert back.outcome is Outcome.DUPLICATE


def test_own_identity_alone_never_starts_a_conversation(repo: Repository) -> None:
    # From an alias to the account and a plus-variant of it: a loop, not a conversation.
    looped = message(
        "loop@acme.test", sender="help@acme.test", to=["support@acme.test"], cc=["help+x@acme.test"]
    )
    # The account writing first to a customer does start one (sending starts a thread too).
    outreach = message("out@acme.test", sender="Support <SUPPORT@acme.test>", to=["ann@x.com"])
    ignored, started = run(repo, looped, outreach)
    assert ignored.outcome is Outcome.IGNORED
    assert ignored.conversation_id is None
    assert started.outcome is Outcome.IMPORTED
    [only] = repo.conversations()
    assert only.id == started.conversation_id
    assert only.earliest_unread is None  # outgoing mail is not unread
    followers = detail(repo, only.id).followers
    assert [email for email, _n, _a in followers] == ["ann@x.com"]


def test_message_without_message_id_is_deduplicated_by_its_hash(repo: Repository) -> None:
    m = message(None, raw=b"From: ann@example.com\r\n\r\nno id here")
    assert m.message_key.startswith("sha256:")
    other = message(None, raw=b"From: ann@example.com\r\n\r\nanother one")
    first, second = run(repo, m, other)
    [third] = run(repo, m, first_uid=3)
    assert first.outcome is Outcome.IMPORTED
    assert second.outcome is Outcome.IMPORTED
    assert second.conversation_id != first.conversation_id  # no id, nothing to thread on
    assert third.outcome is Outcome.DUPLICATE
    found = detail(repo, first.conversation_id)
    assert found.messages[0].message_id is None


# -- reused Message-IDs (content fingerprints) ------------------------------------------------

PARCEL_ID = "q8XvT2pLm0NwYr4Kd7@mailer.parcels.example"


def parcel(number: int, minutes: int) -> ParsedMessage:
    return message(
        PARCEL_ID,
        sender="Parcel Notifications <noreply@parcels.example>",
        subject=f"Your parcel {number} is on its way",
        text=f"Parcel {number} has left our depot.",
        date=at(minutes),
    )


def test_a_reused_message_id_stores_every_different_message(repo: Repository) -> None:
    first, second, third = parcel(1111, 0), parcel(2222, 60), parcel(3333, 120)
    # Two in one batch (as one IMAP fetch brings them), the third later.
    a, b = run(repo, first, second)
    [c] = run(repo, third, first_uid=3)
    assert [r.outcome for r in (a, b, c)] == [Outcome.IMPORTED] * 3
    assert a.message_key == PARCEL_ID  # the first keeps the bare id: integrators' look-ups
    assert b.message_key == f"{PARCEL_ID}#{second.fingerprint[:16]}"
    assert c.message_key == f"{PARCEL_ID}#{third.fingerprint[:16]}"
    assert (a.reused_key, b.reused_key, c.reused_key) == (None, PARCEL_ID, PARCEL_ID)
    # Different parcels are different conversations, each with its own subject.
    assert len({a.conversation_id, b.conversation_id, c.conversation_id}) == 3
    stored = detail(repo, b.conversation_id).messages[0]
    assert stored.message_id == PARCEL_ID
    assert stored.message_key == b.message_key
    assert stored.subject == "Your parcel 2222 is on its way"


def test_each_reused_id_message_fetched_again_is_a_duplicate(repo: Repository) -> None:
    first, second = parcel(1111, 0), parcel(2222, 60)
    a, b = run(repo, first, second)
    # A crash before the move: both fetched again, in the other order, in one batch with a
    # second copy of one of them (the same mail delivered to an alias).
    again = run(repo, second, first, second, first_uid=3)
    assert [r.outcome for r in again] == [Outcome.DUPLICATE] * 3
    assert [r.message_row_id for r in again] == [
        b.message_row_id,
        a.message_row_id,
        b.message_row_id,
    ]
    assert [r.message_key for r in again] == [b.message_key, a.message_key, b.message_key]
    assert sum(s.messages for s in repo.conversations()) == 2


def test_a_reply_citing_a_reused_id_joins_the_newest_message_before_it(repo: Repository) -> None:
    a, b = run(repo, parcel(1111, 0), parcel(2222, 60))
    answer = message(
        "answer@customer.test",
        sender="Ann <ann@customer.test>",
        subject="Re: Your parcel 2222 is on its way",
        in_reply_to=[PARCEL_ID],
        references=[PARCEL_ID],
        date=at(90),
    )
    early = message(
        "early@customer.test",
        subject="Re: Your parcel 1111 is on its way",
        in_reply_to=[PARCEL_ID],
        date=at(30),
    )
    late, old = run(repo, answer, early, first_uid=3)
    assert late.conversation_id == b.conversation_id
    assert old.conversation_id == a.conversation_id


def test_a_later_reused_id_message_is_not_pulled_into_a_reply_of_the_first(
    repo: Repository,
) -> None:
    a, reply_to_first = run(
        repo,
        parcel(1111, 0),
        message("r@customer.test", in_reply_to=[PARCEL_ID], date=at(10)),
    )
    assert reply_to_first.conversation_id == a.conversation_id
    [b] = run(repo, parcel(2222, 60), first_uid=3)
    assert b.new_conversation
    assert b.conversation_id != a.conversation_id


def test_the_same_message_with_other_transport_headers_is_one_message(repo: Repository) -> None:
    # Same content fingerprint, other uid (the parser leaves Received/Delivered-To out).
    m = message("alias@example.com", delivered_to=["support@acme.test"])
    copy = dataclasses.replace(m, delivered_to=("help@acme.test",), size=m.size + 120)
    first, second = run(repo, m, copy)
    assert (first.outcome, second.outcome) == (Outcome.IMPORTED, Outcome.DUPLICATE)


def test_rows_without_a_fingerprint_keep_the_old_rule(repo: Repository, backend: Backend) -> None:
    [a] = run(repo, parcel(1111, 0))
    # A row written before fingerprints were stored (schema 4), or by an integrator.
    backend.execute(repo, "UPDATE conversationmessage SET fingerprint = NULL")
    # The same message fetched again (a crash before the move, across the upgrade).
    [again] = run(repo, parcel(1111, 0), first_uid=2)
    assert again.outcome is Outcome.DUPLICATE
    assert again.message_row_id == a.message_row_id
    # Found by the issue 9 follow-up: a tracker's *next* notice under the id of a row stored
    # before the upgrade was a duplicate (dropped). Its stored date and subject differ: stored.
    [b] = run(repo, parcel(2222, 60), first_uid=3)
    assert b.outcome is Outcome.IMPORTED
    assert (b.message_key, b.reused_key) == (f"{PARCEL_ID}#{b.message_key[-16:]}", PARCEL_ID)
    # A row not imported by mailbridge (uid NULL: an integrator's or a sent message) keeps the
    # documented rule: the copy coming back under its key is that message, whatever it says.
    backend.execute(repo, "UPDATE conversationmessage SET uid = NULL, fingerprint = NULL")
    [c] = run(repo, parcel(3333, 120), first_uid=4)
    assert c.outcome is Outcome.DUPLICATE
    assert c.message_row_id == a.message_row_id


def test_a_failed_reused_id_message_is_failed_under_its_own_key(repo: Repository) -> None:
    [a] = run(repo, parcel(1111, 0))
    bad = dataclasses.replace(parcel(2222, 60), size=2**70)
    [failed] = run(repo, bad, first_uid=2)
    assert failed.outcome is Outcome.FAILED
    assert failed.message_key == f"{PARCEL_ID}#{bad.fingerprint[:16]}" != a.message_key


def _parcel_raw(number: int, attachment_bytes: int = 0) -> bytes:
    """A parcel notice as the tracker sends it: every notice under one Message-ID."""
    head = (
        f"Message-ID: <{PARCEL_ID}>\r\nFrom: noreply@parcels.example\r\n"
        f"To: support@acme.test\r\nSubject: Your parcel {number} is on its way\r\n"
        f"Date: Mon, 02 Jun 2025 09:{number % 60:02d}:00 +0000\r\nMIME-Version: 1.0\r\n"
    )
    if not attachment_bytes:
        return (head + f"\r\nParcel {number} has left our depot.\r\n").encode()
    body = (
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n--B\r\n'
        f"Content-Type: text/plain\r\n\r\nParcel {number}, label attached.\r\n--B\r\n"
        "Content-Type: application/pdf; name=label.pdf\r\n\r\n"
        + "x" * attachment_bytes
        + "\r\n--B--\r\n"
    )
    return (head + body).encode()


def test_failures_of_messages_reusing_an_id_stay_apart_until_each_is_imported(
    repo: Repository,
) -> None:
    """Found by the issue 9 follow-up: failures were keyed by the bare Message-ID, so two
    different notices that failed (too large) were one failure row, and importing a *third*
    notice under that id marked both resolved while they sat unimported in Failed."""
    from mailbridge.daemon.account import _parse_batch
    from mailbridge.mail.imap import FetchedMessage

    def fetched(uid: int, raw_bytes: bytes) -> FetchedMessage:
        return FetchedMessage(uid=uid, raw=raw_bytes, internaldate=at(0), flags=frozenset())

    big_one, big_two = _parcel_raw(1, 5000), _parcel_raw(2, 6000)
    items, failures = _parse_batch([fetched(1, big_one), fetched(2, big_two)], 1000)
    assert items == []
    assert len(failures) == 2
    repo.record_failures(ACCOUNT, failures)
    repo.set_failure_folder_uids(ACCOUNT, {f.message_key: 10 + f.uid for f in failures})
    records = repo.failures(ACCOUNT)
    assert sorted(r.folder_uid for r in records) == [11, 12]  # two failures, each traceable

    # Parcel notices are automatic mail (a no-reply sender): imported here as an operator who
    # wants them would configure it (the default policy discards them: issue 13).
    ctx = dataclasses.replace(CTX, automatic_policy=AutomaticPolicy(automatic_emails="import"))
    small, _ = _parse_batch([fetched(3, _parcel_raw(3))], 1000)
    [other] = repo.import_batch(ctx, small)
    assert other.outcome is Outcome.IMPORTED
    assert len(repo.failures(ACCOUNT)) == 2  # a different message resolves neither

    # The first notice, retried with a higher limit, resolves its own failure only.
    retried, _ = _parse_batch([fetched(11, big_one)], 10**6)
    [done] = repo.import_batch(ctx, retried)
    assert done.outcome is Outcome.IMPORTED
    [left] = repo.failures(ACCOUNT)
    assert left.folder_uid == 12


def _delivered(raw_bytes: bytes, alias: str, hop: str) -> bytes:
    """``raw_bytes`` as one delivery: the trace headers that MTA adds on top (RFC 5321 4.4)."""
    trace = (
        f"Return-Path: <bounce+{hop}@sender.example>\r\nDelivered-To: {alias}\r\n"
        f"X-Original-To: {alias}\r\nReceived: from {hop}.relay.example by mx.acme.test;"
        f"\r\n Mon, 02 Jun 2025 09:0{len(hop) % 10}:00 +0000\r\n"
    )
    return trace.encode() + raw_bytes


_ALERT = (
    b"From: monitor@ops.example\r\nTo: support@acme.test, help@acme.test\r\n"
    b"Subject: Disk full on db1\r\nDate: Mon, 02 Jun 2025 09:00:00 +0000\r\n"
    b"\r\n/var is 100% full.\r\n"
)


def test_store_level_examples_of_reused_ids_and_repeated_deliveries(repo: Repository) -> None:
    """A later tester's examples (issue 9 follow-up), from raw bytes through the parser."""
    from mailbridge.core.parse import parse_message

    def parsed(raw_bytes: bytes) -> ParsedMessage:
        return parse_message(raw_bytes, arrival=at(0))

    notice = _parcel_raw(7)
    # The same mail to two aliases (other trace headers), a Maildir copy with bare LF, a copy
    # whose Subject a relay re-folded, and a re-fetch after a crash before the move.
    copies = [
        _delivered(notice, "support@acme.test", "a"),
        _delivered(notice, "help@acme.test", "bb"),
        notice.replace(b"\r\n", b"\n"),
        notice.replace(b"Subject: Your parcel", b"Subject: Your\r\n parcel"),
    ]
    results = run(repo, *(parsed(c) for c in copies))
    [again] = run(repo, parsed(copies[0]), first_uid=9)
    assert [r.outcome for r in [*results, again]] == [Outcome.IMPORTED] + [Outcome.DUPLICATE] * 4
    assert {r.message_row_id for r in [*results, again]} == {results[0].message_row_id}

    # Same id: another body only, another Date only (a tracker re-sending hourly).
    other_body = notice.replace(b"has left our depot", b"is out for delivery")
    other_date = notice.replace(b"09:07:00", b"10:07:00")
    reused = run(repo, parsed(other_body), parsed(other_date), first_uid=20)
    assert [r.outcome for r in reused] == [Outcome.IMPORTED] * 2
    assert {r.reused_key for r in reused} == {PARCEL_ID}

    # No Message-ID at all: the same alert to two aliases is one, a new alert another; with
    # no Date either, the same text sent again an hour later is another alert too.
    undated = _ALERT.replace(b"Date: Mon, 02 Jun 2025 09:00:00 +0000\r\n", b"")
    first_hop = b"Received: from ups1 by mx.acme.test id 1; Mon, 02 Jun 2025 09:00:00 +0000\r\n"
    later_hop = first_hop.replace(b"id 1; Mon, 02 Jun 2025 09", b"id 2; Mon, 02 Jun 2025 10")
    alerts = run(
        repo,
        parsed(_delivered(_ALERT, "support@acme.test", "a")),
        parsed(_delivered(_ALERT, "help@acme.test", "b")),
        parsed(_ALERT.replace(b"/var", b"/home")),
        parsed(_delivered(first_hop + undated, "support@acme.test", "a")),
        parsed(_delivered(first_hop + undated, "help@acme.test", "b")),
        parsed(_delivered(later_hop + undated, "support@acme.test", "a")),
        first_uid=30,
    )
    imported, duplicate = Outcome.IMPORTED, Outcome.DUPLICATE
    assert [r.outcome for r in alerts] == [imported, duplicate, imported] * 2
    assert alerts[0].message_key.startswith("sha256:")


# -- Reply-To ---------------------------------------------------------------------------------


def test_reply_to_addresses_are_followers_at_level_replyto(repo: Repository) -> None:
    m = message(
        "form@web.example",
        sender="www-data@web.example",
        to=["support@acme.test"],
        reply_to=["Hannah <hannah@customer.example>", "Support <support@acme.test>"],
    )
    [result] = run(repo, m)
    found = detail(repo, result.conversation_id)
    assert set(found.messages[0].followers) == {
        ("www-data@web.example", "from"),
        ("hannah@customer.example", "replyto"),
    }
    assert ("hannah@customer.example", "Hannah", True) in found.followers


def test_a_form_sent_as_the_mailbox_is_the_customers_incoming_message(repo: Repository) -> None:
    form = message(
        "form-20a@www.acme.test",
        sender="support@acme.test",
        to=["support@acme.test"],
        reply_to=["Rita Client <rita@mail.example>"],
    )
    [result] = run(repo, form)
    assert result.outcome is Outcome.IMPORTED
    [summary] = repo.conversations()
    assert summary.earliest_unread is not None  # incoming: waiting for an answer
    found = detail(repo, result.conversation_id)
    assert found.followers == (("rita@mail.example", "Rita Client", True),)
    assert found.messages[0].followers == (("rita@mail.example", "replyto"),)


def test_reply_to_the_mailbox_itself_does_not_make_own_mail_a_conversation(
    repo: Repository,
) -> None:
    looped = message(
        "loop@acme.test",
        sender="support@acme.test",
        to=["help@acme.test"],
        reply_to=["Support <support+x@acme.test>"],
    )
    [result] = run(repo, looped)
    assert result.outcome is Outcome.IGNORED
    assert repo.conversations() == []


def test_reply_to_equal_to_from_is_one_follower_with_both_levels(repo: Repository) -> None:
    m = message("same@customer.test", sender="Ann <ann@x.test>", reply_to=["ann@x.test"])
    [result] = run(repo, m)
    found = detail(repo, result.conversation_id)
    assert [email for email, _n, _a in found.followers] == ["ann@x.test"]
    assert set(found.messages[0].followers) == {("ann@x.test", "from"), ("ann@x.test", "replyto")}


# -- defects ----------------------------------------------------------------------------------


def test_defects_are_stored_on_the_message(repo: Repository, backend: Backend) -> None:
    noted = ("unparseable Date 'Tue, 18 Sep 101'; the time of parsing is used", "base64 padding")
    [with_defects, clean, folded] = run(
        repo,
        message("d1@example.com", defects=noted),
        message("d2@example.com"),
        message("d3@example.com", defects=["two\nlines", "", " spaced \t out "]),
    )
    assert detail(repo, with_defects.conversation_id).messages[0].defects == noted
    # One defect per line: a defect is made one line, an empty one dropped.
    assert detail(repo, folded.conversation_id).messages[0].defects == ("two lines", "spaced out")
    assert detail(repo, clean.conversation_id).messages[0].defects == ()
    rows = backend.query(repo, "SELECT defects FROM conversationmessage")
    assert sorted(rows, key=str) == sorted(
        [("\n".join(noted),), (None,), ("two lines\nspaced out",)], key=str
    )


def test_sqlite_migration_5_keeps_message_followers(sqlite_path: Path) -> None:
    sqlite_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(sqlite_path)
    for migration in MIGRATIONS[:4]:
        for statement in migration.statements:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute("INSERT INTO conversation (id, uniqueid) VALUES (1, 'c')")
    conn.execute(
        "INSERT INTO conversationmessage (id, conversation, account, messagekey, uniqueid, date)"
        " VALUES (7, 1, 'support', 'old@x', 'u', '2024-01-01T00:00:00Z')"
    )
    conn.execute("INSERT INTO follower (id, conversation, email) VALUES (3, 1, 'ann@x')")
    conn.execute(
        "INSERT INTO messagefollower (id, conversationmessage, follower, participationlevel,"
        " messageid) VALUES (5, 7, 3, 'cc', 'per-recipient@x')"
    )
    # An integrator's view over the table survives its rebuild.
    conn.execute(
        "CREATE VIEW who AS SELECT f.email, mf.participationlevel AS level"
        " FROM messagefollower AS mf JOIN follower AS f ON f.id = mf.follower"
    )
    conn.commit()
    conn.close()
    repo = SqliteRepository(sqlite_path)
    try:
        repo.migrate()
        assert repo.schema_version() == SCHEMA_VERSION
    finally:
        repo.close()
    assert raw(sqlite_path, "SELECT * FROM messagefollower") == [
        (5, 7, 3, "cc", "per-recipient@x", None)
    ]
    assert raw(sqlite_path, "SELECT * FROM who") == [("ann@x", "cc")]
    indexes = {row[1] for row in raw(sqlite_path, "PRAGMA index_list(messagefollower)")}
    assert {"messagefollower_follower", "messagefollower_messageid"} <= indexes
    conn = sqlite3.connect(sqlite_path)
    try:
        conn.execute(
            "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
            " VALUES (7, 3, 'replyto')"
        )
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(
                "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
                " VALUES (7, 3, 'sender')"
            )
    finally:
        conn.close()


# -- files ------------------------------------------------------------------------------------


def test_attachments_and_inline_images_are_stored_and_cid_rewritten(
    repo: Repository, backend: Backend
) -> None:
    pdf = attachment("report.pdf", b"%PDF-1.4 \x00\x01\x02 bytes")
    logo = inline_image("logo@acme.test", b"\x89PNG logo")
    m = message(
        "files@example.com",
        html='<p>Hi</p><img src="cid:logo@acme.test" alt="logo"><img src="cid:unknown@x">',
        attachments=[pdf],
        inline_images=[logo],
    )
    [result] = run(repo, m)
    stored = detail(repo, result.conversation_id).messages[0]
    assert stored.documents == (("report.pdf", "application/pdf", pdf.size),)
    assert stored.embedded_files == (("logo@acme.test", "image/png", logo.size),)
    assert "cid:logo@acme.test" not in stored.html
    assert "embeddedfile:" in stored.html
    assert "cid:unknown@x" in stored.html  # an image we do not have stays as it was

    [(doc,)] = backend.query(repo, "SELECT document FROM document")
    assert bytes(doc) == pdf.data
    [(fid, blob)] = backend.query(repo, "SELECT id, document FROM embeddedfile")
    assert bytes(blob) == logo.data
    assert f'src="embeddedfile:{fid}"' in stored.html


# -- followers --------------------------------------------------------------------------------


def test_own_address_and_aliases_are_never_followers(repo: Repository) -> None:
    incoming = message(
        "in@example.com",
        sender="ann@example.com",
        to=["support@acme.test"],
        cc=["help@acme.test", "bob@example.com"],
        bcc=["SUPPORT@ACME.TEST"],
        delivered_to=["help@acme.test"],
    )
    outgoing = reply(
        incoming,
        "out@acme.test",
        minutes=1,
        sender="help@acme.test",
        to=["ann@example.com", "support@acme.test"],
    )
    results = run(repo, incoming, outgoing)
    found = detail(repo, results[0].conversation_id)
    assert {email for email, _n, _a in found.followers} == {"ann@example.com", "bob@example.com"}
    for stored in found.messages:
        assert not {email for email, _level in stored.followers} & {
            "support@acme.test",
            "help@acme.test",
        }


def test_follower_goes_inactive_when_left_out_and_active_again_when_back(
    repo: Repository,
) -> None:
    m1 = message("f1@example.com", cc=["bob@example.com", "carol@example.com"], date=at(0))
    m2 = reply(m1, "f2@example.com", minutes=1, cc=["Bob Builder <bob@example.com>"])
    m3 = reply(m2, "f3@example.com", minutes=2, cc=["carol@example.com"])
    [r1] = run(repo, m1)
    assert active_followers(detail(repo, r1.conversation_id)) == {
        "ann@example.com",
        "bob@example.com",
        "carol@example.com",
    }
    run(repo, m2, first_uid=2)
    found = detail(repo, r1.conversation_id)
    assert active_followers(found) == {"ann@example.com", "bob@example.com"}
    assert ("bob@example.com", "Bob Builder", True) in found.followers  # name learnt
    run(repo, m3, first_uid=3)
    found = detail(repo, r1.conversation_id)
    assert active_followers(found) == {"ann@example.com", "carol@example.com"}
    # A message without a name does not erase the one we know.
    assert ("bob@example.com", "Bob Builder", False) in found.followers


def test_a_late_older_message_deactivates_no_one(repo: Repository) -> None:
    m1 = message("o1@example.com", cc=["dave@example.com"], date=at(0))
    m2 = reply(m1, "o2@example.com", minutes=5, cc=["bob@example.com"])
    [r2] = run(repo, m2)
    run(repo, m1, first_uid=2)
    found = detail(repo, r2.conversation_id)
    # The newest message decides: dave was left out by it.
    assert active_followers(found) == {"ann@example.com", "bob@example.com"}
    assert ("dave@example.com", "", False) in found.followers


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_follower_is_named_by_their_newest_message_whatever_the_arrival_order(
    repo: Repository, order: tuple[int, ...]
) -> None:
    m1 = message("n1@example.com", cc=["Bob Old <bob@example.com>", "dave@example.com"], date=at(0))
    m2 = reply(m1, "n2@example.com", minutes=5, cc=["Bob New <bob@example.com>"])
    m3 = reply(m2, "n3@example.com", minutes=10, cc=["Carol <carol@example.com>"])
    thread = [m1, m2, m3]
    for uid, index in enumerate(order, start=1):
        [result] = run(repo, thread[index], first_uid=uid)
    found = detail(repo, result.conversation_id)
    # m2 is older than the newest message (m3, which leaves Bob out) but it is Bob's newest:
    # its name counts, and m1 arriving after it must not bring the old name back.
    assert sorted(found.followers) == [
        ("ann@example.com", "Ann Example", True),
        ("bob@example.com", "Bob New", False),
        ("carol@example.com", "Carol", True),
        ("dave@example.com", "", False),
    ]


def test_a_late_older_message_names_only_followers_without_a_name(repo: Repository) -> None:
    newer = message(
        "n4@example.com", cc=["Eve New <eve@example.com>", "dave@example.com"], date=at(20)
    )
    older = message(
        "n5@example.com",
        cc=["Eve Old <eve@example.com>", "Dave D <dave@example.com>"],
        references=["n4@example.com"],  # a sibling citing the same thread
        date=at(15),
    )
    [r4] = run(repo, newer)
    [r5] = run(repo, older, first_uid=2)
    assert r5.conversation_id == r4.conversation_id
    found = detail(repo, r4.conversation_id)
    assert ("eve@example.com", "Eve New", True) in found.followers
    assert ("dave@example.com", "Dave D", True) in found.followers


def test_followers_are_subscribed_and_only_the_integrator_changes_that(
    repo: Repository, backend: Backend
) -> None:
    m1 = message("s1@example.com", cc=["Bob <bob@example.com>"], date=at(0))
    [r1] = run(repo, m1)
    subscribed = "SELECT email, subscribed FROM follower ORDER BY id"
    assert backend.query(repo, subscribed) == [("ann@example.com", 1), ("bob@example.com", 1)]
    # Bob follows an unsubscribe link; then he is left out, then named again.
    backend.execute(repo, "UPDATE follower SET subscribed = 0 WHERE email = 'bob@example.com'")
    m2 = reply(m1, "s2@example.com", minutes=1)
    m3 = reply(m2, "s3@example.com", minutes=2, cc=["Bob B <bob@example.com>"])
    run(repo, m2, m3, first_uid=2)
    assert detail(repo, r1.conversation_id).followers == (
        ("ann@example.com", "Ann Example", True),
        ("bob@example.com", "Bob B", True),
    )
    assert backend.query(repo, subscribed) == [("ann@example.com", 1), ("bob@example.com", 0)]


# -- failures inside a batch ------------------------------------------------------------------


def test_one_bad_item_fails_alone_and_the_rest_commit(repo: Repository) -> None:
    good1 = message("g1@example.com", date=at(0))
    bad = message("bad@example.com", cc=["bob@example.com"], date=at(1))
    # A size no database integer holds: the message's own row cannot be written.
    bad = dataclasses.replace(bad, size=2**70)
    good2 = reply(good1, "g2@example.com", minutes=2)
    results = run(repo, good1, bad, good2)
    assert [r.outcome for r in results] == [Outcome.IMPORTED, Outcome.FAILED, Outcome.IMPORTED]
    assert results[1].error_code == "import_failed"
    assert results[1].error_reason
    assert results[1].conversation_id is None
    # The failed message left nothing behind: no conversation, no follower.
    summaries = repo.conversations()
    assert len(summaries) == 1
    assert summaries[0].messages == 2
    assert repo.conversations(search="bob@example.com") == []
    # Its key is free: a fixed copy imports.
    [retry] = run(repo, message("bad@example.com", date=at(1)), first_uid=4)
    assert retry.outcome is Outcome.IMPORTED


@pytest.mark.parametrize("kind", ["python", "database"])
def test_an_error_in_one_message_rolls_back_only_its_rows(
    repo: Repository, backend: Backend, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    real = rewrite_inline_images

    def explode(html: str, mapping: dict[str, str]) -> str:
        if "boom" in html:
            text = "CHECK constraint failed: forced by the test"
            raise KeyError(text) if kind == "python" else backend.refusal(text)
        return real(html, mapping)

    # Fails after the message's conversation, row, follower and files are written.
    monkeypatch.setattr(planner, "rewrite_inline_images", explode)
    ok = message("ok@example.com", html='<img src="cid:a@x">', inline_images=[inline_image("a@x")])
    boom = message(
        "boom@example.com",
        html='<p>boom</p><img src="cid:b@x">',
        cc=["zed@example.com"],
        inline_images=[inline_image("b@x")],
        attachments=[attachment()],
    )
    after = message("after@example.com", date=at(5))
    results = run(repo, ok, boom, after)
    assert [r.outcome for r in results] == [Outcome.IMPORTED, Outcome.FAILED, Outcome.IMPORTED]
    # The database refusing the rows is the message's fault; any other error is a bug.
    assert results[1].error_code == ("import_failed" if kind == "database" else "internal")
    assert "forced by the test" in (results[1].error_reason or "")
    for table, expected in (
        ("conversation", 2),
        ("conversationmessage", 2),
        ("embeddedfile", 1),
        ("document", 0),
        ("follower", 2),  # Ann in each conversation; Zed (only in the failed one) in none
        ("messagefollower", 2),
    ):
        assert backend.query(repo, f"SELECT COUNT(*) FROM {table}") == [(expected,)], table


def test_sqlite_batch_level_error_raises_and_commits_nothing(
    sqlite_repo: SqliteRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = sqlite_repo
    real = rewrite_inline_images

    def disk_full(html: str, mapping: dict[str, str]) -> str:
        if "second" in html:
            raise sqlite3.OperationalError("database or disk is full")
        return real(html, mapping)

    monkeypatch.setattr(planner, "rewrite_inline_images", disk_full)
    first = message("one@example.com", html="<p>first</p>", inline_images=[inline_image("a@x")])
    second = message("two@example.com", html="<p>second</p>", inline_images=[inline_image("b@x")])
    repo.record_failures(
        ACCOUNT,
        [FailureInfo(uid=9, message_key="one@example.com", code="import_failed", reason="earlier")],
    )
    with pytest.raises(StoreError) as info:
        run(repo, first, second)
    assert info.value.code == "disk_full"
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert repo.conversations() == []
    assert raw(tmp_path / "data" / "mailbridge.db", "SELECT COUNT(*) FROM embeddedfile") == [(0,)]
    assert len(repo.failures(ACCOUNT)) == 1  # not resolved either
    # The connection is usable afterwards.
    monkeypatch.setattr(planner, "rewrite_inline_images", real)
    assert [r.outcome for r in run(repo, first, second)] == [Outcome.IMPORTED] * 2


def test_own_mail_that_is_ignored_resolves_its_earlier_failure(repo: Repository) -> None:
    """Own mail continuing nothing is moved to Processed without being stored (ignored): dealt
    with for good, so a failure recorded for it earlier is resolved, not left in `failed`."""
    looped = message("loop@acme.test", sender="help@acme.test", to=["support@acme.test"])
    repo.record_failures(
        ACCOUNT,
        [FailureInfo(uid=4, message_key="loop@acme.test", code="unparseable", reason="earlier")],
    )
    assert len(repo.failures(ACCOUNT)) == 1
    [ignored] = run(repo, looped)
    assert ignored.outcome is Outcome.IGNORED
    assert repo.failures(ACCOUNT) == []


def test_mail_not_stored_is_listed_with_its_reason_once(repo: Repository) -> None:
    """What is moved to Processed without a conversation row is visible (``mailbridge
    discarded``): one row per message, even when a crash before the move imports it again."""
    looped = message("loop@acme.test", sender="Help <HELP@acme.test>", to=["support@acme.test"])
    [ignored] = run(repo, looped)
    [again] = run(repo, looped, first_uid=2)
    assert (ignored.outcome, again.outcome) == (Outcome.IGNORED, Outcome.IGNORED)
    [listed] = repo.not_stored(ACCOUNT)
    assert (listed.account, listed.route, listed.message_id) == (
        ACCOUNT,
        "ignored",
        "loop@acme.test",
    )
    assert listed.from_address == "help@acme.test"
    assert listed.reason == ignored.error_reason
    assert listed.message_key == ignored.message_key
    assert repo.not_stored("another") == []
    assert repo.not_stored(limit=0) == []


# -- import failures and account state --------------------------------------------------------


_LATE = FailureInfo(
    uid=5,
    message_key="late@example.com",
    code="import_failed",
    reason="first reason",
    message_id="late@example.com",
    subject="Broken",
    from_address="Ann@Example.com",
    date=at(0),
    size=1234,
)


def test_failures_upsert_and_reopen(store: Repository) -> None:
    info = _LATE
    store.record_failures(ACCOUNT, [info])
    store.record_failures(ACCOUNT, [dataclasses.replace(info, uid=6, reason="again")])
    store.set_failure_folder_uids(ACCOUNT, {"late@example.com": 77})
    [record] = store.failures(ACCOUNT)
    assert (record.attempts, record.reason, record.uid, record.folder_uid) == (2, "again", 6, 77)
    assert record.from_address == "ann@example.com"
    assert record.date == at(0)
    assert (record.subject, record.size, record.message_id) == ("Broken", 1234, "late@example.com")
    assert record.resolved is None
    assert record.first_failed <= record.last_failed
    assert store.failures("someone-else") == []
    store.record_failures(ACCOUNT, [info])
    [again] = store.failures()
    assert (again.attempts, again.folder_uid) == (3, None)  # a new failure: a new folder UID


def test_failures_upsert_and_are_resolved_by_a_later_import(repo: Repository) -> None:
    info = _LATE
    repo.record_failures(ACCOUNT, [info])
    repo.set_failure_folder_uids(ACCOUNT, {"late@example.com": 77})
    assert [f.message_key for f in repo.failures(ACCOUNT)] == ["late@example.com"]

    [result] = run(repo, message("late@example.com"))
    assert result.outcome is Outcome.IMPORTED
    assert repo.failures(ACCOUNT) == []
    [resolved] = repo.failures(ACCOUNT, include_resolved=True)
    assert resolved.resolved is not None
    assert resolved.resolution == RESOLVED_IMPORTED

    # Failing again re-opens it.
    repo.record_failures(ACCOUNT, [info])
    [reopened] = repo.failures()
    assert reopened.attempts == 2
    assert reopened.resolved is None
    assert reopened.resolution is None
    assert reopened.folder_uid is None


def _failed_in_folder(repo: Repository, account: str, folder_uids: dict[str, int | None]) -> None:
    """Record one too_large failure per key, in the Failed folder at that UID (None: unknown)."""
    repo.record_failures(
        account,
        [FailureInfo(uid=n, message_key=key, code="too_large", reason="big")
         for n, key in enumerate(folder_uids, start=1)],
    )  # fmt: skip
    repo.set_failure_folder_uids(
        account, {key: uid for key, uid in folder_uids.items() if uid is not None}
    )


def test_failures_gone_from_the_failed_folder_are_resolved(store: Repository) -> None:
    _failed_in_folder(store, ACCOUNT, {"deleted": 10, "still-there": 11, "no-uidplus": None})
    _failed_in_folder(store, "sales", {"other-account": 10})
    known = store.failures(ACCOUNT)

    # The folder now holds 11 and a message put there by hand (12): 10 was deleted by hand.
    done = store.reconcile_failures(ACCOUNT, 7, [11, 12], known)

    assert (done.resolved, done.uidvalidity_changed, done.forgotten) == (1, False, 0)
    # Without a Failed-folder UID a row cannot be matched: left alone.
    assert sorted(f.message_key for f in store.failures(ACCOUNT)) == ["no-uidplus", "still-there"]
    [gone] = [f for f in store.failures(ACCOUNT, include_resolved=True) if f.resolved]
    assert gone.message_key == "deleted"
    assert gone.resolution == RESOLVED_REMOVED
    assert gone.folder_uid == 10  # kept: where it was
    assert [f.message_key for f in store.failures("sales")] == ["other-account"]
    states = {s.account: s.failed for s in store.account_states()}
    assert states == {ACCOUNT: 2, "sales": 1}
    # Idempotent; an empty listing still leaves the UID-less row alone.
    assert store.reconcile_failures(ACCOUNT, 7, [11, 12], store.failures(ACCOUNT)).resolved == 0
    assert store.reconcile_failures(ACCOUNT, 7, [], store.failures(ACCOUNT)).resolved == 1
    assert [f.message_key for f in store.failures(ACCOUNT)] == ["no-uidplus"]

    # Failing again re-opens it, without the resolution.
    store.record_failures(
        ACCOUNT, [FailureInfo(uid=1, message_key="deleted", code="too_large", reason="big")]
    )
    [reopened] = [f for f in store.failures(ACCOUNT) if f.message_key == "deleted"]
    assert (reopened.resolved, reopened.resolution, reopened.attempts) == (None, None, 2)


def test_reconcile_only_resolves_rows_unchanged_since_they_were_read(repo: Repository) -> None:
    _failed_in_folder(repo, ACCOUNT, {"failed-again": 20, "imported": 21})
    known = repo.failures(ACCOUNT)
    # Between reading and listing: the live loop moves a new failure to the Failed folder
    # (after the listing: not in it), one message fails again under a new UID, one is imported.
    _failed_in_folder(repo, ACCOUNT, {"new": 22})
    _failed_in_folder(repo, ACCOUNT, {"failed-again": 23})
    [result] = run(repo, message("imported"))
    assert result.outcome is Outcome.IMPORTED

    assert repo.reconcile_failures(ACCOUNT, 7, [], known).resolved == 0
    rows = {f.message_key: f for f in repo.failures(ACCOUNT, include_resolved=True)}
    assert rows["new"].resolved is None
    assert (rows["failed-again"].resolved, rows["failed-again"].folder_uid) == (None, 23)
    assert rows["imported"].resolution == RESOLVED_IMPORTED


def test_reconcile_resolves_nothing_when_the_uidvalidity_changed(store: Repository) -> None:
    _failed_in_folder(store, ACCOUNT, {"a": 1, "b": 2, "no-uidplus": None})
    assert store.reconcile_failures(ACCOUNT, 100, [1, 2], store.failures(ACCOUNT)).resolved == 0

    # The folder was recreated: UID 1 is now another message, and 2 is gone; the stored UIDs
    # mean nothing.
    changed = store.reconcile_failures(ACCOUNT, 200, [1], store.failures(ACCOUNT))
    assert changed.uidvalidity_changed
    assert (changed.previous_uidvalidity, changed.forgotten, changed.resolved) == (100, 2, 0)
    rows = store.failures(ACCOUNT)
    assert len(rows) == 3
    assert [f.folder_uid for f in rows] == [None, None, None]

    # A failure recorded under the new UIDVALIDITY is matched again.
    _failed_in_folder(store, ACCOUNT, {"c": 5})
    again = store.reconcile_failures(ACCOUNT, 200, [], store.failures(ACCOUNT))
    assert (again.resolved, again.uidvalidity_changed) == (1, False)
    assert sorted(f.message_key for f in store.failures(ACCOUNT)) == ["a", "b", "no-uidplus"]


def test_failures_are_listed_newest_first(store: Repository) -> None:
    for n in range(3):
        store.record_failures(
            ACCOUNT, [FailureInfo(uid=n, message_key=f"k{n}", code="unparseable", reason="x")]
        )
    assert [f.message_key for f in store.failures()] == ["k2", "k1", "k0"]


def test_account_state_adds_imported_and_counts_failures(store: Repository) -> None:
    store.set_account_state(
        AccountState(account=ACCOUNT, state="importing", imported=5, last_import=at(1))
    )
    store.set_account_state(
        AccountState(account=ACCOUNT, state="idle", imported=3, detail="waiting", since=at(2))
    )
    store.record_failures(
        ACCOUNT, [FailureInfo(uid=1, message_key="a", code="too_large", reason="big")]
    )
    store.record_failures(
        "orphan",
        [
            FailureInfo(uid=1, message_key="b", code="unparseable", reason="bad"),
            FailureInfo(uid=2, message_key="c", code="unparseable", reason="bad"),
        ],
    )
    states = {s.account: s for s in store.account_states()}
    assert set(states) == {ACCOUNT, "orphan"}
    mine = states[ACCOUNT]
    assert mine.imported == 8
    assert mine.state == "idle"
    assert mine.detail == "waiting"
    assert mine.since == at(2)
    assert mine.last_import == at(1)  # an update without an import keeps the last one
    assert mine.failed == 1
    assert mine.updated is not None
    assert states["orphan"].failed == 2
    assert states["orphan"].imported == 0


def test_conversations_search_and_limit(repo: Repository) -> None:
    run(repo, message("s1@example.com", subject="Broken printer", date=at(0)))
    run(
        repo,
        message(
            "s2@example.com",
            subject="Other",
            text="the 100% question",
            date=at(1),
            cc=["Zoe Zed <zoe@example.com>"],
        ),
        first_uid=2,
    )
    run(repo, message("s3@example.com", subject="Third", date=at(2)), first_uid=3)
    assert [c.subject for c in repo.conversations()] == ["Third", "Other", "Broken printer"]
    assert [c.subject for c in repo.conversations(limit=1)] == ["Third"]
    assert [c.subject for c in repo.conversations(search="PRINTER")] == ["Broken printer"]
    assert [c.subject for c in repo.conversations(search="100%")] == ["Other"]
    assert [c.subject for c in repo.conversations(search="zoe@")] == ["Other"]
    assert repo.conversations(search="_") == []  # wildcards are literal
    assert repo.conversations(account="nobody") == []
    assert repo.conversation(10_000) is None


def seed_conversation(
    store: SqlRepository,
    subject: str,
    date: str,
    *,
    account: str = ACCOUNT,
    text: str = "",
    followers: tuple[tuple[str, str, int], ...] = (),
) -> int:
    """Write one conversation with one message (and its followers) as an integrator would,
    without the import path: the reading methods are tested on every backend this way."""
    key = f"k{next(_seeds)}"
    with store._sql("seed", write=True) as sql:
        sql.execute(
            "INSERT INTO conversation (uniqueid, account, subject, earliestunread,"
            " firstmessagedate, lastmessagedate) VALUES (?, ?, ?, ?, ?, ?)",
            (key, account, subject, date, date, date),
        )
        [conv] = sql.rows("SELECT id FROM conversation WHERE uniqueid = ?", (key,))
        sql.execute(
            "INSERT INTO conversationmessage (conversation, account, uid, messageid, messagekey,"
            " uniqueid, subject, fromaddress, fromname, date, message, plaintext, threadedby)"
            " VALUES (?, ?, 1, ?, ?, ?, ?, 'ann@example.com', 'Ann', ?, '<p>x</p>', ?, 'new')",
            (conv["id"], account, f"{key}@example.com", key, key, subject, date, text),
        )
        [msg] = sql.rows("SELECT id FROM conversationmessage WHERE uniqueid = ?", (key,))
        sql.execute(
            "INSERT INTO document (conversationmessage, filename, contenttype, size, document)"
            " VALUES (?, 'a.pdf', 'application/pdf', 3, ?)",
            (msg["id"], b"PDF"),
        )
        for email, name, active in followers:
            sql.execute(
                "INSERT INTO follower (conversation, email, name, active) VALUES (?, ?, ?, ?)",
                (conv["id"], email, name, active),
            )
            [fid] = sql.rows(
                "SELECT id FROM follower WHERE conversation = ? AND email = ?", (conv["id"], email)
            )
            sql.execute(
                "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
                " VALUES (?, ?, 'to')",
                (msg["id"], fid["id"]),
            )
    return int(conv["id"])


_seeds = itertools.count(1)


def test_conversations_are_listed_searched_and_read_back(store: SqlRepository) -> None:
    first = seed_conversation(store, "Broken printer", "2024-01-01T10:00:00Z")
    other = seed_conversation(
        store,
        "Other",
        "2024-01-02T10:00:00Z",
        text="the 100% question",
        followers=(("zoe@example.com", "Zoe Zed", 1), ("old@example.com", "", 0)),
    )
    seed_conversation(store, "Third", "2024-01-03T10:00:00Z", account="sales")
    assert [c.subject for c in store.conversations()] == ["Third", "Other", "Broken printer"]
    assert [c.subject for c in store.conversations(limit=1)] == ["Third"]
    assert [c.subject for c in store.conversations(account=ACCOUNT)] == ["Other", "Broken printer"]
    assert [c.subject for c in store.conversations(search="PRINTER")] == ["Broken printer"]
    assert [c.subject for c in store.conversations(search="100%")] == ["Other"]
    assert [c.subject for c in store.conversations(search="ZOE@")] == ["Other"]
    assert store.conversations(search="_") == []  # wildcards are literal
    assert store.conversation(10_000) is None

    found = detail(store, other)
    assert (found.summary.subject, found.summary.messages, found.summary.followers) == (
        "Other",
        1,
        2,
    )
    assert found.summary.earliest_unread == datetime(2024, 1, 2, 10, tzinfo=UTC)
    assert found.followers == (("zoe@example.com", "Zoe Zed", True), ("old@example.com", "", False))
    [stored] = found.messages
    assert (stored.subject, stored.from_name, stored.plain_text) == (
        "Other",
        "Ann",
        "the 100% question",
    )
    assert stored.followers == (("zoe@example.com", "to"), ("old@example.com", "to"))
    assert stored.documents == (("a.pdf", "application/pdf", 3),)
    assert stored.threaded_by == "new"

    assert store.mark_read(first)
    assert detail(store, first).summary.earliest_unread is None
    assert not store.mark_read(10_000)


def test_recovery_sweeps_are_recorded_beside_the_state(store: SqlRepository) -> None:
    store.set_account_state(AccountState(account=ACCOUNT, state="idle", imported=2))
    store.record_sweep(ACCOUNT, at(5), "retried 1, recovered 1", imported=1)
    store.record_sweep("new-account", at(6), "nothing to do", imported=0)
    states = {s.account: s for s in store.account_states()}
    assert (states[ACCOUNT].state, states[ACCOUNT].imported) == ("idle", 3)
    assert states[ACCOUNT].last_sweep == at(5)
    assert states[ACCOUNT].last_import == at(5)
    assert states[ACCOUNT].sweep_summary == "retried 1, recovered 1"
    assert (states["new-account"].state, states["new-account"].last_import) == ("stopped", None)


def test_parent_tables_are_created_and_read_back(store: SqlRepository) -> None:
    from mailbridge.config import (
        ConversationParentSettings,
        FollowerParentSettings,
        ParentPropertySettings,
    )

    person = FollowerParentSettings(table="person")
    ticket = ConversationParentSettings(
        table="ticket",
        properties=(
            ParentPropertySettings(column="title", message_property="subject"),
            ParentPropertySettings(column="customer", search_path="person.id",
                                   message_property="from_address"),
        ),
    )  # fmt: skip
    # A read-only check creates nothing and accepts tables that do not exist yet.
    store.use_parents([person], [ticket])
    with store._sql("look", write=False) as sql:
        assert sql.columns("person") == set()
    store.prepare([person], [ticket])
    store.prepare([person], [ticket])  # idempotent
    conv = seed_conversation(store, "Hello", "2024-01-01T10:00:00Z",
                             followers=(("ann@example.com", "", 1),))  # fmt: skip
    with store._sql("link", write=True) as sql:
        assert {"id", "email", "name"} <= sql.columns("person")
        assert "ticket" in sql.columns("conversation")
        sql.execute("INSERT INTO person (email, name) VALUES ('ann@example.com', 'Ann')")
        sql.execute("INSERT INTO ticket (title) VALUES ('Hello')")
        sql.execute("UPDATE conversation SET ticket = 1 WHERE id = ?", (conv,))
        sql.execute("UPDATE follower SET person = 1 WHERE conversation = ?", (conv,))
    found = detail(store, conv)
    assert found.parents == (("ticket", 1),)
    assert found.follower_parents == (("ann@example.com", "person", 1),)

    # An existing table that lacks a configured column is refused, naming the key.
    wrong = FollowerParentSettings(table="person", address_column="mail")
    with pytest.raises(ConfigError) as info:
        store.use_parents([wrong], [])
    assert info.value.path == "follower_parents[0].address_column"


# -- SQLite specifics -------------------------------------------------------------------------


def test_sqlite_files_are_owner_only(sqlite_path: Path) -> None:
    repo = SqliteRepository(sqlite_path)
    try:
        repo.migrate()
        repo.import_batch(CTX, [ImportItem(1, message())])
        assert stat.S_IMODE(sqlite_path.parent.stat().st_mode) == 0o700
        for suffix in ("", "-wal", "-shm"):
            path = sqlite_path.with_name(sqlite_path.name + suffix)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        repo.close()


def test_sqlite_locked_database_raises_and_writes_nothing(sqlite_path: Path) -> None:
    SqliteRepository(sqlite_path).close()
    repo = SqliteRepository(sqlite_path, busy_timeout=0.05)
    repo.migrate()
    other = sqlite3.connect(sqlite_path, isolation_level=None, timeout=0.05)
    try:
        other.execute("BEGIN IMMEDIATE")  # an integrator holding a write transaction
        with pytest.raises(StoreError) as info:
            repo.import_batch(CTX, [ImportItem(1, message()), ImportItem(2, message("x@y"))])
        assert info.value.code == "database_locked"
        assert info.value.transient
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(StoreError) as info2:
            repo.record_failures(
                ACCOUNT, [FailureInfo(uid=1, message_key="k", code="unparseable", reason="r")]
            )
        assert info2.value.code == "database_locked"
        other.execute("ROLLBACK")
        assert repo.conversations() == []
        assert repo.failures() == []
        # Once the integrator is done, the same batch goes through.
        results = repo.import_batch(CTX, [ImportItem(1, message())])
        assert results[0].outcome is Outcome.IMPORTED
    finally:
        other.close()
        repo.close()


def test_sqlite_error_codes_are_mapped() -> None:
    def code(exc: BaseException) -> str:
        return sqlite_backend.error_code(exc)

    assert code(sqlite3.OperationalError("database is locked")) == "database_locked"
    assert code(sqlite3.OperationalError("database table is locked")) == "database_locked"
    assert code(sqlite3.OperationalError("database or disk is full")) == "disk_full"
    assert code(OSError(28, "No space left on device")) == "disk_full"
    assert code(sqlite3.DatabaseError("file is not a database")) == "database_error"


def test_sqlite_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as info:
        SqliteRepository(blocker / "mailbridge.db")
    assert info.value.code == "database_error"


# -- the async wrapper ------------------------------------------------------------------------


async def test_async_repository_round_trip(make_repo: MakeRepo, tmp_path: Path) -> None:
    threads: list[int] = []

    def factory() -> Repository:
        threads.append(threading.get_ident())
        return make_repo(tmp_path)

    repo = AsyncRepository(factory)
    try:
        await repo.migrate()
        parent = message("a1@example.com")
        results = await repo.import_batch(
            CTX, [ImportItem(1, parent), ImportItem(2, reply(parent, "a2@x", minutes=1))]
        )
        assert [r.outcome for r in results] == [Outcome.IMPORTED, Outcome.IMPORTED]
        found = await repo.conversation(results[0].conversation_id or 0)
        assert found is not None
        assert found.summary.messages == 2
        assert found.summary.earliest_unread is not None
        assert await repo.mark_read(found.summary.id)
        assert not await repo.mark_read(999)
        again = await repo.conversation(found.summary.id)
        assert again is not None
        assert again.summary.earliest_unread is None
        assert len(await repo.conversations(ACCOUNT)) == 1
        await repo.record_failures(
            ACCOUNT, [FailureInfo(uid=3, message_key="k", code="too_large", reason="big")]
        )
        await repo.set_failure_folder_uids(ACCOUNT, {"k": 12})
        assert [f.folder_uid for f in await repo.failures(ACCOUNT)] == [12]
        done = await repo.reconcile_failures(ACCOUNT, 1, [12], await repo.failures(ACCOUNT))
        assert done.resolved == 0
        await repo.set_account_state(AccountState(account=ACCOUNT, state="idle", imported=2))
        [state] = await repo.account_states()
        assert (state.imported, state.failed) == (2, 1)
        # Calls run concurrently from the loop's point of view, one at a time on the thread.
        counts = await asyncio.gather(*(repo.conversations() for _ in range(5)))
        assert [len(c) for c in counts] == [1] * 5
    finally:
        await repo.aclose()
        await repo.aclose()  # idempotent
    assert threads
    assert threads[0] != threading.get_ident()
    with pytest.raises(StoreError):
        await repo.conversations()


async def test_async_repository_reports_a_factory_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    repo = AsyncRepository.sqlite(blocker / "db.sqlite")
    try:
        with pytest.raises(StoreError):
            await repo.migrate()
    finally:
        await repo.aclose()


# -- properties -------------------------------------------------------------------------------

PEOPLE = ("p0@example.com", "p1@example.com", "p2@example.com", "p3@example.com")


@st.composite
def threads(draw: st.DrawFn) -> tuple[list[ParsedMessage], list[int], list[int]]:
    """A reply tree of 2-7 messages (full References chains), an arrival order, batch cuts."""
    size = draw(st.integers(min_value=2, max_value=7))
    messages: list[ParsedMessage] = []
    for i in range(size):
        cc = draw(st.lists(st.sampled_from(PEOPLE), unique=True, max_size=3))
        sender = draw(st.sampled_from((*PEOPLE, "support@acme.test")))
        if sender == "support@acme.test" and not cc:
            # Mail in which only the account takes part is ignored when it threads nowhere;
            # this property is about real threads, which always have someone outside.
            cc = [PEOPLE[0]]
        if i == 0:
            messages.append(message(f"t{i}@example.com", sender=sender, cc=cc, date=at(0)))
        else:
            parent = messages[draw(st.integers(min_value=0, max_value=i - 1))]
            messages.append(reply(parent, f"t{i}@example.com", minutes=i, sender=sender, cc=cc))
    order = draw(st.permutations(range(size)))
    cuts = sorted(draw(st.sets(st.integers(min_value=1, max_value=size - 1), max_size=size)))
    return messages, list(order), cuts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(threads())
def test_any_arrival_order_of_a_thread_ends_in_one_conversation(
    make_repo: MakeRepo, case: tuple[list[ParsedMessage], list[int], list[int]]
) -> None:
    messages, order, cuts = case
    with tempfile.TemporaryDirectory() as directory:
        repo = make_repo(Path(directory))
        try:
            arrivals = [messages[i] for i in order]
            bounds = [0, *cuts, len(arrivals)]
            uid = 1
            for start, end in itertools.pairwise(bounds):
                batch = [ImportItem(uid + k, m) for k, m in enumerate(arrivals[start:end])]
                uid += len(batch)
                results = repo.import_batch(CTX, batch)
                assert all(r.outcome is Outcome.IMPORTED for r in results)
            [summary] = repo.conversations()
            assert summary.messages == len(messages)
            found = detail(repo, summary.id)
            # The newest message decides who is active, whatever order they came in.
            newest = messages[-1]
            expected = {a.email for a, _level in newest.participants()} - {"support@acme.test"}
            assert active_followers(found) == expected
            assert found.summary.first_message == at(0)
            assert found.summary.last_message == newest.date
        finally:
            repo.close()
