"""Outgoing replies: building the message that carries a conversation's markers.

:func:`compose_reply` builds the :class:`~email.message.EmailMessage` an outbox worker hands to
SMTP. It is pure (no clock unless none is given, no network, no database) so what the message
carries can be tested byte for byte. Whatever the account's ``identification`` method, the
message is built so that the customer's answer comes back to the same conversation:

* ``plus_address`` — ``Reply-To: local+KEY@domain`` of the account address (read back by
  :func:`~mailbridge.core.identify.plus_keys`);
* ``subject`` — ``Subject: <subject> [ID-KEY]`` within 128 characters (read back by
  :func:`~mailbridge.core.identify.subject_key`);
* always — a fresh Message-ID on the account's domain, ``In-Reply-To`` the parent's id and
  ``References`` the parent's chain plus the parent's id (RFC 5322 section 3.6.4), so a client
  that drops the other markers still threads by Message-ID (the store matches In-Reply-To and
  References against the ids of mail the account sent).

Loop protection on the sending side: the account's own addresses (and aliases, and their
plus-variants) are never recipients, and an automatic reply says so in ``Auto-Submitted``
(RFC 3834) and Microsoft's ``X-Auto-Response-Suppress``, so other robots do not answer it.

Serialise with ``message.as_bytes()``: the message's own policy (:data:`POLICY`) writes ids
whole. aiosmtplib's ``send_message`` re-flattens with plain ``policy.SMTP``, which turns an id
longer than a line into RFC 2047 encoded-words; hand the bytes to ``sendmail`` instead.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email import quoprimime
from email.header import Header
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from typing import Any, Final, Literal

from mailbridge.core.identify import (
    is_key,
    is_own_address,
    normalize_message_id,
    plus_address,
    tag_subject,
)
from mailbridge.core.model import Address
from mailbridge.core.participants import reply_addresses

# The same values as mailbridge.config.Identification. Spelt out here because core may not
# import the config module (it pulls in the store); a unit test keeps the two equal.
Identification = Literal["message_id", "plus_address", "subject"]

# RFC 5322 section 2.1.1: a line MUST NOT exceed 998 characters. The id headers are written
# unfolded (see _Policy), so "References: " plus the id list must fit in one such line. RFC 5537
# section 3.4.4 trims References the same way for Netnews: keep the first id and the newest.
_LINE_LIMIT: Final = 998
MAX_REFERENCES_LENGTH: Final = _LINE_LIMIT - len("References: ")
# The longest id that In-Reply-To can carry on one line, angle brackets included.
_MAX_ID_LENGTH: Final = _LINE_LIMIT - len("In-Reply-To: ") - 2

# What an id must look like to be sent intact: RFC 5322 msg-id characters are printable ASCII;
# anything else (non-ASCII, stray brackets, an encoded-word opener) would be RFC 2047-encoded
# or misread by the header parser, and a mangled id threads nothing.
_SENDABLE_ID = re.compile(r"[!-;=?-~]+")

# Headers holding message ids. The stdlib folds long unstructured headers by turning words
# into RFC 2047 encoded-words, which breaks an id longer than a line; these are never folded.
_ID_HEADERS: Final = frozenset({"message-id", "in-reply-to", "references"})


class _Wire(str):
    """A header value composed here in its final form (RFC 5322 section 2.2: printable ASCII,
    folded with CRLF and a space; other text as RFC 2047 encoded-words): stored and written
    as it is. The stdlib parses every value when it is set and folds it anew when written,
    most of the time composing takes (scripts/bench, sending row); reading such a header
    (``message["To"]``) still parses it as usual."""

    __slots__ = ()


# The MIME headers set_text writes (RFC 2045), and their values parsed (see _Policy).
_MIME_HEADERS: Final = frozenset({"content-type", "content-transfer-encoding", "mime-version"})
_PARSED_MIME: dict[tuple[str, str], Any] = {}


class _Policy(EmailPolicy):
    """``policy.SMTP`` (CRLF line ends), except that id headers are written on one line and
    :class:`_Wire` values are written as they are.

    Folding between ids would be legal too, but the stdlib's folder cannot be told to break
    only at whitespace; writing them unfolded is safe because :func:`reference_chain` keeps
    them within the 998-character line limit.
    """

    def header_store_parse(self, name: str, value: str) -> tuple[str, str]:
        if isinstance(value, _Wire):
            return (name, value)
        return super().header_store_parse(name, value)

    def header_fetch_parse(self, name: str, value: str) -> Any:
        # A _Wire value is parsed when read, as the stdlib parses any raw value. The MIME
        # headers :func:`set_text` writes are read again and again while the message is
        # written and read back (its content type, charset, transfer encoding): their few
        # values are parsed once per process (header objects are immutable).
        if isinstance(value, _Wire) and name.lower() in _MIME_HEADERS:
            key = (name, str(value))  # the object keeps the name as first asked for
            parsed = _PARSED_MIME.get(key)
            if parsed is None:
                parsed = super().header_fetch_parse(name, value)
                if len(_PARSED_MIME) < 64:
                    _PARSED_MIME[key] = parsed
            return parsed
        return super().header_fetch_parse(name, value)

    def fold(self, name: str, value: str) -> str:
        if isinstance(value, _Wire):
            return f"{name}: {self.linesep.join(value.split(_CRLF))}{self.linesep}"
        if name.lower() in _ID_HEADERS and self.max_line_length is not None:
            return str(self.clone(max_line_length=None).fold(name, value))
        return str(super().fold(name, value))

    def fold_binary(self, name: str, value: str) -> bytes:
        if isinstance(value, _Wire):
            return self.fold(name, value).encode("ascii")
        if name.lower() in _ID_HEADERS and self.max_line_length is not None:
            return self.clone(max_line_length=None).fold_binary(name, value)
        return super().fold_binary(name, value)


_CRLF: Final = "\r\n"
# RFC 5322 section 2.1.1: lines SHOULD be at most 78 characters (folded where possible).
_FOLD_AT: Final = 78


def _plain_ascii(text: str) -> bool:
    """Printable ASCII that no reader would take for an encoded-word (RFC 2047 section 6.1)."""
    return text.isascii() and text.isprintable() and "=?" not in text


def _encoded_words(text: str, name: str = "") -> str:
    """``text`` as RFC 2047 encoded-words in UTF-8, folded between words."""
    return str(Header(text, "utf-8", header_name=name or None).encode(linesep=_CRLF))


def _wire_address(address: HeaderAddress) -> str | None:
    """``Name <local@domain>`` for a header (RFC 5322 section 3.4), the name quoted where
    its specials demand; None for a non-ASCII name or address, left to the stdlib (which
    writes encoded-words that its own reader joins again)."""
    spec, name = address.addr_spec, address.display_name
    if not spec.isascii() or (name and not _plain_ascii(name)):
        return None
    return formataddr((name, spec)) if name else spec


def _wire_addresses(name: str, addresses: Sequence[HeaderAddress]) -> _Wire | None:
    """An address list, folded after a comma where a line would pass 78 characters."""
    lines: list[str] = []
    line = ""
    indent = len(name) + 2  # "To: " before the first line, one space before the others

    def width(text: str) -> int:
        _head, folded, tail = text.rpartition(_CRLF)
        return len(tail) + (1 if folded else indent)

    for address in addresses:
        text = _wire_address(address)
        if text is None:
            return None
        joined = f"{line}, {text}" if line else text
        if line and width(joined) > _FOLD_AT:
            lines.append(line + ",")
            line, indent = text, 1
        else:
            line = joined
    lines.append(line)
    return _Wire(f"{_CRLF} ".join(lines))


def _wire_text(name: str, text: str) -> _Wire:
    """An unstructured header (Subject): plain ASCII as it is, folded at spaces past 78
    characters; other text (or a word too long for a line) as folded encoded-words."""
    if _plain_ascii(text):
        if len(name) + 2 + len(text) <= _FOLD_AT:
            return _Wire(text)
        folded = str(Header(text, "us-ascii", header_name=name).encode(linesep=_CRLF))
        if all(len(line) <= _LINE_LIMIT for line in folded.split(_CRLF)):
            return _Wire(folded)
    return _Wire(_encoded_words(text, name))


class _HeaderClasses(HeaderRegistry):
    """The stdlib's header registry, with each header's class made once.

    ``HeaderRegistry.__getitem__`` builds a new class (``type(...)``) on every header set or
    read, about 60 us each: a quarter of composing a short reply (scripts/bench, sending row).
    The classes depend only on the header name while the registry is not changed
    (:meth:`map_to_type` clears the cache), so they are kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def map_to_type(self, name: str, cls: type[BaseHeader]) -> None:
        super().map_to_type(name, cls)
        self._classes.clear()

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


