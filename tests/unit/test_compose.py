"""Outgoing replies (core.compose): the markers they carry come back and are recognised.

Each identification method is shown end to end: compose our reply, serialise it, let a
"customer" answer it the way mail clients do, parse that answer with the real parser and check
that identify (and, for the full path, the store) finds the conversation again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge import config
from mailbridge.core.compose import (
    MAX_REFERENCES_LENGTH,
    Identification,
    compose_reply,
    reference_chain,
)
from mailbridge.core.identify import (
    SUBJECT_LIMIT,
    new_conversation_key,
    normalize_message_id,
    plus_keys,
    subject_key,
    thread_candidates,
)
from mailbridge.core.model import Address, ParsedMessage
from mailbridge.core.parse import parse_message
from mailbridge.store.base import ImportContext, ImportItem
from mailbridge.store.sqlite import SqliteRepository

KEY = "abcdefghij234567"
ACCOUNT = "support@acme.test"
ALIASES = ("help@acme.test",)
OWN = frozenset({ACCOUNT, *ALIASES})
CUSTOMER = "Ann Example <ann@customer.test>"
NOW = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
METHODS: tuple[Identification, ...] = get_args(Identification)


def compose(**overrides: Any) -> EmailMessage:
    """compose_reply with a plausible reply to a customer; tests override what they are about."""
    kwargs: dict[str, Any] = {
        "address": ACCOUNT,
        "display_name": "Acme Support",
        "identification": "message_id",
        "conversation_key": KEY,
        "subject": "Order 1042 is late",
        "parent_message_id": "<first@customer.test>",
        "parent_references": (),
        "to": [CUSTOMER],
        "own_addresses": ALIASES,
        "text": "We are on it.",
        "now": NOW,
    }
    kwargs.update(overrides)
    return compose_reply(**kwargs)


def parsed(message: EmailMessage) -> ParsedMessage:
    return parse_message(message.as_bytes())


def own_id(message: EmailMessage) -> str:
    value = normalize_message_id(str(message["Message-ID"]))
    assert value is not None
    return value


def customer_answer(
    ours: ParsedMessage,
    *,
    message_id: str = "<answer@customer.test>",
    prefix: str = "Re: ",
    threading: str = "full",
) -> ParsedMessage:
    """The customer's answer to ``ours`` as a mail client writes it, parsed by mailbridge.

    The client answers to Reply-To when there is one, else to From (RFC 5322 section 3.6.3), and
    puts its own reply prefix before the subject. ``threading`` is what it keeps of RFC 5322
    section 3.6.4: ``"full"`` In-Reply-To and References, ``"parent"`` only our id in both (so
    nothing names the customer's first message), ``"none"`` neither (only other markers work).
    """
    answer = EmailMessage(policy=email_policy.SMTP)
    answer["From"] = CUSTOMER
    target = ours.reply_to[0] if ours.reply_to else ours.from_address
    assert target is not None
    answer["To"] = target.email
    answer["Subject"] = prefix + ours.subject
    answer["Date"] = "Fri, 01 Mar 2024 10:00:00 +0000"
    answer["Message-ID"] = message_id
    if threading != "none":
        assert ours.message_id is not None
        chain = (*ours.references, ours.message_id) if threading == "full" else (ours.message_id,)
        answer["In-Reply-To"] = f"<{ours.message_id}>"
        answer["References"] = " ".join(f"<{i}>" for i in chain)
    answer.set_content("Thanks!")
    return parse_message(answer.as_bytes())


def addresses_of(message: ParsedMessage) -> tuple[str, ...]:
    """What the store reads plus-addresses from (To, Cc, Bcc, Delivered-To)."""
    return (
        *message.delivered_to,
        *(a.email for a in (*message.to, *message.cc, *message.bcc)),
    )


def test_identification_values_match_the_config() -> None:
    assert set(get_args(Identification)) == set(get_args(config.Identification))


# -- each method's marker comes back -----------------------------------------------------------


def test_message_id_method_answer_threads_by_our_message_id() -> None:
    ours = compose(identification="message_id")
    assert "Reply-To" not in ours
    assert str(ours["Subject"]) == "Order 1042 is late"
    answer = customer_answer(parsed(ours))
    assert thread_candidates(answer)[0] == own_id(ours)
    # The whole chain goes back to the customer's first message.
    assert thread_candidates(answer) == (own_id(ours), "first@customer.test")


def test_plus_address_method_answer_carries_the_key_in_its_recipient() -> None:
    ours = compose(identification="plus_address")
    assert str(ours["Reply-To"]) == f"Acme Support <support+{KEY}@acme.test>"
    assert "[ID-" not in str(ours["Subject"])
    answer = customer_answer(parsed(ours), threading="none")
    assert answer.in_reply_to == answer.references == ()
    assert [a.email for a in answer.to] == [f"support+{KEY}@acme.test"]
    assert plus_keys(addresses_of(answer), OWN) == (KEY,)


@pytest.mark.parametrize("prefix", ["Re: ", "RE: ", "AW: ", "SV: ", "Antw: ", "回复：", ""])
def test_subject_method_answer_carries_the_key_in_its_subject(prefix: str) -> None:
    ours = compose(identification="subject")
    assert str(ours["Subject"]) == f"Order 1042 is late [ID-{KEY}]"
    assert "Reply-To" not in ours
    answer = customer_answer(parsed(ours), prefix=prefix, threading="none")
    assert subject_key(answer.subject) == KEY


@pytest.mark.parametrize("identification", METHODS)
def test_message_id_threading_works_whatever_the_method(identification: Identification) -> None:
    ours = compose(identification=identification)
    answer = customer_answer(parsed(ours), prefix="", threading="parent")
    assert own_id(ours) in thread_candidates(answer)
    assert answer.in_reply_to == (own_id(ours),)


# -- the full path through the store -----------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[SqliteRepository]:
    repository = SqliteRepository(tmp_path / "mailbridge.db")
    repository.migrate()
    yield repository
    repository.close()


def _first_message() -> ParsedMessage:
    first = EmailMessage(policy=email_policy.SMTP)
    first["From"] = CUSTOMER
    first["To"] = ACCOUNT
    first["Subject"] = "Order 1042 is late"
    first["Date"] = "Fri, 01 Mar 2024 09:00:00 +0000"
    first["Message-ID"] = "<first@customer.test>"
    first.set_content("Where is my order?")
    return parse_message(first.as_bytes())


@pytest.mark.parametrize("identification", METHODS)
def test_the_customers_answer_to_our_reply_joins_the_conversation(
    repo: SqliteRepository, identification: Identification
) -> None:
    ctx = ImportContext(
        account="support", address=ACCOUNT, own_addresses=OWN, identification=identification
    )
    first = _first_message()
    [started] = repo.import_batch(ctx, [ImportItem(1, first)])
    assert started.conversation_id is not None
    detail = repo.conversation(started.conversation_id)
    assert detail is not None
    key = detail.summary.uniqueid
    ours = compose(
        identification=identification,
        conversation_key=key,
        subject=first.subject,
        parent_message_id=first.message_id,
        parent_references=first.references,
    )
    sent = parsed(ours)
    if identification == "message_id":
        # Message-ID threading needs our id in the database: the copy of what we sent.
        [stored] = repo.import_batch(ctx, [ImportItem(2, sent)])
        assert stored.conversation_id == started.conversation_id
        # The answer names only our reply, so only our Message-ID can place it.
        answer = customer_answer(sent, threading="parent")
    else:
        # A client that drops In-Reply-To and References: only the marker can place it.
        answer = customer_answer(sent, threading="none")
    [result] = repo.import_batch(ctx, [ImportItem(3, answer)])
    assert result.conversation_id == started.conversation_id
    assert result.new_conversation is False
    detail = repo.conversation(started.conversation_id)
    assert detail is not None
    assert detail.messages[-1].threaded_by == identification


# -- subject limit -----------------------------------------------------------------------------


def test_a_long_subject_is_cut_to_128_characters_keeping_the_tag() -> None:
    ours = compose(identification="subject", subject="Invoice " + "x" * 500)
    subject = str(ours["Subject"])
    assert len(subject) == SUBJECT_LIMIT
    assert subject.endswith(f" [ID-{KEY}]")
    assert subject_key(parsed(ours).subject) == KEY


@given(subject=st.text(max_size=400), prefix=st.sampled_from(["", "Re: ", "AW: ", "Fwd[2]: "]))
def test_any_subject_fits_128_characters_and_its_tag_survives_the_round_trip(
    subject: str, prefix: str
) -> None:
    key = new_conversation_key()
    ours = compose(identification="subject", conversation_key=key, subject=prefix + subject)
    assert len(str(ours["Subject"])) <= SUBJECT_LIMIT
    assert subject_key(parsed(ours).subject) == key


@given(subject=st.text(max_size=300))
def test_other_methods_keep_the_subject_untagged_and_on_one_line(subject: str) -> None:
    for identification in ("message_id", "plus_address"):
        ours = compose(identification=identification, subject=subject)
        assert str(ours["Subject"]) == " ".join(subject.split())


# -- recipients --------------------------------------------------------------------------------


def test_own_addresses_and_aliases_are_never_recipients() -> None:
    ours = compose(
        to=[
            CUSTOMER,
            "SUPPORT@ACME.TEST",
            "Help Desk <Help@Acme.Test>",
            f"support+{KEY}@acme.test",
            Address("help+other@acme.test"),
        ],
        cc=["Jane <jane@x.test>", "ann@CUSTOMER.test", "support@acme.test"],
    )
    assert str(ours["To"]) == "Ann Example <ann@customer.test>"
    # ann is already on To: an address is written once.
    assert str(ours["Cc"]) == "Jane <jane@x.test>"


@pytest.mark.parametrize(
    ("parent_from", "parent_reply_to", "to", "expected"),
    [
        # RFC 5322 section 3.6.2: the answer goes to Reply-To, not to From.
        ("noreply@forms.test", ["Rita <rita@mail.test>"], [], "Rita <rita@mail.test>"),
        # A web form sent as the mailbox itself (field report 20a): the customer, not us.
        ("support@acme.test", ["rita@mail.test"], [], "rita@mail.test"),
        # Several Reply-To addresses: all of them.
        ("x@forms.test", ["a@c.test", "B <b@c.test>"], [], "a@c.test, B <b@c.test>"),
        # No Reply-To: From.
        (CUSTOMER, [], [], "Ann Example <ann@customer.test>"),
        # Reply-To naming only the mailbox: From (we never answer ourselves).
        (CUSTOMER, ["help@acme.test"], [], "Ann Example <ann@customer.test>"),
        # Reply-To equal to From, plus an explicit recipient: each once, Reply-To first.
        (
            CUSTOMER,
            [CUSTOMER],
            ["bob@x.test", CUSTOMER],
            "Ann Example <ann@customer.test>, bob@x.test",
        ),
        # A list's Reply-To: the list.
        (CUSTOMER, ["Dev list <dev@lists.test>"], [], "Dev list <dev@lists.test>"),
    ],
)
def test_reply_goes_to_the_parents_reply_to(
    parent_from: str, parent_reply_to: list[str], to: list[str], expected: str
) -> None:
    ours = compose(parent_from=parent_from, parent_reply_to=parent_reply_to, to=to)
    assert str(ours["To"]) == expected


def test_reply_to_an_own_message_with_nobody_outside_is_refused() -> None:
    with pytest.raises(ValueError, match="no recipient"):
        compose(parent_from="support@acme.test", parent_reply_to=["help@acme.test"], to=[])


@given(
    data=st.data(),
    customers=st.lists(
        st.sampled_from(["ann@customer.test", "bob@x.test", "carol@y.test"]), unique=True
    ),
)
def test_own_addresses_are_dropped_whatever_their_case(
    data: st.DataObject, customers: list[str]
) -> None:
    def any_case(text: str) -> str:
        flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        return "".join(c.upper() if f else c for c, f in zip(text, flips, strict=True))

    own = [any_case(a) for a in (ACCOUNT, *ALIASES, f"support+{KEY}@acme.test")]
    mixed = data.draw(st.permutations([*own, *customers]))
    if not customers:
        with pytest.raises(ValueError, match="no recipient"):
            compose(to=mixed)
        return
    ours = compose(to=mixed)
    got = [a.addr_spec for a in ours["To"].addresses]
    assert sorted(got) == sorted(customers)


def test_recipients_accept_model_addresses_and_keep_their_names() -> None:
    ours = compose(to=[Address("ann@customer.test", "Ann Example")], cc=[Address("j@x.test")])
    assert str(ours["To"]) == "Ann Example <ann@customer.test>"
    assert str(ours["Cc"]) == "j@x.test"


def test_cc_only_is_allowed_but_no_recipient_at_all_is_an_error() -> None:
    ours = compose(to=[ACCOUNT], cc=[CUSTOMER])
    assert "To" not in ours
    assert str(ours["Cc"]) == CUSTOMER
    with pytest.raises(ValueError, match="no recipient"):
        compose(to=[ACCOUNT, "help@acme.test"], cc=[])


@pytest.mark.parametrize("bad", ["not-an-address", "@acme.test", "ann@"])
def test_a_malformed_recipient_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="not an address"):
        compose(to=[bad])


def test_a_malformed_key_is_an_error_whatever_the_method() -> None:
    for identification in METHODS:
        with pytest.raises(ValueError, match="not a conversation key"):
            compose(identification=identification, conversation_key="NOT-A-KEY")


# -- automatic replies -------------------------------------------------------------------------


def test_an_automatic_reply_is_marked_for_other_robots() -> None:
    ours = compose(automatic=True)
    assert ours["Auto-Submitted"] == "auto-replied"
    assert ours["X-Auto-Response-Suppress"] == "All"
    assert ours["Precedence"] == "auto_reply"
    # The parser keeps them where the importer's loop detection reads them.
    back = parsed(ours).auto_headers
    assert back["auto-submitted"] == "auto-replied"
    assert back["x-auto-response-suppress"] == "All"


def test_a_reply_a_person_wrote_has_no_automatic_markers() -> None:
    ours = compose(automatic=False)
    assert "Auto-Submitted" not in ours
    assert "X-Auto-Response-Suppress" not in ours
    assert "Precedence" not in ours
    assert "auto-submitted" not in parsed(ours).auto_headers


# -- ids, date, references -----------------------------------------------------------------------


def test_message_id_is_fresh_and_on_the_accounts_domain() -> None:
    first, second = compose(address="Support@Acme.TEST"), compose()
    assert own_id(first).endswith("@acme.test")
    assert own_id(first) != own_id(second)
    assert parsed(first).message_id == own_id(first)


def test_date_is_the_given_time() -> None:
    later = datetime(2024, 7, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    ours = compose(now=later)
    assert parsedate_to_datetime(str(ours["Date"])) == later
    assert parsed(ours).date == later
    assert abs(parsedate_to_datetime(str(compose(now=None)["Date"])) - datetime.now(UTC)) < (
        timedelta(minutes=1)
    )


def test_references_are_the_parents_references_then_the_parents_id() -> None:
    ours = compose(
        parent_message_id="<p@X.ORG>", parent_references=["<root@x.org>", "mid@x.org", "p@x.org"]
    )
    assert str(ours["In-Reply-To"]) == "<p@x.org>"
    assert str(ours["References"]) == "<root@x.org> <mid@x.org> <p@x.org>"
    back = parsed(ours)
    assert back.in_reply_to == ("p@x.org",)
    assert back.references == ("root@x.org", "mid@x.org", "p@x.org")


def test_a_parent_without_references_uses_its_single_in_reply_to() -> None:
    # RFC 5322 section 3.6.4: one id in the parent's In-Reply-To stands in for its References.
    assert reference_chain("p@x.org", (), ["<gp@x.org>"]) == ("gp@x.org", "p@x.org")
    assert reference_chain("p@x.org", (), ["a@x.org", "b@x.org"]) == ("p@x.org",)
    assert reference_chain("p@x.org", ["r@x.org"], ["gp@x.org"]) == ("r@x.org", "p@x.org")


def test_the_first_message_of_a_conversation_has_no_threading_headers() -> None:
    ours = compose(parent_message_id=None)
    assert "In-Reply-To" not in ours
    assert "References" not in ours
    back = parsed(ours)
    assert back.in_reply_to == back.references == ()


def test_ids_that_cannot_be_sent_intact_are_left_out() -> None:
    chain = reference_chain("p@x.org", ["ok@x.org", "ünï@x.org", "=?utf-8?q?x?=@x.org", "<>"])
    assert chain == ("ok@x.org", "p@x.org")
    assert "In-Reply-To" not in compose(parent_message_id="<ünï@x.org>")


def _ids(n: int, length: int = 60) -> list[str]:
    return [f"{i:04d}.{'x' * (length - 16)}@mail.x.org" for i in range(n)]


def test_a_very_long_chain_is_trimmed_keeping_the_root_and_the_newest() -> None:
    chain = _ids(200)
    refs, parent = chain[:-1], chain[-1]
    trimmed = reference_chain(parent, refs)
    assert trimmed[0] == chain[0]
    assert trimmed[-1] == parent
    assert trimmed[1:] == tuple(chain[-(len(trimmed) - 1) :])  # a contiguous newest run
    assert len(" ".join(f"<{i}>" for i in trimmed)) <= MAX_REFERENCES_LENGTH
    # The run is as long as fits: one more id would not.
    assert len(" ".join(f"<{i}>" for i in (chain[0], chain[-len(trimmed)], *trimmed[1:]))) > (
        MAX_REFERENCES_LENGTH
    )


@given(
    lengths=st.lists(st.integers(min_value=5, max_value=400), max_size=60),
    budget=st.integers(min_value=20, max_value=2000),
)
def test_trimming_keeps_order_root_and_parent_within_the_budget(
    lengths: list[int], budget: int
) -> None:
    ids = [f"{i}.{'y' * n}@x.org" for i, n in enumerate(lengths)]
    parent = "parent@x.org"
    trimmed = reference_chain(parent, ids, max_length=budget)
    assert trimmed[-1] == parent
    # The result is a subsequence of the chain, in order.
    full = [*ids, parent]
    positions = [full.index(i) for i in trimmed]
    assert positions == sorted(positions)
    rendered = len(" ".join(f"<{i}>" for i in trimmed))
    assert rendered <= budget or trimmed == (parent,)
    if ids and rendered + len(ids[0]) + 3 <= budget:
        assert trimmed[0] == ids[0]


def test_long_ids_are_written_whole_and_every_line_fits_998() -> None:
    long_parent = "p" * 900 + "@x.org"
    ours = compose(parent_message_id=long_parent, parent_references=_ids(40))
    raw = ours.as_bytes()
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0]  # no id turned into an encoded-word
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    back = parse_message(raw)
    assert back.in_reply_to == (long_parent,)
    assert back.references[-1] == long_parent
    assert back.references[0] == _ids(1)[0]


# -- serialisation -----------------------------------------------------------------------------


@pytest.mark.parametrize("identification", METHODS)
def test_the_message_serialises_and_reparses(identification: Identification) -> None:
    ours = compose(
        identification=identification,
        display_name="Acme Süpport, Team",
        subject="Grüße — Order 1042",
        parent_references=["<root@customer.test>"],
        cc=["Jörg Müller <jorg@x.test>"],
        text="Hallo Jörg,\nwir kümmern uns.\n",
        html="<p>Hallo <b>Jörg</b>,</p><p>wir kümmern uns.</p>",
        automatic=True,
    )
    raw = ours.as_bytes()
    assert raw.count(b"\r\n") > 0
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF line ends throughout (policy.SMTP)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998

    back = parse_message(raw)
    assert back.message_id == own_id(ours)
    assert back.from_address == Address("support@acme.test", "Acme Süpport, Team")
    assert back.to == (Address("ann@customer.test", "Ann Example"),)
    assert back.cc == (Address("jorg@x.test", "Jörg Müller"),)
    assert back.in_reply_to == ("first@customer.test",)
    assert back.references == ("root@customer.test", "first@customer.test")
    assert "wir kümmern uns." in back.plain_text
    assert "<b>Jörg</b>" in back.html
    assert back.date == NOW
    assert back.defects == ()
    if identification == "subject":
        assert back.subject == f"Grüße — Order 1042 [ID-{KEY}]"
    else:
        assert back.subject == "Grüße — Order 1042"
    if identification == "plus_address":
        assert back.reply_to == (Address(f"support+{KEY}@acme.test", "Acme Süpport, Team"),)
    else:
        assert back.reply_to == ()

    # The stdlib reads it back to the same headers too.
    again = message_from_bytes(raw, policy=email_policy.default)
    for name in ("From", "To", "Cc", "Subject", "Message-ID", "In-Reply-To", "References"):
        assert str(again[name]) == str(ours[name])
    assert again.get_content_type() == "multipart/alternative"


def test_plain_text_only_is_a_single_part() -> None:
    ours = compose(html=None)
    assert ours.get_content_type() == "text/plain"
    assert parsed(ours).plain_text == "We are on it."


@given(
    name=st.text(min_size=0, max_size=40),
    subject=st.text(min_size=0, max_size=200),
    text=st.text(min_size=0, max_size=300),
)
def test_the_kept_header_classes_write_what_the_stdlib_writes(
    name: str, subject: str, text: str
) -> None:
    """POLICY keeps the header classes the stdlib makes per header (a quarter of composing):
    the bytes are those of the same policy with the stdlib's own registry."""
    from mailbridge.core import compose

    kwargs: dict[str, Any] = {
        "address": "support@example.test",
        "display_name": name,
        "identification": "subject",
        "conversation_key": new_conversation_key(),
        "subject": subject,
        "to": ["Jöhn Doe <john@customer.example>", "jane@x.example"],
        "text": text,  # no HTML: a multipart's boundary is random
        "parent_message_id": "<parent@customer.example>",
        "now": datetime(2026, 11, 23, 9, 0, tzinfo=UTC),
    }

    def composed() -> bytes:
        message = compose_reply(**kwargs)
        del message["Message-ID"]  # random per message
        return message.as_bytes()

    kept = composed()
    stdlib = compose._Policy(linesep="\r\n")
    original = compose.POLICY
    compose.POLICY = stdlib  # type: ignore[misc]
    try:
        assert composed() == kept
    finally:
        compose.POLICY = original  # type: ignore[misc]


# Printable ASCII names are written by compose; others by the stdlib, as before (whose reader
# splits a long encoded name it wrote itself: not ours to test).
_NAMES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@given(
    sender_name=_NAMES,
    names=st.lists(_NAMES, min_size=1, max_size=8),
    subject=st.text(max_size=300),
)
def test_headers_written_as_composed_read_back_as_given(
    sender_name: str, names: list[str], subject: str
) -> None:
    """From, To, Cc and Subject are written by compose itself (not the stdlib's slow header
    objects): a reader gets the names, addresses and subject back, and every line is ASCII and
    within RFC 5322's 998 characters (folded at 78 where the text allows)."""
    to = [HeaderAddressFor(name, n) for n, name in enumerate(names)]
    message = compose_reply(
        address="support@example.test",
        display_name=sender_name,
        identification="message_id",
        conversation_key=new_conversation_key(),
        subject=subject,
        to=to[: len(to) // 2 + 1],
        cc=to[len(to) // 2 + 1 :],
        text="Hello",
    )
    raw = message.as_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    again = message_from_bytes(raw, policy=email_policy.default)

    def collapsed(text: str) -> str:
        return " ".join(text.split())

    [sender] = again["From"].addresses
    assert (collapsed(sender.display_name), sender.addr_spec) == (
        collapsed(sender_name),
        "support@example.test",
    )
    got = [
        (collapsed(a.display_name), a.addr_spec)
        for field in ("To", "Cc")
        if again[field] is not None
        for a in again[field].addresses
    ]
    assert got == [(collapsed(a.name), a.email) for a in to]
    assert collapsed(str(again["Subject"])) == collapsed(subject)


def HeaderAddressFor(name: str, n: int) -> Address:  # noqa: N802 - reads as a constructor
    return Address(email=f"person{n}@customer.example", name=name)
