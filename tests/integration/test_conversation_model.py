"""The conversation model end to end: real Dovecot, the daemon's one pass, the integrator's SQL.

Followers and aliases, follower parents, conversation parents with every property source,
reply identification by subject tag and plus-address, and a corpus of real-world mail that
must import without a single Failed entry.
"""

from __future__ import annotations

import re
import sqlite3
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailbridge.config import Settings, parse_config
from mailbridge.core.identify import plus_address, tag_subject
from mailbridge.daemon.supervisor import run_once
from mailbridge.store.sqlite import SqliteRepository
from tests.integration.test_import_loop import FAILED, PROCESSED, config_data, db, mail

pytestmark = pytest.mark.dovecot

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
CORPUS_FOLDERS = ("stdlib-email", "mail-parser", "quoted-replies", "threads-notmuch/default")
_NOT_MAIL = {".json", ".py", ".md", ".html", ".pyc"}

PARENTS: dict[str, Any] = {
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
}


def settings_for(
    tmp_path: Path, dovecot: Any, user: Any, top: dict[str, Any] | None = None, **account: Any
) -> Settings:
    data = config_data(tmp_path, dovecot, user, **account)
    data["limits"] = {"attachment_max_size_mb": 25}
    data.update(top or {})
    return parse_config(data)


def deliver(dovecot: Any, user: Any, *messages: EmailMessage | bytes) -> None:
    raws = [m if isinstance(m, bytes) else m.as_bytes() for m in messages]
    dovecot.append_many(user.login, user.password, raws)


async def import_all(settings: Settings) -> None:
    [result] = await run_once(settings)
    assert result.error is None, result.error


def rows(settings: Settings, query: str, *params: object) -> list[tuple[Any, ...]]:
    conn = db(settings)
    try:
        return [tuple(row) for row in conn.execute(query, params)]
    finally:
        conn.close()


