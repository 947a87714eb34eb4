"""The reason a queued row of an account not in the config is failed with (SQLite) or warned
of (PostgreSQL): the account, a configured name in other case, the configured names, bounded."""

from __future__ import annotations

from mailbridge.daemon.outbox import unknown_account_reason


def test_the_reason_names_the_account_and_the_configured_ones() -> None:
    assert unknown_account_reason("suport", ["support", "archive"]) == (
        "account 'suport' is not in the config; configured: archive, support"
    )


def test_another_case_of_a_configured_name_is_pointed_at() -> None:
    reason = unknown_account_reason("Support", ["support"])
    assert (
        reason
        == "account 'Support' is not in the config (did you mean 'support'?); configured: support"
    )


def test_a_fleets_names_are_cut_to_a_readable_line() -> None:
    names = [f"a{i:05d}" for i in range(10_000)]
    reason = unknown_account_reason("nosuch", names)
    assert reason.endswith("a00019 and 9980 more")
    assert len(reason) < 300


def test_no_account_configured() -> None:
    assert unknown_account_reason("x", []).endswith("configured: none")
