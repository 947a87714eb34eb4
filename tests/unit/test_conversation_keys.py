"""Conversation keys in mail: subject tags, reply prefixes, plus-addresses (core.identify)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.identify import (
    SUBJECT_LIMIT,
    base_address,
    is_key,
    is_own_address,
    new_conversation_key,
    plus_address,
    plus_keys,
    strip_reply_prefixes,
    subject_key,
    tag_subject,
)

KEY = "abcdefghij234567"
OWN = frozenset({"support@acme.test", "help@acme.test"})


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Order 1042",
        "RE: Order 1042",
        "re:Order 1042",
        "Fwd: Order 1042",
        "Fw: Order 1042",
        "FW: Order 1042",
        "AW: Order 1042",  # German
        "WG: Order 1042",
        "SV: Order 1042",  # Nordic
        "VS: Order 1042",
        "Antw: Order 1042",  # Dutch
        "Doorst: Order 1042",
        "Réf : Order 1042",  # French, with a space before the colon
        "TR: Order 1042",
        "RIF: Order 1042",  # Italian
        "R: Order 1042",
        "Odp: Order 1042",  # Polish
        "ΑΠ: Order 1042",  # Greek
        "ΣΧΕΤ: Order 1042",
        "回复: Order 1042",  # Chinese
        "回复：Order 1042",  # full-width colon
        "转发: Order 1042",
        "Re[2]: Order 1042",  # Outlook counters
        "Re(3): Order 1042",
        "Re: AW: Fwd: SV: Order 1042",  # stacked
        "  Re :  Order 1042",
    ],
)
def test_reply_prefixes_are_stripped_in_many_languages(subject: str) -> None:
    assert strip_reply_prefixes(subject) == "Order 1042"


@pytest.mark.parametrize(
    "subject",
    ["Order 1042", "Regarding: Order 1042", "Tree: Order 1042", "Order: 1042 Re: x"],
)
def test_words_that_merely_start_like_prefixes_are_kept(subject: str) -> None:
    assert strip_reply_prefixes(subject) == subject


def test_tag_subject_appends_the_tag_and_subject_key_finds_it_through_prefixes() -> None:
    tagged = tag_subject("Order 1042", KEY)
    assert tagged == f"Order 1042 [ID-{KEY}]"
    for prefix in ("Re: ", "AW: ", "SV: Re: ", "回复：", "Fwd[2]: "):
        assert subject_key(prefix + tagged) == KEY
    # Some servers upper-case subjects; keys are lower-case base32.
    assert subject_key(tagged.upper()) == KEY


def test_subject_without_a_well_formed_tag_has_no_key() -> None:
    assert subject_key("Order 1042") is None
    assert subject_key("Order [ID-short]") is None
    assert subject_key("Order [ID-abcdefghij2345671]") is None  # too long
    assert subject_key("Order [ID-abcdefghij234518]") is None  # 1 and 8 are not base32


def test_the_last_tag_wins_and_retagging_does_not_accumulate_tags() -> None:
    other = "zzzzzzzzzzzzzzzz"
    assert subject_key(f"Fwd: x [ID-{other}] [ID-{KEY}]") == KEY
    retagged = tag_subject(f"Re: x [ID-{KEY}]", KEY)
    assert retagged.count("[ID-") == 1


def test_a_long_subject_is_cut_to_128_characters_with_the_tag_intact() -> None:
    tagged = tag_subject("x" * 500, KEY)
    assert len(tagged) == SUBJECT_LIMIT == 128
    assert tagged.endswith(f" [ID-{KEY}]")
    assert subject_key(tagged) == KEY


@given(subject=st.text(max_size=400), limit=st.integers(min_value=21, max_value=300))
def test_tag_subject_always_fits_and_always_carries_the_key(subject: str, limit: int) -> None:
    key = new_conversation_key()
    tagged = tag_subject(subject, key, limit=limit)
    assert len(tagged) <= limit
    assert subject_key(tagged) == key


def test_tag_subject_rejects_non_keys_and_impossible_limits() -> None:
    with pytest.raises(ValueError, match="not a conversation key"):
        tag_subject("x", "NOT-A-KEY")
    with pytest.raises(ValueError, match="shorter than the tag"):
        tag_subject("x", KEY, limit=10)


def test_plus_address_round_trips_through_plus_keys() -> None:
    address = plus_address("Support@Acme.test", KEY)
    assert address == f"support+{KEY}@acme.test"
    assert plus_keys([address], OWN) == (KEY,)
    assert plus_keys([f"HELP+{KEY.upper()}@ACME.TEST"], OWN) == (KEY,)


def test_plus_keys_only_reads_the_accounts_own_addresses() -> None:
    assert plus_keys([f"support+{KEY}@elsewhere.test"], OWN) == ()  # same local, other domain
    assert plus_keys([f"bob+{KEY}@acme.test"], OWN) == ()  # someone else at our domain
    assert plus_keys(["support+sales@acme.test"], OWN) == ()  # a suffix that is no key
    assert plus_keys(["support@acme.test"], OWN) == ()


def test_plus_variants_of_own_addresses_are_the_same_identity() -> None:
    assert is_own_address(f"support+{KEY}@acme.test", OWN)
    assert is_own_address("HELP@acme.test", OWN)
    assert not is_own_address("supporter@acme.test", OWN)
    assert base_address(f"help+{KEY}@acme.test", OWN) == "help@acme.test"
    assert base_address("ann@example.com", OWN) == "ann@example.com"


@given(st.builds(lambda _: new_conversation_key(), st.integers()))
def test_new_keys_are_keys(key: str) -> None:
    assert is_key(key)
    assert plus_keys([plus_address("support@acme.test", key)], OWN) == (key,)
