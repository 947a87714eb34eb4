"""The import side of automatic mail and bounces, on each backend (SQLite, and PostgreSQL on the
session's throwaway cluster): the policy applied, the automatic columns,
conversationmessageerror rows and the follower mark, and the CLI's ``errors`` listing and
``errors resolve``. The matching rules alone: test_delivery_matching.py."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from mailbridge.cli import main as cli_main
from mailbridge.config import PostgresUrl
from mailbridge.core.parse import parse_message
from mailbridge.core.policy import AutomaticPolicy, BotLists, analyse
from mailbridge.store.base import ImportContext, ImportItem, ImportResult, Outcome
from mailbridge.store.postgres import PostgresRepository
from mailbridge.store.sqlite import SqliteRepository
from tests.conftest import PostgresDatabase

OWN = frozenset({"support@acme.test"})


def _context(policy: AutomaticPolicy | None = None) -> ImportContext:
    return ImportContext(
        account="support",
        address="support@acme.test",
        own_addresses=OWN,
        automatic_policy=policy or AutomaticPolicy(),
    )


def _item(uid: int, raw: bytes) -> ImportItem:
    parsed = parse_message(raw)
    automatic, report = analyse(raw, parsed)
    return ImportItem(uid=uid, message=parsed, automatic=automatic, report=report)


Store = SqliteRepository | PostgresRepository


@dataclass
class Db:
    """The test's database on one backend, read and written beside the repository as an
    integrator would (``?`` placeholders)."""

    path: Path | None = None  # SQLite
    postgres: PostgresDatabase | None = None

    def open(self) -> Store:
        if self.postgres is not None:
            return PostgresRepository(self.postgres.url, password=self.postgres.password)
        assert self.path is not None
        return SqliteRepository(self.path)

    def config(self, tmp_path: Path) -> str:
        """The ``database`` lines of a config file."""
        if self.postgres is None:
            return f"database: {self.path}\n"
        secret = tmp_path / "db.pw"
        secret.write_text(self.postgres.password + "\n", encoding="utf-8")
        secret.chmod(0o600)
        return f"database: {self.postgres.url}\ndatabase_password_file: {secret}\n"


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    if request.param == "postgres":
        return Db(postgres=request.getfixturevalue("postgres_database"))
    return Db(path=tmp_path / "mailbridge.db")


@pytest.fixture
def repo(db: Db) -> Iterator[Store]:
    repository = db.open()
    repository.migrate()
    yield repository
    repository.close()


def _sql(db: Db, query: str, *params: object) -> list[tuple[Any, ...]]:
    if db.postgres is not None:
        conninfo = make_conninfo("", **PostgresUrl.parse(db.postgres.url).connection_parameters())
        with psycopg.connect(conninfo, password=db.postgres.password, autocommit=True) as conn:
            cursor = conn.execute(query.replace("%", "%%").replace("?", "%s").encode(), params)
            return cursor.fetchall() if cursor.description else []
    assert db.path is not None
    lite = sqlite3.connect(db.path)
    try:
        with lite:
            return lite.execute(query, params).fetchall()
    finally:
        lite.close()


def _import(
    repo: Store, raw: bytes, uid: int = 1, policy: AutomaticPolicy | None = None
) -> ImportResult:
    [result] = repo.import_batch(_context(policy), [_item(uid, raw)])
    return result


CUSTOMER = b"""\
From: Ann Customer <ann@customer.example>
To: support@acme.test
Cc: bob@customer.example
Subject: Printer broken
Message-ID: <first@customer.example>
Date: Mon, 16 Nov 2026 09:00:00 +0000

It does not print.
"""

OOO_NEW = b"""\
From: Carl <carl@partner.example>
To: support@acme.test
Subject: Automatic reply: Hello
Auto-Submitted: auto-replied
Message-ID: <ooo-1@partner.example>
Date: Mon, 16 Nov 2026 09:05:00 +0000

I am away.
"""

OOO_REPLY = b"""\
From: Ann Customer <ann@customer.example>
To: support@acme.test
Subject: Automatic reply: Printer broken
Auto-Submitted: auto-replied
In-Reply-To: <first@customer.example>
Message-ID: <ooo-2@customer.example>
Date: Mon, 16 Nov 2026 09:10:00 +0000

I am away.
"""


def _bounce(original_id: str | None, recipient: str = "bob@customer.example") -> bytes:
    headers = f"Message-ID: <{original_id}>\n" if original_id else ""
    return f"""\
Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx.acme.test>
To: support@acme.test
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-{original_id or "x"}@mx.acme.test>
Date: Mon, 16 Nov 2026 10:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Could not deliver.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.acme.test

