"""Raw RFC 5322 bytes -> :class:`~mailbridge.core.model.ParsedMessage`.

The MIME tree comes from the standard library's parser with the ``compat32`` policy, which keeps
header values as the raw text it read; decoding (RFC 2047 words, RFC 2231 parameters, charsets,
transfer encodings) is done here, once, with fallbacks for the broken labels real mail carries.
That is about three times faster than ``policy.default`` (which builds a header object per
access) and lets every step degrade instead of failing: a bad charset, date or address costs
that one value, never the message. :func:`parse_message` raises only
:class:`~mailbridge.errors.MessageError`.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import hashlib
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32
from email.utils import getaddresses, parsedate_to_datetime
from typing import Final

from mailbridge.core.automatic import HEADERS as AUTOMATIC_HEADERS
from mailbridge.core.html import html_to_text, sanitize_html
from mailbridge.core.identify import normalize_message_id, parse_id_list
from mailbridge.core.model import Address, Attachment, ParsedMessage
from mailbridge.errors import MessageError

__all__ = ["decode_header_value", "decode_text", "parse_message"]

_MAX_DEFECTS: Final = 20
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
            # "Base64 ", "\"base64\"": compat32 compares the exact lower-cased string.
            return value.strip().strip("\"'").lower()
        return value

    def fold_binary(self, name: str, value: str) -> bytes:
        # Re-serialising an attached message must give back its bytes: the stored value
        # still holds the original folding, so no re-folding.
        return f"{name}: {value}{self.linesep}".encode("utf-8", "surrogateescape")


_POLICY: Final = _RawPolicy()

# ----------------------------------------------------------------------------------------------
# Charsets

# Labels Python does not know, or where a superset decodes what senders really use.
_CHARSET_ALIASES: Final = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "euc-cn": "gb18030",
    "x-euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ksc5601": "cp949",
    "euc-kr": "cp949",
    "x-windows-949": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "ms_kanji": "cp932",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-e": "iso-8859-6",
    "unicode-1-1-utf-7": "utf-7",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic",
    "utf8": "utf-8",
}
# Labels that say "we do not know"; decode by sniffing.
_UNKNOWN_LABELS: Final = frozenset(
    {"", "unknown-8bit", "x-unknown", "unknown", "default", "x-user-defined", "charset", "none"}
)
# Python codecs that are not charsets a mail could sensibly use (or are slow on junk).
_REFUSED_CODECS: Final = frozenset(
    {"idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined", "mbcs", "oem"}
)
# Declared ASCII/Latin-1 with valid multi-byte UTF-8 in it is mislabelled UTF-8: such byte pairs
# spell nonsense ("Ã©") in Latin-1 text.
_LATIN_CODECS: Final = frozenset({"ascii", "latin-1", "iso8859-1", "cp1252"})
_UTF8_SEQUENCE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]")
_SEVEN_BIT_CODECS: Final = ("utf-7", "utf-16", "utf-32", "iso2022", "hz")


@functools.lru_cache(maxsize=256)
def _codec_for(label: str) -> str | None:
    """The Python codec name for a charset label, or ``None`` when it is unknown or unsafe."""
    name = label.strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    if name in _UNKNOWN_LABELS:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True):  # base64, zlib, rot13 ...
        return None
    codec = info.name.replace("_", "-")
    if codec in _REFUSED_CODECS:
        return None
    return codec


def _sniff(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def decode_text(data: bytes, charset: str | None) -> tuple[str, str | None]:
    """Decode ``data`` declared as ``charset``; never raises.

    Returns the text and a defect note when the declaration could not be trusted. Unknown or
    absent labels are sniffed (UTF-8, then Windows-1252, then Latin-1, which cannot fail).
    """
    if data.isascii():
        codec = _codec_for(charset) if charset else "ascii"
        # ASCII-compatible charsets read ASCII bytes as ASCII; 7-bit stateful ones do not.
        if codec is None or not codec.startswith(_SEVEN_BIT_CODECS):
            return data.decode("ascii"), None
    if not charset:
        return _sniff(data), None
    codec = _codec_for(charset)
    if codec is None:
        return _sniff(data), f"unknown charset {charset[:40]!r}"
    if not codec.startswith(("utf-8", "utf-16", "utf-32")) and _UTF8_SEQUENCE.search(data):
        # Valid multi-byte UTF-8 is next to impossible in real legacy-charset text, while
        # UTF-8 labelled as Latin-1 or GB2312 is common: trust the bytes over the label.
        try:
            return data.decode("utf-8"), None
        except UnicodeDecodeError:
            pass
    if codec in _LATIN_CODECS:
        return _sniff(data) if codec == "ascii" else data.decode("cp1252", "replace"), None
    try:
        return data.decode(codec), None
    except UnicodeDecodeError:
        pass
    except Exception:  # a codec that fails otherwise on junk is still no charset
        return _sniff(data), f"charset {charset[:40]!r} failed"
    note = f"invalid {charset[:40]!r} bytes"
    if codec == "utf-8" and not _UTF8_SEQUENCE.search(data):
        return _sniff(data), note  # labelled UTF-8, written in a legacy 8-bit charset
    if codec != "utf-8" and _UTF8_SEQUENCE.search(data):
        try:
            return data.decode("utf-8"), f"declared {charset[:40]!r}, decoded as UTF-8"
        except UnicodeDecodeError:
            pass
    return data.decode(codec, "replace"), note


# ----------------------------------------------------------------------------------------------
# Headers

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r?\n$")
_SPACES = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _to_bytes(value: str) -> bytes:
    """The bytes behind a header string from the bytes parser (8-bit bytes are surrogates)."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def _fix_8bit(value: str, hint: str | None = None) -> str:
    """Turn raw 8-bit header bytes into text: UTF-8, else the message's charset, else 1252."""
    if value.isascii():
        return value
    data = _to_bytes(value)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if hint:
        codec = _codec_for(hint)
        if codec is not None and codec != "utf-8":
            try:
                return data.decode(codec)
            except Exception:  # noqa: S110 - try the next candidate
                pass
    return _sniff(data)


