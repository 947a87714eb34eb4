"""Raw RFC 5322 bytes -> :class:`~mailbridge.core.model.ParsedMessage`.

The MIME tree comes from the standard library's parser with the ``compat32`` policy, which keeps
header values as the raw text it read; decoding (RFC 2047 words, RFC 2231 parameters, charsets,
transfer encodings) is done here, once, with fallbacks for the broken labels real mail carries.
That is about three times faster than ``policy.default`` (which builds a header object per
access) and lets every step degrade instead of failing: a bad charset, date or address costs
that one value, never the message. :func:`parse_message` raises only
:class:`~mailbridge.errors.MessageError`.

Bytes become text only through :func:`mailbridge.core.charset.decode_text` (headers, file names
and bodies alike); transfer encodings are undone by :mod:`mailbridge.core.transfer` (base64 in
padded chunks, uuencode), Outlook's winmail.dat by tnefparse. Every repair is recorded as a
stable code in ``ParsedMessage.defects`` (the list is in that class's docstring).
"""

from __future__ import annotations

import binascii
import functools
import io
import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import Compat32
from email.utils import getaddresses, parsedate_tz
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from mailbridge.core.automatic import HEADERS as AUTOMATIC_HEADERS
from mailbridge.core.charset import decode_text
from mailbridge.core.html import html_to_text, resolve_cid_sources, sanitize_html
from mailbridge.core.identify import normalize_message_id, parse_id_list
from mailbridge.core.messagekey import content_fingerprint
from mailbridge.core.messagekey import message_key as message_key_for
from mailbridge.core.model import Address, Attachment, ParsedMessage
from mailbridge.core.transfer import (
    DEFECT_JUNK,
    decode_base64,
    decode_quoted_printable,
    decode_uuencode,
    find_uuencoded,
    split_base64_trailer,
)
from mailbridge.errors import MessageError

__all__ = ["decode_header_value", "decode_text", "parse_composed", "parse_message"]

# Legit mail nests a handful of multiparts; deeper trees are hostile or broken.
_MAX_DEPTH: Final = 40
_AUTO_HEADERS: Final = (
    "auto-submitted",
    "x-auto-response-suppress",
    "precedence",
    "list-id",
    "list-unsubscribe",
    "x-autoreply",
    "x-autorespond",
    "return-path",
    "content-type",
    "x-failed-recipients",
    *AUTOMATIC_HEADERS,  # the list, bulk-sender and Exchange markers core/automatic.py reads
)


class _RawPolicy(Compat32):
    """compat32, but header values come back as the raw text, never as ``Header`` objects
    (which compat32 makes for 8-bit values and which then decode lossily)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        if name.lower() == "content-transfer-encoding":
            return _transfer_encoding(value)
        return value

    def fold_binary(self, name: str, value: str) -> bytes:
        # Re-serialising an attached message must give back its bytes: the stored value
        # still holds the original folding, so no re-folding.
        return f"{name}: {value}{self.linesep}".encode("utf-8", "surrogateescape")


_POLICY: Final = _RawPolicy()
_COMMENT = re.compile(r"\([^()]*\)")
# Spellings of the RFC 2045 mechanisms that senders write.
_TRANSFER_ALIASES: Final = {
    "base-64": "base64",
    "quoted_printable": "quoted-printable",
    "quotedprintable": "quoted-printable",
    "quoted-printed": "quoted-printable",
}


def _transfer_encoding(value: str) -> str:
    """A Content-Transfer-Encoding value as its mechanism (RFC 2045 6.1): ``"Base64 "``,
    ``"\"base64\""``, ``base64 (attached)`` (a comment, RFC 5322 3.2.2) are all ``base64``;
    compat32 compares the exact lower-cased string."""
    text = value.strip().strip("\"'").lower()
    if "(" in text or " " in text or "\t" in text:
        words = _COMMENT.sub(" ", text).split()
        text = words[0].strip("\"'") if words else ""
    return _TRANSFER_ALIASES.get(text, text)


# ----------------------------------------------------------------------------------------------
# Headers

# RFC 2047 2; the closing "?=" may be missing at the very end of a value (a name cut at the
# line limit by the sender's client): the word is still decoded.
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)(?:\?=|\Z)")
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r?\n$")
_SPACES = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _to_bytes(value: str) -> bytes:
    """The bytes behind a header string from the bytes parser (8-bit bytes are surrogates)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _fix_8bit(value: str, hint: str | None = None, notes: list[str] | None = None) -> str:
    """Raw 8-bit (or 7-bit ISO-2022-JP) header bytes as text: UTF-8 first (RFC 6532), else the
    message's charset, else a guess (:func:`~mailbridge.core.charset.decode_text`)."""
    if value.isascii() and "\x1b" not in value:
        return value
    text, defect = decode_text(_to_bytes(value), None, hint)
    if defect and notes is not None:
        notes.append(defect)
    return text


def _decode_word(encoding: str, text: str) -> bytes | None:
    if encoding in "bB":
        cleaned = re.sub(r"[^A-Za-z0-9+/]", "", text)
        cleaned += "=" * (-len(cleaned) % 4)
        try:
            return binascii.a2b_base64(cleaned)
        except (binascii.Error, ValueError):
            return None
    return binascii.a2b_qp(_to_bytes(text), header=True)


def decode_header_value(value: str, hint: str | None = None, notes: list[str] | None = None) -> str:
    """Decode RFC 2047 encoded words and raw 8-bit bytes; unfold. Never raises.

    Adjacent encoded words in one charset are decoded together: encoders split multi-byte
    characters across words. Whitespace between encoded words is dropped (RFC 2047 6.2).
    Charset defects (``charset-*``) are appended to ``notes`` when given.
    """
    value = _FOLD.sub("", value)
    if "=?" not in value:
        return _CONTROL.sub("", _fix_8bit(value, hint, notes))
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    position = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            text, defect = decode_text(bytes(pending), pending_charset or None, hint)
            if defect and notes is not None:
                notes.append(defect)
            out.append(text)
            pending.clear()
        pending_charset = ""

    for match in _ENCODED_WORD.finditer(value):
        between = value[position : match.start()]
        word_charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 language suffix
        decoded = _decode_word(match.group(2), match.group(3))
        if decoded is None:
            continue  # leave the undecodable word as literal text
        if between and not (pending_charset and between.isspace()):
            flush()
            out.append(_fix_8bit(between, hint, notes))
        elif pending_charset and word_charset != pending_charset:
            flush()
        pending += decoded
        pending_charset = word_charset
        position = match.end()
    flush()
    out.append(_fix_8bit(value[position:], hint, notes))
    return _CONTROL.sub("", "".join(out))


