"""Tests for mailbridge.term: how wide the commands print when piped."""

from __future__ import annotations

import pytest

from mailbridge.term import console, mail_text


def test_piped_output_is_wide_unless_columns_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under pytest stdout is not a terminal: the piped rule applies.
    assert console().width == 240
    monkeypatch.setenv("COLUMNS", "100")
    assert console().width == 100
    monkeypatch.setenv("COLUMNS", "wide")  # not a number: ignored
    assert console().width == 240


def test_mail_text_drops_terminal_control_bytes_and_keeps_markup_like_text() -> None:
    assert mail_text("[b]Hi[/b]\x1b[2J :warning:\tok\n").plain == "[b]Hi[/b][2J :warning:\tok\n"
