"""Tests for mailbridge.core.messagekey: what makes two fetches "the same message".

Reused Message-IDs (parcel trackers, monitoring tools, ticket systems) must give different
fingerprints; the same message fetched again, re-delivered, or delivered to two aliases (other
transport headers) must give the same one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.messagekey import (
    DERIVED_PREFIX,
    ParentCandidate,
    StoredIdentity,
    choose_parent,
    content_fingerprint,
    decide_message_key,
    derived_key,
    message_key,
)
from mailbridge.core.parse import parse_message

FIELD_REPORTS = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "field-reports"


def raw(
    *,
    subject: str = "Your parcel 1111 is on its way",
    date: str = "Wed, 25 Jun 2025 08:00:00 +0200",
    body: str = "Parcel 1111 has left our depot.\r\n",
    message_id: str = "<q8XvT2pLm0NwYr4Kd7@mailer.parcels.example>",
    sender: str = "Parcel Notifications <noreply@parcels.example>",
    trace: str = "",
    to: str = "support@example.com",
) -> bytes:
    return (
        f"{trace}From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {date}\r\n"
        f"Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


# -- the same message -------------------------------------------------------------------------


def test_transport_headers_do_not_change_the_fingerprint() -> None:
    first = raw(
        trace="Return-Path: <bounce-1@parcels.example>\r\n"
        "Delivered-To: support@example.com\r\n"
        "Received: from mx1.example.com by imap1 with LMTP id a1; Wed, 25 Jun 2025 08:00:02\r\n"
        "Received: from out.parcels.example (out.parcels.example [192.0.2.1])\r\n"
        "\tby mx1.example.com with ESMTPS id 4aB; Wed, 25 Jun 2025 08:00:01 +0200\r\n"
    )
    # The same mail to an alias, through another MX, with other envelope and spam headers.
    second = raw(
        trace="Return-Path: <bounce-2@parcels.example>\r\n"
        "Delivered-To: help@example.com\r\nX-Original-To: help@example.com\r\n"
        "X-Spam-Status: No, score=-0.1\r\nAuthentication-Results: mx2.example.com; spf=pass\r\n"
        "Received: from out2.parcels.example by mx2.example.com; Wed, 25 Jun 2025 08:00:07\r\n"
    )
    assert content_fingerprint(first) == content_fingerprint(second)
    assert content_fingerprint(first) == content_fingerprint(raw())


def test_line_endings_folding_and_final_line_breaks_do_not_change_it() -> None:
    crlf = raw(body="line one  \r\nline two\r\n\r\n")
    lf = crlf.replace(b"\r\n", b"\n")
    unterminated = crlf.rstrip(b"\r\n")
    folded = crlf.replace(b"Subject: Your parcel", b"Subject: Your\r\n  parcel")
    lower = crlf.replace(b"Subject:", b"SUBJECT:").replace(b"Message-ID:", b"Message-Id:")
    expected = content_fingerprint(crlf)
    assert content_fingerprint(lf) == expected
    assert content_fingerprint(unterminated) == expected
    # Trailing spaces are content (format=flowed, RFC 3676): another text, another message.
    assert content_fingerprint(crlf.replace(b"one  ", b"one")) != expected
    assert content_fingerprint(folded) == expected
    assert content_fingerprint(lower) == expected


@given(
    trace=st.lists(
        st.tuples(
            st.sampled_from(["Received", "Delivered-To", "Return-Path", "X-Original-To"]),
            st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
        ),
        max_size=5,
    )
)
def test_any_trace_headers_keep_the_fingerprint(trace: list[tuple[str, str]]) -> None:
    lines = "".join(f"{name}: {value}\r\n" for name, value in trace)
    assert content_fingerprint(raw(trace=lines)) == content_fingerprint(raw())


def test_alerts_without_date_or_id_sent_twice_are_two_messages() -> None:
    """Found by the issue 9 follow-up: a UPS or NAS re-sending one alert text without Date
    and Message-ID got one fingerprint for every sending, so each later alert was dropped as
    a duplicate. The oldest Received tells sendings apart; copies of one sending share it."""
    alert = (
        b"From: ups@ops.example\r\nTo: support@example.com\r\nSubject: On battery\r\n\r\nUPS1\r\n"
    )

    def sent(at: str, alias: str = "support@example.com") -> bytes:
        first_hop = f"Received: from ups1 (192.0.2.9) by mx.example.com id {at}; {at}\r\n"
        delivery = (
            f"Received: by imap.example.com for <{alias}>; later\r\nDelivered-To: {alias}\r\n"
        )
        return (delivery + first_hop).encode() + alert

    once, again = sent("09:00:01"), sent("10:00:01")
    assert content_fingerprint(once) != content_fingerprint(again)
    assert content_fingerprint(once) == content_fingerprint(sent("09:00:01", "help@example.com"))
    assert content_fingerprint(once.replace(b"\r\n", b"\n")) == content_fingerprint(once)
    # With a Date the author's own fields decide, as before: trace headers never count.
    dated = raw(trace="Received: from a by b; 1\r\n")
    assert content_fingerprint(dated) == content_fingerprint(raw(trace="Received: from c; 2\r\n"))


# -- different messages under one id ----------------------------------------------------------


@pytest.mark.parametrize(
    "changed",
    [
        # A parcel tracker: another parcel, date, subject and body (field report 04).
        {
            "subject": "Your parcel 2222 was delivered",
            "date": "Thu, 03 Jul 2025 16:30:00 +0200",
            "body": "Parcel 2222 was delivered to the front desk.\r\n",
        },
        # A monitoring tool: the same subject every time, another reading in the body.
        {"body": "CPU load 97% on db1\r\n"},
        # A ticket system's template: same subject and text, only the Date differs.
        {"date": "Wed, 25 Jun 2025 08:05:00 +0200"},
        # Two notifications in the same second that differ only in the subject.
        {"subject": "Your parcel 1112 is on its way"},
        # Another sender domain that happens to produce the same id.
        {"sender": "Shop <shop@other.example>"},
    ],
)
def test_a_different_message_under_the_same_id_has_another_fingerprint(
    changed: dict[str, str],
) -> None:
    assert content_fingerprint(raw(**changed)) != content_fingerprint(raw())


def test_attachments_count() -> None:
    def with_attachment(data: str) -> bytes:
        return (
            "From: scanner@example.com\r\nSubject: Scan\r\n"
            "Date: Mon, 02 Jun 2025 09:00:00 +0200\r\n"
            "Message-ID: <scan@scanner.example>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
            "Content-Type: text/plain\r\n\r\nScan attached\r\n--b\r\n"
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            f"{data}\r\n--b--\r\n"
        ).encode()

    assert content_fingerprint(with_attachment("JVBERi0x")) != content_fingerprint(
        with_attachment("JVBERi0y")
    )


def test_field_report_04_gives_two_messages_and_a_refetch_gives_one() -> None:
    a = (FIELD_REPORTS / "04-reused-message-id-a.eml").read_bytes()
    b = (FIELD_REPORTS / "04-reused-message-id-b.eml").read_bytes()
    first, second = parse_message(a), parse_message(b)
    assert first.message_id == second.message_id
    assert first.message_key == second.message_key == first.message_id
    assert first.fingerprint != second.fingerprint
    # After the server added its own trace header, and with bare LF line ends.
    again = parse_message(b"Return-Path: <x@y>\n" + a.replace(b"\r\n", b"\n"))
    assert again.fingerprint == first.fingerprint


def test_odd_input_still_has_a_fingerprint() -> None:
    for data in (b"", b"no headers at all", b"Subject: only headers", b"\r\n\r\nbody only"):
        assert len(content_fingerprint(data)) == 64
    assert content_fingerprint(b"Subject: a") != content_fingerprint(b"Subject: b")


# -- keys -------------------------------------------------------------------------------------

ID = "q8X@mailer.parcels.example"
FP_A, FP_B, FP_C = "a" * 64, "b" * 64, "c" * 64


def test_message_key_is_the_id_or_the_fingerprint() -> None:
    assert message_key(ID, FP_A) == ID
    assert message_key(None, FP_A) == "sha256:" + FP_A
    assert derived_key(ID, FP_B) == f"{ID}#{'b' * DERIVED_PREFIX}"


def test_first_message_keeps_the_bare_id() -> None:
    decision = decide_message_key(ID, ID, FP_A, [])
    assert (decision.key, decision.duplicate, decision.reused) == (ID, False, None)


def test_the_same_message_again_is_a_duplicate_of_whichever_key_it_got() -> None:
    stored = [StoredIdentity(ID, FP_A), StoredIdentity(derived_key(ID, FP_B), FP_B)]
    assert decide_message_key(ID, ID, FP_A, stored).duplicate
    again = decide_message_key(ID, ID, FP_B, stored)
    assert again.duplicate
    assert again.key == derived_key(ID, FP_B)


def test_a_different_message_reusing_the_id_gets_a_derived_key() -> None:
    stored = [StoredIdentity(ID, FP_A)]
    second = decide_message_key(ID, ID, FP_B, stored)
    assert (second.key, second.duplicate, second.reused) == (derived_key(ID, FP_B), False, ID)
    stored.append(StoredIdentity(second.key, FP_B))
    third = decide_message_key(ID, ID, FP_C, stored)
    assert third.key == derived_key(ID, FP_C)
    assert third.reused == ID  # the warning names the message that owns the bare id


def test_a_taken_short_key_falls_back_to_the_whole_fingerprint() -> None:
    clash = "b" * DERIVED_PREFIX + "0" * (64 - DERIVED_PREFIX)
    stored = [StoredIdentity(ID, FP_A), StoredIdentity(derived_key(ID, clash), clash)]
    decision = decide_message_key(ID, ID, FP_B, stored)
    assert decision.key == derived_key(ID, FP_B, full=True)


def test_rows_without_a_fingerprint_keep_the_old_rule() -> None:
    # Stored before schema 5 (or by an integrator): the same key is the same message.
    assert decide_message_key(ID, ID, FP_B, [StoredIdentity(ID, None)]).duplicate
    # A message built without a fingerprint: the same, whatever the row has.
    assert decide_message_key(ID, ID, "", [StoredIdentity(ID, FP_A)]).duplicate


def test_a_free_bare_id_is_used_and_the_other_holder_named() -> None:
    # An integrator deleted the first message; a later one with the id takes the bare key.
    stored = [StoredIdentity(derived_key(ID, FP_B), FP_B)]
    decision = decide_message_key(ID, ID, FP_C, stored)
    assert (decision.key, decision.reused) == (ID, derived_key(ID, FP_B))


def test_a_row_without_a_fingerprint_that_says_otherwise_is_another_message() -> None:
    """Found by the issue 9 follow-up: after an upgrade every new notice of a tracker whose id
    a pre-upgrade row holds was a duplicate. The row's stored date and subject tell."""
    old = StoredIdentity(ID, None, ("2025-06-25T06:00:00Z", "Your parcel 1111"))
    same = ("2025-06-25T06:00:00Z", "Your parcel 1111")
    assert decide_message_key(ID, ID, FP_B, [old], same).duplicate
    other = decide_message_key(ID, ID, FP_B, [old], ("2025-07-03T14:30:00Z", "Your parcel 2222"))
    assert (other.key, other.duplicate, other.reused) == (derived_key(ID, FP_B), False, ID)
    # Nothing to compare (a row not imported by mailbridge, a caller without a summary).
    assert decide_message_key(ID, ID, FP_B, [StoredIdentity(ID, None)], same).duplicate
    assert decide_message_key(ID, ID, FP_B, [old]).duplicate


