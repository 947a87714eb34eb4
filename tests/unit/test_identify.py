"""Tests for mailbridge.core.identify: id normalisation, id lists, thread candidates, keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.identify import (
    new_conversation_key,
    normalize_message_id,
    parse_id_list,
    thread_candidates,
)
from tests.unit.factories import message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<Abc.123@Example.COM>", "Abc.123@example.com"),
        ("  <abc@example.com>  ", "abc@example.com"),
        ("abc@example.com", "abc@example.com"),
        ("<abc@exa\r\n mple.com>", "abc@example.com"),
        ("<CAF=x+Y_z@mail.gmail.com>", "CAF=x+Y_z@mail.gmail.com"),
        ("<no-at-sign>", "no-at-sign"),
        ("<>", None),
        ("", None),
        ("   ", None),
        ("<a\x00b@example.com>", None),
        ("<" + "x" * 2000 + "@example.com>", None),
    ],
)
def test_normalize_message_id(value: str, expected: str | None) -> None:
    assert normalize_message_id(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<a@x.org> <b@x.org>", ("a@x.org", "b@x.org")),
        ("<a@x.org>,<b@x.org>", ("a@x.org", "b@x.org")),
        ("<a@x.org>\r\n\t<b@x.org>\r\n <c@x.org>", ("a@x.org", "b@x.org", "c@x.org")),
        ("<a@x.org> (Joe's message of Mon, 1 Jan <joe@x.org>)", ("a@x.org",)),
        ("(comment (nested)) <a@x.org>", ("a@x.org",)),
        ("Your message of Mon, 1 Jan 2024 <a@X.ORG>", ("a@x.org",)),
        ("a@x.org b@x.org", ("a@x.org", "b@x.org")),
        ("a@x.org, b@x.org", ("a@x.org", "b@x.org")),
        ("<a@x.org> <a@x.org> <A@x.org>", ("a@x.org", "A@x.org")),
        ("just some prose", ()),
        ("", ()),
        ("<> <  >", ()),
        ('"quoted (not a comment)" <a@x.org>', ("a@x.org",)),
        # Bare and bracketed ids mixed (clients that drop the brackets): all kept, in order.
        ("root@x.org <parent@y.org>", ("root@x.org", "parent@y.org")),
        (
            "<root@x.org> middle@x.org <parent@y.org>",
            ("root@x.org", "middle@x.org", "parent@y.org"),
        ),
        ("<a@x.org>b@x.org", ("a@x.org", "b@x.org")),
        ("a@x.org;<b@x.org>, c@x.org", ("a@x.org", "b@x.org", "c@x.org")),
        # A missing '>' (cut by a client or a line limit), alone or before another id.
        ("<a@x.org", ("a@x.org",)),
        ("<a@x.org <b@x.org>", ("a@x.org", "b@x.org")),
        # An id folded across lines inside its brackets.
        ("<CAF1234@\r\n mail.gmail.com>", ("CAF1234@mail.gmail.com",)),
        # Prose words and quoted phrases around bare ids are not ids.
        ('"ann@x.org" wrote root@x.org', ("root@x.org",)),
        ("In reply to root@x.org.", ("root@x.org",)),
        ('Message from "Joe Smith <a@x.org> b@x.org', ("a@x.org", "b@x.org")),
    ],
)
def test_parse_id_list(value: str, expected: tuple[str, ...]) -> None:
    assert parse_id_list(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # A later tester's examples (issue 9 follow-up); all came out right.
        ("<a@x.org>, <b@y.org>,<c@z.org>", ("a@x.org", "b@y.org", "c@z.org")),
        ("<a@x.org>\r\n\t<b@y.org>\n <c@z.org>", ("a@x.org", "b@y.org", "c@z.org")),
        ("<a@x.org> (Ann's message of Mon, 2 Jun 2025 09:00:00 +0200)", ("a@x.org",)),
        ("<a@x.org> (message from Ann <ann@x.org> of 2 Jun)", ("a@x.org",)),
        ('<a@x.org> from "Ann O\'Neil" at Jun 2, 25 9:00', ("a@x.org",)),
        ("<a@x.org> from Ann O'Neil at Jun 2", ("a@x.org",)),
        ('Your message of "Mon, 2 Jun" <a@x.org>', ("a@x.org",)),
        ('<a@x.org> <b@y.org> (Ann\'s (nested) message of "Mon")', ("a@x.org", "b@y.org")),
        ("<a@x.org>,,<b@y.org>; <a@x.org>", ("a@x.org", "b@y.org")),
        ("<<a@x.org>>", ("a@x.org",)),
        ("<1234.5678@[192.168.1.1]>", ("1234.5678@[192.168.1.1]",)),
        ('<"a b"@x.org> <c@y.org>', ('"ab"@x.org', "c@y.org")),  # as its own id is normalised
        ("root@x.org\r\n <parent@y.org>", ("root@x.org", "parent@y.org")),
    ],
)
def test_more_id_lists(value: str, expected: tuple[str, ...]) -> None:
    assert parse_id_list(value) == expected
    assert all(normalize_message_id(f"<{i}>") == i for i in expected)


def test_thread_candidates_order_dedup_and_own_id_excluded() -> None:
    msg = message(
        "own@x.org",
        in_reply_to=("parent@x.org",),
        references=("root@x.org", "middle@x.org", "parent@x.org", "own@x.org"),
    )
    assert thread_candidates(msg) == ("parent@x.org", "middle@x.org", "root@x.org")


def test_thread_candidates_without_in_reply_to_uses_newest_reference_first() -> None:
    msg = message("m@x.org", references=("a@x.org", "b@x.org"))
    assert thread_candidates(msg) == ("b@x.org", "a@x.org")


def test_thread_candidates_without_own_id() -> None:
    msg = message(None, in_reply_to=("p@x.org",), references=("p@x.org",))
    assert thread_candidates(msg) == ("p@x.org",)


def test_thread_candidates_none() -> None:
    assert thread_candidates(message("m@x.org")) == ()


def test_new_conversation_key_shape_and_uniqueness() -> None:
    keys = {new_conversation_key() for _ in range(2000)}
    assert len(keys) == 2000
    for key in keys:
        assert re.fullmatch(r"[a-z2-7]{16}", key)
        assert key == key.lower()


_ID_ATOM = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_$+="),
    min_size=1,
    max_size=12,
)


@given(
    st.lists(
        st.tuples(
            _ID_ATOM, _ID_ATOM, st.booleans(), st.sampled_from([" ", ",", ", ", "\r\n ", ";"])
        ),
        min_size=1,
        max_size=8,
        unique_by=lambda item: item[0],
    )
)
def test_parse_id_list_keeps_bare_and_bracketed_ids_in_order(
    items: list[tuple[str, str, bool, str]],
) -> None:
    value = "".join(
        (f"<{local}@{domain}.example>" if bracketed else f"{local}@{domain}.example") + separator
        for local, domain, bracketed, separator in items
    )
    expected = tuple(f"{local}@{domain.lower()}.example" for local, domain, _, _ in items)
    assert parse_id_list(value) == expected
