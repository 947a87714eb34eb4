"""Charset labels and bytes -> text: the one place where mailbridge decodes text.

Headers (RFC 2047 words, raw 8-bit bytes), attachment names (RFC 2231) and bodies all pass
:func:`decode_text`, so a label is read the same way everywhere. The rules are the ones mail
clients and the WHATWG Encoding Standard (https://encoding.spec.whatwg.org/, "Names and labels")
settled on, because senders write to what readers accept, not to the registry:

- A label is looked up through mailbridge's aliases, then Python's codec registry, then once more
  with its punctuation dropped (``UTF8``, ``iso_8859-1``, ``windows1252``). Empty, unknown and
  unsafe labels (``x-unknown``, ``base64``, ``idna``) count as no label.
- Labels are read as the superset that the sending clients really write: GB2312/GBK as
  GB18030, Big5 as Big5-HKSCS, EUC-KR and KS C 5601 as CP949, Shift_JIS as CP932, TIS-620 as
  CP874; ISO-8859-x bytes 0x80-0x9F (C1 controls, never meant) as the matching Windows-125x
  characters; ISO-2022-JP as CP50221 (NEC row 13 and IBM extensions) when the plain codec fails.
- 7-bit text with ISO-2022-JP escape sequences is ISO-2022-JP whatever its label (RFC 1468
  text sent as ``us-ascii`` or without a charset by old Japanese mailers).
- Valid multi-byte UTF-8 wins over a legacy label (UTF-8 sent as Latin-1 is common; valid UTF-8
  by chance in legacy text is next to impossible) and is tried first for unlabelled bytes.
- Only when all of that fails is the charset detected (charset-normalizer, on text long enough
  to tell), else Windows-1252 is assumed. Detection never runs on text that decodes cleanly.

:func:`decode_text` never raises; it returns the text and a defect code (see
:class:`~mailbridge.core.model.ParsedMessage`) when the label could not be trusted.
"""

from __future__ import annotations

import codecs
import functools
import re
from encodings import aliases as python_aliases
from typing import Final

__all__ = [
    "DEFECT_INVALID_BYTES",
    "DEFECT_MISLABELLED",
    "DEFECT_MISSING",
    "DEFECT_UNKNOWN",
    "codec_for",
    "decode_text",
]

DEFECT_UNKNOWN: Final = "charset-unknown"  # a label no codec answers to; the bytes were guessed
DEFECT_MISSING: Final = "charset-missing"  # 8-bit text without a label that is not UTF-8
DEFECT_MISLABELLED: Final = "charset-mislabelled"  # the bytes are not in the declared charset
DEFECT_INVALID_BYTES: Final = "charset-invalid-bytes"  # bytes no charset reads: U+FFFD