async def test_follower_activity_and_aliases(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    alias = f"help-{imap_user.login}@example.test"
    settings = settings_for(tmp_path, dovecot, imap_user, aliases=[alias])
    first = mail(
        "Order 1042",
        to=f"Support <{imap_user.address}>",
        Cc=f"Jane Doe <jane@customer.example>, Help <{alias}>",
    )
    # John answers without Jane; the alias is still on the message and is still not a follower.
    second = mail(
        "Re: Order 1042",
        to=alias,
        In_Reply_To=first["Message-ID"],
        References=first["Message-ID"],
    )
    # The account writing to itself through its alias: a loop, never a conversation.
    loop = mail("Note to self", sender=alias, to=imap_user.address)
    deliver(dovecot, imap_user, first, second, loop)
    await import_all(settings)

    [(conversation, email)] = rows(settings, "SELECT id, email FROM conversation")
    assert email == imap_user.address
    followers = rows(
        settings,
        "SELECT email, name, active FROM follower WHERE conversation = ? ORDER BY id",
        conversation,
    )
    assert followers == [
        ("john@customer.example", "John Doe", 1),
        ("jane@customer.example", "Jane Doe", 0),
    ]
    levels = rows(
        settings,
        "SELECT m.messageid, f.email, mf.participationlevel FROM messagefollower AS mf"
        " JOIN follower AS f ON f.id = mf.follower"
        " JOIN conversationmessage AS m ON m.id = mf.conversationmessage ORDER BY mf.id",
    )
    first_id = first["Message-ID"].strip("<>")
    assert (first_id, "jane@customer.example", "cc") in levels
    assert (first_id, "john@customer.example", "from") in levels
    assert not [row for row in levels if imap_user.login in row[1]]
    # Jane writes again: active again.
    third = mail(
        "Re: Order 1042",
        sender="Jane Doe <jane@customer.example>",
        to=imap_user.address,
        In_Reply_To=second["Message-ID"],
    )
    third.replace_header("Date", "Mon, 23 Nov 2026 10:00:00 +0000")
    deliver(dovecot, imap_user, third)
    await import_all(settings)
    assert rows(settings, "SELECT email, active FROM follower ORDER BY id") == [
        ("john@customer.example", 0),
        ("jane@customer.example", 1),
    ]
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 4
    assert rows(settings, "SELECT COUNT(*) FROM importfailure") == [(0,)]


async def test_parents_from_every_property_source(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = settings_for(tmp_path, dovecot, imap_user, PARENTS)
    # Start-up creates the tables the integrator fills; the integrator fills them.
    repo = SqliteRepository(settings.database)
    try:
        repo.migrate()
        repo.prepare(settings.follower_parents, settings.conversation_parents)
    finally:
        repo.close()
    conn = sqlite3.connect(settings.database)
    with conn:
        conn.execute(
            "INSERT INTO person (id, email, name, company) VALUES"
            " (11, 'John@Customer.example', 'John Doe', 500)"
        )
        conn.execute("INSERT INTO coworker (id, email, name) VALUES (4, 'agent@acme.example', 'A')")
    conn.close()

    first = mail(
        "Printer on fire", to=imap_user.address, body="It is burning.", Cc="agent@acme.example"
    )
    stranger = mail("Hello", sender="someone@else.example", to=imap_user.address)
    deliver(dovecot, imap_user, first, stranger)
    await import_all(settings)

    tickets = rows(
        settings,
        "SELECT c.subject, t.subject, t.description, t.person, t.company, t.source"
        " FROM conversation AS c JOIN ticket AS t ON t.id = c.ticket ORDER BY c.id",
    )
    assert tickets == [
        ("Printer on fire", "Printer on fire", "It is burning.", 11, 500, "email"),
        ("Hello", "Hello", "Hello", None, None, "email"),
    ]
    assert rows(settings, "SELECT email, person, coworker FROM follower ORDER BY id") == [
        ("john@customer.example", 11, None),
        ("agent@acme.example", None, 4),
        ("someone@else.example", None, None),
    ]
    # All of John's conversations link to the same person.
    again = mail("Another problem", to=imap_user.address)
    deliver(dovecot, imap_user, again)
    await import_all(settings)
    assert rows(
        settings, "SELECT COUNT(DISTINCT conversation) FROM follower WHERE person = 11"
    ) == [(2,)]


@pytest.mark.parametrize("identification", ["subject", "plus_address"])
async def test_reply_without_message_ids_joins_by_the_configured_marker(
    tmp_path: Path, dovecot: Any, imap_user: Any, identification: str
) -> None:
    settings = settings_for(tmp_path, dovecot, imap_user, {"identification": identification})
    deliver(dovecot, imap_user, mail("Broken invoice", to=imap_user.address))
    await import_all(settings)
    [(conversation, key)] = rows(settings, "SELECT id, uniqueid FROM conversation")
    # A client that keeps neither In-Reply-To nor References.
    if identification == "subject":
        answer = mail("AW: " + tag_subject("Broken invoice", key), to=imap_user.address)
    else:
        answer = mail("something else", to=plus_address(imap_user.address, key))
    forged = mail(
        "Re: Broken invoice [ID-aaaaaaaaaaaaaaaa]",
        to=plus_address(imap_user.address, "aaaaaaaaaaaaaaaa"),
    )
    deliver(dovecot, imap_user, answer, forged)
    await import_all(settings)
    stored = rows(
        settings,
        "SELECT conversation, threadedby FROM conversationmessage ORDER BY id",
    )
    assert stored[0] == (conversation, "new")
    assert stored[1] == (conversation, identification)
    assert stored[2][0] != conversation  # an unknown key starts its own conversation
    # The plus-address is the account itself, never a follower.
    assert not rows(settings, "SELECT email FROM follower WHERE email LIKE '%+%'")


def _corpus_files() -> list[Path]:
    files: list[Path] = []
    for folder in CORPUS_FOLDERS:
        base = CORPORA / folder
        if base.is_dir():
            files.extend(
                path
                for path in sorted(base.rglob("*"))
                if path.is_file()
                and path.suffix not in _NOT_MAIL
                and not path.name.endswith("_text")
            )
    return files


@pytest.mark.corpus
@pytest.mark.skipif(not CORPORA.is_dir(), reason=f"real-world mail corpora not found at {CORPORA}")
async def test_real_world_corpus_imports_without_a_failed_entry(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    files = _corpus_files()
    assert len(files) > 100
    deliver(dovecot, imap_user, *(path.read_bytes() for path in files))
    settings = settings_for(tmp_path, dovecot, imap_user)
    await import_all(settings)

    failures = rows(settings, "SELECT uid, code, reason FROM importfailure")
    assert failures == []
    assert dovecot.folder_uids(imap_user.login, imap_user.password, FAILED) == []
    assert dovecot.folder_uids(imap_user.login, imap_user.password) == []
    processed = dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)
    assert len(processed) == len(files)
    [(stored,)] = rows(settings, "SELECT COUNT(*) FROM conversationmessage")
    assert stored > len(files) * 0.9  # the rest are the corpora's own duplicates
    for html, text in rows(settings, "SELECT message, plaintext FROM conversationmessage"):
        assert "<script" not in html.lower()
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", html, re.IGNORECASE)
        assert isinstance(text, str)
    # Every inline image we stored is referenced as an embeddedfile, no longer by cid.
    for mid, cid in rows(
        settings,
        "SELECT m.id, e.contentid FROM embeddedfile AS e"
        " JOIN conversationmessage AS m ON m.id = e.conversationmessage"
        " WHERE e.contentid IS NOT NULL",
    ):
        [(html,)] = rows(settings, "SELECT message FROM conversationmessage WHERE id = ?", mid)
        assert f"cid:{cid}" not in html
