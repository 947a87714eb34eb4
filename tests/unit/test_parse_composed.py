"""The outgoing message as stored (``parse_composed``) is what parsing its bytes gave.

The outbox stores a sent message in its conversation from the message object it composed,
instead of parsing the composed bytes back (scripts/bench, sending row). Both readings go
through the same ``_read`` in core/parse.py; these tests compare them field by field - every
field the store writes conversation-model rows from - for the messages the outbox composes:
replies and new conversations, each identification method, text-only, HTML-only and both,
attachments, HTML citing inline images, automatic replies, personalised copies, and text the
stdlib has to encode (long lines, non-ASCII, CR/LF mixtures, uuencoded blocks).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import formataddr
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbridge.core.identify import new_conversation_key, normalize_message_id
from mailbridge.core.model import ParsedMessage
from mailbridge.core.outbox import OutgoingFile, build_message
from mailbridge.core.parse import parse_composed, parse_message
from mailbridge.daemon.outbox import personal_copies

NOW = datetime(2026, 12, 1, 4, 30, 12, tzinfo=UTC)
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def _message(**changes: Any) -> Any:
    arguments: dict[str, Any] = {
        "address": "support@example.test",
        "display_name": "Support",
        "identification": "message_id",
        "conversation_key": new_conversation_key(),
        "subject": "Your order",
        "to": ["Jo Doe <jo@customer.example>"],
        "text": "Thank you for your message.\n\nAnn",
        "now": NOW,
    }
    arguments.update(changes)
    return build_message(**arguments)


def _same(message: Any) -> ParsedMessage:
    """Both readings of ``message``, asserted equal field by field; the composed one."""
    raw = message.as_bytes()
    old = parse_message(raw, now=NOW)
    new = parse_composed(message, raw, now=NOW)
    differing = [f for f in ParsedMessage.__slots__ if getattr(old, f) != getattr(new, f)]
    assert differing == [], {f: (getattr(old, f), getattr(new, f)) for f in differing}
    return new


REPLY: dict[str, Any] = {
    "subject": "Re: Your order",
    "parent_message_id": "<parent@customer.example>",
    "parent_references": ["<root@customer.example>", "<middle@example.test>"],
}

CASES: dict[str, dict[str, Any]] = {
    "new conversation, text only": {},
    "reply, text only": REPLY,
    "reply by plus address": {**REPLY, "identification": "plus_address"},
    "reply by subject tag": {**REPLY, "identification": "subject"},
    "html only": {"text": None, "html": "<p>Hello <b>Jo</b>,</p><p>it ships today.</p>"},
    "html and text": {"html": "<p>Hello <b>Jo</b></p>", "text": "Hello Jo"},
    "html citing inline images": {
        "text": None,
        "html": '<p>Logo: <img src="cid:logo@example.test"></p><img src="CID:other">',
        "files": [OutgoingFile("logo.png", "image/png", PNG)],
    },
    "attachments": {
        **REPLY,
        "files": [
            OutgoingFile("invoice 1042.pdf", "application/pdf", PDF),
            OutgoingFile("naïve résumé.txt", "text/plain", "Grüße\r\n".encode()),
            OutgoingFile("", "application/octet-stream", PNG),
            OutgoingFile("data.bin", "not a type", b"\x00\x01"),
        ],
    },
    "non-ASCII names and subject": {
        "display_name": "Süpport Désk",
        "to": ["Jöhn Dœ <john@example.org>", '"Doe, Jane" <JANE@Example.ORG>'],
        "cc": ["Ann <ann@example.net>", "x@example.com"],
        "subject": "Ré: commande n° 42 – livraison; détails, " * 4,
    },
    "long lines and line ends": {
        "text": "a" * 2500 + "\r\nb\rc\n\n  indented  \n" + "é" * 1200 + "\n\n\n",
        "html": "<div>" + "x " * 3000 + "</div>\r\n",
    },
    "uuencoded block in the text": {"text": "see:\nbegin 644 a.txt\n#86)C\n`\nend\nbye"},
    "automatic reply": {"automatic": True},
}


@pytest.mark.parametrize("changes", CASES.values(), ids=list(CASES))
def test_the_composed_message_reads_as_its_bytes(changes: dict[str, Any]) -> None:
    _same(_message(**changes))


def test_html_citing_a_missing_image_is_noted_in_both() -> None:
    stored = _same(_message(text=None, html='<p><img src="cid:nothing"></p>'))
    assert stored.defects == ("cid-dangling",)


def test_a_personalised_row_stores_its_first_copy() -> None:
    """The row stores the first copy (the message as composed, before personal_copies gives
    the others their own Message-IDs): the same as parsing that copy's bytes."""
    message = _message(to=["a@customer.example", "b@customer.example"], cc=["c@x.example"])
    raw = message.as_bytes()
    stored = parse_composed(message, raw, now=NOW)
    copies = personal_copies(message, ["a@customer.example", "b@customer.example"])
    assert copies[0].raw == raw
    assert stored == parse_message(copies[0].raw, now=NOW)
    assert stored.message_id == copies[0].message_id
    assert normalize_message_id(str(message["Message-ID"])) != stored.message_id


_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=300
)
_NAME = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30).filter(
    lambda n: n.strip() == n
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.none() | _TEXT,
    html=st.none() | _TEXT.map(lambda t: f"<p>{t}</p>"),
    subject=_TEXT,
    name=_NAME,
    filename=_NAME,
)
def test_any_body_subject_and_name_reads_as_its_bytes(
    text: str | None, html: str | None, subject: str, name: str, filename: str
) -> None:
    if text is None and html is None:
        text = ""
    files = [OutgoingFile(filename, "application/pdf", PDF)] if filename else []
    _same(
        _message(
            text=text,
            html=html,
            subject=subject,
            to=[formataddr((name, "jo@customer.example"))],
            files=files,
        )
    )