def _one_line(value: str) -> str:
    return _SPACES.sub(" ", value).strip()


class _Headers:
    """The message's top-level headers, looked up case-insensitively, decoded on demand."""

    def __init__(self, items: Iterable[tuple[str, str]], hint: str | None) -> None:
        self.hint = hint
        self.values: dict[str, list[str]] = {}
        for name, value in items:
            self.values.setdefault(name.strip().lower(), []).append(value)

    def raw(self, name: str) -> str | None:
        values = self.values.get(name)
        return values[0] if values else None

    def text(self, name: str) -> str | None:
        """The first value, unfolded, 8-bit bytes decoded, without RFC 2047 decoding."""
        value = self.raw(name)
        if value is None:
            return None
        return _one_line(_CONTROL.sub("", _fix_8bit(_FOLD.sub("", value), self.hint)))

    def all_text(self, name: str) -> list[str]:
        return [_fix_8bit(_FOLD.sub("", v), self.hint) for v in self.values.get(name, ())]


_EMAIL = re.compile(r"[^\s@<>()\[\],;:\"\\]+@[^\s@<>()\[\],;:\"\\]+")
# A quoted local part is legal (RFC 5322 3.4.1) and mail systems use it for their senders:
# Exchange bounces come from <"System Administrator"@example.com>.
_QUOTED_EMAIL = re.compile(r"\"([^\"\\]+)\"(@[^\s@<>()\[\],;:\"\\]+)")


def _email(addr: str, hint: str | None) -> str | None:
    """The address as stored (lower-case), or None when it is not one."""
    email = _fix_8bit(addr, hint).strip().strip("<>").lower()
    if not email.isprintable():
        return None
    if _EMAIL.fullmatch(email):
        return email
    quoted = _QUOTED_EMAIL.fullmatch(email)
    if quoted is None:
        return None
    # Quotes that protect nothing are dropped, so "ann"@x.org is ann@x.org.
    bare = quoted.group(1) + quoted.group(2)
    return bare if _EMAIL.fullmatch(bare) and ".." not in bare else email


def _addresses(values: list[str], hint: str | None) -> tuple[Address, ...]:
    """Valid, distinct addresses of one header (all its occurrences)."""
    if not values:
        return ()
    seen: set[str] = set()
    out: list[Address] = []
    # Raw ISO-2022-JP names (old Japanese mailers) are decoded first: "ESC ( B" would open a
    # comment for the address parser and swallow the address.
    unfolded = [_FOLD.sub("", v) for v in values]
    unfolded = [_fix_8bit(v, hint) if "\x1b" in v else v for v in unfolded]
    for name, addr in getaddresses(unfolded):
        email = _email(addr, hint)
        if email is None or email in seen:
            continue
        seen.add(email)
        display = _one_line(decode_header_value(name, hint)).strip("\"' ")
        out.append(Address(email=email, name="" if display.lower() == email else display))
    return tuple(out)


def _delivered_to(headers: _Headers) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for name in ("delivered-to", "x-original-to"):
        for value in headers.all_text(name):
            for _, addr in getaddresses([value]):
                email = addr.strip().strip("<>").lower()
                if _EMAIL.fullmatch(email) and email.isprintable():
                    seen.setdefault(email, None)
    return tuple(seen)


# The day-month-year of an RFC 5322 date (3.3), obsolete forms included (4.3): "18 Sep 101".
_DATE_DMY = re.compile(r"\b\d{1,2}[\s-]+[A-Za-z]{3,9}\.?,?[\s-]+(\d{2,4})\b")
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# A Date ahead of the arrival by more than this is wrong (a sender's clock or a forgery);
# a day covers every time zone error.
_MAX_DATE_AHEAD: Final = timedelta(days=1)


# The zone after the time when it is no RFC 5322 zone: a name (``CEST``), ``GMT+0200``,
# ``UTC+2`` or ``+02:00`` (what parsedate_tz reads as +0000).
_ZONE_AFTER_TIME = re.compile(
    r":\d\d?\s*(?P<name>[A-Za-z]{1,5})?\s*"
    r"(?:(?P<sign>[+-])(?P<hours>\d\d?)(?::?(?P<minutes>\d\d))?)?\s*(?:\([^()]*\)\s*)?$"
)
# Zone names mail programs write although RFC 5322 4.3 knows only the North American ones
# (which parsedate_tz reads). Ambiguous names (IST, AST, CST in Asia ...) are left out: RFC
# 5322 4.3 says an unknown zone means -0000.
_ZONE_NAMES: Final = {
    "CET": 60,
    "MET": 60,
    "MEZ": 60,
    "CEST": 120,
    "MEST": 120,
    "MESZ": 120,
    "WET": 0,
    "WEST": 60,
    "BST": 60,
    "EET": 120,
    "EEST": 180,
    "MSK": 180,
    "HKT": 480,
    "SGT": 480,
    "AWST": 480,
    "JST": 540,
    "KST": 540,
    "ACST": 570,
    "AEST": 600,
    "AEDT": 660,
    "NZST": 720,
    "NZDT": 780,
    "HST": -600,
    "AKST": -540,
    "AKDT": -480,
}
_UTC_NAMES: Final = frozenset({"GMT", "UT", "UTC", "Z"})