# Labels Python does not know, or where a superset decodes what senders really write.
_ALIASES: Final = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "ms936": "gb18030",
    "euc-cn": "gb18030",
    "x-euc-cn": "gb18030",
    "csgb2312": "gb18030",
    "chinese": "gb18030",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601-1989": "cp949",
    "ks_c_5601": "cp949",
    "ksc5601": "cp949",
    "ksc_5601": "cp949",
    "euc-kr": "cp949",
    "x-euc-kr": "cp949",
    "cseuckr": "cp949",
    "x-windows-949": "cp949",
    "windows-949": "cp949",
    "korean": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "csshiftjis": "cp932",
    "windows-31j": "cp932",
    "ms_kanji": "cp932",
    "x-ms-cp932": "cp932",
    "big5": "big5hkscs",
    "x-big5": "big5hkscs",
    "big5-hkscs": "big5hkscs",
    "cn-big5": "big5hkscs",
    "csbig5": "big5hkscs",
    "cp950": "big5hkscs",
    "tis-620": "cp874",
    "iso-8859-11": "cp874",
    "windows-874": "cp874",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-e": "iso-8859-6",
    "logical": "iso-8859-8",
    "visual": "iso-8859-8",
    "cp50220": "iso2022_jp",
    "cp50221": "iso2022_jp",
    "cp50222": "iso2022_jp",
    "csiso2022jp": "iso2022_jp",
    "iso-2022-jp-ms": "iso2022_jp",
    "x-cp50220": "iso2022_jp",
    "x-cp50221": "iso2022_jp",
    "unicode-1-1-utf-7": "utf-7",
    "x-unicode-2-0-utf-7": "utf-7",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-ukrainian": "mac-cyrillic",
    "x-mac-greek": "mac-greek",
    "x-mac-turkish": "mac-turkish",
    "x-mac-ce": "mac-latin2",
    "x-mac-centraleurope": "mac-latin2",
    "x-mac-icelandic": "mac-iceland",
    "utf8": "utf-8",
    "x-utf-8": "utf-8",
    "x-utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "unicode-2-0-utf-8": "utf-8",
    "ansi": "cp1252",
    "x-cp1252": "cp1252",
    "x-cp1250": "cp1250",
    "x-cp1251": "cp1251",
    "win-1252": "cp1252",
    "win-1251": "cp1251",
    "win-1250": "cp1250",
    "x-ansi": "cp1252",
    # WHATWG Encoding labels Python lacks, and what web applications write.
    "x-euc-jp": "euc-jp",
    "x-windows-874": "cp874",
    "x-x-big5": "big5hkscs",
    "utf8mb4": "utf-8",
    "utf8mb3": "utf-8",
    # "Unicode" in Outlook and .NET means UTF-16 (little-endian, usually with a BOM).
    "unicode": "utf-16",
    "ucs-2": "utf-16",
    "iso-10646-ucs-2": "utf-16",
    "csunicode": "utf-16",
    "unicodefffe": "utf-16-be",
}
# Labels that say "we do not know": decode by guessing, without a defect for the label.
_NO_LABEL: Final = frozenset(
    {"", "unknown-8bit", "x-unknown", "unknown", "default", "x-user-defined", "charset", "none"}
)
# Python codecs that are no charset a mail could sensibly use (or are slow on junk).
_REFUSED: Final = frozenset(
    {"idna", "punycode", "raw-unicode-escape", "unicode-escape", "undefined", "mbcs", "oem"}
)
# ISO-8859-x reads bytes 0x80-0x9F as C1 controls that nobody types; the Windows code page of
# the same script has characters there (WHATWG maps ISO-8859-1 and -9 to 1252/1254 for this).
_C1_SUPERSET: Final = {
    "latin-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso8859-15": "cp1252",
    "iso8859-2": "cp1250",
    "iso8859-16": "cp1250",
    "iso8859-4": "cp1257",
    "iso8859-13": "cp1257",
    "iso8859-5": "cp1251",
    "iso8859-6": "cp1256",
    "iso8859-7": "cp1253",
    "iso8859-8": "cp1255",
    "iso8859-9": "cp1254",
    "cp1252": "cp1252",
}
# ISO-8859 parts whose Windows counterpart differs beyond 0x80-0x9F.
_C1_WHOLE_TEXT: Final = frozenset(
    {"iso8859-2", "iso8859-4", "iso8859-5", "iso8859-6", "iso8859-7", "iso8859-8", "iso8859-13"}
)
# Supersets tried when a codec fails, before any guessing.
_FALLBACKS: Final = {
    "euc-jp": ("euc-jis-2004", "cp932"),
    "cp932": ("shift-jis-2004",),
    "big5hkscs": ("cp950",),
    "iso8859-8": ("cp1255",),
    "iso8859-6": ("cp1256",),
    "iso8859-7": ("cp1253",),
    "iso8859-3": ("cp1254",),
}
# 8-bit text under a 7-bit label: what the sender's client really wrote, in the order that
# tells them apart (EUC-JP fails on Shift_JIS bytes, not the other way round).
_MISLABELLED_AS: Final = {
    **dict.fromkeys(
        ("iso2022-jp", "iso2022-jp-1", "iso2022-jp-2", "iso2022-jp-2004", "iso2022-jp-3"),
        ("euc-jp", "cp932"),
    ),
    "iso2022-jp-ext": ("euc-jp", "cp932"),
    "iso2022-kr": ("cp949",),
    "hz": ("gb18030",),
}
_JIS_CODECS: Final = frozenset(
    {"iso2022-jp", "iso2022-jp-1", "iso2022-jp-2", "iso2022-jp-2004", "iso2022-jp-3"}
    | {"iso2022-jp-ext"}
)
_UTF8_CODECS: Final = frozenset({"utf-8", "utf-8-sig"})
_UTF8_BOM: Final = b"\xef\xbb\xbf"
_SEVEN_BIT_CODECS: Final = ("utf-7", "utf-16", "utf-32", "iso2022", "hz")
_UTF8_SEQUENCE: Final = re.compile(rb"[\xc2-\xf4][\x80-\xbf]")
# ISO-2022-JP designations (RFC 1468, RFC 2237, JIS X 0213) and SO/SI for half-width kana.
_JIS_ESCAPE: Final = re.compile(rb"\x1b(?:\$[@B]|\$\([DOPQ]|\([BJHI])")
_JIS_SEGMENTS: Final = re.compile(rb"(\x1b(?:\$[@AB]|\$\([CDOPQ]|\([BJHI])|[\x0e\x0f])")
_ISO2022_KR: Final = b"\x1b$)C"
# Detection needs text to count; below this many bytes Windows-1252 is the better bet.
_DETECT_MIN_BYTES: Final = 160
# What charset-normalizer may answer: charsets mail is written in, not every code page it knows.
_DETECT_CANDIDATES: Final = (
    "cp1252",
    "cp1250",
    "cp1251",
    "cp1253",
    "cp1254",
    "cp1255",
    "cp1256",
    "cp1257",
    "koi8_r",
    "koi8_u",
    "cp874",
    "cp932",
    "euc_jp",
    "gb18030",
    "big5hkscs",
    "cp949",
)


