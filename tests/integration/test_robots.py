"""Automatic mail and bounces end to end: real Dovecot, the daemon's one pass, the database.

An out-of-office reply that answers nothing is discarded under the default policy (and still
leaves the Inbox); one that answers a conversation is imported into it; an allow-listed bot
starts a conversation; a bounce of an integrator's outgoing message records a delivery error
on the right message follower and creates nothing else; a bounce that matches nothing is kept.
"""

from __future__ import annotations

import json
import sqlite3
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mailbridge.cli import main as cli_main
from mailbridge.config import Settings, parse_config
from mailbridge.daemon.supervisor import run_once
from tests.integration.test_conversation_model import deliver, rows, settings_for
from tests.integration.test_import_loop import PROCESSED, config_data, mail, write_config

pytestmark = pytest.mark.dovecot


async def _pass(settings: Settings) -> Any:
    with capture_logs() as logs:
        [result] = await run_once(settings)
    assert result.error is None, result.error
    return result.summary, logs


def _out_of_office(to: str, subject: str, **headers: str) -> EmailMessage:
    # Exchange-style: no RFC 3834 header at all, only the subject says it.
    return mail(
        f"Automatic reply: {subject}",
        sender="Carl Berg <carl@partner.example>",
        to=to,
        body="I am out of the office until Monday.",
        X_Auto_Response_Suppress="All",
        **headers,
    )


def _processed(dovecot: Any, user: Any) -> int:
    return len(dovecot.folder_uids(user.login, user.password, PROCESSED))


