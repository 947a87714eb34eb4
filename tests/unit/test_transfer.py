"""mailbridge.core.transfer: base64 in padded chunks, junk, truncation; uuencode."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.transfer import (
    decode_base64,
    decode_quoted_printable,
    decode_uuencode,
    find_uuencoded,
    split_base64_trailer,
)


def uuencode(data: bytes, name: str = "file.bin", end: bool = True) -> bytes:
    lines = [binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45)]
    block = b"begin 644 " + name.encode() + b"\n" + b"".join(lines) + b"`\n"
    return block + (b"end\n" if end else b"")


def test_plain_base64_fast_path() -> None:
    data = bytes(range(256)) * 3
    assert decode_base64(base64.encodebytes(data)) == (data, [])


def test_separately_padded_chunks_all_decoded() -> None:
    assert decode_base64(b"QQ==Qg==\r\nQ0RF") == (b"ABCDE", ["base64-padding-inside"])
    assert decode_base64(b"QQ==\r\nQkM=\r\n") == (b"ABC", ["base64-padding-inside"])


def test_junk_between_quanta_is_skipped() -> None:
    assert decode_base64(b"aGVs*bG8g!d29y\x00bGQ=") == (b"hello world", ["base64-junk"])
    # Whitespace of any kind is no junk.
    assert decode_base64(b" aGVs\tbG8g\r\n d29y bGQ= \r\n") == (b"hello world", [])


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (b"aGVsbG8gd29ybG", b"hello worl"),  # unpadded short last quantum: as far as it goes
        (b"aGVsbG8gd29yb", b"hello wor"),  # a lone sixth of a byte: dropped
    ],
)
def test_truncated_base64_is_a_defect(encoded: bytes, expected: bytes) -> None:
    assert decode_base64(encoded) == (expected, ["base64-truncated"])


@given(st.lists(st.binary(max_size=80), max_size=12), st.sampled_from([b"", b"\r\n", b"\n", b" "]))
def test_chunked_base64_never_loses_a_byte(chunks: list[bytes], separator: bytes) -> None:
    encoded = separator.join(base64.b64encode(chunk) for chunk in chunks)
    decoded, defects = decode_base64(encoded)
    assert decoded == b"".join(chunks)
    assert set(defects) <= {"base64-padding-inside"}


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=76))
def test_line_wrapped_base64_round_trips(data: bytes, width: int) -> None:
    encoded = base64.b64encode(data)
    wrapped = b"\r\n".join(encoded[i : i + width] for i in range(0, len(encoded), width))
    assert decode_base64(wrapped) == (data, [])


@given(st.binary(max_size=300))
def test_decode_base64_never_raises(junk: bytes) -> None:
    decoded, defects = decode_base64(junk)
    assert isinstance(decoded, bytes)
    assert set(defects) <= {"base64-padding-inside", "base64-junk", "base64-truncated"}


def test_uuencoded_blocks_leave_the_text() -> None:
    payload = bytes(range(256))
    text = b"Hello,\r\nthe log is attached.\r\n\r\n" + uuencode(payload, "log.tgz") + b"Bye\r\n"
    rest, blocks, defects = find_uuencoded(text)
    assert rest == b"Hello,\r\nthe log is attached.\r\n\r\nBye\r\n"
    assert [(b.filename, b.mode, b.data) for b in blocks] == [("log.tgz", "644", payload)]
    assert defects == []


def test_two_uuencoded_blocks_and_a_truncated_one() -> None:
    text = uuencode(b"one", "a.txt") + b"middle\n" + uuencode(b"two" * 40, "b.txt", end=False)
    rest, blocks, defects = find_uuencoded(text)
    assert rest == b"middle\n"
    assert [(b.filename, b.data) for b in blocks] == [("a.txt", b"one"), ("b.txt", b"two" * 40)]
    assert defects == ["uuencode-truncated"]


def test_uuencode_last_line_with_nonzero_padding() -> None:
    # Encoders pad the last line with any character (here '_', and spaces inside): the length
    # character says how many bytes are meant.
    line = b'I455%4U0@1D]2(%%53U1%+F5X95!+!08      0 ! $,   "LU ,    _'
    data, defects = decode_uuencode(b"begin 644 x.zip\n" + line + b"\n`\nend\n")
    assert len(data) == 41
    assert data.startswith(b"QUEST FOR QUOTE.exePK\x05\x06")
    assert defects == []


def test_prose_starting_with_begin_is_not_uuencode() -> None:
    text = b"begin 644 is how the file starts\nand here is more prose\nend\n"
    assert find_uuencoded(text) == (text, [], [])


@given(st.binary(max_size=500))
def test_uuencode_round_trips(data: bytes) -> None:
    _, blocks, _ = find_uuencoded(b"text\n" + uuencode(data))
    if data:
        assert blocks[0].data == data
    assert decode_uuencode(uuencode(data))[0] == data


@pytest.mark.parametrize(
    ("data", "encoded", "trailer"),
    [
        # Text a list, gateway or phone appended after an empty line is not base64.
        (b"QUJD\r\n\r\n-- \r\nsig\r\n", b"QUJD", b"-- \r\nsig"),
        (b"QUJD\n\nSent from my iPhone\n", b"QUJD", b"Sent from my iPhone"),
        (b"QUJD\r\n\r\n____\r\nList\r\n", b"QUJD", b"____\r\nList"),
        # Chunks separated by empty lines stay data, as does a body without any.
        (b"QQ==\r\n\r\nQg==\r\n", b"QQ==\r\n\r\nQg==\r\n", b""),
        (b"QUJD\r\nREVG\r\n", b"QUJD\r\nREVG\r\n", b""),
    ],
)
def test_base64_trailer_after_an_empty_line(data: bytes, encoded: bytes, trailer: bytes) -> None:
    assert split_base64_trailer(data) == (encoded, trailer)
    decoded, defects = decode_base64(data)
    assert decoded == (b"ABC" if b"QUJD" in data else b"AB") + (b"DEF" if b"REVG" in data else b"")
    assert ("base64-junk" in defects) is bool(trailer)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"soft =  \r\nbreak", b"soft break"),  # RFC 2045 6.7 rule 3: transport added spaces
        (b"soft =\t\nbreak\t\n", b"soft break\n"),
        (b"kept=20\r\nspace", b"kept \r\nspace"),
        (b"Gr=c3=bc=C3=9Fe", "Grüße".encode()),
    ],
)
def test_quoted_printable_trailing_white_space(data: bytes, expected: bytes) -> None:
    assert decode_quoted_printable(data) == expected


def test_uuencode_m_base64_blocks_leave_the_text() -> None:
    """Was wrong: POSIX 'uuencode -m' output (begin-base64 ... ====) stayed in the text."""
    data = bytes(range(200))
    block = b"begin-base64 600 data.bin\r\n" + base64.encodebytes(data).replace(b"\n", b"\r\n")
    text = b"Hi,\r\n" + block + b"====\r\nbye\r\n"
    rest, [found], defects = find_uuencoded(text)
    assert (rest, found.filename, found.mode, found.data, defects) == (
        b"Hi,\r\nbye\r\n",
        "data.bin",
        "600",
        data,
        [],
    )
    # Without its "====": what decoded, noted; prose after "begin-base64" stays text.
    rest, [cut], defects = find_uuencoded(b"x\n" + block)
    assert (rest, cut.data, defects) == (b"x\n", data, ["uuencode-truncated"])
    prose = b"begin-base64 644 is how uuencode -m starts.\nThen lines.\n"
    assert find_uuencoded(prose) == (prose, [], [])
