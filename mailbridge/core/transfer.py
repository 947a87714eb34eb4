"""Content-Transfer-Encodings as real mail uses them: base64 in padded chunks, uuencode.

The standard library's base64 decoding stops at the first ``=`` and so drops everything after a
chunk that was padded on its own (list footers, log mailers and some gateways encode each piece
separately, RFC 2045 section 6.8 notwithstanding). :func:`decode_base64` decodes every chunk,
skips whitespace and junk between quanta, and says what it repaired. :func:`find_uuencoded`
cuts ``begin 644 name`` ... ``end`` blocks (POSIX uuencode, still sent by old clients and
scripts inside text/plain bodies) out of a text, as mail clients show them: as attachments.

Defect codes (see :class:`~mailbridge.core.model.ParsedMessage`): ``base64-padding-inside``,
``base64-junk``, ``base64-truncated``, ``uuencode-truncated``.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "UUBlock",
    "decode_base64",
    "decode_quoted_printable",
    "decode_uuencode",
    "find_uuencoded",
    "split_base64_trailer",
]

DEFECT_PADDING_INSIDE: Final = "base64-padding-inside"
DEFECT_JUNK: Final = "base64-junk"
DEFECT_TRUNCATED: Final = "base64-truncated"
DEFECT_UU_TRUNCATED: Final = "uuencode-truncated"

_WHITESPACE: Final = b" \t\r\n\x0b\x0c"
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/=]+")
_PADDING = re.compile(rb"=+")
# An empty line, and the next line that is not empty: base64 has no empty lines (RFC 2045
# 6.8), so one followed by a line outside the alphabet ends the encoded data.
_BLANK_THEN_LINE = re.compile(rb"\n[ \t]*\r?\n\s*([^\r\n]*)")  # a literal first: fast
_BASE64_LINE = re.compile(rb"[A-Za-z0-9+/=]+[ \t]*")
# RFC 2045 6.7 rule 3: white space at the end of an encoded line was added in transport.
_QP_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r?\n|\Z)")


def split_base64_trailer(data: bytes) -> tuple[bytes, bytes]:
    """``(encoded, trailer)``: the base64 data and plain text that follows it after an empty
    line (a list footer, disclaimer or "Sent from my phone" that a gateway or list appended to
    a base64 body). The trailer is ``b""`` when there is none; base64 chunks separated by empty
    lines stay data. Cheap when there is no empty line inside the data (the usual case)."""
    stripped = data.strip()
    for match in _BLANK_THEN_LINE.finditer(stripped):
        line = match.group(1)
        if line and not _BASE64_LINE.fullmatch(line):
            return stripped[: match.start()].rstrip(b"\r"), stripped[match.start(1) :]
    return data, b""


def decode_quoted_printable(data: bytes) -> bytes:
    """RFC 2045 6.7 quoted-printable -> bytes; never raises. White space that transport added
    at line ends is dropped first (rule 3), so ``=`` followed by spaces is still a soft line
    break (relays and Outlook add them)."""
    if b" \n" in data or b" \r\n" in data or b"\t\n" in data or b"\t\r\n" in data:
        data = _QP_TRAILING_SPACE.sub(b"", data)
    return binascii.a2b_qp(data)


def decode_base64(data: bytes) -> tuple[bytes, list[str]]:
    """RFC 2045 section 6.8 base64 -> ``(bytes, defects)``; never raises.

    Every chunk between padding runs is decoded, so ``QQ==Qg==`` gives ``AB``. Characters
    outside the alphabet are skipped (``base64-junk`` unless they are whitespace); a final
    quantum of one character carries no whole byte and is dropped, and an unpadded short one is
    decoded as far as it goes (``base64-truncated``). Plain text after an empty line (see
    :func:`split_base64_trailer`) is not decoded (``base64-junk``).
    """
    trailer = b""
    if b"\n\n" in data or b"\n\r\n" in data:
        data, trailer = split_base64_trailer(data)
    compact = data.translate(None, _WHITESPACE)
    if len(compact) % 4 == 0 and b"=" not in compact[:-2] and not trailer:
        try:
            return binascii.a2b_base64(compact, strict_mode=True), []
        except (binascii.Error, ValueError):
            pass  # junk or misplaced padding: the careful way below
    defects: list[str] = []
    cleaned = _NOT_BASE64.sub(b"", compact)
    if len(cleaned) != len(compact) or trailer:
        defects.append(DEFECT_JUNK)
    out = bytearray()
    chunks = _PADDING.split(cleaned)
    last = len(chunks) - 1
    while last > 0 and not chunks[last]:
        last -= 1
    for index, chunk in enumerate(chunks[: last + 1]):
        if not chunk:
            continue
        if index < last and DEFECT_PADDING_INSIDE not in defects:
            defects.append(DEFECT_PADDING_INSIDE)
        remainder = len(chunk) % 4
        unpadded_end = remainder and index == last and not cleaned.endswith(b"=")
        if (remainder == 1 or unpadded_end) and DEFECT_TRUNCATED not in defects:
            defects.append(DEFECT_TRUNCATED)
        if remainder == 1:  # six bits: no whole byte
            chunk = chunk[:-1]
        out += binascii.a2b_base64(chunk + b"=" * (-len(chunk) % 4))
    return bytes(out), defects


_UU_BEGIN = re.compile(rb"^begin(-base64)?[ \t]+([0-7]{3,4})[ \t]+([^\r\n]+?)[ \t]*\r?$", re.M)
_UU_END = re.compile(rb"^end[ \t]*\r?$", re.M)
# POSIX "uuencode -m": begin-base64 MODE NAME, base64 lines, "====".
_B64_BLOCK_END = re.compile(rb"^====[ \t]*\r?$", re.M)
_B64_BLOCK_LINE = re.compile(rb"[A-Za-z0-9+/]+=*")
_UU_LINE = re.compile(rb"^[\x20-\x60]+$")


def _uu_line(line: bytes) -> bytes | None:
    """One uuencoded line; None when it is not one. Tolerates encoders that drop trailing
    spaces or pad too much (the length character says how many bytes are meant)."""
    if not _UU_LINE.match(line):
        return None
    count = (line[0] - 32) & 63
    needed = (count * 4 + 5) // 3  # the length character and the characters of count bytes
    body = line[:needed].ljust(needed, b" ")
    try:
        return binascii.a2b_uu(body)[:count]
    except binascii.Error:
        return None


def decode_uuencode(data: bytes) -> tuple[bytes, list[str]]:
    """A whole ``x-uuencode`` part -> ``(bytes, defects)``; with or without ``begin``/``end``."""
    begin = _UU_BEGIN.search(data)
    body = data[begin.end() :] if begin else data
    out = bytearray()
    ended = False
    for raw_line in body.splitlines():
        line = raw_line.rstrip(b"\r")
        if line.strip() in {b"end", b"`", b""}:
            if line.strip() == b"end":
                ended = True
                break
            continue
        decoded = _uu_line(line)
        if decoded is None:
            continue
        out += decoded
    return bytes(out), [] if ended or begin is None else [DEFECT_UU_TRUNCATED]


@dataclass(frozen=True, slots=True)
class UUBlock:
    """A uuencoded file found in a text: its name, mode and bytes."""

    filename: str
    mode: str
    data: bytes


def find_uuencoded(text: bytes) -> tuple[bytes, list[UUBlock], list[str]]:
    """Cut uuencoded blocks out of a plain-text body: ``(rest, blocks, defects)``.

    A block starts at ``begin MODE NAME`` and runs to ``end``; it counts only when the line
    after ``begin`` is a uuencoded line, so prose that starts with "begin 644" stays text. A
    block without ``end`` keeps what decoded (``uuencode-truncated``). ``uuencode -m`` blocks
    (``begin-base64 MODE NAME`` ... ``====``, POSIX) are read the same way, as base64.
    """
    if b"begin" not in text:
        return text, [], []
    blocks: list[UUBlock] = []
    defects: list[str] = []
    kept: list[bytes] = []
    position = 0
    for begin in _UU_BEGIN.finditer(text):
        if begin.start() < position:
            continue
        lines = text[begin.end() :].lstrip(b"\r\n").splitlines()
        first = lines[0].rstrip(b"\r") if lines else b""
        as_base64 = begin.group(1) is not None
        if not first or (
            not _B64_BLOCK_LINE.fullmatch(first) if as_base64 else _uu_line(first) is None
        ):
            continue
        end = (_B64_BLOCK_END if as_base64 else _UU_END).search(text, begin.end())
        stop = end.end() if end else len(text)
        if text[stop : stop + 1] == b"\n":
            stop += 1
        encoded = text[begin.end() : end.start() if end else len(text)]
        data, _ = decode_base64(encoded) if as_base64 else decode_uuencode(encoded)
        if end is None:
            defects.append(DEFECT_UU_TRUNCATED)
        name = begin.group(3).decode("utf-8", "replace").strip()
        blocks.append(UUBlock(filename=name, mode=begin.group(2).decode("ascii"), data=data))
        kept.append(text[position : begin.start()])
        position = stop
    if not blocks:
        return text, [], []
    kept.append(text[position:])
    return b"".join(kept), blocks, defects