async def test_out_of_office_discarded_when_new_imported_when_it_answers(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    settings = parse_config(data)
    deliver(dovecot, imap_user, _out_of_office(imap_user.address, "Hello"))
    summary, logs = await _pass(settings)
    assert (summary.imported, summary.discarded) == (0, 1)
    assert rows(settings, "SELECT COUNT(*) FROM conversation") == [(0,)]
    assert rows(settings, "SELECT COUNT(*) FROM follower") == [(0,)]
    # Nothing is dropped silently: the Inbox is empty, the mail is in Processed, with a reason.
    assert dovecot.folder_uids(imap_user.login, imap_user.password) == []
    assert _processed(dovecot, imap_user) == 1
    [discarded] = [e for e in logs if e["event"] == "message_discarded"]
    assert discarded["reason"] == "automatic: out-of-office subject (en)"
    # ... and in a table and a command, not only in the log.
    assert rows(
        settings, "SELECT account, route, reason, fromaddress, subject FROM discardedmessage"
    ) == [
        (
            "support",
            "discarded",
            "automatic: out-of-office subject (en)",
            "carl@partner.example",
            "Automatic reply: Hello",
        )
    ]
    assert cli_main(["-c", str(write_config(tmp_path, data)), "discarded", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["discarded"]
    assert (listed["route"], listed["from"], listed["reason"]) == (
        "discarded",
        "carl@partner.example",
        "automatic: out-of-office subject (en)",
    )

    first = mail("Order 1042", sender="Carl Berg <carl@partner.example>", to=imap_user.address)
    deliver(dovecot, imap_user, first)
    await _pass(settings)
    answer = _out_of_office(
        imap_user.address,
        "Re: Order 1042",
        In_Reply_To=first["Message-ID"],
        References=first["Message-ID"],
    )
    deliver(dovecot, imap_user, answer)
    summary, _ = await _pass(settings)
    assert (summary.imported, summary.discarded) == (1, 0)
    assert rows(
        settings,
        "SELECT conversation, subject, automatic, automaticreason FROM conversationmessage"
        " ORDER BY id",
    ) == [
        (1, "Order 1042", 0, None),
        (1, "Automatic reply: Re: Order 1042", 1, "out-of-office subject (en)"),
    ]
    assert _processed(dovecot, imap_user) == 3


async def test_allow_listed_bot_creates_a_conversation(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = settings_for(
        tmp_path,
        dovecot,
        imap_user,
        bots={"allow": ["alerts@monitor.example"]},
    )
    alert = mail(
        "CRITICAL: disk full on web-3",
        sender="Monitor <alerts@monitor.example>",
        to=imap_user.address,
        Auto_Submitted="auto-generated",
    )
    other = mail(
        "Weekly digest",
        sender="Digest <digest@monitor.example>",
        to=imap_user.address,
        Auto_Submitted="auto-generated",
    )
    deliver(dovecot, imap_user, alert, other)
    summary, _ = await _pass(settings)
    assert (summary.imported, summary.discarded) == (1, 1)
    assert rows(settings, "SELECT subject FROM conversation") == [("CRITICAL: disk full on web-3",)]
    assert rows(settings, "SELECT automatic, automaticreason FROM conversationmessage") == [
        (1, "auto-submitted: auto-generated")
    ]
    assert rows(settings, "SELECT email FROM follower") == [("alerts@monitor.example",)]


def _bounce(to: str, original_id: str, recipient: str) -> bytes:
    return f"""\
Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx.customer.example>
To: {to}
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-{original_id.strip("<>")}>
Date: Mon, 23 Nov 2026 10:00:00 +0000
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

This is the mail system. Your message could not be delivered.

<{recipient}>: host mx.customer.example said: 550 5.1.1 User unknown

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.customer.example

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822; {recipient}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: User unknown

--B
Content-Type: text/rfc822-headers

From: {to}
To: {recipient}
Message-ID: {original_id}
Subject: Re: Order 1042

--B--
""".encode()


async def test_bounce_of_an_outgoing_message_records_an_error_on_its_follower(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = settings_for(tmp_path, dovecot, imap_user)
    first = mail(
        "Order 1042",
        to=imap_user.address,
        Cc="Jane Doe <jane@customer.example>",
    )
    deliver(dovecot, imap_user, first)
    await _pass(settings)

    # The integrator's CRM sent a reply to John and Jane and inserted its row.
    conn = sqlite3.connect(settings.database)
    with conn:
        cursor = conn.execute(
            "INSERT INTO conversationmessage (conversation, account, messageid, messagekey,"
            " uniqueid, direction, subject, fromaddress, date)"
            " VALUES (1, 'support', 'crm-reply-1@acme.example', 'crm-reply-1@acme.example',"
            " 'crm-1', 'outgoing', 'Re: Order 1042', ?, '2026-11-23T09:30:00Z')",
            (imap_user.address,),
        )
        reply_row = cursor.lastrowid
        followers = dict(conn.execute("SELECT email, id FROM follower").fetchall())
        for email in ("john@customer.example", "jane@customer.example"):
            conn.execute(
                "INSERT INTO messagefollower (conversationmessage, follower, participationlevel)"
                " VALUES (?, ?, 'to')",
                (reply_row, followers[email]),
            )
    conn.close()
    jane_mf = rows(
        settings,
        "SELECT mf.id FROM messagefollower AS mf JOIN follower AS f ON f.id = mf.follower"
        " WHERE mf.conversationmessage = ? AND f.email = 'jane@customer.example'",
        reply_row,
    )[0][0]
    before = {
        table: rows(settings, f"SELECT COUNT(*) FROM {table}")
        for table in ("conversation", "conversationmessage", "follower", "messagefollower")
    }

    deliver(
        dovecot,
        imap_user,
        _bounce(imap_user.address, "<crm-reply-1@acme.example>", "jane@customer.example"),
    )
    summary, logs = await _pass(settings)
    assert (summary.imported, summary.bounces) == (0, 1)
    assert rows(
        settings,
        "SELECT conversation, conversationmessage, messagefollower, recipient, type, status,"
        " matchedby FROM conversationmessageerror",
    ) == [(1, reply_row, jane_mf, "jane@customer.example", "permanent", "5.1.1", "message_id")]
    assert rows(settings, "SELECT email, deliveryerror FROM follower ORDER BY id") == [
        ("john@customer.example", None),
        ("jane@customer.example", "permanent"),
    ]
    # Nothing else was created: no conversation, message, follower or message follower.
    for table, count in before.items():
        assert rows(settings, f"SELECT COUNT(*) FROM {table}") == count, table
    assert dovecot.folder_uids(imap_user.login, imap_user.password) == []
    assert _processed(dovecot, imap_user) == 2
    assert [e["matched"] for e in logs if e["event"] == "bounce_recorded"] == [1]


async def test_unmatched_bounce_is_kept_and_visible(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailbridge.cli import main as cli_main
    from tests.integration.test_import_loop import write_config

    settings = settings_for(tmp_path, dovecot, imap_user)
    deliver(
        dovecot,
        imap_user,
        _bounce(imap_user.address, "<never-sent@acme.example>", "ghost@nowhere.example"),
    )
    summary, logs = await _pass(settings)
    assert summary.bounces == 1
    assert [e["event"] for e in logs if e["event"].startswith("bounce")] == ["bounce_unmatched"]
    assert rows(settings, "SELECT COUNT(*) FROM conversation") == [(0,)]
    assert _processed(dovecot, imap_user) == 1
    path = write_config(tmp_path, settings.model_dump(mode="json", exclude={"source"}))
    capsys.readouterr()
    assert cli_main(["-c", str(path), "errors", "--unresolved"]) == 0
    out = capsys.readouterr().out
    assert "ghost@nowhere.example" in out
    assert "(unmatched)" in out


async def test_the_recovery_sweep_applies_the_policy_and_counts_it(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    from datetime import UTC, datetime, timedelta

    from mailbridge.daemon.sweep import sweep_and_record
    from mailbridge.store.factory import open_repository

    now = datetime.now(UTC)
    login, password = imap_user.login, imap_user.password
    for message in (
        _out_of_office(imap_user.address, "Hello"),
        mail("A person's question", to=imap_user.address),
    ):
        dovecot.append(login, password, message.as_bytes(), date=now - timedelta(minutes=10))
    dovecot.append(
        login,
        password,
        _bounce(imap_user.address, "<never-sent-2@acme.example>", "ghost@nowhere.example"),
        date=now - timedelta(minutes=10),
    )
    settings = settings_for(tmp_path, dovecot, imap_user)
    repo = await open_repository(settings.database)
    try:
        with capture_logs() as logs:
            summary = await sweep_and_record(settings, settings.accounts[0], repo)
    finally:
        await repo.aclose()
    assert (summary.inbox_imported, summary.discarded) == (1, 2)
    assert "discarded or bounces 2" in summary.line()
    [done] = [e for e in logs if e["event"] == "sweep_done"]
    assert (done["inbox_imported"], done["discarded"]) == (1, 2)  # the log line counts them too
    assert dovecot.folder_uids(login, password) == []
    assert _processed(dovecot, imap_user) == 3
    assert rows(settings, "SELECT subject FROM conversationmessage") == [("A person's question",)]
