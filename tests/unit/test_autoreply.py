"""The automatic-reply rule (core/autoreply.py) and the daemon's RFC 3834 check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import pytest

from mailbridge.core.autoreply import decide_auto_reply
from mailbridge.core.parse import parse_message
from mailbridge.daemon.autoreply import is_automatic_mail

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
OWN = frozenset({"support@example.test", "help@example.test"})


def decide(**changes: Any) -> tuple[bool, str]:
    values: dict[str, Any] = {
        "enabled": True,
        "new_conversation": True,
        "is_automatic": False,
        "sender": "john@customer.example",
        "own_addresses": OWN,
        "arrived": NOW - timedelta(minutes=1),
        "now": NOW,
        "max_age": timedelta(hours=24),
        "replies_in_window": 0,
        "max_replies": 3,
    }
    values.update(changes)
    decision = decide_auto_reply(**values)
    return decision.reply, decision.reason


def test_a_new_conversation_from_a_person_is_answered() -> None:
    assert decide() == (True, "new conversation")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"enabled": False}, "off"),
        ({"new_conversation": False}, "continues"),
        ({"is_automatic": True}, "automatic mail"),
        ({"sender": None}, "no sender"),
        ({"sender": "HELP@example.test"}, "own address"),
        ({"sender": "support+abc@example.test"}, "own address"),
        ({"arrived": NOW - timedelta(hours=25)}, "older"),
        ({"replies_in_window": 3}, "3 automatic replies"),
        ({"max_replies": 0}, "0 automatic replies"),
    ],
)
def test_every_rule_can_say_no(changes: dict[str, Any], words: str) -> None:
    reply, reason = decide(**changes)
    assert not reply
    assert words in reason


def _mail(**headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "robot@example.org"
    message["To"] = "support@example.test"
    message["Subject"] = "x"
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("x")
    return message


@pytest.mark.parametrize(
    ("headers", "automatic"),
    [
        ({}, False),
        ({"Auto_Submitted": "no"}, False),
        ({"Auto_Submitted": "auto-replied"}, True),
        ({"Auto_Submitted": "auto-generated; owner-email=x@y"}, True),
        ({"Precedence": "bulk"}, True),
        ({"Precedence": "auto_reply"}, True),
        ({"Precedence": "first-class"}, False),
    ],
)
def test_rfc_3834_markers(headers: dict[str, str], automatic: bool) -> None:
    assert is_automatic_mail(parse_message(_mail(**headers).as_bytes())) is automatic