def _build_c1_tables() -> dict[str, dict[int, str]]:
    tables: dict[str, dict[int, str]] = {}
    for windows in set(_C1_SUPERSET.values()):
        table: dict[int, str] = {}
        for byte in range(0x80, 0xA0):
            try:
                table[byte] = bytes([byte]).decode(windows)
            except UnicodeDecodeError:
                continue  # undefined there too: stays the C1 code point, as browsers show it
        tables[windows] = table
    return tables


_C1_TABLES: Final = _build_c1_tables()
_C1 = re.compile("[\x80-\x9f]")


def _compact(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


@functools.cache
def _compact_aliases() -> dict[str, str]:
    """Every known label with its punctuation dropped -> codec name, for misspelt labels."""
    table: dict[str, str] = {}
    for alias, codec in python_aliases.aliases.items():
        table.setdefault(_compact(alias), codec)
    for alias, codec in _ALIASES.items():
        table[_compact(alias)] = codec
    for prefix in ("windows", "win", "cp", "xcp", "ms"):
        for number in (*range(1250, 1259), 874, 932, 936, 949, 950):
            target = _ALIASES.get(f"cp{number}", f"cp{number}")
            table.setdefault(f"{prefix}{number}", target)
    for number in range(1, 17):
        for prefix in ("iso8859", "iso", "8859", "latin"):
            if prefix != "latin":
                table.setdefault(f"{prefix}{number}", f"iso8859-{number}")
    return table


@functools.lru_cache(maxsize=512)
def codec_for(label: str) -> str | None:
    """The Python codec name (``cp1252``, ``iso8859-2``, ``utf-8``, ``iso2022-jp``) for a
    charset label, or ``None`` when the label is empty, unknown or no text charset."""
    whole = label.strip().strip("\"'").strip().lower().split(";", 1)[0]
    name = whole.split(" ", 1)[0].strip("\"'")
    if name != whole and name.isalpha():  # "windows 1252", "iso 8859-1": the words are one
        name = whole.replace(" ", "-")
    name = _ALIASES.get(name, name)
    if name in _NO_LABEL:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        compact = _compact(name)
        if not compact or compact in {_compact(x) for x in _NO_LABEL}:
            return None
        alias = _compact_aliases().get(compact)
        if alias is None:
            return None
        try:
            info = codecs.lookup(alias)
        except LookupError:
            return None
    if not getattr(info, "_is_text_encoding", True):  # base64, zlib, rot13 ...
        return None
    codec = info.name.replace("_", "-")
    if codec in _REFUSED:
        return None
    return _ALIASES.get(codec, codec)


def _c1_superset(text: str, codec: str, data: bytes = b"") -> str:
    """Replace C1 controls that an ISO-8859-x reading produced by the Windows characters.

    Where the Windows code page moves letters too (Cyrillic, Arabic, Greek, Hebrew, Central
    European), bytes 0x80-0x9F show that the sender wrote that code page, so the whole text is
    read in it when it can be."""
    windows = _C1_SUPERSET.get(codec)
    if windows is None or not _C1.search(text):
        return text
    if data and codec in _C1_WHOLE_TEXT:
        try:
            return data.decode(windows)
        except UnicodeDecodeError:
            pass
    return text.translate(_C1_TABLES[windows])


def _cp1252_errors(exc: UnicodeError) -> tuple[str, int]:
    """Error handler: bytes that are not UTF-8 inside UTF-8 text read as Windows-1252 (a
    legacy footer or signature pasted into UTF-8 mail)."""
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    return _c1_superset(bytes(bad).decode("latin-1"), "latin-1"), exc.end


codecs.register_error("mailbridge-cp1252", _cp1252_errors)


def _jis_to_cp932(pairs: bytes) -> bytes:
    """JIS X 0208 row/cell byte pairs (0x21-0x7E each) -> the Shift_JIS bytes of CP932.

    CP932 holds what CP50221 adds to ISO-2022-JP: NEC row 13 (circled digits, Roman
    numerals) and the NEC-selected IBM extensions of rows 89-92.
    """
    out = bytearray()
    for index in range(0, len(pairs) - 1, 2):
        first, second = pairs[index], pairs[index + 1]
        if not (0x21 <= first <= 0x7E and 0x21 <= second <= 0x7E):
            out += b"?"
            continue
        lead = ((first + 1) >> 1) + (0x70 if first <= 0x5E else 0xB0)
        # Odd rows take the first half of the Shift_JIS trail range (skipping 0x7F).
        odd_trail = second + (0x1F if second <= 0x5F else 0x20)
        trail = odd_trail if first % 2 else second + 0x7E
        out += bytes((lead, trail))
    return bytes(out)


def _decode_jis(data: bytes) -> tuple[str, bool]:
    """ISO-2022-JP read as CP50221 does: ``(text, clean)``; ``clean`` is False when some
    bytes could not be read (they become U+FFFD)."""
    try:
        return data.decode("iso2022_jp"), True
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    clean = True
    mode = b"(B"
    for piece in _JIS_SEGMENTS.split(data):
        if not piece:
            continue
        if piece.startswith(b"\x1b"):
            mode = piece[1:]
            continue
        if piece == b"\x0e":
            mode = b"(I"
            continue
        if piece == b"\x0f":
            mode = b"(B"
            continue
        if mode in {b"$B", b"$@"}:
            # Line ends and other controls in double-byte mode pass through (senders forget
            # to switch back before CRLF); the double-byte runs between them are JIS pairs.
            for run in re.split(rb"([\x00-\x20]+)", piece):
                if not run:
                    continue
                if run[0] <= 0x20:
                    out.append(run.decode("latin-1"))
                    continue
                text = _jis_to_cp932(run).decode("cp932", "replace")
                if len(run) % 2:
                    text += "\ufffd"
                clean = clean and "\ufffd" not in text
                out.append(text)
        elif mode == b"(I":
            kana = bytes(b + 0x80 if 0x21 <= b <= 0x5F else b for b in piece)
            text = kana.decode("cp932", "replace")
            clean = clean and "\ufffd" not in text
            out.append(text)
        elif mode in {b"$(D", b"$A", b"$(C"}:
            text = (b"\x1b" + mode + piece + b"\x1b(B").decode("iso2022_jp_2", "replace")
            clean = clean and "\ufffd" not in text
            out.append(text)
        elif mode in {b"$(O", b"$(P", b"$(Q"}:
            text = (b"\x1b" + mode + piece + b"\x1b(B").decode("iso2022_jp_2004", "replace")
            clean = clean and "\ufffd" not in text
            out.append(text)
        else:  # ASCII and JIS X 0201 Roman: shown as ASCII by every client
            text = piece.decode("ascii", "replace")
            clean = clean and "\ufffd" not in text
            out.append(text)
    return "".join(out), clean


def _detect(data: bytes) -> str | None:
    """charset-normalizer's reading of bytes that no declared or likely charset decodes."""
    if len(data) < _DETECT_MIN_BYTES:
        return None
    from charset_normalizer import from_bytes  # imported when needed: rare, and slow to load

    results = from_bytes(data, cp_isolation=list(_DETECT_CANDIDATES))
    best = results.best()
    if best is None:
        return None
    # Ties (Western text with few accents reads as well in 1250 as in 1252) go to the
    # candidate listed first: the charset more mail is written in.
    rank = {name: index for index, name in enumerate(_DETECT_CANDIDATES)}
    ties = [m for m in results if m.chaos <= best.chaos and m.coherence >= best.coherence]
    best = min(ties or [best], key=lambda match: rank.get(match.encoding, len(rank)))
    encoding = codec_for(best.encoding) or "cp1252"
    try:
        return _c1_superset(data.decode(encoding), encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _guess(data: bytes, fallback: str | None) -> str:
    """Bytes of no (usable) charset: UTF-8, the message's other charset, detection, 1252."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if fallback:
        codec = codec_for(fallback)
        if codec is not None and codec not in _UTF8_CODECS and codec != "ascii":
            text = _decode_strict(data, codec)
            if text is not None:
                return text
    detected = _detect(data)
    if detected is not None:
        return detected
    if _UTF8_SEQUENCE.search(data) and _mostly_utf8(data):
        return data.decode("utf-8", "mailbridge-cp1252")
    return _c1_superset(data.decode("latin-1"), "latin-1")


def _mostly_utf8(data: bytes) -> bool:
    """Whether most non-ASCII characters in ``data`` are valid UTF-8 (legacy text has a
    valid-looking pair now and then, never mostly)."""
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    good = sum(1 for char in text if char > "\x7f") - bad
    return good >= bad


def _decode_strict(data: bytes, codec: str) -> str | None:
    """``data`` in ``codec`` or one of its supersets, or None when none reads it cleanly."""
    if codec in _JIS_CODECS:
        if data.isascii():
            text, clean = _decode_jis(data)
            return text if clean else None
        return None
    for candidate in (codec, *_FALLBACKS.get(codec, ())):
        try:
            return _c1_superset(data.decode(candidate), candidate, data)
        except UnicodeDecodeError:
            continue
        except Exception:  # noqa: S112 - a codec that fails otherwise on junk is no charset
            continue
    return None


def decode_text(
    data: bytes, charset: str | None, fallback: str | None = None
) -> tuple[str, str | None]:
    """Decode ``data`` declared as ``charset``: ``(text, defect)``; never raises.

    ``fallback`` is a charset to try before guessing (the message's other declared charset,
    for raw 8-bit headers). ``defect`` is ``None`` when the declaration held (or was read as
    its usual superset), else one of :data:`DEFECT_UNKNOWN`, :data:`DEFECT_MISSING`,
    :data:`DEFECT_MISLABELLED` or :data:`DEFECT_INVALID_BYTES`.
    """
    if data[:3] == _UTF8_BOM:
        # A byte order mark says UTF-8 whatever the label (WHATWG Encoding, "decode"); it is
        # no text, so mail clients show none.
        unmarked, defect = decode_text(data[3:], "utf-8", fallback)
        if defect is None and charset and codec_for(charset) not in {"utf-8", None}:
            defect = DEFECT_MISLABELLED
        return unmarked, defect
    codec = codec_for(charset) if charset else None
    if data.isascii():
        if b"\x1b" in data:
            if (
                codec is not None
                and codec.startswith(_SEVEN_BIT_CODECS)
                and (codec not in _JIS_CODECS)
            ):
                text = _decode_strict(data, codec)
                if text is not None:
                    return text, None
            if _JIS_ESCAPE.search(data):
                text, clean = _decode_jis(data)
                if not clean:
                    return text, DEFECT_INVALID_BYTES
                return text, None if codec in _JIS_CODECS else DEFECT_MISLABELLED
            if _ISO2022_KR in data:
                return data.decode("iso2022_kr", "replace"), DEFECT_MISLABELLED
        if codec is not None and codec.startswith(_SEVEN_BIT_CODECS):
            text = _decode_strict(data, codec)
            if text is not None:
                return text, None
        return data.decode("ascii"), None
    if charset is None or (codec is None and charset.strip().strip("\"'").lower() in _NO_LABEL):
        try:
            return data.decode("utf-8"), None  # RFC 6532 8-bit UTF-8, the usual case
        except UnicodeDecodeError:
            return _guess(data, fallback), DEFECT_MISSING
    if codec is None:
        return _guess(data, fallback), DEFECT_UNKNOWN
    has_utf8 = _UTF8_SEQUENCE.search(data) is not None
    if codec not in _UTF8_CODECS and has_utf8:
        try:
            return data.decode("utf-8"), DEFECT_MISLABELLED
        except UnicodeDecodeError:
            pass
    if codec == "ascii":
        return _guess(data, fallback), DEFECT_MISLABELLED
    text = _decode_strict(data, codec)
    if text is not None:
        return text, None
    for candidate in _MISLABELLED_AS.get(codec, ()):
        text = _decode_strict(data, candidate)
        if text is not None:
            return text, DEFECT_MISLABELLED
    if codec in _UTF8_CODECS:
        if has_utf8 and _mostly_utf8(data):  # UTF-8 with some legacy bytes pasted in
            return data.decode("utf-8", "mailbridge-cp1252"), DEFECT_MISLABELLED
        return _guess(data, fallback), DEFECT_MISLABELLED  # legacy 8-bit text labelled UTF-8
    detected = _detect(data)
    if detected is not None:
        return detected, DEFECT_MISLABELLED
    try:
        return data.decode(codec, "replace"), DEFECT_INVALID_BYTES
    except Exception:  # a codec that cannot even replace: no charset after all
        return _guess(data, fallback), DEFECT_UNKNOWN