def _named_zone(value: str) -> int | None:
    """The offset in seconds of a zone that parsedate_tz read as +0000 but that says more
    (see :data:`_ZONE_AFTER_TIME`), else None."""
    match = _ZONE_AFTER_TIME.search(value)
    if match is None:
        return None
    name = (match.group("name") or "").upper()
    sign, hours, minutes = match.group("sign", "hours", "minutes")
    if sign is not None:
        if not name and minutes is not None and ":" not in match.group(0):
            return None  # "+0200" (or a wrong "+2500") as parsedate_tz reads it
        # "GMT+0200", "UTC-5", "+02:00", "+02", and "CEST+0200" (the number wins).
        total = int(hours) * 60 + int(minutes or 0)
        if total == 0 or total > 18 * 60:
            return None  # no offset at all, or none on Earth
        return (total if sign == "+" else -total) * 60
    if name in _ZONE_NAMES:
        return _ZONE_NAMES[name] * 60
    return None


def _obsolete_year(year: str) -> int:
    """RFC 5322 section 4.3: a two-digit year 00-49 is 20xx, 50-99 is 19xx; a three-digit
    year (a pre-Y2K ``tm_year``) is that plus 1900."""
    value = int(year)
    if len(year) == 2:
        return value + (1900 if value >= 50 else 2000)
    return value + 1900


def _date_from(value: str, defects: list[str]) -> datetime | None:
    parsed = parsedate_tz(value)
    if parsed is None:
        try:
            iso = datetime.fromisoformat(value.strip())  # "2025-06-02 09:00:00" from scripts
        except ValueError:
            return None
        defects.append("date-nonstandard")
        return iso if iso.tzinfo else iso.replace(tzinfo=UTC)
    year = parsed[0]
    dmy = _DATE_DMY.search(value)
    if dmy is not None and len(dmy.group(1)) < 4:
        year = _obsolete_year(dmy.group(1))
        defects.append("date-obsolete-year")
    elif dmy is not None:
        year = int(dmy.group(1))  # "0025" is the year 25, not 2025 (parsedate_tz adds 2000)
    offset = parsed[9]
    # parsedate_tz reads what it does not know as +0000, and "+02" as two minutes (real
    # offsets are whole quarter hours); a zone that means +0000 changes nothing.
    if (offset == 0 or (offset is not None and offset % 900)) and (named := _named_zone(value)):
        offset = named
        defects.append("date-nonstandard")
    try:
        zone = UTC if offset is None else timezone(timedelta(seconds=offset))
        return datetime(year, *parsed[1:6], tzinfo=zone)
    except (ValueError, OverflowError):
        return None


def _parse_date(value: str | None, arrival: datetime, defects: list[str]) -> datetime:
    """The Date header as an aware datetime; ``arrival`` (INTERNALDATE, else the time of
    parsing) when it is missing, unreadable, before 1970 or more than a day ahead of arrival,
    with a defect noted so the message cannot sort its conversation wrong."""
    if value is None or not value.strip():
        defects.append("date-missing")
        return arrival
    try:
        parsed = _date_from(value, defects)
    except Exception:  # the stdlib raises TypeError/ValueError/IndexError on junk
        parsed = None
    if parsed is None:
        defects.append("date-invalid")
        return arrival
    if parsed < _UNIX_EPOCH:
        defects.append("date-before-1970")
        return arrival
    if parsed > arrival + _MAX_DATE_AHEAD:
        defects.append("date-in-future")
        return arrival
    return parsed


# ----------------------------------------------------------------------------------------------
# MIME tree


@dataclass(slots=True)
class _Body:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)

    def extend(self, other: _Body) -> None:
        self.plain.extend(other.plain)
        self.html.extend(other.html)


@dataclass(frozen=True, slots=True)
class _Resource:
    """A non-body leaf part, classified into attachment or inline image once the HTML is known."""

    content_type: str
    filename: str | None
    data: bytes
    content_id: str | None
    disposition: str | None
    charset: str | None = None


_GENERATED_EXTENSIONS: Final = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tif",
    "image/svg+xml": ".svg",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/ms-tnef": ".dat",
    "application/vnd.ms-tnef": ".dat",
    "application/pgp-signature": ".asc",
    "application/pgp-encrypted": ".asc",
    "application/pkcs7-signature": ".p7s",
    "application/x-pkcs7-signature": ".p7s",
    "application/pkcs7-mime": ".p7m",
    "application/x-pkcs7-mime": ".p7m",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "text/x-vcard": ".vcf",
    "text/vcard": ".vcf",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "message/rfc822-headers": ".txt",
}
_FIXED_NAMES: Final = {
    "message/rfc822": "forwarded-message.eml",
    # Outlook's rich-text wrapper; some gateways label it with the registered vnd. name.
    "application/ms-tnef": "winmail.dat",
    "application/vnd.ms-tnef": "winmail.dat",
    "message/delivery-status": "delivery-status.txt",
    "message/disposition-notification": "disposition-notification.txt",
    "text/rfc822-headers": "rfc822-headers.txt",
    "message/rfc822-headers": "rfc822-headers.txt",
}
_BODY_TYPES: Final = frozenset({"text/plain", "text/html"})
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_UNSAFE_FILENAME = re.compile(r"[\x00-\x1f\x7f]")
_FLOWED_QUOTE = re.compile(r"^>+")
_DELIMITER_LINE = re.compile(rb"^--([0-9A-Za-z'()+_,./:=?-]{1,70})[ \t]*\r?$", re.MULTILINE)
_TNEF_TYPES: Final = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})
# Labels that say nothing about the bytes: the file name or the bytes tell the real type.
_GENERIC_TYPES: Final = frozenset(
    {
        "application/octet-stream",
        "application/x-octet-stream",
        "binary/octet-stream",
        "application/binary",
        "application/unknown",
        "application/x-unknown",
        "application/force-download",
        "application/x-download",
        "application/download",
    }
)
# WHATWG MIME Sniffing, 6.1 "image type pattern matching" and 7.1 for the archive/PDF types.
_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
)


