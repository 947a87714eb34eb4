"""What makes two fetched messages "the same message": content fingerprints and message keys.

A message is stored once per account. RFC 5322 section 3.6.4 says a Message-ID names exactly one
message, but real senders break that: parcel trackers, monitoring tools and some ticket systems
send every notification under one id. And one message really does arrive more than once: fetched
again after a crash between the commit and the move, re-delivered by a relay, or delivered to
two of the account's aliases. Those copies differ only in *transport* headers (``Received``,
``Delivered-To``, ``Return-Path``, ``X-Original-To`` ...), which every hop adds.

So the identity of a message is its **content fingerprint** (:func:`content_fingerprint`): a
SHA-256 over the headers that the author's client wrote and no relay changes (Message-ID, Date,
From, Subject, and the top-level Content-Type and Content-Transfer-Encoding that say how to read
the body) and over the whole body (text, HTML, attachments, MIME structure). Two fetches with
the same fingerprint are one message; two messages with one Message-ID but another fingerprint
are two messages.

The **message key** (``conversationmessage.messagekey``, unique per account) keeps its old
shape so existing rows and integrators' look-ups keep working (:func:`decide_message_key`):

* the bare Message-ID for the first message stored with that id;
* ``<message-id>#<first 16 hex digits of the fingerprint>`` for a *different* message that
  reuses a stored id (the full fingerprint in the astronomically unlikely case that the short
  form is taken too);
* ``sha256:<fingerprint>`` for a message without a (usable) Message-ID.

Rows written before fingerprints were stored (schema version 4 and older, or inserted by an
integrator) have none: a message whose bare key is such a row counts as that message, as it
always did, because nothing can show it is another one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# The headers the author's client writes and relays leave alone (RFC 5321 section 4.4 and
# RFC 5322 section 3.6.7: relays *add* trace fields, they do not rewrite these).
IDENTITY_HEADERS: Final = (
    "message-id",
    "date",
    "from",
    "subject",
    "content-type",
    "content-transfer-encoding",
)
# Length of the fingerprint prefix in a derived key: 64 bits, unique among the few messages
# that share one Message-ID.
DERIVED_PREFIX: Final = 16
KEY_PREFIX_NO_ID: Final = "sha256:"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_WHITESPACE = re.compile(rb"[ \t\r\n]+")


def _identity_headers(block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, value with whitespace collapsed) of the identity headers, in order;
    the oldest ``Received`` field (the last one) comes as ``received-origin``.

    RFC 5322 section 2.2.3: a line that starts with white space continues the previous field.
    """
    fields: list[tuple[bytes, bytes]] = []
    origin: list[bytes] = []  # the lines of the last Received field seen
    name = b""
    value: list[bytes] = []

    def flush() -> None:
        if name == b"received":
            origin[:] = value
        elif name and name.decode("ascii", "replace") in IDENTITY_HEADERS:
            text = _WHITESPACE.sub(b" ", b" ".join(value)).strip()
            fields.append((name, text))

    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and name:
            value.append(line)
            continue
        flush()
        head, colon, rest = line.partition(b":")
        name, value = (head.strip().lower(), [rest]) if colon else (b"", [])
    flush()
    if origin and not any(field == b"date" for field, _ in fields):
        # Without a Date nothing the author wrote tells two sendings of one text apart (a
        # device or script re-sending the same alert without Date or Message-ID): the first
        # hop's trace field (RFC 5321 4.4, the bottom-most Received) does, and every copy of
        # one sending shares it, whichever alias or later relay it reached.
        fields.append((b"received-origin", _WHITESPACE.sub(b" ", b" ".join(origin)).strip()))
    return fields


def content_fingerprint(raw: bytes) -> str:
    """The content fingerprint of a raw RFC 5322 message: 64 lower-case hex digits (SHA-256).

    Covers the identity headers (:data:`IDENTITY_HEADERS`, each occurrence, names
    case-insensitive, folding and runs of white space ignored) and the body; for a message
    without a Date, also the oldest ``Received`` field, which tells two sendings of the same
    text apart (RFC 5322 3.6.1 makes Date mandatory; devices and scripts leave it out). The body is
    compared with CRLF line ends (a message stored with bare LF, as in a Maildir, counts as its
    CRLF form, RFC 5322 section 2.1) and without trailing empty lines (SMTP ends DATA with a line
    break a sender may not have written, RFC 5321 section 4.1.1.4); transports change nothing
    else. Trace and delivery headers (``Received``, ``Delivered-To``, ``Return-Path``,
    ``X-Original-To``, anything a relay or the IMAP server adds) do not count. Never raises;
    any bytes have a fingerprint. Costs about one SHA-256 pass over the message: the body, as
    IMAP serves it (CRLF), is hashed without a copy.
    """
    match = _HEADER_END.search(raw)
    if match is None:
        # Only headers (or only a body: a first line without a colon is not a header).
        first = raw.split(b"\n", 1)[0]
        block, start = (raw, len(raw)) if b":" in first else (b"", 0)
    else:
        block, start = raw[: match.start()], match.end()
    digest = hashlib.sha256()
    for name, value in sorted(_identity_headers(block)):
        digest.update(name + b"\0" + value + b"\n")
    digest.update(b"\0\0")
    end = len(raw)
    while end > start and raw[end - 1] in b"\r\n":
        end -= 1
    if raw.count(b"\n", start, end) == raw.count(b"\r\n", start, end):
        digest.update(memoryview(raw)[start:end])  # CRLF throughout (or one line)
    else:
        body = raw[start:end].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        digest.update(body)
    return digest.hexdigest()