# policy.SMTP is policy.default with CRLF line ends; this is the same plus the id rule above.
POLICY: Final = _Policy(linesep="\r\n", header_factory=_HeaderClasses())


def _sendable_id(value: str) -> str | None:
    """``value`` normalised (no angle brackets), or None when it cannot be sent intact."""
    normalized = normalize_message_id(value)
    if (
        normalized is None
        or len(normalized) > _MAX_ID_LENGTH
        or "=?" in normalized
        or not _SENDABLE_ID.fullmatch(normalized)
    ):
        return None
    return normalized


def _length(ids: Sequence[str]) -> int:
    """Length of ``<a> <b> ...``: each id with its brackets, one space between them."""
    return sum(len(i) + 2 for i in ids) + max(len(ids) - 1, 0)


def reference_chain(
    parent_message_id: str | None,
    parent_references: Iterable[str] = (),
    parent_in_reply_to: Iterable[str] = (),
    *,
    max_length: int = MAX_REFERENCES_LENGTH,
) -> tuple[str, ...]:
    """The reply's References ids (normalised, no angle brackets), oldest first.

    RFC 5322 section 3.6.4: the parent's References followed by the parent's Message-ID; when
    the parent has no References but its In-Reply-To holds exactly one id, that id stands in for
    them. Ids are de-duplicated and ids that cannot be sent intact are dropped. When the chain is
    longer than ``max_length`` characters the middle goes (as RFC 5537 section 3.4.4 does): the
    first id (the thread's root, which threading clients key on) and the parent are kept, then
    as many of the newest ids as fit. A root and parent that alone do not fit leave the parent.
    """
    references = [i for i in map(_sendable_id, parent_references) if i is not None]
    if not references:
        replied = [i for i in map(_sendable_id, parent_in_reply_to) if i is not None]
        references = replied if len(replied) == 1 else []
    parent = _sendable_id(parent_message_id) if parent_message_id else None
    chain: list[str] = []
    for ident in (*references, *([parent] if parent else [])):
        if ident not in chain:
            chain.append(ident)
    if _length(chain) <= max_length:
        return tuple(chain)
    root, newest = chain[0], chain[-1]
    kept = [newest]
    for ident in reversed(chain[1:-1]):
        if _length([root, ident, *kept]) > max_length:
            break
        kept.insert(0, ident)
    if _length([root, *kept]) <= max_length:
        kept.insert(0, root)
    elif _length(kept) > max_length:  # max_length below one id: the parent is what matters
        kept = [newest]
    return tuple(kept)