@functools.cache
def _mime_types() -> mimetypes.MimeTypes:
    """The standard library's own extension table, not the machine's /etc/mime.types (the
    same answer everywhere); built on first use, not at start-up."""
    return mimetypes.MimeTypes()


_TRANSFER_IDENTITY: Final = frozenset({"", "7bit", "8bit", "binary", "7-bit", "8-bit", "none"})
_UUENCODE: Final = frozenset({"x-uuencode", "uuencode", "x-uue", "uue"})
# RFC 2045 5.1 / RFC 2231 parameters: name, then a quoted string (its end may be missing) or a
# token (senders leave spaces unquoted: read to the next ';').
_PARAMETER = re.compile(r';\s*([^\s=;"]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"?|([^;]*))')
_QUOTED_PAIR = re.compile(r"\\(.)")
# Stdlib parser defects -> ours.
_STDLIB_DEFECTS: Final = {
    "NoBoundaryInMultipartDefect": "boundary-missing",
    "StartBoundaryNotFoundDefect": "boundary-missing",
    "CloseBoundaryNotFoundDefect": "boundary-unclosed",
    "FirstHeaderLineIsContinuationDefect": "header-malformed",
    "MisplacedEnvelopeHeaderDefect": "header-malformed",
    "MissingHeaderBodySeparatorDefect": "header-malformed",
    "MultipartConversionDefect": "multipart-invalid",
    "MultipartInvariantViolationDefect": "multipart-invalid",
    "InvalidMultipartContentTransferEncodingDefect": "multipart-invalid",
    "InvalidBase64PaddingDefect": "base64-truncated",
    "InvalidBase64LengthDefect": "base64-truncated",
    "InvalidBase64CharactersDefect": "base64-junk",
}


_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")


def _content_type(part: Message) -> str:
    """The part's lower-case MIME type; junk (NULs, 8-bit bytes) reads as octet-stream."""
    ctype = part.get_content_type()
    return ctype if _MIME_TYPE.fullmatch(ctype) else "application/octet-stream"


def _real_type(declared: str, filename: str | None, data: bytes) -> str:
    """``declared`` unless it says nothing (octet-stream, as scanners and Apple Mail send):
    then the type the file name's extension gives, else the one the bytes' magic gives."""
    if declared not in _GENERIC_TYPES:
        return declared
    if filename:
        guessed, _ = _mime_types().guess_type(filename, strict=False)
        if guessed:
            return guessed
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return declared


_BRACKETED = re.compile(r"<([^<>]+)>")


def _content_id(value: str | None) -> str | None:
    if not value:
        return None
    text = _fix_8bit(value)
    bracketed = _BRACKETED.search(text)  # "<id> (comment)": the msg-id (RFC 2045 7)
    cid = _SPACES.sub("", bracketed.group(1) if bracketed else text).strip("<>")
    return cid if cid and cid.isprintable() else None


def _clean_filename(text: str | None) -> str | None:
    """A decoded file name made safe to show and store: no path, no control characters."""
    if not text:
        return None
    text = _one_line(text)
    text = text.replace("\\", "/").rsplit("/", 1)[-1]  # senders' paths mean nothing here
    text = _UNSAFE_FILENAME.sub("", text).strip(" .") if text not in {".", ".."} else ""
    return text[:255] or None


def _parameters(value: str) -> list[tuple[str, str]]:
    """The ``name=value`` parameters of a Content-Type or Content-Disposition value, in order,
    names lower-cased, quoted strings unquoted."""
    out: list[tuple[str, str]] = []
    for match in _PARAMETER.finditer(_FOLD.sub("", value)):
        quoted, token = match.group(2), match.group(3)
        text = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else (token or "").strip()
        out.append((match.group(1).lower(), text))
    return out


def _rfc2231_value(
    params: list[tuple[str, str]], name: str, hint: str | None, notes: list[str]
) -> str | None:
    """The RFC 2231 value of parameter ``name`` (``name*=``, or continuations ``name*0*=``,
    ``name*1=`` ...), or None when there is none.

    The sections' bytes are joined first and decoded once, in the charset the first section
    declares (RFC 2231 4.1), so a character split across sections survives. An empty, unknown
    or misspelt charset goes through :func:`~mailbridge.core.charset.decode_text` (UTF-8
    first), never through Latin-1.
    """
    prefix = name + "*"
    sections: dict[int, tuple[str, bool]] = {}
    single: str | None = None
    for key, value in params:
        if key == prefix:
            single = value if single is None else single
        elif key.startswith(prefix):
            suffix = key[len(prefix) :]
            encoded = suffix.endswith("*")
            suffix = suffix.rstrip("*")
            if suffix.isdigit():
                sections.setdefault(int(suffix), (value, encoded))
    if single is not None:
        sections = {0: (single, True)}
    if not sections:
        return None
    charset: str | None = None
    data = bytearray()
    for index, number in enumerate(sorted(sections)):
        value, encoded = sections[number]
        if not encoded:
            data += _to_bytes(value)
            continue
        if index == 0 and value.count("'") >= 2:
            label, _, value = value.split("'", 2)
            charset = label or None
        data += unquote_to_bytes(_to_bytes(value))
    text, defect = decode_text(bytes(data), charset, hint)
    if defect:
        notes.append(defect)
    return text


def _unflow(text: str, delsp: bool) -> str:
    """Join the soft line breaks of format=flowed text (RFC 3676)."""
    out: list[str] = []
    joining = False
    joining_depth = -1
    for line in text.split("\n"):
        match = _FLOWED_QUOTE.match(line)
        depth = len(match.group(0)) if match else 0
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffing
        flowed = content.endswith(" ") and content != "-- "
        if flowed and delsp:
            content = content[:-1]
        if joining and depth == joining_depth:
            out[-1] += content
        else:
            out.append((">" * depth + (" " if depth else "")) + content)
        joining = flowed
        joining_depth = depth
    return "\n".join(out)


