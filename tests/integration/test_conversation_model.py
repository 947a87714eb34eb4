"""The conversation model end to end: real Dovecot, the daemon's one pass, the integrator's SQL.

Followers and aliases, follower parents, conversation parents with every property source,
reply identification by subject tag and plus-address, a corpus of real-world mail that must
import without a single Failed entry, and the operator's view of it all: ``mailbridge
conversations`` and ``conversation show``.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any, Final

import pytest

from mailbridge.cli import main as cli_main
from mailbridge.config import Settings, parse_config
from mailbridge.core.identify import plus_address, tag_subject
from mailbridge.core.parse import parse_message
from mailbridge.core.policy import analyse
from mailbridge.daemon.supervisor import run_once
from mailbridge.store.sqlite import SqliteRepository
from tests.integration.test_import_loop import (
    FAILED,
    PROCESSED,
    config_data,
    db,
    mail,
    write_config,
)

pytestmark = pytest.mark.dovecot

# Beside the checkout, as in CI (see ../shared/corpora/README.md); the test is skipped without.
CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
# Every folder: bounces (flufl), broken headers, threading oddities (ghost roots, In-Reply-To
# loops) and duplicates (notmuch) are mail a shared mailbox receives too.
CORPUS_FOLDERS = (
    "stdlib-email",
    "mail-parser",
    "quoted-replies",
    "threads-notmuch",
    "bounces-flufl",
)
_NOT_MAIL = {".json", ".py", ".md", ".html", ".pyc"}
# Corpus messages that cannot be imported, each with the reason: none today. An entry here
# must say why the message is unimportable; a message is never left out of the test.
UNIMPORTABLE: Final[dict[str, str]] = {}
_TNEF_TYPES: Final = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})

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
        "SELECT email, name, active, subscribed FROM follower WHERE conversation = ? ORDER BY id",
        conversation,
    )
    # Subscribed is the integrator's (unsubscribe links): every follower starts subscribed.
    assert followers == [
        ("john@customer.example", "John Doe", 1, 1),
        ("jane@customer.example", "Jane Doe", 0, 1),
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


def _is_report(raw: bytes) -> bool:
    return analyse(raw, parse_message(raw))[1] is not None


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


@dataclass(frozen=True, slots=True)
class _Expected:
    """What the standard library sees in a raw message, independently of our parser."""

    html_only: bool  # a non-blank text/html body and no non-blank text/plain one
    tnef: tuple[tuple[str, bytes], ...]  # (content type, decoded bytes) of winmail.dat parts


def _expected(raw: bytes) -> _Expected:
    plain = html = False
    tnef: list[tuple[str, bytes]] = []
    pending = [BytesParser(policy=compat32).parsebytes(raw)]
    while pending:
        part = pending.pop(0)
        if part.get_content_maintype() == "message":
            continue  # an attached message's parts are not this message's
        if part.is_multipart():
            pending.extend(p for p in part.get_payload() if isinstance(p, Message))
            continue
        ctype = part.get_content_type()
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if ctype in _TNEF_TYPES or (part.get_filename() or "").lower() == "winmail.dat":
            tnef.append((ctype, data))
        elif (
            ctype in {"text/plain", "text/html"} and part.get_content_disposition() != "attachment"
        ):
            plain = plain or (ctype == "text/plain" and bool(data.strip()))
            html = html or (ctype == "text/html" and bool(data.strip()))
    return _Expected(html_only=html and not plain, tnef=tuple(tnef))


def _outlook_message(to: str) -> bytes:
    """An Outlook message in rich-text mode: the body again, as winmail.dat (TNEF). The corpora
    hold no such part (their six Exchange bounces carry only an empty X-MS-TNEF-Correlator
    header), so this one keeps the winmail.dat check from passing on nothing."""
    msg = mail("Quarterly figures", sender="Olga <olga@outlook.example>", to=to, body="See TNEF.")
    # A TNEF stream starts with the signature 0x223E9F78, little-endian.
    msg.add_attachment(
        b"\x78\x9f\x3e\x22\x01\x00" + bytes(range(256)) * 8,
        maintype="application",
        subtype="ms-tnef",
        filename="winmail.dat",
    )
    return msg.as_bytes()


@pytest.mark.corpus
@pytest.mark.skipif(not CORPORA.is_dir(), reason=f"real-world mail corpora not found at {CORPORA}")
async def test_real_world_corpus_imports_without_a_failed_entry(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    files = _corpus_files()
    assert len(files) > 250
    assert not set(UNIMPORTABLE) - {str(f.relative_to(CORPORA)) for f in files}
    raws = [path.read_bytes() for path in files] + [_outlook_message(imap_user.address)]
    names = [str(path.relative_to(CORPORA)) for path in files] + ["(constructed) Outlook TNEF"]
    deliver(dovecot, imap_user, *raws)
    # A fresh mailbox numbers the appended messages 1, 2, 3 ...: UID i is names[i - 1].
    uids = dovecot.folder_uids(imap_user.login, imap_user.password)
    assert len(uids) == len(raws)
    # Automatic mail imported too; delivery reports never make messages (see test_robots.py).
    settings = settings_for(tmp_path, dovecot, imap_user, top={"automatic_emails": "import"})
    await import_all(settings)
    reports = {uid for uid, raw in zip(uids, raws, strict=True) if _is_report(raw)}
    assert len(reports) > 100  # bounces-flufl

    # Nothing failed but what UNIMPORTABLE explains, and the Inbox is empty.
    failures = rows(settings, "SELECT uid, code, reason FROM importfailure")
    by_uid = dict(zip(uids, names, strict=True))
    assert {by_uid[uid] for uid, _code, _reason in failures} == set(UNIMPORTABLE), failures
    failed_folder = dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)
    assert len(failed_folder) == len(UNIMPORTABLE)
    assert dovecot.folder_uids(imap_user.login, imap_user.password) == []
    processed = dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)
    assert len(processed) == len(raws) - len(UNIMPORTABLE)

    # Every other message is stored once: the first copy of each message (the corpora's
    # duplicates share a Message-ID). Copies that share a Message-ID but differ in subject or
    # body (threads-notmuch/duplicate: one mail through several lists and a bug tracker, each
    # tagging the subject or adding a footer) are different messages and each is stored.
    first_of_key: dict[tuple[str, str], int] = {}
    for uid, data in zip(uids, raws, strict=True):
        parsed = parse_message(data)
        first_of_key.setdefault((parsed.message_key, parsed.fingerprint), uid)
    stored = {
        uid: (key, direction, html, text)
        for uid, key, direction, html, text in rows(
            settings,
            "SELECT uid, messagekey, direction, message, plaintext FROM conversationmessage",
        )
    }
    failed_uids = {uid for uid, _code, _reason in failures}
    assert set(stored) == set(first_of_key.values()) - failed_uids - reports
    # The corpora hold copies of one message too (stdlib-email msg_01/msg_20, one notmuch
    # message in two folders): they were recognised, not stored again.
    assert len(first_of_key) < len(raws)
    for uid, (_key, direction, html, text) in stored.items():
        assert direction == "incoming", by_uid[uid]
        assert "<script" not in html.lower()
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", html, re.IGNORECASE)
        assert isinstance(text, str)
    documents: dict[int, list[tuple[str, str, bytes]]] = {}
    for uid, filename, ctype, blob in rows(
        settings,
        "SELECT m.uid, d.filename, d.contenttype, d.document FROM document AS d"
        " JOIN conversationmessage AS m ON m.id = d.conversationmessage ORDER BY d.id",
    ):
        documents.setdefault(uid, []).append((filename, ctype, blob))

    # HTML-only mail gets a plain text derived from its HTML; winmail.dat is a document.
    html_only = tnef = 0
    for uid in stored:
        expected = _expected(raws[uids.index(uid)])
        if expected.html_only:
            html_only += 1
            assert stored[uid][3].strip(), f"{by_uid[uid]}: HTML-only, but no plain text"
            assert stored[uid][2].strip(), f"{by_uid[uid]}: HTML-only, but no HTML"
        for ctype, data in expected.tnef:
            tnef += 1
            assert any(
                (name.lower(), kind, blob) == ("winmail.dat", ctype, data)
                for name, kind, blob in documents.get(uid, [])
            ), by_uid[uid]
    assert html_only >= 5  # the corpora's HTML-only bounces are delivery errors, not messages
    assert tnef >= 1

    # Bounces never become messages: each one's failed recipients are delivery errors (no
    # outgoing mail is stored here, so none is matched), flufl.bounce's expected answers.
    bounces = json.loads((CORPORA / "bounces-flufl" / "expected.json").read_text())
    uid_of = {name: uid for uid, name in by_uid.items()}
    recorded = {recipient for (recipient,) in rows(
        settings, "SELECT recipient FROM conversationmessageerror WHERE matchedby = 'none'"
    )}  # fmt: skip
    for bounce in bounces:
        uid = uid_of[f"bounces-flufl/{bounce['file']}"]
        if uid not in reports:
            continue  # not a bounce at all (a person's reply, an auto-reply): stored above
        assert uid not in stored, bounce["file"]
        for address in bounce["failed"]:
            assert address.lower() in recorded, (bounce["file"], address)
    # Exchange's X-MS-TNEF-Correlator header alone (six bounces) makes no phantom attachment.
    for name in ("simple_34", "simple_35", "simple_36", "simple_37", "qmail_06", "aol_01"):
        parsed = parse_message(raws[uids.index(uid_of[f"bounces-flufl/{name}.txt"])])
        assert parsed.plain_text.strip(), name
        assert not parsed.attachments, name

    # Every inline image we stored is referenced as an embeddedfile, no longer by cid.
    for mid, cid in rows(
        settings,
        "SELECT m.id, e.contentid FROM embeddedfile AS e"
        " JOIN conversationmessage AS m ON m.id = e.conversationmessage"
        " WHERE e.contentid IS NOT NULL",
    ):
        [(html,)] = rows(settings, "SELECT message FROM conversationmessage WHERE id = ?", mid)
        assert f"cid:{cid}" not in html


def _table_rows(out: str) -> list[list[str]]:
    """The body rows of the rich table in ``out``, as lists of cell texts."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    ]