def message_key(message_id: str | None, fingerprint: str) -> str:
    """The key a message is looked up by before any collision is known: its normalised
    Message-ID, or ``sha256:<fingerprint>`` when it has none."""
    return message_id if message_id else KEY_PREFIX_NO_ID + fingerprint


def derived_key(message_id: str, fingerprint: str, *, full: bool = False) -> str:
    """``<message-id>#<fingerprint prefix>``: the key of a message that reuses a stored id."""
    return f"{message_id}#{fingerprint if full else fingerprint[:DERIVED_PREFIX]}"


def failure_key(message_id: str | None, fingerprint: str) -> str:
    """The key of a message's import failure (``importfailure.messagekey``): the
    :func:`derived_key` of its Message-ID, else ``sha256:<fingerprint>``.

    A failure must name one message's *content*, not its Message-ID: two different messages
    that reuse one id and both fail are two failures (each in the Failed folder), and a
    different message imported under the bare id resolves neither. The key is the same
    whether parsing or storing failed, and it is the key a message reusing a stored id is
    stored under, so importing the message itself resolves it (the store settles both its
    stored key and this one). Without a fingerprint (a message built in a test), its
    :func:`message_key`.
    """
    if message_id and fingerprint:
        return derived_key(message_id, fingerprint)
    return message_key(message_id, fingerprint)


@dataclass(frozen=True, slots=True)
class StoredIdentity:
    """A stored message as the key decision sees it: its key and fingerprint (None for rows
    written before fingerprints were kept, or by an integrator), and its stored ``summary``
    (date as ISO-8601 text, subject) for telling such a row from another message."""

    key: str
    fingerprint: str | None
    summary: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class KeyDecision:
    """What :func:`decide_message_key` concluded for one incoming message.

    ``key``: the message's key (of the stored copy when ``duplicate``). ``reused``: the key of
    the stored, different message whose Message-ID this one reuses (None without a collision).
    """

    key: str
    duplicate: bool
    reused: str | None = None


def decide_message_key(
    plain: str,
    message_id: str | None,
    fingerprint: str,
    stored: Sequence[StoredIdentity],
    summary: tuple[str, str] | None = None,
) -> KeyDecision:
    """Whether a message is already stored, and under which key it is (to be) stored.

    ``plain`` is the message's key as parsed (:func:`message_key`: the Message-ID, or
    ``sha256:<fingerprint>``); ``stored`` are the account's stored messages that carry
    ``message_id`` or whose key is ``plain``, oldest first. Rules, in order:

    1. a stored message with the same fingerprint: a duplicate of it;
    2. no fingerprint on either side (a row from before fingerprints, a message built without
       one) and the same plain key: a duplicate, as before fingerprints existed, unless the
       row's date and subject (``summary``, as stored) differ from the message's: then it is
       another message reusing the id (a tracker's next notice after an upgrade), rule 4;
    3. the plain key is free: stored under it (``reused`` names an earlier message with the id
       when the plain key's row was deleted since);
    4. otherwise a different message reuses the id: stored under :func:`derived_key`.
    """
    if fingerprint:
        for row in stored:
            if row.fingerprint == fingerprint:
                return KeyDecision(key=row.key, duplicate=True)
    keys = {row.key for row in stored}
    taken = next((row for row in stored if row.key == plain), None)
    if taken is not None and (taken.fingerprint is None or not fingerprint):
        # What was stored of it shows another message: never merge it away (nothing is lost;
        # at worst a copy the parser now reads differently is stored twice).
        differs = summary is not None and taken.summary is not None and taken.summary != summary
        if not differs:
            return KeyDecision(key=plain, duplicate=True)
    first_other = next((row.key for row in stored if row.key != plain), None)
    if taken is None:
        return KeyDecision(key=plain, duplicate=False, reused=first_other)
    # Here the fingerprints differ (or a row without one holds another message), so the key
    # is a Message-ID (a sha256: key with a known fingerprint is that fingerprint, rule 1).
    key = derived_key(message_id or plain, fingerprint)
    if key in keys:
        key = derived_key(message_id or plain, fingerprint, full=True)
    return KeyDecision(key=key, duplicate=False, reused=plain)


@dataclass(frozen=True, slots=True)
class ParentCandidate:
    """A stored message carrying an id a reply cites: its date (ISO text), row and conversation."""

    date: str
    row_id: int
    conversation_id: int


def choose_parent(candidates: Sequence[ParentCandidate], reply_date: str) -> int | None:
    """The conversation a reply joins when the id it cites names several stored messages.

    Only a sender reusing its Message-ID produces more than one. A person answers the message
    in front of them, which cannot be newer than the answer: the reply joins the conversation
    of the newest message with that id dated no later than the reply; when every one is dated
    later (clocks disagree), the oldest. One candidate is simply the parent. ``reply_date`` and
    the candidates' dates are ISO-8601 UTC text of one shape, so text order is time order.
    None for no candidate.
    """
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda c: (c.date, c.row_id))
    earlier = [c for c in ordered if c.date <= reply_date]
    return (earlier[-1] if earlier else ordered[0]).conversation_id