def _one_line(text: str) -> str:
    # Header values may not contain line breaks (the stdlib refuses them); runs of whitespace
    # collapse as a mail client would show them.
    return " ".join(text.split())


def _header_address(address: Address | str, name: str = "") -> HeaderAddress:
    """A header address; raises ValueError for something that is not ``local@domain``."""
    if isinstance(address, Address):
        email, name = address.email, address.name or name
    else:
        parsed_name, email = parseaddr(address)
        name = parsed_name or name
    local, at, domain = email.strip().rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an address: {address!r}")
    return HeaderAddress(display_name=_one_line(name), username=local, domain=domain.lower())


def _recipients(
    to: Iterable[Address | str], cc: Iterable[Address | str], own: frozenset[str]
) -> tuple[list[HeaderAddress], list[HeaderAddress]]:
    """To and Cc without the account's own identity, each address once (To wins over Cc).

    Mail to an own address or alias would come straight back into the Inbox and be imported as
    the account talking to itself: the cheapest loop is the one never sent.
    """
    seen: set[str] = set()
    out: tuple[list[HeaderAddress], list[HeaderAddress]] = ([], [])
    for bucket, addresses in zip(out, (to, cc), strict=True):
        for address in addresses:
            header = _header_address(address)
            email = header.addr_spec.lower()
            if email in seen or is_own_address(email, own):
                continue
            seen.add(email)
            bucket.append(header)
    return out