def _decode_word(encoding: str, text: str) -> bytes | None:
    if encoding in "bB":
        cleaned = re.sub(r"[^A-Za-z0-9+/]", "", text)
        cleaned += "=" * (-len(cleaned) % 4)
        try:
            return binascii.a2b_base64(cleaned)
        except (binascii.Error, ValueError):
            return None
    return binascii.a2b_qp(_to_bytes(text), header=True)


def decode_header_value(value: str, hint: str | None = None) -> str:
    """Decode RFC 2047 encoded words and raw 8-bit bytes; unfold. Never raises.

    Adjacent encoded words in one charset are decoded together: encoders split multi-byte
    characters across words. Whitespace between encoded words is dropped (RFC 2047 6.2).
    """
    value = _FOLD.sub("", value)
    if "=?" not in value:
        return _CONTROL.sub("", _fix_8bit(value, hint))
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    position = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending:
            text, _ = decode_text(bytes(pending), pending_charset or None)
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
            out.append(_fix_8bit(between, hint))
        elif pending_charset and word_charset != pending_charset:
            flush()
        pending += decoded
        pending_charset = word_charset
        position = match.end()
    flush()
    out.append(_fix_8bit(value[position:], hint))
    return _CONTROL.sub("", "".join(out))


def _one_line(value: str) -> str:
    return _SPACES.sub(" ", value).strip()


class _Headers:
    """The message's top-level headers, looked up case-insensitively, decoded on demand."""

    def __init__(self, message: Message, hint: str | None) -> None:
        self.hint = hint
        self.values: dict[str, list[str]] = {}
        for name, value in message.items():
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
    for name, addr in getaddresses([_FOLD.sub("", v) for v in values]):
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


def _parse_date(value: str | None, now: datetime, defects: list[str]) -> datetime:
    if value is None or not value.strip():
        defects.append("no Date header; the time of parsing is used")
        return now
    try:
        parsed = parsedate_to_datetime(value)
    except Exception:  # the stdlib raises TypeError/ValueError/IndexError here
        parsed = None
    if parsed is None:
        defects.append(f"unparseable Date {value[:60]!r}; the time of parsing is used")
        return now
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
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
    in_related: bool
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
_CID_REFERENCE = re.compile(r"cid:\s*<?([^\"'\s<>)]+)", re.IGNORECASE)
_META_CHARSET = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_UNSAFE_FILENAME = re.compile(r"[\x00-\x1f\x7f]")
_FLOWED_QUOTE = re.compile(r"^>+")
_DELIMITER_LINE = re.compile(rb"^--([0-9A-Za-z'()+_,./:=?-]{1,70})[ \t]*\r?$", re.MULTILINE)


_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")


def _content_type(part: Message) -> str:
    """The part's lower-case MIME type; junk (NULs, 8-bit bytes) reads as octet-stream."""
    ctype = part.get_content_type()
    return ctype if _MIME_TYPE.fullmatch(ctype) else "application/octet-stream"


def _content_id(value: str | None) -> str | None:
    if not value:
        return None
    cid = _SPACES.sub("", _fix_8bit(value)).strip("<>")
    return cid if cid and cid.isprintable() else None


