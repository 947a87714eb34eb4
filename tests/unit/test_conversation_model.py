"""The conversation model in the store: reply identification, parents, follower parents, unread.

Run against SQLite directly (the raw rows are part of what integrators rely on).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailbridge.cli import main as cli_main
from mailbridge.config import (
    ConversationParentSettings,
    FollowerParentSettings,
    Identification,
    parse_config,
)
from mailbridge.core.identify import plus_address, tag_subject
from mailbridge.core.model import ParsedMessage
from mailbridge.errors import ConfigError
from mailbridge.store.base import ImportContext, ImportItem, ImportResult, Outcome
from mailbridge.store.schema import MIGRATIONS
from mailbridge.store.sqlite import SqliteRepository
from tests.unit.factories import at, message, reply

OWN = frozenset({"support@acme.test", "help@acme.test"})
PERSON = FollowerParentSettings(table="person", address_column="email", name_column="name")
COWORKER = FollowerParentSettings(table="coworker", address_column="email", name_column="name")
TICKET = ConversationParentSettings.model_validate(
    {
        "table": "ticket",
        "properties": [
            {"column": "subject", "message_property": "subject"},
            {"column": "description", "message_property": "plain_text"},
            {"column": "person", "message_property": "from_address", "search_path": "person.email"},
            {"column": "company", "search_path": "person.company"},
            {"column": "source", "default": "email"},
            {"column": "sender", "message_property": "from_name", "default": "unknown"},
            {"column": "received", "message_property": "date"},
            {"column": "mailbox", "message_property": "account"},
        ],
    }
)


def context(
    identification: Identification = "message_id", account: str = "support", **kw: Any
) -> ImportContext:
    return ImportContext(
        account=account,
        address=f"{account}@acme.test" if account != "support" else "support@acme.test",
        own_addresses=OWN if account == "support" else frozenset({f"{account}@acme.test"}),
        identification=identification,
        **kw,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "mailbridge.db"


@pytest.fixture
def repo(path: Path) -> Iterator[SqliteRepository]:
    repository = SqliteRepository(path)
    repository.migrate()
    yield repository
    repository.close()


def sql(path: Path, query: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def write(path: Path, statement: str, *params: object) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(statement, params)
    finally:
        conn.close()


_uids = iter(range(1, 10_000))


def imp(repo: SqliteRepository, ctx: ImportContext, *messages: ParsedMessage) -> list[ImportResult]:
    return repo.import_batch(ctx, [ImportItem(next(_uids), m) for m in messages])


def key_of(path: Path, conversation_id: int | None) -> str:
    [(key,)] = sql(path, "SELECT uniqueid FROM conversation WHERE id = ?", conversation_id)
    return str(key)


# -- Message-ID threading --------------------------------------------------------------------


def test_cc_replying_to_the_original_lands_in_the_same_conversation(repo: SqliteRepository) -> None:
    original = message("orig@customer.test", to=["support@acme.test"], cc=["Jane <jane@x.test>"])
    ours = reply(
        original, "ours@acme.test", minutes=1, sender="support@acme.test", to=["ann@example.com"]
    )
    # Jane answers the original (not our reply); Ann answers ours.
    jane = reply(original, "jane1@x.test", minutes=2, sender="Jane <jane@x.test>")
    ann = reply(ours, "ann2@customer.test", minutes=3)
    results = imp(repo, context(), original, ours, jane, ann)
    assert [r.outcome for r in results] == [Outcome.IMPORTED] * 4
    assert {r.conversation_id for r in results} == {results[0].conversation_id}
    assert len(repo.conversations()) == 1


def test_reply_to_a_message_inserted_by_the_integrator_threads_to_it(
    repo: SqliteRepository, path: Path
) -> None:
    [first] = imp(repo, context(), message("first@customer.test"))
    # The integrator's sending code stored the message it sent, with a per-recipient copy id.
    write(
        path,
        "INSERT INTO conversationmessage (conversation, account, messageid, messagekey, uniqueid,"
        " direction, date) VALUES (?, 'support', 'sent@acme.test', 'sent@acme.test', 'u1',"
        " 'outgoing', ?)",
        first.conversation_id,
        "2024-03-01T09:05:00Z",
    )
    [(mid,)] = sql(path, "SELECT id FROM conversationmessage WHERE messageid = 'sent@acme.test'")
    [(fid,)] = sql(path, "SELECT id FROM follower")
    write(
        path,
        "INSERT INTO messagefollower (conversationmessage, follower, participationlevel,"
        " messageid) VALUES (?, ?, 'to', 'copy-for-ann@acme.test')",
        mid,
        fid,
    )
    to_sent = message("r1@customer.test", in_reply_to=["sent@acme.test"], date=at(10))
    to_copy = message("r2@customer.test", in_reply_to=["copy-for-ann@acme.test"], date=at(11))
    results = imp(repo, context(), to_sent, to_copy)
    assert [r.conversation_id for r in results] == [first.conversation_id] * 2
    assert sql(path, "SELECT threadedby FROM conversationmessage WHERE messageid LIKE 'r%'") == [
        ("message_id",),
        ("message_id",),
    ]


# -- plus addressing -------------------------------------------------------------------------


def test_plus_address_joins_the_conversation_without_any_message_id(
    repo: SqliteRepository, path: Path
) -> None:
    ctx = context("plus_address")
    [first] = imp(repo, ctx, message("p1@customer.test", subject="Broken"))
    key = key_of(path, first.conversation_id)
    # A client that drops In-Reply-To and References, writing to our Reply-To.
    answer = message(
        "p2@customer.test", subject="other words", to=[plus_address("help@acme.test", key)]
    )
    delivered = message(
        "p3@customer.test", to=["someone@else.test"], delivered_to=[f"support+{key}@acme.test"]
    )
    results = imp(repo, ctx, answer, delivered)
    assert [r.conversation_id for r in results] == [first.conversation_id] * 2
    found = repo.conversation(first.conversation_id or 0)
    assert found is not None
    # The plus-address is the account itself: no follower, and the reply-from address is plain.
    assert "support+" not in str(found.followers)
    assert all("+" not in email for email, _n, _a in found.followers)
    assert [m.threaded_by for m in found.messages] == ["new", "plus_address", "plus_address"]


def test_plus_address_key_wins_over_message_id_threading(
    repo: SqliteRepository, path: Path
) -> None:
    ctx = context("plus_address")
    a, b = imp(repo, ctx, message("a@customer.test"), message("b@customer.test", date=at(1)))
    key_b = key_of(path, b.conversation_id)
    cross = message(
        "c@customer.test", in_reply_to=["a@customer.test"], to=[f"support+{key_b}@acme.test"]
    )
    [result] = imp(repo, ctx, cross)
    assert result.conversation_id == b.conversation_id != a.conversation_id


# -- subject tag -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["Re: ", "AW: ", "SV: ", "Antw: ", "回复：", "Re[2]: Fwd: ", ""])
def test_subject_tag_joins_whatever_the_prefixes(
    repo: SqliteRepository, path: Path, prefix: str
) -> None:
    ctx = context("subject")
    [first] = imp(repo, ctx, message("s1@customer.test", subject="Invoice " + "x" * 200))
    tagged = tag_subject("Invoice " + "x" * 200, key_of(path, first.conversation_id))
    assert len(tagged) == 128
    [answer] = imp(repo, ctx, message("s2@customer.test", subject=prefix + tagged, date=at(5)))
    assert answer.conversation_id == first.conversation_id
    assert answer.new_conversation is False


def test_the_chosen_marker_only_is_read(repo: SqliteRepository, path: Path) -> None:
    [first] = imp(repo, context("message_id"), message("m1@customer.test"))
    key = key_of(path, first.conversation_id)
    # With message_id identification a tag or plus-address alone starts a new conversation.
    tagged = message("m2@customer.test", subject=f"Hi [ID-{key}]", to=[f"support+{key}@acme.test"])
    [result] = imp(repo, context("message_id"), tagged)
    assert result.new_conversation


# -- forged keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("identification", ["plus_address", "subject"])
def test_a_forged_or_foreign_key_never_joins_someone_elses_conversation(
    repo: SqliteRepository, path: Path, identification: Identification
) -> None:
    ours, theirs = context(identification), context(identification, account="sales")
    [victim] = imp(repo, theirs, message("v@customer.test", to=["sales@acme.test"]))
    foreign = key_of(path, victim.conversation_id)
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
    [(count,)] = sql(
        path,
        "SELECT COUNT(*) FROM conversationmessage WHERE conversation = ?",
        victim.conversation_id,
    )
    assert count == 1


# -- parents ---------------------------------------------------------------------------------


def test_conversation_parent_gets_a_record_with_every_property_source(
    repo: SqliteRepository, path: Path
) -> None:
    ctx = context(follower_parents=(PERSON,), conversation_parents=(TICKET,))
    repo.prepare(ctx.follower_parents, ctx.conversation_parents)
    # Tables mailbridge created; the integrator fills them.
    assert {c for (_i, c, *_r) in sql(path, "PRAGMA table_info(person)")} >= {
        "id",
        "email",
        "name",
        "company",
    }
    write(
        path,
        "INSERT INTO person (id, email, name, company) VALUES (7, 'Ann@Example.com', 'Ann', 42)",
    )
    first = message(
        "t1@customer.test", subject="Printer on fire", text="Help!", sender="ann@example.com"
    )
    nameless = message("t2@customer.test", subject="Who", sender="nobody@else.test", date=at(3))
    a, b = imp(repo, ctx, first, nameless)
    [ticket] = sql(
        path,
        "SELECT id, subject, description, person, company, source, sender,"
        " received, mailbox FROM ticket WHERE id = (SELECT ticket FROM"
        " conversation WHERE id = ?)",
        a.conversation_id,
    )
    assert ticket[1:] == (
        "Printer on fire",
        "Help!",
        7,
        42,
        "email",
        "unknown",
        "2024-03-01T09:00:00Z",
        "support",
    )
    [other] = sql(
        path,
        "SELECT person, company, sender FROM ticket WHERE id = (SELECT ticket"
        " FROM conversation WHERE id = ?)",
        b.conversation_id,
    )
    assert other == (None, None, "unknown")  # unknown sender: no person, no company
    # A reply creates no second ticket.
    imp(repo, ctx, reply(first, "t3@customer.test", minutes=5))
    assert sql(path, "SELECT COUNT(*) FROM ticket") == [(2,)]
    found = repo.conversation(a.conversation_id or 0)
    assert found is not None
    assert found.parents == (("ticket", ticket[0]),)
    assert ("ann@example.com", "person", 7) in found.follower_parents


def test_follower_parents_link_every_conversation_of_a_person(
    repo: SqliteRepository, path: Path
) -> None:
    ctx = context(follower_parents=(PERSON, COWORKER))
    repo.prepare(ctx.follower_parents, ())
    write(path, "INSERT INTO person (id, email, name) VALUES (3, 'ann@example.com', 'Ann Person')")
    write(path, "INSERT INTO coworker (id, email, name) VALUES (9, 'BOB@acme.test', 'Bob')")
    one = message("f1@customer.test", sender="ann@example.com", cc=["bob@acme.test"])
    two = message("f2@customer.test", sender="Ann <ann@example.com>", date=at(2))
    results = imp(repo, ctx, one, two)
    rows = sql(path, "SELECT conversation, email, name, person, coworker FROM follower ORDER BY id")
    assert rows == [
        (results[0].conversation_id, "ann@example.com", "Ann Person", 3, None),
        (results[0].conversation_id, "bob@acme.test", "Bob", None, 9),
        (results[1].conversation_id, "ann@example.com", "Ann", 3, None),
    ]


def test_parent_only_for_the_accounts_it_names(repo: SqliteRepository, path: Path) -> None:
    only_sales = ConversationParentSettings.model_validate(
        {
            "table": "deal",
            "accounts": ["sales"],
            "properties": [{"column": "title", "message_property": "subject"}],
        }
    )
    settings_like = (only_sales,)
    repo.prepare((), settings_like)
    support = ImportContext("support", own_addresses=OWN, conversation_parents=())
    sales = ImportContext(
        "sales", own_addresses=frozenset({"sales@acme.test"}), conversation_parents=settings_like
    )
    imp(repo, support, message("d1@customer.test"))
    imp(repo, sales, message("d2@customer.test", subject="Big deal"))
    assert sql(path, "SELECT title FROM deal") == [("Big deal",)]
    assert sql(path, "SELECT account, deal IS NOT NULL FROM conversation ORDER BY id") == [
        ("support", 0),
        ("sales", 1),
    ]


def test_prepare_checks_existing_tables_and_names_the_key(
    repo: SqliteRepository, path: Path
) -> None:
    write(path, "CREATE TABLE person (id INTEGER PRIMARY KEY, mail TEXT)")
    with pytest.raises(ConfigError) as info:
        repo.prepare((PERSON,), ())
    assert info.value.path == "follower_parents[0].address_column"
    write(path, "CREATE TABLE ticket (id INTEGER PRIMARY KEY, subject TEXT)")
    fine = FollowerParentSettings(table="person", address_column="mail", name_column=None)
    with pytest.raises(ConfigError) as info:
        repo.prepare((fine,), (TICKET,))
    assert info.value.path == "conversation_parents[0].properties[1].column"
    lookup = ConversationParentSettings.model_validate(
        {
            "table": "ticket",
            "properties": [
                {
                    "column": "subject",
                    "message_property": "from_address",
                    "search_path": "customer.email",
                }
            ],
        }
    )
    with pytest.raises(ConfigError) as info:
        repo.prepare((fine,), (lookup,))
    assert info.value.path == "conversation_parents[0].properties[0].search_path"
    assert "no table 'customer'" in str(info.value)


def test_prepare_is_idempotent_and_keeps_integrator_data(
    repo: SqliteRepository, path: Path
) -> None:
    repo.prepare((PERSON,), (TICKET,))
    write(path, "INSERT INTO person (email, name) VALUES ('x@y.test', 'X')")
    repo.close()
    again = SqliteRepository(path)
    try:
        again.migrate()
        again.prepare((PERSON,), (TICKET,))
    finally:
        again.close()
    assert sql(path, "SELECT email FROM person") == [("x@y.test",)]
    columns = {row[1] for row in sql(path, "PRAGMA table_info(conversation)")}
    assert "ticket" in columns


def test_a_version_1_database_is_upgraded_in_place(path: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for statement in MIGRATIONS[0].statements:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO conversation (uniqueid, account) VALUES ('k', 'support')")
    conn.close()
    repo = SqliteRepository(path)
    try:
        repo.migrate()
        assert repo.schema_version() == MIGRATIONS[-1].version
    finally:
        repo.close()
    assert sql(path, "SELECT uniqueid FROM conversation") == [("k",)]
    assert "threadedby" in {row[1] for row in sql(path, "PRAGMA table_info(conversationmessage)")}


# -- unread ----------------------------------------------------------------------------------


def test_earliest_unread_is_the_oldest_incoming_and_mark_read_clears_it(
    repo: SqliteRepository,
) -> None:
    first = message("u1@customer.test", date=at(10))
    late_older = reply(first, "u0@customer.test", minutes=5)
    [a] = imp(repo, context(), first)
    imp(repo, context(), late_older)
    [summary] = repo.conversations()
    assert summary.earliest_unread == at(5)
    assert repo.mark_read(a.conversation_id or 0)
    [summary] = repo.conversations()
    assert summary.earliest_unread is None
    imp(repo, context(), reply(first, "u2@customer.test", minutes=20))
    [summary] = repo.conversations()
    assert summary.earliest_unread == at(20)
    assert not repo.mark_read(12345)


def test_cli_shows_parents_and_marks_read(
    tmp_path: Path, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = parse_config(
        {
            "database": str(path),
            "follower_parents": [{"table": "person"}],
            "conversation_parents": [
                {"table": "ticket", "properties": [{"column": "source", "default": "email"}]}
            ],
            "accounts": [
                {
                    "name": "support",
                    "address": "support@acme.test",
                    "imap": {"host": "127.0.0.1"},
                    "auth": {"username": "u", "password": "p"},
                }
            ],
        }
    )
    config = tmp_path / "config.yaml"
    config.write_text(settings.model_dump_json(exclude={"source"}))  # JSON is YAML
    repo = SqliteRepository(path)
    try:
        repo.migrate()
        repo.prepare(settings.follower_parents, settings.conversation_parents)
        write(path, "INSERT INTO person (id, email, name) VALUES (5, 'ann@example.com', 'Ann')")
        ctx = ImportContext.for_account(settings, settings.accounts[0])
        [result] = imp(repo, ctx, message("cli@x.test", subject="Tagged [ID-abcdefghij234567]"))
    finally:
        repo.close()
    cid = str(result.conversation_id)
    assert cli_main(["-c", str(config), "conversation", "show", cid]) == 0
    out = capsys.readouterr().out
    assert "parent: ticket 1" in out
    assert "<ann@example.com> [person 5]" in out
    assert "Tagged [ID-abcdefghij234567]" in out  # not eaten as console markup
    assert "earliest unread: 2024-03-01" in out
    assert cli_main(["-c", str(config), "conversation", "read", cid]) == 0
    assert cli_main(["-c", str(config), "conversation", "show", cid]) == 0
    assert "earliest unread: none (read)" in capsys.readouterr().out
    assert cli_main(["-c", str(config), "conversation", "read", "999"]) == 1