def test_cli_conversations_lists_filters_and_prints_mail_text_as_written(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    sales_login = f"sales-{secrets.token_hex(3)}"
    sales_password = secrets.token_urlsafe(12)
    dovecot.add_user(sales_login, sales_password)
    sales_address = f"{sales_login}@example.test"
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"].append(
        {
            **data["accounts"][0],
            "name": "sales",
            "address": sales_address,
            "auth": {"username": sales_login, "password": sales_password},
        }
    )
    path = write_config(tmp_path, data)
    settings = parse_config(data)

    # Text that looks like console markup or emoji codes, and a terminal escape sequence.
    invoice = mail(
        "[external] Invoice [/quote]",
        to=imap_user.address,
        body="> [quote]Pay now[/quote]\n[/quote] :warning: [b]not bold[/b]\x1b[2J",
    )
    invoice.replace_header("Date", "Mon, 23 Nov 2026 09:00:00 +0000")
    printer = mail(
        "Printer on fire", sender="Jane Doe <jane@customer.example>", to=imap_user.address
    )
    printer.replace_header("Date", "Mon, 23 Nov 2026 10:00:00 +0000")
    quote = mail("Quote for 100 chairs", sender="Zoe Zed <zoe@buyer.example>", to=sales_address)
    quote.replace_header("Date", "Mon, 23 Nov 2026 11:00:00 +0000")
    deliver(dovecot, imap_user, invoice, printer)
    dovecot.append(sales_login, sales_password, quote.as_bytes())
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    capsys.readouterr()

    conversations = {
        subject: [str(cid), account, subject, "1", "1", f"2026-11-23T{hour}:00:00+00:00", key]
        for cid, account, subject, key, hour in rows(
            settings,
            "SELECT id, account, subject, uniqueid, substr(lastmessagedate, 12, 2)"
            " FROM conversation",
        )
    }
    invoice_row = conversations["[external] Invoice [/quote]"]
    printer_row = conversations["Printer on fire"]
    quote_row = conversations["Quote for 100 chairs"]

    def listed(*args: str) -> tuple[str, list[list[str]]]:
        assert cli_main(["-c", str(path), "conversations", *args]) == 0
        out = capsys.readouterr().out
        return out.splitlines()[0].strip(), _table_rows(out)

    # Newest first, every account.
    assert listed() == ("3 conversation(s)", [quote_row, printer_row, invoice_row])
    assert listed("--account", "support") == ("2 conversation(s)", [printer_row, invoice_row])
    assert listed("--account", "sales") == ("1 conversation(s)", [quote_row])
    assert listed("--search", "INVOICE") == ("1 conversation(s)", [invoice_row])
    assert listed("--search", "[/quote]") == ("1 conversation(s)", [invoice_row])  # the body
    assert listed("--search", "zoe@buyer") == ("1 conversation(s)", [quote_row])  # an address
    assert listed("--account", "sales", "--search", "invoice") == ("0 conversation(s)", [])
    # A name that is neither configured nor stored is a typo, not an empty list.
    assert cli_main(["-c", str(path), "conversations", "--account", "slaes"]) == 1
    assert "no account named 'slaes' (configured: sales, support)" in capsys.readouterr().err

    assert cli_main(["-c", str(path), "conversation", "show", invoice_row[0]]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"Conversation {invoice_row[0]}  [external] Invoice [/quote]"
    assert "followers: John Doe <john@customer.example>" in lines
    assert "Subject: [external] Invoice [/quote]" in lines
    assert "> [quote]Pay now[/quote]" in lines
    assert "[/quote] :warning: [b]not bold[/b][2J" in lines
    assert "\x1b" not in out