def _clean_filename(name: str | None) -> str | None:
    if not name:
        return None
    text = _one_line(decode_header_value(name))
    text = text.replace("\\", "/").rsplit("/", 1)[-1]  # senders' paths mean nothing here
    text = _UNSAFE_FILENAME.sub("", text).strip(" .") if text not in {".", ".."} else ""
    return text[:255] or None


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

    def body(self, part: Message, depth: int = 0, *, top: bool = False) -> _Body:
        if depth > _MAX_DEPTH:
            self.notes.append(f"MIME nesting deeper than {_MAX_DEPTH}; the rest is skipped")
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
        self._add_resource(part, ctype, in_related=False)
        return _Body()

    def _salvage(self, part: Message, ctype: str, depth: int) -> _Body:
        """A multipart the parser could not split (no or wrong boundary): guess the boundary
        from the first delimiter-shaped line, else read the payload as plain text."""
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        delimiter = _DELIMITER_LINE.search(data)
        if delimiter is not None:
            boundary = delimiter.group(1)
            head = b"Content-Type: " + ctype.encode("ascii", "replace")
            head += b'; boundary="' + boundary + b'"\r\n\r\n'
            rebuilt = BytesParser(policy=_POLICY).parsebytes(head + data)
            if rebuilt.is_multipart():
                self.notes.append(f"{ctype}: boundary guessed from the body")
                return self.body(rebuilt, depth + 1)
        if not data.strip():
            return _Body()
        text, _ = decode_text(data, part.get_content_charset())
        self.notes.append(f"{ctype}: unsplittable multipart read as text")
        return _Body(plain=[text.replace("\r\n", "\n").replace("\x00", "")])

    def promote_inline_text(self) -> _Body:
        """With no body part found, the first text part with a file name that is not marked
        as an attachment is the body (``Content-Disposition: inline; filename=...`` or just
        ``name=...``, as mutt and VM send)."""
        for index, res in enumerate(self.resources):
            if res.content_type in _BODY_TYPES and res.disposition != "attachment":
                del self.resources[index]
                text, _ = decode_text(res.data, res.charset)
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
        self._add_resource(part, _content_type(part), in_related=True)

    @staticmethod
    def _is_inline_text(part: Message) -> bool:
        if part.get_content_disposition() == "attachment":
            return False
        return part.get_param("filename", None, "content-disposition") is None and (
            part.get_param("name") is None
        )

    def _text(self, part: Message, ctype: str) -> _Body:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        charset = part.get_content_charset()
        if charset is None and ctype == "text/html":
            meta = _META_CHARSET.search(data[:4096])
            if meta is not None:
                charset = meta.group(1).decode("ascii")
        text, note = decode_text(data, charset)
        if note:
            self.notes.append(f"{ctype}: {note}")
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
        if ctype == "text/html":
            return _Body(html=[text])
        if str(part.get_param("format", "")).lower() == "flowed":
            delsp = str(part.get_param("delsp", "")).lower() == "yes"
            text = _unflow(text, delsp)
        return _Body(plain=[text])

    def _filename(self, part: Message) -> str | None:
        try:
            return _clean_filename(part.get_filename())
        except Exception:  # a mangled parameter costs the name, not the part
            self.notes.append("unreadable attachment file name")
            return None

    def _add_resource(self, part: Message, ctype: str, *, in_related: bool) -> None:
        payload = part.get_payload(decode=True)
        self.resources.append(
            _Resource(
                content_type=ctype,
                filename=self._filename(part),
                data=payload if isinstance(payload, bytes) else b"",
                content_id=_content_id(part.get("content-id")),
                disposition=part.get_content_disposition(),
                in_related=in_related,
                charset=part.get_content_charset(),
            )
        )

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
        except Exception as exc:  # a part we cannot re-serialise is noted
            self.notes.append(f"{ctype} part could not be kept: {type(exc).__name__}")
            return
        if part.get("content-transfer-encoding") in {"base64", "quoted-printable"}:
            # Non-standard but seen: an encoded message/rfc822 the parser read as headers.
            helper = Message(policy=_POLICY)
            helper["Content-Transfer-Encoding"] = part["content-transfer-encoding"]
            helper.set_payload(data.decode("ascii", "surrogateescape"))
            decoded = helper.get_payload(decode=True)
            data = decoded if isinstance(decoded, bytes) else data
        self.resources.append(
            _Resource(
                content_type=ctype,
                filename=self._filename(part),
                data=data,
                content_id=_content_id(part.get("content-id")),
                disposition=part.get_content_disposition(),
                in_related=False,
            )
        )


def _generated_name(ctype: str, prefix: str, number: int) -> str:
    extension = _GENERATED_EXTENSIONS.get(ctype)
    if extension is None:
        subtype = ctype.partition("/")[2]
        extension = f".{subtype}" if ctype.startswith("image/") and subtype.isalnum() else ".bin"
    return f"{prefix}-{number}{extension}"


