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

    ``message_key`` is the per-account de-duplication key: the Message-ID (without angle
    brackets) when there is one, else ``sha256:<hex>`` of the raw bytes, so the same mail
    delivered twice is recognised either way.
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

    def participants(self) -> list[tuple[Address, Participation]]:
        """Every address with its participation, From first, each address once per level."""
        out: list[tuple[Address, Participation]] = []
        if self.from_address is not None:
            out.append((self.from_address, Participation.FROM))
        for level, addrs in (
            (Participation.TO, self.to),
            (Participation.CC, self.cc),
            (Participation.BCC, self.bcc),
        ):
            out.extend((a, level) for a in addrs)
        return out
