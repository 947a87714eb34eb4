"""The conversation model on SQLite: parent tables prepared and checked, old schemas upgraded,
the CLI showing parents.

The conversation rules themselves (reply identification, parents, follower parents, unread)
are contract tests run on every backend (test_store_contract.py) and planner unit tests
(test_planner.py).
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
    parse_config,
)
from mailbridge.core.model import ParsedMessage
from mailbridge.errors import ConfigError
from mailbridge.store.base import ImportContext, ImportItem, ImportResult
from mailbridge.store.schema import MIGRATIONS
from mailbridge.store.sqlite import SqliteRepository
from tests.unit.factories import PERSON, TICKET, message

OWN = frozenset({"support@acme.test", "help@acme.test"})


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


# -- parent tables ---------------------------------------------------------------------------


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


# -- the CLI ---------------------------------------------------------------------------------


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
