"""How a delivery report is tied to the mail it answers (mailbridge.core.bounce, the rules of
store/delivery_errors.py): plain values, no database. The store's look-ups and writes are
tested in test_delivery_errors.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core import bounce
from mailbridge.core.bounce import Bounce, BounceRecipient, MatchStep

TYPES = st.sampled_from(["permanent", "complaint", "temporary"])


def test_match_steps_follow_the_returned_id_first_then_the_recipient() -> None:
    assert bounce.match_steps("id@x", "a@b") == (
        MatchStep.COPY_ID,
        MatchStep.MESSAGE_ID,
        MatchStep.RECIPIENT,
    )
    assert bounce.match_steps(None, "a@b") == (MatchStep.RECIPIENT,)
    assert bounce.match_steps("id@x", None) == (MatchStep.COPY_ID, MatchStep.MESSAGE_ID)
    assert bounce.match_steps("", "") == ()  # recorded unmatched


def test_matched_by_names_the_id_or_the_recipient() -> None:
    assert [bounce.matched_by(step) for step in MatchStep] == [
        "message_id",
        "message_id",
        "recipient",
    ]


def test_the_recipients_own_personalised_copy_wins() -> None:
    assert bounce.choose_copy(["a@x", "b@x", "c@x"], "b@x") == 1
    assert bounce.choose_copy(["a@x", "b@x"], "z@x") == 0  # another's copy: the first
    assert bounce.choose_copy(["a@x"], None) == 0
    assert bounce.choose_copy([], "a@x") is None


def test_an_outgoing_message_wins_over_an_incoming_one_with_the_same_id() -> None:
    assert bounce.choose_message(["incoming", "outgoing", "outgoing"]) == 1
    assert bounce.choose_message(["incoming", "incoming"]) == 0
    assert bounce.choose_message([]) is None


def test_recipient_window_reaches_two_weeks_back_and_an_hour_ahead() -> None:
    date = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert bounce.recipient_window(date) == (date - timedelta(days=14), date + timedelta(hours=1))


@pytest.mark.parametrize(
    ("kind", "recipient", "expected"),
    [
        ("feedback", BounceRecipient("a@x", permanent=True), "complaint"),
        ("dsn", BounceRecipient("a@x", permanent=True), "permanent"),
        ("dsn", BounceRecipient("a@x", permanent=False), "temporary"),
        ("non-standard", None, "permanent"),  # a report naming no recipient is a hard one
    ],
)
def test_error_type(kind: str, recipient: BounceRecipient | None, expected: str) -> None:
    report = Bounce(kind, (recipient,) if recipient else (), None)  # type: ignore[arg-type]
    assert bounce.error_type(report, recipient) == expected


def test_a_delay_never_hides_a_known_permanent_failure() -> None:
    assert bounce.follower_mark("permanent", "temporary") == "permanent"
    assert bounce.follower_mark("temporary", "permanent") == "permanent"
    assert bounce.follower_mark(None, "temporary") == "temporary"
    assert bounce.follower_mark("permanent", "complaint") == "complaint"


@given(st.lists(TYPES))
def test_the_remaining_mark_is_the_worst_unresolved_error(types: list[str]) -> None:
    mark = bounce.remaining_mark(types)
    if not types:
        assert mark is None
    elif "permanent" in types:
        assert mark == "permanent"
    elif "complaint" in types:
        assert mark == "complaint"
    else:
        assert mark == "temporary"