def _as_address(address: Address | str) -> Address:
    if isinstance(address, Address):
        return address
    name, email = parseaddr(address)
    return Address(email=email.strip().lower(), name=name)


def set_text(message: EmailMessage, text: str) -> None:
    """``message.set_content(text)`` for a message without content yet, byte for byte (a
    unit test compares the two on generated text): ``text/plain; charset="utf-8"``, the
    transfer encoding the stdlib's content manager would choose (7bit, 8bit,
    quoted-printable or base64, RFC 2045 section 6), ``MIME-Version: 1.0``. The stdlib's way
    parses and refolds the Content-Type header it builds twice (a third of composing a
    short reply); here the headers are written in their final form (:class:`_Wire`)."""
    policy = message.policy
    limit = policy.max_line_length or _LINE_LIMIT
    lines = text.encode("utf-8").splitlines()
    body = b"\n".join(lines) + b"\n"
    cte: str | None = None
    payload = ""
    if max((len(line) for line in lines), default=0) <= limit:
        if body.isascii():
            cte, payload = "7bit", body.decode("ascii")
        elif policy.cte_type == "8bit":
            cte, payload = "8bit", body.decode("ascii", "surrogateescape")
    if cte is None:
        linesep = policy.linesep.encode("ascii")
        # The stdlib's choice: whichever of the two is shorter on the first ten lines.
        sniff = linesep.join(lines[:10]) + linesep
        sniff_qp = quoprimime.body_encode(sniff.decode("latin-1"), limit)
        if len(sniff_qp) > len(binascii.b2a_base64(sniff)):
            cte = "base64"
            whole = linesep.join(lines) + linesep
            per_line = limit // 4 * 3
            payload = "".join(
                binascii.b2a_base64(whole[i : i + per_line]).decode("ascii")
                for i in range(0, len(whole), per_line)
            )
        else:
            cte = "quoted-printable"
            payload = (
                sniff_qp
                if len(lines) <= 10
                else quoprimime.body_encode(body.decode("latin-1"), limit)
            )
    message["Content-Type"] = _Wire('text/plain; charset="utf-8"')
    message.set_payload(payload)
    message["Content-Transfer-Encoding"] = _Wire(cte)
    if "MIME-Version" not in message:
        message["MIME-Version"] = _Wire("1.0")


