"""Plain data that flows from the parser to the repository: a parsed message and its parts.

These types are the contract between ``core`` (which builds them from bytes), ``store`` (which
writes them) and ``daemon`` (which moves them along). They are frozen and hold no behaviour that
touches I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Participation(enum.StrEnum):
    """How an address took part in one message (``messagefollower.participationlevel``)."""

    FROM = "from"
    TO = "to"
    CC = "cc"
    BCC = "bcc"
    # RFC 5322 section 3.6.2: where the author asked for answers to go.
    REPLYTO = "replyto"


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox address. ``email`` is lower-cased (RFC 5321 local parts are case-sensitive
    in theory; no real server treats them so, and followers must not split on case)."""

    email: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    """An attachment (a ``document`` row) or an inline image (an ``embeddedfile`` row)."""

    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None  # without angle brackets; set for inline images

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """Everything mailbridge keeps of one incoming message.

    ``message_key`` is the key the message is looked up by: the Message-ID (without angle
    brackets) when there is one, else ``sha256:<fingerprint>``. ``fingerprint`` is the
    :func:`~mailbridge.core.messagekey.content_fingerprint` of the raw bytes (transport
    headers excluded), so the same mail fetched or delivered twice is recognised and a
    different message reusing a Message-ID is not taken for it; the store derives the final
    key (:func:`~mailbridge.core.messagekey.decide_message_key`). "" when unknown (built by
    hand): then the key alone decides.
    """

    message_key: str
    message_id: str | None
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    subject: str
    from_address: Address | None
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    delivered_to: tuple[str, ...]
    date: datetime  # timezone-aware; the Date header, or the time of parsing when absent/broken
    plain_text: str  # always present (derived from HTML when the message has none)
    html: str  # sanitised HTML; cid: references kept for the store to rewrite; "" when none
    attachments: tuple[Attachment, ...]
    inline_images: tuple[Attachment, ...]
    size: int  # raw size in bytes
    # Headers that automatic-reply and bounce detection read (lower-cased names).
    auto_headers: dict[str, str] = field(default_factory=dict)
    defects: tuple[str, ...] = ()  # parser defects worth keeping for an operator
    fingerprint: str = ""  # 64 hex digits; see the class docstring

    def participants(self) -> list[tuple[Address, Participation]]:
        """Every address with its participation, From first, each address once per level.

        Reply-To addresses come last, at level ``replyto`` (RFC 5322 section 3.6.2).
        """
        out: list[tuple[Address, Participation]] = []
        if self.from_address is not None:
            out.append((self.from_address, Participation.FROM))
        for level, addrs in (
            (Participation.TO, self.to),
            (Participation.CC, self.cc),
            (Participation.BCC, self.bcc),
            (Participation.REPLYTO, self.reply_to),
        ):
            out.extend((a, level) for a in addrs)
        return out
