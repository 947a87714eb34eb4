"""The sweep schedule's next slots, shared by a fleet's accounts (issue 10: croniter per
account at start-up), answer exactly as croniter does for each moment asked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from croniter import croniter
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.daemon import sweep

START = datetime(2026, 12, 1, 1, 59, 58, tzinfo=UTC)


@given(
    st.sampled_from(["*/20 * * * *", "0 * * * *", "* * * * *", "5,7 3 * * *", "* * * * * */15"]),
    st.lists(st.floats(min_value=0, max_value=4 * 3600), min_size=1, max_size=30),
)
def test_next_slots_answer_as_croniter_for_any_moment(schedule: str, offsets: list[float]) -> None:
    sweep._slots.clear()
    for offset in sorted(offsets):  # time goes forward, as for a fleet's schedules
        now = START + timedelta(seconds=offset)
        expected = croniter(schedule, now)
        first = expected.get_next(datetime)
        assert sweep.next_slots(schedule, now) == (first, expected.get_next(datetime))


def test_a_slot_reached_exactly_is_not_returned_again() -> None:
    sweep._slots.clear()
    slot, following = sweep.next_slots("*/20 * * * *", START)
    assert sweep.next_slots("*/20 * * * *", slot) == (following, following + timedelta(minutes=20))
