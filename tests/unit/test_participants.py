"""Tests for mailbridge.core.participants: Reply-To as a participant, own mail, reply addresses.

Field reports 20a/20b (web forms) are one example each; the others are our own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbridge.core.model import Address, Participation
from mailbridge.core.parse import parse_message
from mailbridge.core.participants import (
    is_outgoing,
    only_own_identity,
    reached_address,
    reply_addresses,
)
from tests.unit.factories import addr, message

OWN = frozenset({"support@example.com", "help@example.com"})
FIELD_REPORTS = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "field-reports"


def test_contact_form_from_the_mailbox_itself_is_the_customers_message() -> None:
    # Field report 20a: From = To = the mailbox, the customer only in Reply-To.
    parsed = parse_message((FIELD_REPORTS / "20-contact-form-reply-to-a.eml").read_bytes())
    assert not is_outgoing(parsed, OWN)
    assert not only_own_identity(parsed, OWN)
    assert (Address("rita.client@mail.example", "Rita Client"), Participation.REPLYTO) in (
        parsed.participants()
    )
    assert reply_addresses(parsed.from_address, parsed.reply_to, OWN) == (
        Address("rita.client@mail.example", "Rita Client"),
    )


def test_form_mailer_sender_with_customer_in_reply_to() -> None:
    # Field report 20b: From www-data@, the customer in Reply-To.
    parsed = parse_message((FIELD_REPORTS / "20-contact-form-reply-to-b.eml").read_bytes())
    levels = {(a.email, level) for a, level in parsed.participants()}
    assert ("hannah@customer.example", Participation.REPLYTO) in levels
    assert ("www-data@web.example", Participation.FROM) in levels
    assert [a.email for a in reply_addresses(parsed.from_address, parsed.reply_to, OWN)] == [
        "hannah@customer.example"
    ]


@pytest.mark.parametrize(
    ("sender", "to", "reply_to", "outgoing", "only_own"),
    [
        # Sent by another client of the account: ours, and to a customer.
        ("support@example.com", ["ann@customer.test"], [], True, False),
        # The account writing to itself (a loop in the making).
        ("support@example.com", ["help@example.com"], [], True, True),
        # ... also when Reply-To points at the mailbox itself or a plus-variant of it.
        ("support@example.com", ["support@example.com"], ["support+x@example.com"], True, True),
        # A web form (From = To = mailbox) with the customer and a colleague in Reply-To.
        ("support@example.com", ["support@example.com"], ["a@c.test", "b@c.test"], False, False),
        # The account writing to a customer, answers directed to a colleague: still ours.
        ("support@example.com", ["ann@customer.test"], ["boss@partner.test"], True, False),
        # A form mailing an alias of the mailbox (Cc the mailbox), the customer in Reply-To.
        ("help@example.com", ["support+f@example.com"], ["ann@c.test"], False, False),
        # A customer with Reply-To to themselves (same as From): plain incoming mail.
        ("ann@customer.test", ["support@example.com"], ["ann@customer.test"], False, False),
        # A mailing list's Reply-To: incoming, the list is where answers go.
        ("ann@customer.test", ["dev@lists.test"], ["dev@lists.test"], False, False),
        # No From at all, only own recipients: not ours (nobody claims to be the account).
        (None, ["support@example.com"], [], False, True),
    ],
)
def test_own_mail_rules(
    sender: str | None, to: list[str], reply_to: list[str], outgoing: bool, only_own: bool
) -> None:
    m = message("x@example.com", sender=sender, to=to, reply_to=reply_to)
    assert is_outgoing(m, OWN) is outgoing
    assert only_own_identity(m, OWN) is only_own


def test_reply_to_comes_last_at_its_own_level_even_when_it_repeats_from() -> None:
    m = message(
        "x@example.com",
        sender="Ann <ann@customer.test>",
        to=["support@example.com"],
        reply_to=["Ann <ann@customer.test>", "Office <office@customer.test>"],
    )
    assert m.participants() == [
        (addr("Ann <ann@customer.test>"), Participation.FROM),
        (addr("support@example.com"), Participation.TO),
        (addr("Ann <ann@customer.test>"), Participation.REPLYTO),
        (addr("Office <office@customer.test>"), Participation.REPLYTO),
    ]


@pytest.mark.parametrize(
    ("sender", "reply_to", "expected"),
    [
        ("ann@c.test", [], ["ann@c.test"]),
        ("ann@c.test", ["bob@c.test", "Carol <carol@c.test>"], ["bob@c.test", "carol@c.test"]),
        # Reply-To equal to From, listed twice: once.
        ("ann@c.test", ["ann@c.test", "ANN@c.test"], ["ann@c.test"]),
        # Reply-To naming only the mailbox (a misconfigured form): From, not ourselves.
        ("ann@c.test", ["support@example.com"], ["ann@c.test"]),
        # Reply-To naming the mailbox and a customer: the customer.
        ("support@example.com", ["help@example.com", "ann@c.test"], ["ann@c.test"]),
        # Nobody outside the account: no one to answer.
        ("support@example.com", ["help+k@example.com"], []),
        (None, [], []),
    ],
)
def test_reply_addresses_follow_rfc_5322_reply_to(
    sender: str | None, reply_to: list[str], expected: list[str]
) -> None:
    found = reply_addresses(addr(sender) if sender else None, [addr(a) for a in reply_to], OWN)
    assert [a.email for a in found] == expected


def test_reached_address_prefers_delivery_and_recipients_over_from() -> None:
    m = message(
        "x@example.com",
        sender="help@example.com",
        to=["ann@c.test", "support+abc@example.com"],
        delivered_to=["someone@else.test"],
    )
    assert reached_address(m, OWN) == "support@example.com"
    assert reached_address(message("y@example.com", to=["ann@c.test"]), OWN) is None
    from_only = message("z@example.com", sender="help@example.com", to=["ann@c.test"])
    assert reached_address(from_only, OWN) == "help@example.com"


def _form(head: str) -> bytes:
    lines = ["Message-ID: <f@forms.example>", "Date: Mon, 02 Jun 2025 09:00:00 +0000", head]
    return ("\r\n".join(lines) + "\r\nSubject: Contact form\r\n\r\nHello\r\n").encode()


@pytest.mark.parametrize(
    ("head", "outgoing", "answer_to"),
    [
        # A later tester's examples (issue 9 follow-up); all came out right.
        (
            'From: "Jane via Contact Form" <support@example.com>\r\nTo: support@example.com\r\n'
            'Reply-To: "Doe, Jane" <jane@customer.example>',
            False,
            ["jane@customer.example"],
        ),
        (
            "From: www-data\r\nTo: support@example.com\r\nReply-To: jane@customer.example",
            False,
            ["jane@customer.example"],
        ),
        (
            "From: noreply@forms.example\r\nTo: support@example.com\r\n"
            "Reply-To: jane@customer.example\r\nReply-To: John <john@customer.example>",
            False,
            ["jane@customer.example", "john@customer.example"],
        ),
        (
            "From: noreply@forms.example\r\nTo: support@example.com\r\n"
            "Reply-To: Team: jane@customer.example, john@customer.example;",
            False,
            ["jane@customer.example", "john@customer.example"],
        ),
        (
            "From: support@example.com\r\nTo: undisclosed-recipients:;\r\n"
            "Delivered-To: support@example.com\r\nReply-To: jane@customer.example",
            False,
            ["jane@customer.example"],
        ),
        (
            "From: support+forms@example.com\r\nTo: support@example.com\r\n"
            "Cc: help@example.com\r\nReply-To: =?utf-8?Q?J=C3=BCrgen?= <jurgen@customer.example>",
            False,
            ["jurgen@customer.example"],
        ),
        # Reply-To = the mailbox's plus-address: answers go to the customer who wrote.
        (
            "From: jane@customer.example\r\nTo: support@example.com\r\n"
            "Reply-To: support+abc123@example.com",
            False,
            ["jane@customer.example"],
        ),
        # The account alone, Reply-To included: own mail, nobody to answer.
        (
            "From: support@example.com\r\nTo: support@example.com\r\n"
            "Reply-To: SUPPORT+x@Example.com",
            True,
            [],
        ),
    ],
)
def test_more_reply_to_examples(head: str, outgoing: bool, answer_to: list[str]) -> None:
    parsed = parse_message(_form(head))
    assert is_outgoing(parsed, OWN) is outgoing
    assert only_own_identity(parsed, OWN) is (not answer_to)
    answers = reply_addresses(parsed.from_address, parsed.reply_to, OWN)
    assert [a.email for a in answers] == answer_to
    repliers = {a.email for a, level in parsed.participants() if level is Participation.REPLYTO}
    assert set(answer_to) <= repliers | {a.email for a in answers}