class _Walker:
    """Walks the MIME tree once, collecting body texts, resources and defect notes."""

    def __init__(self, hint: str | None, linesep: str) -> None:
        self.hint = hint
        self.linesep = linesep
        self.resources: list[_Resource] = []
        self.notes: list[str] = []
        self.tnef_body = _Body()  # the body of the first winmail.dat, for mail with no other

    def body(self, part: Message, depth: int = 0, *, top: bool = False) -> _Body:
        if depth > _MAX_DEPTH:
            self.notes.append("mime-too-deep")
            return _Body()
        ctype = _content_type(part)
        maintype = ctype.partition("/")[0]
        if part.is_multipart():
            if maintype == "message":
                self._add_message(part, depth)
                return _Body()
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            if ctype == "multipart/alternative":
                return self._alternative(children, depth)
            if ctype == "multipart/related":
                return self._related(part, children, depth)
            body = _Body()
            for child in children:
                body.extend(self.body(child, depth + 1))
            return body
        if ctype in _BODY_TYPES and (top or self._is_inline_text(part)):
            return self._text(part, ctype)
        if maintype == "multipart":
            return self._salvage(part, ctype, depth)
        self._add_resource(part, ctype)
        return _Body()

    def payload(self, part: Message) -> bytes:
        """The part's body with its Content-Transfer-Encoding undone (RFC 2045 6), repairs
        noted: padded base64 chunks, junk, truncation, uuencode, unknown encodings."""
        # The stored payload itself: get_payload() would re-decode 8-bit bytes with the
        # declared charset and U+FFFD, and get_payload(decode=True) stops base64 at a '='.
        payload = getattr(part, "_payload", None)
        if isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            try:
                data = payload.encode("ascii", "surrogateescape")
            except UnicodeEncodeError:
                data = payload.encode("utf-8", "surrogateescape")
        else:
            return b""
        encoding = str(part.get("content-transfer-encoding") or "")
        if encoding in _TRANSFER_IDENTITY:
            return data
        if encoding == "base64":
            trailer = b""
            if part.get_content_maintype() == "text" and (b"\n\n" in data or b"\n\r\n" in data):
                # A footer a list or gateway appended after the base64 text: kept as text.
                data, trailer = split_base64_trailer(data)
            decoded, defects = decode_base64(data)
            if trailer:
                defects.append(DEFECT_JUNK)
                if not _DELIMITER_LINE.fullmatch(trailer):  # a stray boundary is no text
                    decoded += b"\r\n" + trailer
        elif encoding == "quoted-printable":
            return decode_quoted_printable(data)
        elif encoding in _UUENCODE:
            decoded, defects = decode_uuencode(data)
        else:
            self.notes.append("transfer-encoding-unknown")
            return data
        self.notes.extend(defects)
        return decoded

    def decode(self, data: bytes, charset: str | None) -> str:
        text, defect = decode_text(data, charset, self.hint)
        if defect:
            self.notes.append(defect)
        return text

    def _salvage(self, part: Message, ctype: str, depth: int) -> _Body:
        """A multipart the parser could not split (no or wrong boundary): guess the boundary
        from the first delimiter-shaped line, else read the payload as plain text."""
        data = self.payload(part)
        delimiter = _DELIMITER_LINE.search(data)
        if delimiter is not None:
            boundary = delimiter.group(1)
            head = b"Content-Type: " + ctype.encode("ascii", "replace")
            head += b'; boundary="' + boundary + b'"\r\n\r\n'
            rebuilt = BytesParser(policy=_POLICY).parsebytes(head + data)
            if rebuilt.is_multipart():
                self.notes.append("boundary-guessed")
                return self.body(rebuilt, depth + 1)
        if not data.strip():
            return _Body()
        text = self.decode(data, part.get_content_charset())
        self.notes.append("multipart-unsplittable")
        return _Body(plain=[text.replace("\r\n", "\n").replace("\x00", "")])

    def promote_inline_text(self) -> _Body:
        """With no body part found, the first text part with a file name that is not marked
        as an attachment is the body (``Content-Disposition: inline; filename=...`` or just
        ``name=...``, as mutt and VM send)."""
        for index, res in enumerate(self.resources):
            if res.content_type in _BODY_TYPES and res.disposition != "attachment":
                del self.resources[index]
                text = self.decode(res.data, res.charset)
                text = text.replace("\r\n", "\n").replace("\x00", "")
                return _Body(html=[text]) if res.content_type == "text/html" else _Body([text])
        return _Body()

    def _alternative(self, children: list[Message], depth: int) -> _Body:
        # Senders list alternatives from plainest to richest: first plain, last HTML.
        bodies = [self.body(child, depth + 1) for child in children]
        return _Body(
            plain=next((b.plain for b in bodies if b.plain), []),
            html=next((b.html for b in reversed(bodies) if b.html), []),
        )

    def _related(self, part: Message, children: list[Message], depth: int) -> _Body:
        if not children:
            return _Body()
        root = 0
        start = part.get_param("start")
        if isinstance(start, str) and (start_id := _content_id(start)) is not None:
            for index, child in enumerate(children):
                if _content_id(child.get("content-id")) == start_id:
                    root = index
                    break
        body = self.body(children[root], depth + 1)
        for index, child in enumerate(children):
            if index != root:
                self._resources_of(child, depth + 1)
        return body

    def _resources_of(self, part: Message, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        if part.is_multipart():
            if part.get_content_maintype() == "message":
                self._add_message(part, depth)
                return
            for child in part.get_payload():
                if isinstance(child, Message):
                    self._resources_of(child, depth + 1)
            return
        self._add_resource(part, _content_type(part))

    @staticmethod
    def _is_inline_text(part: Message) -> bool:
        if part.get_content_disposition() == "attachment":
            return False
        return part.get_param("filename", None, "content-disposition") is None and (
            part.get_param("name") is None
        )

    def _text(self, part: Message, ctype: str) -> _Body:
        data = self.payload(part)
        charset = part.get_content_charset()
        if charset is None and ctype == "text/html":
            meta = _META_CHARSET.search(data[:4096])
            if meta is not None:
                charset = meta.group(1).decode("ascii")
        if ctype == "text/plain":
            data = self._cut_uuencoded(data)
        text = self.decode(data, charset)
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
        if ctype == "text/html":
            return _Body(html=[text])
        if str(part.get_param("format", "")).lower() == "flowed":
            delsp = str(part.get_param("delsp", "")).lower() == "yes"
            text = _unflow(text, delsp)
        return _Body(plain=[text])

    def _cut_uuencoded(self, data: bytes) -> bytes:
        """uuencoded files inside a plain-text body become attachments, as mail clients
        show them, and leave the text."""
        rest, blocks, defects = find_uuencoded(data)
        self.notes.extend(defects)
        for block in blocks:
            name = _clean_filename(block.filename)
            self.resources.append(
                _Resource(
                    content_type=_real_type("application/octet-stream", name, block.data),
                    filename=name,
                    data=block.data,
                    content_id=None,
                    disposition="attachment",
                )
            )
        return rest

    def _filename(self, part: Message) -> str | None:
        """The part's file name: RFC 2231 values (``filename*``, ``name*``, continuations)
        before plain ones, Content-Disposition's before Content-Type's; RFC 2047 words and raw
        8-bit bytes in plain values decoded too (Outlook, Gmail and phones send those)."""
        # Raw 8-bit bytes in a name are in the part's own charset when it declares one (the
        # client wrote both), else in the message's.
        hint = part.get_content_charset() or self.hint
        try:
            found: list[tuple[list[tuple[str, str]], str]] = []
            for header, name in (("content-disposition", "filename"), ("content-type", "name")):
                value = part.get(header)
                if isinstance(value, str) and "=" in value:
                    found.append((_parameters(value), name))
            for params, name in found:
                extended = _rfc2231_value(params, name, hint, self.notes)
                if extended:
                    return _clean_filename(extended)
            for params, name in found:
                plain = next((value for key, value in params if key == name), None)
                if plain:
                    return _clean_filename(decode_header_value(plain, hint, self.notes))
        except Exception:  # a mangled parameter costs the name, not the part
            self.notes.append("filename-undecodable")
        return None

    def _add_resource(self, part: Message, ctype: str) -> None:
        data = self.payload(part)
        filename = self._filename(part)
        self.resources.append(
            _Resource(
                content_type=ctype,
                filename=filename,
                data=data,
                content_id=_content_id(part.get("content-id")),
                disposition=part.get_content_disposition(),
                charset=part.get_content_charset(),
            )
        )
        if ctype in _TNEF_TYPES or (
            ctype in _GENERIC_TYPES and (filename or "").lower() == "winmail.dat"
        ):
            self._unpack_tnef(data)

    def _unpack_tnef(self, data: bytes) -> None:
        """Outlook's ``winmail.dat`` (MS-OXTNEF) unpacked with tnefparse: its files become
        attachments beside it, its body is kept for a message that has no other."""
        try:
            from tnefparse import TNEF  # imported when needed: rare, and no start-up cost

            tnef = TNEF(data, do_checksum=False)
        except Exception:  # any failure of a foreign decoder on junk: keep winmail.dat only
            self.notes.append("tnef-unreadable")
            return
        for attachment in tnef.attachments:
            content = attachment.data if isinstance(attachment.data, bytes) else b""
            name = _tnef_text(_tnef_name(attachment), tnef.codepage)
            filename = _clean_filename(name)
            self.resources.append(
                _Resource(
                    content_type=_real_type("application/octet-stream", filename, content),
                    filename=filename,
                    data=content,
                    content_id=None,
                    disposition="attachment",
                )
            )
        if not self.tnef_body.plain and not self.tnef_body.html:
            html = _tnef_text(tnef.htmlbody, tnef.codepage)
            plain = _tnef_text(tnef.body, tnef.codepage)
            if not html.strip() and not plain.strip():
                plain = self._tnef_rtf(tnef)
            self.tnef_body = _Body(
                plain=[plain.replace("\r\n", "\n").rstrip("\x00")] if plain.strip() else [],
                html=[html.rstrip("\x00")] if html.strip() else [],
            )

    def _tnef_rtf(self, tnef: Any) -> str:
        """The text of a TNEF body that Outlook kept only as compressed RTF (MS-OXRTFCP),
        decompressed with compressed-rtf and turned into text with striprtf."""
        compressed = getattr(tnef, "_rtfbody", None)
        if not isinstance(compressed, bytes) or not compressed:
            return ""
        try:
            from compressed_rtf import decompress  # imported when needed, as tnefparse is
            from striprtf.striprtf import rtf_to_text

            rtf = decompress(compressed + b"\x00")  # tnefparse's own reading adds the NUL
            # striprtf ships py.typed but leaves this function unannotated.
            text = rtf_to_text(rtf.decode("latin-1"), errors="ignore")  # type: ignore[no-untyped-call]
        except Exception:  # a foreign decoder on damaged data: the body is lost, not the mail
            self.notes.append("tnef-unreadable")
            return ""
        return str(text).replace("\r\n", "\n").strip("\n")

    def _add_message(self, part: Message, depth: int) -> None:
        """message/* parts (forwards, delivery reports) are kept whole, as their bytes."""
        ctype = _content_type(part)
        try:
            buffer = io.BytesIO()
            generator = BytesGenerator(buffer, mangle_from_=False, policy=_POLICY)
            for child in part.get_payload():
                if isinstance(child, Message):
                    generator.flatten(child, linesep=self.linesep)
                    if ctype != "message/rfc822":
                        buffer.write(self.linesep.encode("ascii"))
            data = buffer.getvalue()
        except Exception:  # a part we cannot re-serialise is noted
            self.notes.append("message-part-unreadable")
            return
        if part.get("content-transfer-encoding") in {"base64", "quoted-printable"}:
            # Non-standard but seen: an encoded message/rfc822 the parser read as headers.
            helper = Message(policy=_POLICY)
            helper["Content-Transfer-Encoding"] = part["content-transfer-encoding"]
            helper.set_payload(data.decode("ascii", "surrogateescape"))
            data = self.payload(helper)
        self.resources.append(
            _Resource(
                content_type=ctype,
                filename=self._filename(part),
                data=data,
                content_id=_content_id(part.get("content-id")),
                disposition=part.get_content_disposition(),
            )
        )


def _tnef_name(attachment: Any) -> object:
    try:
        return attachment.long_filename()
    except Exception:  # tnefparse decodes names itself and may fail on odd code pages
        return getattr(attachment, "_name", b"")


def _tnef_text(value: object, codepage: str | None) -> str:
    """A TNEF string property (bytes in the message's OEM code page, or already text)."""
    if isinstance(value, str):
        return value.strip("\x00")
    if isinstance(value, bytes):
        text, _ = decode_text(value.rstrip(b"\x00"), codepage)
        return text
    return ""


def _generated_name(ctype: str, prefix: str, number: int) -> str:
    extension = _GENERATED_EXTENSIONS.get(ctype)
    if extension is None:
        subtype = ctype.partition("/")[2]
        extension = f".{subtype}" if ctype.startswith("image/") and subtype.isalnum() else ".bin"
    return f"{prefix}-{number}{extension}"


def _classify(
    resources: list[_Resource], html: str, notes: list[str]
) -> tuple[tuple[Attachment, ...], tuple[Attachment, ...], str]:
    """Attachments, inline images and the HTML that cites them.

    A part is an inline image (an ``embeddedfile``) exactly when the HTML cites its
    Content-ID (``src="cid:..."``, RFC 2392), whatever its declared type; any other part,
    Content-ID or not, is a document a reader can see (so is a second part reusing a cited
    Content-ID: the reference shows the first). ``cid:`` references that name no part
    are removed from the HTML (``cid-dangling``), and the others are written as the part's own
    Content-ID, so the store rewrites every one of them without deciding anything.
    """
    known = {res.content_id.lower(): res.content_id for res in resources if res.content_id}
    html, cited, dangling = resolve_cid_sources(html, known)
    if dangling:
        notes.append("cid-dangling")
    attachments: list[Attachment] = []
    images: list[Attachment] = []
    counters = {
        (inline, prefix): 0 for inline in (True, False) for prefix in ("attachment", "image")
    }
    embedded: set[str] = set()
    for res in resources:
        ctype = _real_type(res.content_type, res.filename, res.data)
        cid = res.content_id.lower() if res.content_id is not None else None
        # A cid: reference shows one part: a second part under the same Content-ID is
        # cited by nothing a reader can follow, so it is a document (RFC 2392 wants ids unique).
        inline = cid is not None and cid in cited and cid not in embedded
        if inline and cid is not None:
            embedded.add(cid)
        filename = res.filename or _FIXED_NAMES.get(ctype)
        if filename is None:
            prefix = "image" if ctype.startswith("image/") else "attachment"
            counters[inline, prefix] += 1
            filename = _generated_name(ctype, prefix, counters[inline, prefix])
        item = Attachment(
            filename=filename,
            content_type=ctype,
            data=res.data,
            content_id=res.content_id,
        )
        (images if inline else attachments).append(item)
    return tuple(attachments), tuple(images), html


def _defect_notes(message: Message) -> list[str]:
    """The standard library parser's defects, as our codes."""
    notes: list[str] = []
    for part in message.walk():
        for defect in getattr(part, "defects", ()):
            notes.append(_STDLIB_DEFECTS.get(type(defect).__name__, "mime-defect"))
    return notes


def _charset_hint(message: Message) -> str | None:
    """The charset that raw 8-bit headers most likely use: the first one the message declares."""
    for count, part in enumerate(message.walk()):
        charset = part.get_content_charset()
        if charset or count > 10:
            return charset
    return None


# ----------------------------------------------------------------------------------------------
# Entry point


@dataclass(frozen=True, slots=True)
class HeaderSummary:
    """What the top-level headers of a message say, for one that cannot be imported."""

    message_id: str | None
    subject: str
    from_address: str


def summarise_headers(raw: bytes) -> HeaderSummary:
    """Message-ID, subject and sender, decoded as :func:`parse_message` decodes them,
    from the headers alone. Never raises: a message that failed to import still deserves a
    readable line in ``mailbridge failed`` (not "=?utf-8?b?...?=" and "John <JOHN@X>")."""
    try:
        message = BytesParser(policy=_POLICY).parsebytes(bytes(raw), headersonly=True)
        hint = _charset_hint(message)
        headers = _Headers(message.items(), hint)
        message_id_text = headers.text("message-id")
        subject_raw = headers.raw("subject")
        senders = _addresses(headers.values.get("from", []), hint) or _addresses(
            headers.values.get("sender", []), hint
        )
        return HeaderSummary(
            message_id=normalize_message_id(message_id_text) if message_id_text else None,
            subject=_one_line(decode_header_value(subject_raw, hint))[:500] if subject_raw else "",
            from_address=senders[0].email if senders else "",
        )
    except Exception:  # best effort by contract: the failure row still gets key and reason
        return HeaderSummary(message_id=None, subject="", from_address="")


def parse_message(
    raw: bytes,
    *,
    max_attachment_bytes: int | None = None,
    now: datetime | None = None,
    arrival: datetime | None = None,
) -> ParsedMessage:
    """Parse one raw message.

    ``arrival`` is when the message reached the mailbox (IMAP INTERNALDATE, RFC 3501 2.3.3);
    it stands in for a Date that is missing, unreadable, before 1970 or in the future. Without
    it, ``now`` (default: the time of parsing) does. Every repair is listed in ``defects``.

    Raises :class:`MessageError` with code ``too_large`` when attachments and inline images
    together exceed ``max_attachment_bytes``, and with code ``unparseable`` for anything that
    cannot be read as a message (empty input, headers and body both missing, parser failure).
    Nothing else escapes.
    """
    try:
        if arrival is not None and arrival.tzinfo is None:
            arrival = arrival.replace(tzinfo=UTC)
        return _parse(raw, max_attachment_bytes, arrival or now or datetime.now(UTC))
    except MessageError:
        raise
    except RecursionError as exc:
        raise MessageError("the MIME structure is nested too deeply", code="unparseable") from exc
    except Exception as exc:
        reason = f"cannot parse message: {type(exc).__name__}: {exc}"
        raise MessageError(reason[:300], code="unparseable") from exc


def _parse(raw: bytes, max_attachment_bytes: int | None, arrival: datetime) -> ParsedMessage:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MessageError(f"expected bytes, got {type(raw).__name__}", code="unparseable")
    raw = bytes(raw)
    if not raw.strip():
        raise MessageError("the message is empty", code="unparseable")
    message = BytesParser(policy=_POLICY).parsebytes(raw)
    if not message.keys() and not str(message.get_payload() or "").strip():
        raise MessageError("the message has neither headers nor a body", code="unparseable")
    hint = _charset_hint(message)
    return _read(message, _Headers(message.items(), hint), raw, max_attachment_bytes, arrival)


# Top-level headers that _read never looks at (the walker reads each part's own from the tree).
_UNREAD_HEADERS: Final = frozenset({"mime-version", "content-transfer-encoding"}) - frozenset(
    _AUTO_HEADERS
)


def parse_composed(
    message: EmailMessage, raw: bytes, *, now: datetime | None = None
) -> ParsedMessage:
    """What :func:`parse_message` reads from ``raw``, taken from ``message``, the message
    object ``raw`` was serialised from (``message.as_bytes()``, as the outbox composes it):
    the same reading (:func:`_read`), without parsing the bytes back.

    The header values are the ones the serialiser writes (``policy.fold_binary``, as the bytes
    parser reads them back: after the colon, continuation lines kept); the MIME tree is the
    composed one, whose parts hold the encoded payloads the bytes carry. An outgoing message
    is thus stored with the same conversation-model rows as when its bytes were parsed
    (``tests/unit/test_parse_composed.py`` compares the two). Raises :class:`MessageError`
    as :func:`parse_message` does.
    """
    try:
        policy = message.policy
        items: list[tuple[str, str]] = []
        for name, value in message.raw_items():
            if name.lower() in _UNREAD_HEADERS:
                continue  # folding one costs ~40 us, for nothing
            folded = policy.fold_binary(name, value).decode("ascii", "surrogateescape")
            # What the bytes parser keeps of a header line (compat32 header_source_parse).
            items.append((name, folded.partition(":")[2].lstrip(" \t").rstrip("\r\n")))
        headers = _Headers(items, _charset_hint(message))
        return _read(message, headers, bytes(raw), None, now or datetime.now(UTC))
    except MessageError:
        raise
    except Exception as exc:
        reason = f"cannot read the composed message: {type(exc).__name__}: {exc}"
        raise MessageError(reason[:300], code="unparseable") from exc


def _read(
    message: Message,
    headers: _Headers,
    raw: bytes,
    max_attachment_bytes: int | None,
    arrival: datetime,
) -> ParsedMessage:
    """The :class:`ParsedMessage` of ``message`` (its MIME tree), ``headers`` (its top-level
    header values as the bytes carry them) and ``raw`` (its bytes): what parse_message and
    parse_composed share."""
    hint = headers.hint
    defects: list[str] = []

    message_id_text = headers.text("message-id")
    message_id = normalize_message_id(message_id_text) if message_id_text else None
    if message_id_text and message_id is None:
        defects.append("message-id-invalid")
    fingerprint = content_fingerprint(raw)
    message_key = message_key_for(message_id, fingerprint)

    in_reply_to = parse_id_list(" ".join(headers.all_text("in-reply-to")))
    references = parse_id_list(" ".join(headers.all_text("references")))

    subject_raw = headers.raw("subject")
    subject = _one_line(decode_header_value(subject_raw, hint, defects)) if subject_raw else ""

    def addresses(name: str) -> tuple[Address, ...]:
        return _addresses(headers.values.get(name, []), hint)

    senders = addresses("from") or addresses("sender")
    date = _parse_date(headers.text("date"), arrival, defects)

    linesep = "\r\n" if b"\r\n" in raw[:4096] else "\n"
    walker = _Walker(hint, linesep)
    body = walker.body(message, top=True)
    if not body.plain and not body.html:
        body = walker.promote_inline_text()
    if not any(t.strip() for t in body.plain) and not any(t.strip() for t in body.html):
        body = walker.tnef_body if walker.tnef_body.plain or walker.tnef_body.html else body

    html_source = "\n".join(body.html)
    plain = "\n".join(text.strip("\n") for text in body.plain).strip("\n").rstrip()
    if not plain.strip() and html_source:
        plain = html_to_text(html_source)
    html = sanitize_html(html_source) if html_source.strip() else ""

    attachments, inline_images, html = _classify(walker.resources, html, walker.notes)
    defects.extend(walker.notes)
    if max_attachment_bytes is not None:
        total = sum(a.size for a in attachments) + sum(i.size for i in inline_images)
        if total > max_attachment_bytes:
            raise MessageError(
                f"attachments total {total} bytes, over the limit of {max_attachment_bytes} bytes",
                code="too_large",
            )

    auto_headers = {
        name: value for name in _AUTO_HEADERS if (value := headers.text(name)) is not None
    }
    defects.extend(_defect_notes(message))

    return ParsedMessage(
        message_key=message_key,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
        subject=subject,
        from_address=senders[0] if senders else None,
        reply_to=addresses("reply-to"),
        to=addresses("to"),
        cc=addresses("cc"),
        bcc=addresses("bcc"),
        delivered_to=_delivered_to(headers),
        date=date,
        plain_text=plain,
        html=html,
        attachments=attachments,
        inline_images=inline_images,
        size=len(raw),
        auto_headers=auto_headers,
        defects=tuple(dict.fromkeys(defects)),
        fingerprint=fingerprint,
    )
