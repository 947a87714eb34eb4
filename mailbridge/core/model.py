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
    # Without angle brackets. An inline image is a part the HTML cites by this Content-ID;
    # a document may have one too (a Content-ID nothing cites).
    content_id: str | None = None

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

    ``defects`` lists what the parser repaired or could not read, each code once, in the order
    met (``mailbridge.core.parse``; an operator searches for these strings):

    ========================== =================================================================
    ``message-id-invalid``     Message-ID present but unusable; the key is the bytes' hash
    ``date-missing``           no Date; arrival time (INTERNALDATE, else parse time) used
    ``date-invalid``           unreadable Date; arrival time used
    ``date-nonstandard``       Date in a non-RFC 5322 form that was read (ISO 8601, a zone
                               name such as CEST, GMT+0200 or +02:00)
    ``date-obsolete-year``     two- or three-digit year, read per RFC 5322 4.3
    ``date-before-1970``       Date before 1970; arrival time used
    ``date-in-future``         Date more than a day after arrival; arrival time used
    ``charset-unknown``        a charset label no codec answers to; the text was guessed
    ``charset-missing``        8-bit text without a label that is not UTF-8; guessed
    ``charset-mislabelled``    the bytes are not in the declared charset (read as UTF-8,
                               ISO-2022-JP, or the detected charset)
    ``charset-invalid-bytes``  bytes no charset reads; replaced by U+FFFD
    ``base64-padding-inside``  base64 in separately padded chunks; all chunks decoded
    ``base64-junk``            characters outside the base64 alphabet skipped, or text
                               after an empty line (a footer) kept undecoded
    ``base64-truncated``       base64 ending in an incomplete quantum
    ``uuencode-truncated``     a uuencoded block without its ``end`` line
    ``transfer-encoding-unknown`` an unknown Content-Transfer-Encoding; bytes kept as they are
    ``tnef-unreadable``        a winmail.dat that could not be unpacked (kept as it is)
    ``filename-undecodable``   an attachment name that could not be read; a name is made up
    ``cid-dangling``           a ``cid:`` image source naming no part; removed from the HTML
    ``boundary-missing``       a multipart without (the declared) boundary
    ``boundary-unclosed``      a multipart without its closing boundary
    ``boundary-guessed``       a multipart split at a boundary guessed from its body
    ``multipart-unsplittable`` a multipart that could not be split; read as text
    ``multipart-invalid``      a multipart with an invalid structure or transfer encoding
    ``header-malformed``       header lines the MIME parser had to skip or repair
    ``mime-too-deep``          MIME nesting deeper than the parser follows; the rest skipped
    ``message-part-unreadable`` an attached message that could not be kept
    ``mime-defect``            any other defect the standard library's MIME parser reports
    ========================== =================================================================
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
    # Timezone-aware: the Date header, or the arrival time (INTERNALDATE, else the time of
    # parsing) when it is absent, broken, before 1970 or in the future.
    date: datetime
    plain_text: str  # always present (derived from HTML when the message has none)
    # Sanitised HTML, "" when none. Every ``src="cid:X"`` left in it names an inline image
    # whose content_id is exactly X (dangling ones are removed), for the store to rewrite.
    html: str
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