Final-Recipient: rfc822; {recipient}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 User unknown

--B
Content-Type: text/rfc822-headers

From: support@acme.test
To: {recipient}
{headers}Subject: Re: Printer broken

--B--
""".encode()


def _outgoing(db: Db, message_id: str) -> tuple[int, int]:
    """An integrator's sent reply to conversation 1: its row and Bob's message follower."""
    [(row,)] = _sql(
        db,
        "INSERT INTO conversationmessage (conversation, account, messageid, messagekey,"
        " uniqueid, direction, subject, fromaddress, date)"
        " VALUES (1, 'support', ?, ?, ?, 'outgoing', 'Re: Printer broken',"
        " 'support@acme.test', '2026-11-16T09:30:00Z') RETURNING id",
        message_id,
        message_id,
        "u-" + message_id,
    )
    [(follower,)] = _sql(
        db,
        "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
        " SELECT ?, id, 'to' FROM follower WHERE email = 'bob@customer.example' RETURNING id",
        row,
    )
    return int(row), int(follower)


def test_out_of_office_to_nothing_is_discarded_into_a_conversation_is_imported(
    repo: Store, db: Db
) -> None:
    discarded = _import(repo, OOO_NEW)
    assert discarded.outcome is Outcome.DISCARDED
    assert discarded.error_reason == "automatic: auto-submitted: auto-replied"
    assert _sql(db, "SELECT COUNT(*) FROM conversation") == [(0,)]
    assert _sql(db, "SELECT COUNT(*) FROM follower") == [(0,)]

    assert _import(repo, CUSTOMER, uid=2).outcome is Outcome.IMPORTED
    answered = _import(repo, OOO_REPLY, uid=3)
    assert answered.outcome is Outcome.IMPORTED
    assert answered.conversation_id == 1
    assert _sql(
        db, "SELECT messageid, automatic, automaticreason FROM conversationmessage ORDER BY id"
    ) == [
        ("first@customer.example", 0, None),
        ("ooo-2@customer.example", 1, "auto-submitted: auto-replied"),
    ]


def test_policies_import_discard_and_bots(repo: Store, db: Db) -> None:
    assert _import(repo, OOO_NEW, policy=AutomaticPolicy("import")).outcome is Outcome.IMPORTED
    assert _sql(db, "SELECT COUNT(*) FROM conversation") == [(1,)]
    assert _import(repo, CUSTOMER, uid=2).outcome is Outcome.IMPORTED
    discard = AutomaticPolicy("discard")
    assert _import(repo, OOO_REPLY, uid=3, policy=discard).outcome is Outcome.DISCARDED
    allow = AutomaticPolicy(bots=(BotLists(allow=("partner.example",)),))
    other = OOO_NEW.replace(b"ooo-1@", b"ooo-3@")
    allowed = _import(repo, other, uid=4, policy=allow)
    assert allowed.outcome is Outcome.IMPORTED
    assert allowed.new_conversation


def test_a_discarded_message_retried_from_failed_resolves_its_failure(repo: Store, db: Db) -> None:
    from mailbridge.store.base import FailureInfo

    repo.record_failures(
        "support", [FailureInfo(uid=9, message_key="ooo-1@partner.example", code="x", reason="y")]
    )
    assert _import(repo, OOO_NEW, uid=9).outcome is Outcome.DISCARDED
    assert _sql(db, "SELECT resolution FROM importfailure") == [("imported",)]


def test_bounce_of_an_outgoing_message_by_message_id(repo: Store, db: Db) -> None:
    _import(repo, CUSTOMER)
    row, bob_mf = _outgoing(db, "reply-1@acme.test")
    before = _sql(db, "SELECT COUNT(*) FROM conversation")
    result = _import(repo, _bounce("reply-1@acme.test"), uid=2)
    assert result.outcome is Outcome.BOUNCE
    assert (result.delivery_errors, result.delivery_errors_matched) == (1, 1)
    assert _sql(
        db,
        "SELECT conversation, conversationmessage, messagefollower, recipient, type, status,"
        " diagnostic, matchedby, reportkind, resolved FROM conversationmessageerror",
    ) == [
        (
            1,
            row,
            bob_mf,
            "bob@customer.example",
            "permanent",
            "5.1.1",
            "550 5.1.1 User unknown",
            "message_id",
            "dsn",
            None,
        )
    ]
    assert _sql(db, "SELECT email, deliveryerror FROM follower ORDER BY id") == [
        ("ann@customer.example", None),
        ("bob@customer.example", "permanent"),
    ]
    # Nothing else: no conversation, no message, no follower for the mail system.
    assert _sql(db, "SELECT COUNT(*) FROM conversation") == before
    assert _sql(db, "SELECT COUNT(*) FROM conversationmessage") == [(2,)]
    assert _sql(db, "SELECT COUNT(*) FROM follower WHERE email LIKE 'mailer-daemon%'") == [(0,)]
    # The same report again (a crash before the move) writes nothing twice.
    again = _import(repo, _bounce("reply-1@acme.test"), uid=3)
    assert again.outcome is Outcome.BOUNCE
    assert again.delivery_errors == 0
    assert _sql(db, "SELECT COUNT(*) FROM conversationmessageerror") == [(1,)]


def test_bounce_of_a_personalised_copy(repo: Store, db: Db) -> None:
    _import(repo, CUSTOMER)
    _, bob_mf = _outgoing(db, "reply-2@acme.test")
    _sql(db, "UPDATE messagefollower SET messageid = 'copy-bob@acme.test' WHERE id = ?", bob_mf)
    _import(repo, _bounce("copy-bob@acme.test"), uid=2)
    assert _sql(db, "SELECT messagefollower, matchedby FROM conversationmessageerror") == [
        (bob_mf, "message_id")
    ]


def test_bounce_without_message_id_matched_by_recipient_and_time(repo: Store, db: Db) -> None:
    _import(repo, CUSTOMER)
    _, bob_mf = _outgoing(db, "reply-3@acme.test")
    _import(repo, _bounce(None), uid=2)
    assert _sql(db, "SELECT messagefollower, matchedby FROM conversationmessageerror") == [
        (bob_mf, "recipient")
    ]


def test_unmatched_bounce_is_kept_and_listed_and_resolvable(
    repo: Store, db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _import(repo, _bounce("unknown@elsewhere.example", "nobody@x.example"))
    assert result.outcome is Outcome.BOUNCE
    assert (result.delivery_errors, result.delivery_errors_matched) == (1, 0)
    assert _sql(db, "SELECT COUNT(*) FROM conversation") == [(0,)]
    [error] = repo.delivery_errors(unresolved=True)
    assert (error.conversation, error.recipient, error.matched_by) == (
        None,
        "nobody@x.example",
        "none",
    )

    config = tmp_path / "config.yaml"
    config.write_text(
        f"{db.config(tmp_path)}accounts:\n  - name: support\n    address: support@acme.test\n"
        "    imap: {host: 127.0.0.1}\n    auth: {username: s, password: x}\n"
    )
    config.chmod(0o600)
    capsys.readouterr()
    assert cli_main(["-c", str(config), "errors", "--unresolved", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["errors"]
    assert [(e["id"], e["recipient"], e["conversation"]) for e in listed] == [
        (error.id, "nobody@x.example", None)
    ]
    assert cli_main(["-c", str(config), "errors"]) == 0
    assert "nobody@x.example" in capsys.readouterr().out
    assert cli_main(["-c", str(config), "errors", "resolve", str(error.id)]) == 0
    assert cli_main(["-c", str(config), "errors", "resolve", str(error.id)]) == 1
    assert repo.delivery_errors(unresolved=True) == []
    assert repo.delivery_errors()[0].resolved is not None


def test_resolving_clears_the_follower_mark(repo: Store, db: Db) -> None:
    _import(repo, CUSTOMER)
    _outgoing(db, "reply-4@acme.test")
    _import(repo, _bounce("reply-4@acme.test"), uid=2)
    [error] = repo.delivery_errors(conversation=1)
    assert repo.delivery_errors(conversation=2) == []
    assert repo.resolve_delivery_error(error.id)
    marks = _sql(db, "SELECT deliveryerror FROM follower WHERE email = 'bob@customer.example'")
    assert marks == [(None,)]


def test_feedback_report_is_a_complaint(repo: Store, db: Db) -> None:
    samples = Path(__file__).resolve().parents[1] / "data" / "robots"
    result = _import(repo, (samples / "arf_report.eml").read_bytes())
    assert result.outcome is Outcome.BOUNCE
    assert _sql(db, "SELECT recipient, type, reportkind FROM conversationmessageerror") == [
        ("angry@isp.example", "complaint", "feedback")
    ]
