"""Config of the conversation model: identification, follower_parents, conversation_parents."""

from __future__ import annotations

import copy
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mailbridge.cli import main as cli_main
from mailbridge.config import load_config, parse_config
from mailbridge.errors import ConfigError
from mailbridge.store.base import ImportContext

BASE: dict[str, Any] = {
    "identification": "subject",
    "follower_parents": [
        {"table": "person", "address_column": "email", "name_column": "name"},
        {"table": "coworker", "address_column": "email", "name_column": "name"},
    ],
    "conversation_parents": [
        {
            "table": "ticket",
            "accounts": ["support"],
            "properties": [
                {"column": "subject", "message_property": "subject"},
                {"column": "description", "message_property": "plain_text"},
                {
                    "column": "person",
                    "message_property": "from_address",
                    "search_path": "person.email",
                },
                {"column": "company", "search_path": "person.company"},
                {"column": "source", "default": "email"},
            ],
        }
    ],
    "accounts": [
        {
            "name": "support",
            "address": "support@example.com",
            "aliases": ["help@example.com"],
            "imap": {"host": "imap.example.com"},
            "auth": {"username": "u", "password": "p"},
        },
        {
            "name": "sales",
            "address": "sales@example.com",
            "imap": {"host": "imap.example.com"},
            "auth": {"username": "u", "password": "p"},
        },
    ],
}


def with_changes(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (list indexes as numbers) replaced."""
    data = copy.deepcopy(BASE)
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_the_issue_example_parses_and_builds_per_account_contexts() -> None:
    settings = parse_config(BASE)
    assert settings.identification == "subject"
    assert [fp.table for fp in settings.follower_parents] == ["person", "coworker"]
    [ticket] = settings.conversation_parents
    assert ticket.properties[3].search_table == "person"
    assert ticket.properties[3].search_column == "company"
    support = ImportContext.for_account(settings, settings.account("support"))
    sales = ImportContext.for_account(settings, settings.account("sales"))
    assert support.own_addresses == {"support@example.com", "help@example.com"}
    assert support.identification == "subject"
    assert [cp.table for cp in support.conversation_parents] == ["ticket"]
    assert sales.conversation_parents == ()
    assert sales.follower_parents == settings.follower_parents


def test_defaults_are_message_id_and_no_parents() -> None:
    data = {"accounts": BASE["accounts"]}
    settings = parse_config(data)
    assert settings.identification == "message_id"
    assert settings.follower_parents == ()
    assert settings.conversation_parents == ()


@pytest.mark.parametrize(
    ("path", "value", "key_path", "words"),
    [
        ("identification", "references", "identification", "message_id"),
        (
            "conversation_parents.0.accounts",
            ["nobody"],
            "conversation_parents[0].accounts[0]",
            "no account named 'nobody'",
        ),
        ("conversation_parents.0.table", "select", "conversation_parents[0].table", "keyword"),
        ("conversation_parents.0.table", "Ticket", "conversation_parents[0].table", "not a valid"),
        (
            "conversation_parents.0.table",
            'ticket"; drop',
            "conversation_parents[0].table",
            "not a valid",
        ),
        (
            "conversation_parents.0.table",
            "conversation",
            "conversation_parents[0].table",
            "mailbridge's tables",
        ),
        (
            "conversation_parents.0.table",
            "subject",
            "conversation_parents[0].table",
            "conversation.subject",
        ),
        (
            "conversation_parents.0.table",
            "person",
            "conversation_parents[0].table",
            "follower_parents",
        ),
        ("follower_parents.1.table", "person", "follower_parents[1].table", "twice"),
        ("follower_parents.0.table", "active", "follower_parents[0].table", "follower.active"),
        ("follower_parents.0.address_column", "id", "follower_parents[0].address_column", "'id'"),
        (
            "conversation_parents.0.properties.0",
            {"column": "id", "message_property": "subject"},
            "conversation_parents[0].properties[0]",
            "'id'",
        ),
        (
            "conversation_parents.0.properties.0",
            {"column": "subject"},
            "conversation_parents[0].properties[0]",
            "message_property, search_path or default",
        ),
        (
            "conversation_parents.0.properties.1",
            {"column": "subject", "default": "x"},
            "conversation_parents[0].properties",
            "set twice",
        ),
        (
            "conversation_parents.0.properties.0",
            {"column": "subject", "message_property": "body"},
            "conversation_parents[0].properties[0].message_property",
            "plain_text",
        ),
        (
            "conversation_parents.0.properties.3",
            {"column": "company", "search_path": "company"},
            "conversation_parents[0].properties[3].search_path",
            "not a valid",
        ),
        (
            "conversation_parents.0.properties.3",
            {"column": "company", "search_path": "org.name"},
            "conversation_parents[0].properties[3].search_path",
            "follower_parents",
        ),
        (
            "conversation_parents.0.properties.3",
            {"column": "company", "search_path": "follower.name", "message_property": "subject"},
            "conversation_parents[0].properties[3].search_path",
            "mailbridge's tables",
        ),
    ],
)
def test_model_errors_name_the_key_path(path: str, value: Any, key_path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_changes(path, value))
    assert info.value.path == key_path
    assert words in str(info.value)


def test_a_config_that_does_not_fit_the_database_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "mailbridge.db"
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE person (id INTEGER PRIMARY KEY, mail TEXT)")
    conn.close()
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            database: {database}
            follower_parents: [{{table: person, address_column: email}}]
            accounts:
              - name: support
                address: support@example.com
                imap: {{host: 127.0.0.1}}
                auth: {{username: u, password: p}}
            """
        )
    )
    assert load_config(config).follower_parents[0].table == "person"
    assert cli_main(["-c", str(config), "conversations"]) == 78
    assert "follower_parents[0].address_column" in capsys.readouterr().err