def compose_reply(
    *,
    address: str,
    display_name: str = "",
    identification: Identification,
    conversation_key: str,
    subject: str,
    parent_message_id: str | None = None,
    parent_references: Sequence[str] = (),
    parent_in_reply_to: Sequence[str] = (),
    parent_from: Address | str | None = None,
    parent_reply_to: Sequence[Address | str] = (),
    to: Iterable[Address | str] = (),
    cc: Iterable[Address | str] = (),
    own_addresses: Iterable[str] = (),
    text: str,
    html: str | None = None,
    automatic: bool = False,
    now: datetime | None = None,
) -> EmailMessage:
    """The outgoing message of one conversation, carrying its markers.

    ``address`` and ``display_name`` are the account's (From). ``subject`` is the conversation's
    subject, used as given (with the ``[ID-KEY]`` tag for ``identification="subject"``): a
    caller that wants ``Re:`` adds it. ``parent_*`` describe the message answered (ids with or
    without angle brackets, as stored); leave them out for the first message of a new
    conversation. The answer goes (To) to the parent's Reply-To addresses when it has any,
    else to its From (``parent_from``, ``parent_reply_to``; RFC 5322 section 3.6.2; a Reply-To
    that names only the account falls back to From), then to ``to``. Recipients are
    :class:`~mailbridge.core.model.Address` objects or strings (``"Name <a@b>"`` or
    ``"a@b"``); the account address, ``own_addresses`` (its aliases) and their plus-variants
    are dropped, case-insensitively. ``html`` adds a
    ``multipart/alternative`` HTML part beside the plain text. ``automatic`` marks a reply no
    person wrote. ``now`` (timezone-aware) fixes the Date for tests.

    Raises ValueError for a malformed key or address, or when no recipient is left.
    The Message-ID to record as sent is ``normalize_message_id(message["Message-ID"])``.
    """
    if not is_key(conversation_key):
        raise ValueError(f"not a conversation key: {conversation_key!r}")
    sender = _header_address(address, display_name)
    own = frozenset(a.strip().lower() for a in (address, *own_addresses) if a.strip())
    answered = reply_addresses(
        _as_address(parent_from) if parent_from is not None else None,
        [_as_address(a) for a in parent_reply_to],
        own,
    )
    to_list, cc_list = _recipients((*answered, *to), cc, own)
    if not to_list and not cc_list:
        raise ValueError("no recipient left once the account's own addresses are dropped")

    message = EmailMessage(policy=POLICY)

    def addresses(name: str, values: Sequence[HeaderAddress]) -> None:
        # Written by _wire_addresses; a non-ASCII address by the stdlib.
        message[name] = _wire_addresses(name, values) or values

    addresses("From", [sender])
    if to_list:
        addresses("To", to_list)
    if cc_list:
        addresses("Cc", cc_list)
    if identification == "plus_address":
        # Answers go to support+KEY@domain, which the store reads from To/Cc/Delivered-To.
        # The display name is kept so the customer's client shows the account as usual.
        addresses(
            "Reply-To",
            [
                HeaderAddress(
                    display_name=sender.display_name,
                    addr_spec=plus_address(sender.addr_spec, conversation_key),
                )
            ],
        )
    if identification == "subject":
        # tag_subject cuts the subject so that the tag survives servers that shorten subjects.
        message["Subject"] = _wire_text("Subject", tag_subject(subject, conversation_key))
    else:
        message["Subject"] = _wire_text("Subject", _one_line(subject))
    # RFC 5322 section 3.6.1: Date is required; section 3.3 date-time via the stdlib.
    message["Date"] = _Wire(format_datetime(now if now is not None else datetime.now(UTC)))
    # RFC 5322 section 3.6.4: a fresh, globally unique id on our own domain. Passing the domain
    # also keeps make_msgid from asking the resolver for this host's name (core does no I/O).
    # Ids (checked by _sendable_id, printable ASCII) are written unfolded (see _Policy).
    message["Message-ID"] = _Wire(make_msgid(domain=sender.domain))
    parent = _sendable_id(parent_message_id) if parent_message_id else None
    if parent is not None:
        message["In-Reply-To"] = _Wire(f"<{parent}>")
    chain = reference_chain(parent_message_id, parent_references, parent_in_reply_to)
    if chain:
        message["References"] = _Wire(" ".join(f"<{i}>" for i in chain))
    if automatic:
        # RFC 3834 section 5: a responder must not answer mail whose Auto-Submitted is other than
        # "no". Exchange/Outlook honour only their own header; "All" suppresses out-of-office
        # replies, delivery and read receipts alike.
        message["Auto-Submitted"] = _Wire("auto-replied")
        message["X-Auto-Response-Suppress"] = _Wire("All")
        # Not standard (RFC 3834 section 5 discourages relying on it) but what many older
        # vacation programs and list servers still read; "auto_reply" as the reference sends.
        message["Precedence"] = _Wire("auto_reply")

    set_text(message, text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message