def _classify(
    resources: list[_Resource], html: str
) -> tuple[tuple[Attachment, ...], tuple[Attachment, ...]]:
    referenced = (
        {m.lower() for m in _CID_REFERENCE.findall(html)} if "cid:" in html.lower() else set()
    )
    attachments: list[Attachment] = []
    images: list[Attachment] = []
    counters = {
        (inline, prefix): 0 for inline in (True, False) for prefix in ("attachment", "image")
    }
    for res in resources:
        is_image = res.content_type.startswith("image/")
        inline = (
            is_image
            and res.content_id is not None
            and (
                res.content_id.lower() in referenced
                or (res.in_related and res.disposition != "attachment")
            )
        )
        filename = res.filename or _FIXED_NAMES.get(res.content_type)
        if filename is None:
            prefix = "image" if is_image else "attachment"
            counters[inline, prefix] += 1
            filename = _generated_name(res.content_type, prefix, counters[inline, prefix])
        item = Attachment(
            filename=filename,
            content_type=res.content_type,
            data=res.data,
            content_id=res.content_id,
        )
        (images if inline else attachments).append(item)
    return tuple(attachments), tuple(images)


def _defect_notes(message: Message) -> list[str]:
    notes: list[str] = []
    for part in message.walk():
        for defect in getattr(part, "defects", ()):
            name = type(defect).__name__.removesuffix("Defect")
            words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).lower()
            note = f"{_content_type(part)}: {words}"
            if note not in notes:
                notes.append(note)
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
        headers = _Headers(message, hint)
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
    raw: bytes, *, max_attachment_bytes: int | None = None, now: datetime | None = None
) -> ParsedMessage:
    """Parse one raw message.

    Raises :class:`MessageError` with code ``too_large`` when attachments and inline images
    together exceed ``max_attachment_bytes``, and with code ``unparseable`` for anything that
    cannot be read as a message (empty input, headers and body both missing, parser failure).
    Nothing else escapes.
    """
    try:
        return _parse(raw, max_attachment_bytes, now)
    except MessageError:
        raise
    except RecursionError as exc:
        raise MessageError("the MIME structure is nested too deeply", code="unparseable") from exc
    except Exception as exc:
        reason = f"cannot parse message: {type(exc).__name__}: {exc}"
        raise MessageError(reason[:300], code="unparseable") from exc


def _parse(raw: bytes, max_attachment_bytes: int | None, now: datetime | None) -> ParsedMessage:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MessageError(f"expected bytes, got {type(raw).__name__}", code="unparseable")
    raw = bytes(raw)
    if not raw.strip():
        raise MessageError("the message is empty", code="unparseable")
    message = BytesParser(policy=_POLICY).parsebytes(raw)
    if not message.keys() and not str(message.get_payload() or "").strip():
        raise MessageError("the message has neither headers nor a body", code="unparseable")

    hint = _charset_hint(message)
    headers = _Headers(message, hint)
    defects: list[str] = []

    message_id_text = headers.text("message-id")
    message_id = normalize_message_id(message_id_text) if message_id_text else None
    if message_id_text and message_id is None:
        defects.append(f"unusable Message-ID {message_id_text[:60]!r}")
    message_key = message_id or "sha256:" + hashlib.sha256(raw).hexdigest()

    in_reply_to = parse_id_list(" ".join(headers.all_text("in-reply-to")))
    references = parse_id_list(" ".join(headers.all_text("references")))

    subject_raw = headers.raw("subject")
    subject = _one_line(decode_header_value(subject_raw, hint)) if subject_raw else ""

    def addresses(name: str) -> tuple[Address, ...]:
        return _addresses(headers.values.get(name, []), hint)

    senders = addresses("from") or addresses("sender")
    date = _parse_date(headers.text("date"), now or datetime.now(UTC), defects)

    linesep = "\r\n" if b"\r\n" in raw[:4096] else "\n"
    walker = _Walker(hint, linesep)
    body = walker.body(message, top=True)
    if not body.plain and not body.html:
        body = walker.promote_inline_text()
    defects.extend(walker.notes)

    html_source = "\n".join(body.html)
    plain = "\n".join(text.strip("\n") for text in body.plain).strip("\n").rstrip()
    if not plain.strip() and html_source:
        plain = html_to_text(html_source)
    html = sanitize_html(html_source) if html_source.strip() else ""

    attachments, inline_images = _classify(walker.resources, html_source)
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
    if len(defects) > _MAX_DEFECTS:
        extra = len(defects) - _MAX_DEFECTS + 1
        defects = [*defects[: _MAX_DEFECTS - 1], f"... and {extra} more"]

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
        defects=tuple(defects),
    )
