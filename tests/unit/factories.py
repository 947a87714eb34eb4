"""Builders of ParsedMessage objects for tests, so a test states only what it is about.

Addresses are written ``"Name <email>"`` or ``"email"``; ids without angle brackets, as the
parser stores them. Every message gets a content fingerprint, as the parser gives: the SHA-256
of ``raw`` when given, else of what the message says (id, date, sender, subject, Reply-To, text,
HTML, files), so the same call twice is the same message and a different one is not. A message
without a Message-ID gets the parser's ``sha256:<fingerprint>`` key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from mailbridge.config import ConversationParentSettings, FollowerParentSettings
from mailbridge.core.model import Address, Attachment, ParsedMessage

BASE_DATE = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)

# Parent tables as an integrator configures them: people, coworkers, and a ticket per
# conversation with a property of every source (message, look-up, follower parent, default).
PERSON = FollowerParentSettings(table="person", address_column="email", name_column="name")
COWORKER = FollowerParentSettings(table="coworker", address_column="email", name_column="name")
TICKET = ConversationParentSettings.model_validate(
    {
        "table": "ticket",
        "properties": [
            {"column": "subject", "message_property": "subject"},
            {"column": "description", "message_property": "plain_text"},
            {"column": "person", "message_property": "from_address", "search_path": "person.email"},
            {"column": "company", "search_path": "person.company"},
            {"column": "source", "default": "email"},
            {"column": "sender", "message_property": "from_name", "default": "unknown"},
            {"column": "received", "message_property": "date"},
            {"column": "mailbox", "message_property": "account"},
            {"column": "recipients", "message_property": "to_addresses"},
        ],
    }
)


def addr(text: str) -> Address:
    """``"Ann Example <ann@example.com>"`` or ``"ann@example.com"`` -> Address."""
    if "<" in text:
        name, _, rest = text.partition("<")
        return Address(email=rest.rstrip(">").strip().lower(), name=name.strip())
    return Address(email=text.strip().lower())


def addrs(values: Iterable[str]) -> tuple[Address, ...]:
    return tuple(addr(v) for v in values)


def at(minutes: int) -> datetime:
    """A date ``minutes`` after a fixed base, so tests can order messages."""
    return BASE_DATE + timedelta(minutes=minutes)


def attachment(
    filename: str = "report.pdf", data: bytes = b"%PDF-1.4 test", content_type: str = ""
) -> Attachment:
    return Attachment(filename=filename, content_type=content_type or "application/pdf", data=data)


def inline_image(content_id: str, data: bytes = b"\x89PNG\r\n\x1a\nfake") -> Attachment:
    return Attachment(
        filename=f"{content_id.split('@')[0]}.png",
        content_type="image/png",
        data=data,
        content_id=content_id,
    )


def message(
    message_id: str | None = "m1@example.com",
    *,
    subject: str = "Hello",
    sender: str | None = "Ann Example <ann@example.com>",
    to: Iterable[str] = ("support@acme.test",),
    cc: Iterable[str] = (),
    bcc: Iterable[str] = (),
    in_reply_to: Iterable[str] = (),
    references: Iterable[str] = (),
    date: datetime = BASE_DATE,
    text: str = "Hello there",
    html: str = "",
    attachments: Iterable[Attachment] = (),
    inline_images: Iterable[Attachment] = (),
    delivered_to: Iterable[str] = (),
    reply_to: Iterable[str] = (),
    raw: bytes | None = None,
    fingerprint: str | None = None,
    defects: Iterable[str] = (),
) -> ParsedMessage:
    """A ParsedMessage with sensible defaults; ``message_key`` is derived as the parser does.

    ``fingerprint=""`` builds a message without one (as code that builds messages by hand).
    """
    to_t, cc_t, bcc_t = addrs(to), addrs(cc), addrs(bcc)
    attachments, inline_images, reply_to = tuple(attachments), tuple(inline_images), tuple(reply_to)
    if fingerprint is None:
        content = raw
        if content is None:
            files = [(a.filename, a.content_type, a.data) for a in (*attachments, *inline_images)]
            content = repr(
                (message_id, subject, sender, date.isoformat(), reply_to, text, html, files)
            ).encode()
        fingerprint = hashlib.sha256(content).hexdigest()
    key = message_id if message_id is not None else "sha256:" + fingerprint
    return ParsedMessage(
        message_key=key,
        message_id=message_id,
        in_reply_to=tuple(in_reply_to),
        references=tuple(references),
        subject=subject,
        from_address=addr(sender) if sender is not None else None,
        reply_to=addrs(reply_to),
        to=to_t,
        cc=cc_t,
        bcc=bcc_t,
        delivered_to=tuple(delivered_to),
        date=date,
        plain_text=text,
        html=html,
        attachments=attachments,
        inline_images=inline_images,
        size=len(text) + 500,
        defects=tuple(defects),
        fingerprint=fingerprint,
    )


def reply(
    parent: ParsedMessage,
    message_id: str,
    *,
    minutes: int,
    sender: str = "Ann Example <ann@example.com>",
    to: Iterable[str] = ("support@acme.test",),
    cc: Iterable[str] = (),
    text: str = "A reply",
) -> ParsedMessage:
    """A standards-following reply to ``parent``: In-Reply-To and the full References chain."""
    assert parent.message_id is not None
    return message(
        message_id,
        subject=f"Re: {parent.subject}",
        sender=sender,
        to=to,
        cc=cc,
        in_reply_to=(parent.message_id,),
        references=(*parent.references, parent.message_id),
        date=at(minutes),
        text=text,
    )