def test_messages_without_an_id_are_keyed_by_fingerprint() -> None:
    plain = message_key(None, FP_A)
    assert not decide_message_key(plain, None, FP_A, []).duplicate
    assert decide_message_key(plain, None, FP_A, [StoredIdentity(plain, FP_A)]).duplicate


# -- which conversation a reply to a reused id joins -------------------------------------------


def test_a_reply_joins_the_newest_message_not_after_it() -> None:
    candidates = [
        ParentCandidate("2025-06-25T06:00:00Z", 1, 10),
        ParentCandidate("2025-07-03T14:30:00Z", 2, 20),
        ParentCandidate("2025-07-10T09:00:00Z", 3, 30),
    ]
    assert choose_parent(candidates, "2025-07-04T08:00:00Z") == 20
    assert choose_parent(candidates, "2025-06-26T08:00:00Z") == 10
    assert choose_parent(candidates, "2025-07-10T09:00:00Z") == 30
    # Every candidate newer than the reply (a wrong clock): the oldest.
    assert choose_parent(candidates, "2025-01-01T00:00:00Z") == 10
    assert choose_parent(list(reversed(candidates)), "2025-07-04T08:00:00Z") == 20
    assert choose_parent([], "2025-07-04T08:00:00Z") is None


@given(
    arrivals=st.lists(
        st.tuples(st.sampled_from(["a@x", "b@x", None]), st.sampled_from([FP_A, FP_B, FP_C])),
        max_size=12,
    )
)
def test_any_arrival_order_stores_each_message_once_under_a_unique_key(
    arrivals: list[tuple[str | None, str]],
) -> None:
    stored: list[tuple[str | None, StoredIdentity]] = []
    for message_id, fingerprint in arrivals:
        plain = message_key(message_id, fingerprint)
        candidates = [row for mid, row in stored if (mid == message_id and mid) or row.key == plain]
        decision = decide_message_key(plain, message_id, fingerprint, candidates)
        seen = any(mid == message_id and row.fingerprint == fingerprint for mid, row in stored)
        assert decision.duplicate is seen
        if not decision.duplicate:
            stored.append((message_id, StoredIdentity(decision.key, fingerprint)))
    keys = [row.key for _mid, row in stored]
    assert len(keys) == len(set(keys))  # messagekey stays unique per account
    assert len(stored) == len(set(arrivals))  # every different message stored, once
    for message_id in {mid for mid, _fp in arrivals if mid}:
        # The first message with an id keeps the bare id.
        first = next(row for mid, row in stored if mid == message_id)
        assert first.key == message_id
