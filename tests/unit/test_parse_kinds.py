"""The kinds of real-world fault behind issue 9, on the parser: attachment names, body
charsets, transfer encodings (chunked base64, uuencode, TNEF), inline or attachment, dates,
and the defects recorded for each repair. Each kind has its own examples beyond the handed
field reports (tests/unit/test_parse_field_reports.py)."""

from __future__ import annotations

import base64
import binascii
import quopri
import re
import struct
import unicodedata
import urllib.parse
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.core.html import rewrite_inline_images
from mailbridge.core.model import ParsedMessage
from mailbridge.core.parse import parse_message
from mailbridge.daemon.account import _parse_batch
from mailbridge.mail.imap import FetchedMessage
from tests.unit.test_charset import MISLABELLED_SUPERSETS, jis
from tests.unit.test_parse_corpora import DOCUMENTED_DEFECTS as DOCUMENTED

ARRIVAL = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
JPEG = b"\xff\xd8\xff\xe0" + bytes(60)
PDF = b"%PDF-1.4\n%%EOF\n"


BASE_HEADERS = {
    "from": "From: a@x.org",
    "to": "To: b@y.org",
    "date": "Date: Mon, 02 Jun 2025 09:00:00 +0200",
    "message-id": "Message-ID: <m@x.org>",
}


def mail(head: str, body: bytes | str = b"", omit: tuple[str, ...] = ()) -> bytes:
    """A message from a header block (``\\n`` line ends; it replaces the base header of the
    same name) and a body, with CRLF line ends; ``omit`` drops base headers."""
    given = {line.split(":", 1)[0].lower() for line in head.split("\n") if ":" in line}
    base = [v for k, v in BASE_HEADERS.items() if k not in given and k not in omit]
    data = body.encode() if isinstance(body, str) else body
    text = "\n".join([*base, head.strip("\n")]).strip("\n").replace("\n", "\r\n")
    return text.encode("latin-1") + b"\r\n\r\n" + data


def multipart(*parts: tuple[str, bytes], subtype: str = "mixed") -> bytes:
    body = b""
    for head, content in parts:
        body += b"--B\r\n" + head.strip("\n").replace("\n", "\r\n").encode("latin-1")
        body += b"\r\n\r\n" + content + b"\r\n"
    body += b"--B--\r\n"
    return mail(f'MIME-Version: 1.0\nContent-Type: multipart/{subtype}; boundary="B"', body)


def parse(raw: bytes, arrival: datetime | None = ARRIVAL) -> ParsedMessage:
    parsed = parse_message(raw, arrival=arrival)
    assert set(parsed.defects) <= DOCUMENTED, parsed.defects
    return parsed


def names(raw: bytes) -> list[str]:
    return [a.filename for a in parse(raw).attachments]


def attachment(disposition: str, content_type: str = "application/octet-stream") -> bytes:
    return multipart(
        ("Content-Type: text/plain; charset=utf-8", b"see attached"),
        (f"Content-Type: {content_type}\nContent-Disposition: {disposition}", b"data"),
    )


def test_documented_defects_are_the_list() -> None:
    assert {"charset-unknown", "base64-padding-inside", "cid-dangling", "date-in-future"} <= (
        DOCUMENTED
    )
    assert len(DOCUMENTED) >= 25


# --- attachment names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        ("attachment; filename*=utf-8''%E2%82%AC%20Rechnung.pdf", "€ Rechnung.pdf"),
        ("attachment; filename*=UTF-8'de'%C3%84nderung.txt", "Änderung.txt"),
        ("attachment; filename*=iso-8859-1''Gr%FC%DFe.txt", "Grüße.txt"),
        ("attachment; filename*=windows-1252''%80%20price.txt", "€ price.txt"),
        ("attachment; filename*=iso-8859-1''%80%20price.txt", "€ price.txt"),
        ("attachment; filename*=koi8-r''%F0%D2%C9%D7%C5%D4.txt", "Привет.txt"),
        ("attachment; filename*=shift_jis''%88%C4%93%E0.pdf", "案内.pdf"),
        ("attachment; filename*=gb2312''%D6%D0%CE%C4.doc", "中文.doc"),
        # Empty, misspelt, unknown charsets: UTF-8 first, never Latin-1 mojibake.
        ("attachment; filename*=''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("attachment; filename*=utf8''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("attachment; filename*=UTF_8''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("attachment; filename*=x-unknown''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("attachment; filename*=bogus''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("attachment; filename*=%C3%A9t%C3%A9.pdf", "été.pdf"),
        ("attachment; filename*=''%E9t%E9.pdf", "été.pdf"),
        ("attachment; filename*=\"utf-8''%C3%A9t%C3%A9.pdf\"", "été.pdf"),
        # Continuations: a character split across sections is joined before decoding.
        ("attachment; filename*0*=utf-8''%E2%98; filename*1*=%83.txt", "☃.txt"),
        ("attachment; filename*0*=utf-8''%E2; filename*1*=%98; filename*2*=%83", "☃"),
        (
            "attachment;\n filename*0*=utf-8''%C3%9Cber;\n"
            ' filename*1=" sicht";\n filename*2*=.txt',
            "Über sicht.txt",
        ),
        ("attachment; filename*1*=%83.txt; filename*0*=utf-8''%E2%98", "☃.txt"),
        ('attachment; filename*0="plain "; filename*1="name.txt"', "plain name.txt"),
        # RFC 2231 wins over the plain fallback name sent beside it.
        ("attachment; filename=\"fallback.txt\"; filename*=utf-8''%C3%A9t%C3%A9.txt", "été.txt"),
        # RFC 2047 in a quoted parameter (Outlook, Gmail), any charset.
        ('attachment; filename="=?utf-8?B?w6l0w6kucGRm?="', "été.pdf"),
        ('attachment; filename="=?iso-8859-1?Q?=E9t=E9.pdf?="', "été.pdf"),
        ('attachment; filename="=?windows-1252?Q?=80_price.txt?="', "€ price.txt"),
        ('attachment; filename="=?x-bogus?Q?=C3=A9t=C3=A9.pdf?="', "été.pdf"),
        ('attachment; filename="=?utf8?B?w6l0w6kucGRm?="', "été.pdf"),
        (
            'attachment; filename="=?utf-8?B?4piD?= =?utf-8?B?LnR4dA==?="',
            "☃.txt",
        ),
        # Unquoted names with spaces, paths.
        ("attachment; filename=my report.pdf", "my report.pdf"),
        ('attachment; filename="C:\\\\Users\\\\ann\\\\scan.pdf"', "scan.pdf"),
    ],
)
def test_attachment_names(disposition: str, expected: str) -> None:
    assert names(attachment(disposition)) == [expected]


def test_raw_8bit_utf8_name_and_name_in_content_type() -> None:
    raw = multipart(
        ("Content-Type: text/plain", b"x"),
        ("Content-Type: application/pdf; name*=utf-8''%C3%A9t%C3%A9.pdf", PDF),
    )
    assert names(raw) == ["été.pdf"]
    eight_bit = attachment('attachment; filename="été.pdf"'.encode().decode("latin-1"))
    assert names(eight_bit) == ["été.pdf"]


def test_undecodable_name_bytes_are_noted() -> None:
    raw = attachment("attachment; filename*=utf-8''%FF%FE%FD%FC.bin")
    parsed = parse(raw)
    assert parsed.attachments[0].filename
    assert "Ã" not in parsed.attachments[0].filename
    assert "charset-mislabelled" in parsed.defects


_NAME_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="/\\"),
    min_size=1,
    max_size=30,
).filter(lambda s: s.strip(" .") == s and s.strip() != "")


@settings(max_examples=150)
@given(_NAME_TEXT, st.lists(st.integers(min_value=1, max_value=200), max_size=5))
def test_rfc2231_round_trip_split_anywhere(name: str, cuts: list[int]) -> None:
    """Any name, UTF-8 percent-encoded and cut into sections at any byte, reads back."""
    encoded = urllib.parse.quote(name.encode(), safe="")
    # Cut between percent-escapes only (RFC 2231 sections hold whole %XX triplets).
    tokens = re.findall(r"%[0-9A-F]{2}|.", encoded)
    points = sorted({c % len(tokens) for c in cuts if c % len(tokens)})
    pieces = [
        "".join(tokens[a:b]) for a, b in zip([0, *points], [*points, len(tokens)], strict=True)
    ]
    params = "; ".join(
        f"filename*{i}*={'utf-8' + chr(39) * 2 if i == 0 else ''}{piece}"
        for i, piece in enumerate(pieces)
    )
    parsed = parse(attachment(f"attachment; {params}"))
    assert [a.filename for a in parsed.attachments] == [" ".join(name.split())]


# --- body charsets ------------------------------------------------------------------------

JIS_TEXT = "納品書を添付いたします。"


@pytest.mark.parametrize("label", ["", "; charset=us-ascii", '; charset="US-ASCII"'])
@pytest.mark.parametrize("subtype", ["plain", "html"])
def test_7bit_iso_2022_jp_body_whatever_its_label(label: str, subtype: str) -> None:
    text = JIS_TEXT if subtype == "plain" else f"<p>{JIS_TEXT}</p>"
    raw = mail(
        f"MIME-Version: 1.0\nContent-Type: text/{subtype}{label}\nContent-Transfer-Encoding: 7bit",
        text.encode("iso2022_jp"),
    )
    parsed = parse(raw)
    assert parsed.plain_text == JIS_TEXT
    assert "\x1b" not in parsed.plain_text + parsed.html
    assert "charset-mislabelled" in parsed.defects


def test_iso_2022_jp_windows_superset_in_body_and_subject() -> None:
    nec = b"\x1b$B9`L\\\x1b(B\x1b$B-!\x1b(B"  # 項目 + ① (NEC row 13)
    subject = "=?ISO-2022-JP?B?" + base64.b64encode(nec).decode() + "?="
    raw = mail(f"Subject: {subject}\nContent-Type: text/plain; charset=iso-2022-jp", nec)
    parsed = parse(raw)
    assert parsed.subject == "項目①"
    assert parsed.plain_text == "項目①"
    assert parsed.defects == ()


@pytest.mark.parametrize(("text", "writer", "label"), MISLABELLED_SUPERSETS)
def test_mislabelled_body_charsets_read_as_mail_clients_do(
    text: str, writer: str, label: str
) -> None:
    raw = mail(
        f"Content-Type: text/plain; charset={label}\nContent-Transfer-Encoding: 8bit",
        text.encode(writer),
    )
    parsed = parse(raw)
    assert parsed.plain_text == text
    assert "\ufffd" not in parsed.plain_text


def test_raw_jis_headers_without_encoded_words() -> None:
    def jis(text: str) -> str:
        return text.encode("iso2022_jp").decode("ascii")

    raw = mail(
        f"Subject: {jis('見積')}\nFrom: {jis('佐藤')} <sato@x.org>\n"
        f"To: {jis('営業')} <sales@y.org>, b@y.org",
        b"x",
    )
    parsed = parse(raw)
    assert parsed.subject == "見積"
    assert (parsed.from_address.email, parsed.from_address.name) == ("sato@x.org", "佐藤")
    assert [(a.email, a.name) for a in parsed.to] == [("sales@y.org", "営業"), ("b@y.org", "")]


# --- transfer encodings -------------------------------------------------------------------


def test_base64_chunks_in_a_body_and_an_attachment() -> None:
    lines = ["first line\n", "second line\n", "third\n"]
    body = b"\r\n".join(base64.b64encode(line.encode()) for line in lines)
    data = bytes(range(200))
    chunks = b"\r\n".join(base64.b64encode(data[i : i + 7]) for i in range(0, 200, 7))
    raw = multipart(
        ("Content-Type: text/plain\nContent-Transfer-Encoding: base64", body),
        (
            "Content-Type: application/octet-stream; name=data.bin\n"
            "Content-Transfer-Encoding: BASE64",
            chunks,
        ),
    )
    parsed = parse(raw)
    assert parsed.plain_text == "first line\nsecond line\nthird"
    assert parsed.attachments[0].data == data
    assert "base64-padding-inside" in parsed.defects


def test_truncated_base64_attachment_is_a_defect() -> None:
    raw = multipart(
        ("Content-Type: text/plain", b"x"),
        ("Content-Type: image/png\nContent-Transfer-Encoding: base64", b"iVBORw0KGgoAAA"),
    )
    parsed = parse(raw)
    assert parsed.attachments[0].data.startswith(b"\x89PNG")
    assert "base64-truncated" in parsed.defects


def test_uuencoded_attachment_inside_plain_text() -> None:
    payload = PDF + bytes(range(256))
    lines = b"".join(binascii.b2a_uu(payload[i : i + 45]) for i in range(0, len(payload), 45))
    block = b"begin 644 invoice.pdf\n" + lines + b"`\nend\n"
    raw = mail(
        "Content-Type: text/plain", b"Hello,\r\nthe invoice:\r\n\r\n" + block + b"Thanks\r\n"
    )
    parsed = parse(raw)
    assert parsed.plain_text == "Hello,\nthe invoice:\n\nThanks"
    (item,) = parsed.attachments
    assert (item.filename, item.content_type, item.data) == (
        "invoice.pdf",
        "application/pdf",
        payload,
    )


def test_x_uuencode_transfer_encoding() -> None:
    encoded = b"begin 600 a.txt\n" + binascii.b2a_uu(b"hello uu") + b"`\nend\n"
    raw = multipart(
        ("Content-Type: text/plain", b"x"),
        ("Content-Type: text/plain; name=a.txt\nContent-Transfer-Encoding: x-uuencode", encoded),
    )
    assert parse(raw).attachments[0].data == b"hello uu"


def test_unknown_transfer_encoding_keeps_bytes_with_a_defect() -> None:
    raw = mail("Content-Type: text/plain\nContent-Transfer-Encoding: x-gzip64", b"as is")
    parsed = parse(raw)
    assert parsed.plain_text == "as is"
    assert "transfer-encoding-unknown" in parsed.defects


def _tnef_attribute(level: int, attr_id: int, attr_type: int, data: bytes) -> bytes:
    """One MS-OXTNEF attribute: level, id, type, length, data, checksum (sum of data bytes)."""
    head = struct.pack("<BHHI", level, attr_id, attr_type, len(data))
    return head + data + struct.pack("<H", sum(data) & 0xFFFF)


def tnef(body: str | None, files: list[tuple[str, bytes]]) -> bytes:
    """A winmail.dat as Outlook writes it in its legacy form: version, OEM code page, body
    (attBody) and, per file, attAttachRendData, attAttachTitle, attAttachData."""
    out = struct.pack("<IH", 0x223E9F78, 0x0101)
    out += _tnef_attribute(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
    out += _tnef_attribute(1, 0x9007, 0x0006, struct.pack("<II", 1252, 0))
    if body is not None:
        out += _tnef_attribute(1, 0x800C, 0x0002, body.encode("cp1252") + b"\x00")
    for name, data in files:
        out += _tnef_attribute(2, 0x9002, 0x0006, bytes(14))
        out += _tnef_attribute(2, 0x8010, 0x0001, name.encode("cp1252") + b"\x00")
        out += _tnef_attribute(2, 0x800F, 0x0006, data)
    return out


def tnef_rtf_only(rtf: bytes) -> bytes:
    """A winmail.dat whose body is only compressed RTF (PR_RTF_COMPRESSED in attMAPIProps),
    as Outlook sends rich-text mail."""
    from compressed_rtf import compress

    blob = compress(rtf, compressed=True)
    padded = blob + bytes(-len(blob) % 4)
    props = struct.pack("<IHHII", 1, 0x0102, 0x1009, 1, len(blob)) + padded
    out = struct.pack("<IH", 0x223E9F78, 0x0101)
    out += _tnef_attribute(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
    out += _tnef_attribute(1, 0x9003, 0x0006, props)
    return out


def _with_tnef(text_body: bytes, data: bytes, ctype: str = "application/ms-tnef") -> bytes:
    return multipart(
        ("Content-Type: text/plain", text_body),
        (
            f"Content-Type: {ctype}; name=winmail.dat\nContent-Transfer-Encoding: base64",
            base64.encodebytes(data),
        ),
    )


def test_tnef_unpacked_into_its_files_keeping_winmail_dat() -> None:
    data = tnef("Body", [("report.txt", b"numbers\n"), ("photo.png", PNG)])
    parsed = parse(_with_tnef(b"See attachments.", data))
    assert parsed.plain_text == "See attachments."  # the mail's own body wins
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("winmail.dat", "application/ms-tnef"),
        ("report.txt", "text/plain"),
        ("photo.png", "image/png"),
    ]
    assert parsed.attachments[0].data == data
    assert parsed.attachments[2].data == PNG


def test_tnef_body_used_when_the_mail_has_no_other() -> None:
    data = tnef("Grüße aus Outlook\r\nZeile 2", [("a.txt", b"a")])
    parsed = parse(_with_tnef(b"", data, ctype="application/vnd.ms-tnef"))
    assert parsed.plain_text == "Grüße aus Outlook\nZeile 2"
    assert [a.filename for a in parsed.attachments] == ["winmail.dat", "a.txt"]


def test_tnef_rich_text_body_used_when_the_mail_has_no_other() -> None:
    rtf = (
        rb"{\rtf1\ansi\ansicpg1252\deff0{\fonttbl{\f0 Calibri;}}"
        rb"\f0\fs22 Gr\'fc\'dfe aus Outlook\par Zeile 2\par}"
    )
    parsed = parse(_with_tnef(b"", tnef_rtf_only(rtf)))
    assert parsed.plain_text == "Grüße aus Outlook\nZeile 2"
    assert [a.filename for a in parsed.attachments] == ["winmail.dat"]


def test_octet_stream_winmail_dat_is_unpacked_and_junk_is_noted() -> None:
    data = tnef(None, [("x.pdf", PDF)])
    parsed = parse(_with_tnef(b"x", data, ctype="application/octet-stream"))
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("winmail.dat", "application/octet-stream"),
        ("x.pdf", "application/pdf"),
    ]
    broken = parse(_with_tnef(b"x", b"not tnef at all"))
    assert [a.filename for a in broken.attachments] == ["winmail.dat"]
    assert "tnef-unreadable" in broken.defects


# --- inline or attachment -----------------------------------------------------------------


def related(html: str, *parts: tuple[str, bytes]) -> bytes:
    return multipart(
        ("Content-Type: text/html; charset=utf-8", html.encode()),
        *(
            (head + "\nContent-Transfer-Encoding: base64", base64.encodebytes(data))
            for head, data in parts
        ),
        subtype="related",
    )


def test_cited_octet_stream_parts_are_inline_with_their_real_type() -> None:
    raw = related(
        '<p><img src="cid:scan1@x"><img src="cid:logo@x"><img src="cid:named@x"></p>',
        ("Content-Type: application/octet-stream\nContent-ID: <scan1@x>", JPEG),
        ("Content-Type: application/octet-stream; name=logo\nContent-ID: <logo@x>", PNG),
        ("Content-Type: application/octet-stream; name=pic.gif\nContent-ID: <named@x>", b"GIF89a"),
    )
    parsed = parse(raw)
    assert parsed.attachments == ()
    assert [(i.content_id, i.content_type) for i in parsed.inline_images] == [
        ("scan1@x", "image/jpeg"),
        ("logo@x", "image/png"),
        ("named@x", "image/gif"),
    ]
    assert parsed.inline_images[0].filename.endswith(".jpg")


def test_inline_exactly_when_cited_whatever_the_type_or_disposition() -> None:
    raw = related(
        '<p><img src="cid:doc@x"> <a href="cid:other@x">link</a></p>',
        ("Content-Type: application/pdf; name=a.pdf\nContent-ID: <doc@x>", PDF),
        ("Content-Type: image/png; name=b.png\nContent-ID: <other@x>", PNG),
        (
            "Content-Type: image/png; name=c.png\nContent-ID: <c@x>\nContent-Disposition: inline",
            PNG,
        ),
    )
    parsed = parse(raw)
    assert [i.filename for i in parsed.inline_images] == ["a.pdf"]
    # Cited by nothing an <img> shows (links to cid: are not kept): documents a reader sees.
    assert [a.filename for a in parsed.attachments] == ["b.png", "c.png"]


def test_cid_forms_are_matched_and_written_as_the_part_id() -> None:
    raw = related(
        '<img src="CID:Part1.ABC@X"><img src="cid:&lt;two@x&gt;"><img src="cid:a%25b@x">',
        ("Content-Type: image/png\nContent-ID: <part1.abc@x>", PNG),
        ("Content-Type: image/png\nContent-ID: <two@x>", PNG),
        ("Content-Type: image/png\nContent-ID: <a%b@x>", PNG),
    )
    parsed = parse(raw)
    assert [i.content_id for i in parsed.inline_images] == ["part1.abc@x", "two@x", "a%b@x"]
    assert parsed.defects == ()
    # The store maps every cid: left in the HTML without deciding anything.
    mapping = {i.content_id or "": f"embeddedfile:{n}" for n, i in enumerate(parsed.inline_images)}
    stored = rewrite_inline_images(parsed.html, mapping)
    assert "cid:" not in stored.lower()
    assert stored.count("embeddedfile:") == 3


def test_dangling_cid_is_removed_from_the_html() -> None:
    raw = related(
        '<p>Logo: <img src="cid:missing@x" alt="logo"> and <img src="cid:here@x"></p>',
        ("Content-Type: image/png\nContent-ID: <here@x>", PNG),
    )
    parsed = parse(raw)
    assert "missing@x" not in parsed.html
    assert 'alt="logo"' in parsed.html
    assert 'src="cid:here@x"' in parsed.html
    assert [i.content_id for i in parsed.inline_images] == ["here@x"]
    assert "cid-dangling" in parsed.defects


def test_image_with_content_id_that_html_never_cites_is_a_document() -> None:
    raw = related(
        "<p>No images cited here.</p>",
        ("Content-Type: image/jpeg; name=photo.jpg\nContent-ID: <p@x>", JPEG),
    )
    parsed = parse(raw)
    assert parsed.inline_images == ()
    assert [(a.filename, a.content_id) for a in parsed.attachments] == [("photo.jpg", "p@x")]


# --- dates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Tue, 18 Sep 101 10:15 WET", datetime(2001, 9, 18, 10, 15, tzinfo=UTC)),
        ("Mon, 2 Jun 125 08:00:00 +0000", datetime(2025, 6, 2, 8, 0, tzinfo=UTC)),
        ("Fri, 1 Jan 99 00:00:00 +0000", datetime(1999, 1, 1, tzinfo=UTC)),
        ("Wed, 1 Jan 75 00:00:00 +0000", datetime(1975, 1, 1, tzinfo=UTC)),
        ("1 Jan 50 00:00:00 +0000", datetime(1950, 1, 1, tzinfo=UTC)),
        ("Sat, 1 Mar 03 12:00:00 +0000", datetime(2003, 3, 1, 12, tzinfo=UTC)),
        ("Mon, 02 Jun 25 09:00:00 +0200", datetime(2025, 6, 2, 7, tzinfo=UTC)),
        ("Mon, 2-Jun-25 09:00:00 GMT", datetime(2025, 6, 2, 9, tzinfo=UTC)),
    ],
)
def test_obsolete_years_rfc5322_4_3(value: str, expected: datetime) -> None:
    parsed = parse(mail(f"Date: {value}"))
    if expected.year < 1970:
        assert parsed.date == ARRIVAL
        assert "date-before-1970" in parsed.defects
    else:
        assert parsed.date == expected
        assert "date-obsolete-year" in parsed.defects


def _dated(value: str) -> bytes:
    return mail(f"Date: {value}")


@pytest.mark.parametrize(
    "value",
    ["Tue, 1 Jan 2030 00:00:00 +0000", "Wed, 4 Jun 2025 09:00:00 +0000", "1 Jan 2049 10:00 GMT"],
)
def test_future_date_becomes_arrival(value: str) -> None:
    parsed = parse(_dated(value))
    assert parsed.date == ARRIVAL
    assert "date-in-future" in parsed.defects


def test_slightly_ahead_date_is_kept() -> None:
    parsed = parse(_dated("Mon, 2 Jun 2025 23:00:00 +0000"))  # 11 h ahead: a wrong clock zone
    assert parsed.date == datetime(2025, 6, 2, 23, tzinfo=UTC)
    assert parsed.defects == ()


@pytest.mark.parametrize("value", ["Thu, 1 Jan 1970 00:00:00 +0100", "Sun, 1 Jan 1950 12:00 GMT"])
def test_date_before_1970_becomes_arrival(value: str) -> None:
    parsed = parse(_dated(value))
    assert parsed.date == ARRIVAL
    assert "date-before-1970" in parsed.defects


def test_missing_and_broken_dates_use_arrival() -> None:
    assert parse(_dated("")).date == ARRIVAL
    assert parse(_dated("not a date")).date == ARRIVAL
    no_date = mail("", omit=("date",))
    parsed = parse(no_date)
    assert (parsed.date, parsed.defects) == (ARRIVAL, ("date-missing",))
    naive_arrival = parse_message(no_date, arrival=ARRIVAL.replace(tzinfo=None))
    assert naive_arrival.date == ARRIVAL


def test_iso_dates_from_scripts_are_read() -> None:
    parsed = parse(_dated("2025-06-01 10:00:00"))
    assert parsed.date == datetime(2025, 6, 1, 10, tzinfo=UTC)
    assert "date-nonstandard" in parsed.defects


def test_import_step_passes_internaldate_as_arrival() -> None:
    arrived = datetime(2025, 6, 2, 8, 30, tzinfo=UTC)
    fetched = FetchedMessage(
        uid=7, raw=_dated("Fri, 1 Jan 2100 00:00:00 +0000"), internaldate=arrived, flags=frozenset()
    )
    items, failures = _parse_batch([fetched], 10_000_000)
    assert failures == []
    assert items[0].message.date == arrived
    assert "date-in-future" in items[0].message.defects


def test_arrival_defaults_to_now() -> None:
    before = datetime.now(UTC)
    parsed = parse_message(_dated("Fri, 1 Jan 2100 00:00:00 +0000"))
    assert before - timedelta(seconds=1) <= parsed.date <= datetime.now(UTC)


# --- defects --------------------------------------------------------------------------------


def test_clean_message_has_no_defects() -> None:
    raw = multipart(
        (
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit",
            "Grüße".encode(),
        ),
        (
            "Content-Type: application/pdf; name=a.pdf\nContent-Transfer-Encoding: base64",
            base64.encodebytes(PDF),
        ),
    )
    assert parse(raw).defects == ()


@pytest.mark.parametrize(
    ("raw", "defect"),
    [
        (
            mail("Content-Type: text/plain; charset=x-nonsense", "é".encode("cp1252")),
            "charset-unknown",
        ),
        (mail("Content-Type: text/plain", "été".encode("cp1252")), "charset-missing"),
        (
            mail("Content-Type: text/plain; charset=shift_jis", b"\x82\xa0\x82"),
            "charset-invalid-bytes",
        ),
        (
            mail('Content-Type: multipart/mixed; boundary="x"', b"--x\r\n\r\nno end\r\n"),
            "boundary-unclosed",
        ),
        (mail("Message-ID: <>"), "message-id-invalid"),
        (mail("Subject: =?x-nonsense?Q?=E9t=E9?="), "charset-unknown"),
    ],
)
def test_repairs_are_recorded(raw: bytes, defect: str) -> None:
    assert defect in parse(raw).defects


# --- further examples of each kind (the issue 9 follow-up: a later tester's mail) -----------
# Each table keeps the examples that came out right as guards of their kind, and the ones that
# came out wrong (marked "was wrong") as tests of the rule that fixed them.


def _b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


def _pct(text: bytes) -> str:
    return "".join(f"%{byte:02X}" for byte in text)


def _word(charset: str, text: str, codec: str) -> str:
    """An RFC 2047 B-word of ``text`` written by ``codec`` under the label ``charset``."""
    return f'attachment; filename="=?{charset}?B?{_b64(text.encode(codec))}?="'


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        (
            "attachment; filename*0*=iso-8859-1''R%E9sum%E9; filename*1*=%20final.doc",
            "Résumé final.doc",
        ),
        (
            "attachment; filename*1*=%20final.doc; filename*0*=utf-8''R%C3%A9sum%C3%A9",
            "Résumé final.doc",
        ),
        ("attachment; filename*=gb2312''" + _pct("報告.pdf".encode("gbk")), "報告.pdf"),
        ("attachment; filename*=shift_jis''" + _pct("①資料.xlsx".encode("cp932")), "①資料.xlsx"),
        ("attachment; filename*=x-foo''%C3%A9t%C3%A9.pdf", "été.pdf"),
        ('attachment; filename="=?iso-8859-1?Q?=C3=A9t=C3=A9.pdf?="', "été.pdf"),
        (_word("ks_c_5601-1987", "견적서.pdf", "cp949"), "견적서.pdf"),
        (_word("big5", "報價單.pdf", "big5hkscs"), "報價單.pdf"),
        (_word("ISO-2022-JP", "見積書.pdf", "iso2022_jp"), "見積書.pdf"),
        (
            _word("ISO-2022-JP", "①見積書.pdf", "cp932"),
            "①見積書.pdf",
        ),  # Shift_JIS under a JIS label
        ("attachment; filename==?UTF-8?Q?=C3=A9t=C3=A9_2025.pdf?=", "été 2025.pdf"),
        # Was wrong: an encoded word whose "?=" the sender's client cut off stayed literal.
        ('attachment; filename="=?UTF-8?Q?=C3=A9t=C3=A9.pdf"', "été.pdf"),
        ('attachment; filename="=?UTF-8?Q?=E9t=E9.pdf?="', "été.pdf"),  # Latin-1 under UTF-8
        ("attachment; filename*=\"UTF-8''Lo%CC%88sung.txt\"", "Lösung.txt"),
    ],
)
def test_more_attachment_names(disposition: str, expected: str | None) -> None:
    [name] = names(attachment(disposition))
    if expected is None:  # any readable name: no U+FFFD, no escape characters
        assert "\ufffd" not in name
        assert "\x1b" not in name
    else:
        assert unicodedata.normalize("NFC", name) == expected


def test_raw_8bit_name_in_the_parts_own_charset() -> None:
    """Was wrong: a raw Windows-1251 name in a part labelled windows-1251 was read in the
    message's first charset (UTF-8 here) and guessed as Latin-1 mojibake."""
    name = "Отчёт за май.txt".encode("cp1251").decode("latin-1")
    raw = multipart(
        ("Content-Type: text/plain; charset=utf-8", "Привет".encode()),
        (f'Content-Type: text/plain; charset=windows-1251; name="{name}"\n'
         "Content-Disposition: attachment", "текст".encode("cp1251")),
    )  # fmt: skip
    assert names(raw) == ["Отчёт за май.txt"]


def _body(data: bytes, content_type: str, encoding: str = "8bit") -> bytes:
    return mail(
        f"MIME-Version: 1.0\nContent-Type: {content_type}\nContent-Transfer-Encoding: {encoding}",
        data,
    )


def _labelled(text: str, writer: str, label: str) -> bytes:
    return _body(text.encode(writer), f"text/plain; charset={label}")


_JP = "お世話になっております。山田です。\n見積書を送付します。"
_JIS_EXTENDED = "№１ ㈱山田 ①②③ Ⅰ Ⅱ 髙橋 﨑 ∵ 〝引用〟"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            _body(
                quopri.encodestring(_JP.encode("iso2022_jp")),
                "text/plain; charset=us-ascii",
                "quoted-printable",
            ),
            "見積書を送付",
            id="jis-qp-us-ascii",
        ),
        pytest.param(
            _body(base64.encodebytes(_JP.encode("iso2022_jp")), "text/plain", "base64"),
            "見積書を送付",
            id="jis-base64-unlabelled",
        ),
        pytest.param(
            _body(b"\x1b$B%F%9%H\x1b(B \x1b(I23\x1b(B", "text/plain; charset=iso-2022-jp", "7bit"),
            "テスト ｲｳ",
            id="jis-half-width-kana",
        ),
        pytest.param(
            _body(jis(_JIS_EXTENDED), "text/plain; charset=ISO-2022-JP", "7bit"),
            _JIS_EXTENDED,
            id="cp50221-nec-ibm",
        ),
        pytest.param(
            _labelled("He said “hello” – ok… €5", "cp1252", "iso-8859-15"),
            "“hello” – ok… €5",
            id="1252-as-8859-15",
        ),
        pytest.param(
            _labelled("Labdien – „Ąžuolas“", "cp1257", "iso-8859-13"),
            "„Ąžuolas“",
            id="1257-as-8859-13",
        ),
        pytest.param(
            _labelled("Merhaba – “Günaydın” şğı", "cp1254", "iso-8859-9"),
            "“Günaydın” şğı",
            id="1254-as-8859-9",
        ),
        pytest.param(
            _labelled("Καλημέρα – “Ά”", "cp1253", "iso-8859-7"),
            "Καλημέρα – “Ά”",
            id="1253-as-8859-7",
        ),
        pytest.param(
            _labelled("欧元€ 𠀀 ᠠ", "gb18030", "GB2312"), "欧元€ 𠀀 ᠠ", id="gb2312-holding-gb18030"
        ),
        pytest.param(_labelled("價格 €100", "cp950", "big5"), "價格 €100", id="big5-cp950"),
        pytest.param(_labelled("똠방각하", "cp949", "euc-kr"), "똠방각하", id="euc-kr-cp949"),
        pytest.param(_labelled("①髙橋様", "cp932", "x-sjis"), "①髙橋様", id="x-sjis-cp932"),
        pytest.param(
            _labelled("見積書①", "cp932", "iso-2022-jp"), "見積書①", id="8bit-cp932-labelled-jis"
        ),
    ],
)
def test_more_body_charsets(raw: bytes, expected: str) -> None:
    parsed = parse(raw)
    assert expected in parsed.plain_text
    assert "\ufffd" not in parsed.plain_text
    assert "\x1b" not in parsed.plain_text


def test_raw_windows_1251_display_name_read_in_the_message_charset() -> None:
    name = "Иван Петров".encode("cp1251").decode("latin-1")
    raw = mail(
        f"MIME-Version: 1.0\nContent-Type: text/plain; charset=windows-1251\nFrom: {name} <i@x.ru>",
        "Привет".encode("cp1251"),
    )
    parsed = parse(raw)
    assert parsed.from_address is not None
    assert parsed.from_address.name == "Иван Петров"


def test_jis_html_parts_whatever_their_label() -> None:
    html = f"<p>{_JP}</p>".encode("iso2022_jp")
    for label in ("text/html", "text/html; charset=us-ascii"):
        parsed = parse(_body(html, label, "7bit"))
        assert "見積書を送付" in parsed.html
        assert "\x1b" not in parsed.html


_LINES = b"line one\r\nline two\r\nline three\r\nline four\r\nline five\r\n"
_FOOTER = b"_______________\r\nList mailing list\r\nhttp://lists.example.org/"


@pytest.mark.parametrize(
    ("encoding", "payload", "expected", "defect"),
    [
        pytest.param(
            "base64",
            b"".join(base64.b64encode(line + b"\r\n") for line in _LINES.splitlines()),
            _LINES,
            "base64-padding-inside",
            id="padded-chunks-one-line",
        ),
        # Was wrong: a footer a list or phone appended after an empty line became garbage.
        pytest.param(
            "base64",
            base64.encodebytes(_LINES) + b"\r\n" + _FOOTER + b"\r\n",
            _LINES + b"\r\n" + _FOOTER,
            "base64-junk",
            id="list-footer",
        ),
        pytest.param(
            "base64",
            base64.encodebytes(_LINES) + b"\r\nSent from my iPhone\r\n",
            _LINES + b"\r\nSent from my iPhone",
            "base64-junk",
            id="phone-footer",
        ),
        # Was wrong: a comment in Content-Transfer-Encoding (RFC 5322 3.2.2) hid the mechanism.
        pytest.param(
            "base64 (attached file)", base64.encodebytes(_LINES), _LINES, None, id="cte-comment"
        ),
        pytest.param("Base-64", base64.encodebytes(_LINES), _LINES, None, id="cte-base-64"),
        # Was wrong: RFC 2045 6.7 rule 3, white space a relay added after a soft line break.
        pytest.param(
            "quoted-printable",
            b"line one\r\nline =  \r\ntwo=\t\r\n\r\n",
            b"line one\r\nline two\r\n",
            None,
            id="qp-trailing-space",
        ),
    ],
)
def test_more_transfer_encodings(
    encoding: str, payload: bytes, expected: bytes, defect: str | None
) -> None:
    parsed = parse(_body(payload, "text/plain; charset=us-ascii", encoding))
    assert parsed.plain_text == expected.decode().replace("\r\n", "\n").strip("\n")
    if defect is None:
        assert "transfer-encoding-unknown" not in parsed.defects
    else:
        assert defect in parsed.defects


def test_more_uuencode_in_text() -> None:
    def uu(data: bytes, name: str, mode: str = "600") -> bytes:
        lines = [f"begin {mode} {name}".encode()]
        lines += [binascii.b2a_uu(data[i : i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
        return b"\r\n".join([*lines, b"`", b"end"]) + b"\r\n"

    pdf = b"%PDF-1.4 " + bytes(100)
    body = b"Hello,\r\nthe files:\r\n\r\n" + uu(PNG, "pic.png") + b"\r\nand:\r\n"
    body += uu(pdf, "my notes.pdf", "0644") + b"\r\nRegards,\r\nBob\r\n"
    parsed = parse(_body(quopri.encodestring(body), "text/plain", "quoted-printable"))
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("pic.png", "image/png", PNG),
        ("my notes.pdf", "application/pdf", pdf),
    ]
    assert parsed.plain_text == "Hello,\nthe files:\n\n\nand:\n\nRegards,\nBob"


def _rel(html: str, content_id: str, data: bytes = PNG, head: str = "", subtype: str = "") -> bytes:
    """HTML citing images, and one part with ``content_id`` (a Content-ID header value)."""
    part = head or "Content-Type: image/png"
    return multipart(
        ("Content-Type: text/html; charset=utf-8", html.encode()),
        (f"{part}\nContent-ID: {content_id}", data),
        subtype=subtype or "related",
    )


_SCAN = 'Content-Type: application/octet-stream; name="SCAN.JPG"\nContent-Disposition: attachment'
_OCTET = "Content-Type: application/octet-stream"


@pytest.mark.parametrize(
    ("raw", "inline", "dangling"),
    [
        pytest.param(
            _rel('<img src="cid:i@apple">', "<i@apple>", head=_OCTET), True, False, id="octet"
        ),
        pytest.param(
            _rel('<img src="cid:p1.A@scan">', "<p1.A@scan>", JPEG, _SCAN, "mixed"),
            True,
            False,
            id="cited-attachment-in-mixed",
        ),
        pytest.param(
            _rel('<img src="CID:Logo@Example">', "<logo@example>"), True, False, id="case"
        ),
        pytest.param(
            _rel(
                '<img src="cid:image001.png%4001D9E2A4.5B6C7D80">',
                "<image001.png@01D9E2A4.5B6C7D80>",
            ),
            True,
            False,
            id="percent-encoded-at",
        ),
        pytest.param(_rel('<img src="cid:a&#64;x">', "<a@x>"), True, False, id="entity-at"),
        pytest.param(_rel("<img src=cid:logo@x>", "logo@x"), True, False, id="unquoted-bare-id"),
        # Were wrong: white space around the URL, a comment after the Content-ID, a space in
        # the Content-ID cited as %20, an empty cid: left in the HTML.
        pytest.param(_rel('<img src=" cid:a@x ">', "<a@x>"), True, False, id="spaces-around-url"),
        pytest.param(_rel('<img src="cid:a@x">', "<a@x> (logo)"), True, False, id="id-comment"),
        pytest.param(
            _rel('<img src="cid:my%20logo@x">', "<my logo@x>"), True, False, id="id-space"
        ),
        pytest.param(_rel('<img src="cid:">', "<a@x>"), False, True, id="empty-cid"),
        pytest.param(
            _rel(
                "<p>hi</p>",
                "<sig@x>",
                JPEG,
                "Content-Type: image/jpeg\nContent-Disposition: inline",
            ),
            False,
            False,
            id="uncited-inline-disposition",
        ),
        pytest.param(
            _rel("<p>hi</p>", "<f_abc>", PDF, "Content-Type: application/pdf; name=a.pdf"),
            False,
            False,
            id="uncited-pdf",
        ),
        pytest.param(
            _rel('<img src="cid:gone@x"><img src="cid:a@x">', "<a@x>"),
            True,
            True,
            id="one-dangling",
        ),
    ],
)
def test_more_inline_or_attachment(raw: bytes, inline: bool, dangling: bool) -> None:
    parsed = parse(raw)
    assert (len(parsed.inline_images), len(parsed.attachments)) == ((1, 0) if inline else (0, 1))
    resource = (parsed.inline_images or parsed.attachments)[0]
    assert resource.content_type in {"image/png", "image/jpeg", "application/pdf"}
    assert ("cid-dangling" in parsed.defects) is dangling
    cited = set(re.findall(r'src="cid:([^"]*)"', parsed.html))
    assert cited == {i.content_id for i in parsed.inline_images}


_NONSTANDARD = "date-nonstandard"


def _utc(day: int, hour: int, year: int = 2025, month: int = 6) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected", "defect"),
    [
        ("Sat, 3 Jan 98 10:00:00 EST", _utc(3, 15, 1998, 1), "date-obsolete-year"),
        ("Monday, 02-Jun-25 09:00:00 GMT", _utc(2, 9), "date-obsolete-year"),
        ("Mon, 2 Jun 70 09:00:00 +0000", _utc(2, 9, 1970), "date-obsolete-year"),
        ("Mon, 2 Jun 49 09:00:00 +0000", ARRIVAL, "date-in-future"),
        ("Mon, 2 Jun 2037 09:00:00 +0000", ARRIVAL, "date-in-future"),
        ("Wed, 31 Dec 1969 23:59:59 +0000", ARRIVAL, "date-before-1970"),
        ("Mon, 02 Jun 2025 25:00:00 +0000", ARRIVAL, "date-invalid"),
        ("Mon, 02 Jun 2025 09:00:00 +0200 (CEST)", _utc(2, 7), None),
        ("Mon, 02 Jun 2025 09:00:00 PDT", _utc(2, 16), None),
        ("Mon Jun  2 09:00:00 2025", _utc(2, 9), None),
        # Were wrong: zone names and offsets outside RFC 5322 were read as +0000, and a
        # four-digit year below 100 as 20xx.
        ("Mon, 02 Jun 2025 09:00:00 MEZ", _utc(2, 8), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 CEST", _utc(2, 7), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 BST", _utc(2, 8), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 JST", _utc(2, 0), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 GMT+0200", _utc(2, 7), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 UTC-5", _utc(2, 14), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 +02:00", _utc(2, 7), _NONSTANDARD),
        ("Mon, 2 Jun 0025 09:00:00 +0000", ARRIVAL, "date-before-1970"),
        ("Mon, 02 Jun 2025 09:00:00 +02", _utc(2, 7), _NONSTANDARD),  # was two minutes
        ("Mon, 02 Jun 2025 09:00:00 CEST+0200", _utc(2, 7), _NONSTANDARD),
        ("Mon, 02 Jun 2025 09:00:00 CEST (+0200)", _utc(2, 7), _NONSTANDARD),
        # Unknown names stay -0000 (RFC 5322 4.3), and ambiguous ones are unknown.
        ("Mon, 02 Jun 2025 09:00:00 IST", _utc(2, 9), None),
        ("Mon, 02 Jun 2025 09:00:00 -0000", _utc(2, 9), None),
    ],
)
def test_more_dates(value: str, expected: datetime, defect: str | None) -> None:
    parsed = parse(_dated(value))
    assert parsed.date == expected
    if defect is None:
        assert not [d for d in parsed.defects if d.startswith("date-")]
    else:
        assert defect in parsed.defects


def test_a_second_part_under_a_cited_content_id_is_a_document() -> None:
    """Was wrong: two parts under one Content-ID were both embedded files, though the HTML's
    one reference shows only the first: the second was stored where no reader sees it."""
    raw = multipart(
        ("Content-Type: text/html; charset=utf-8", b'<img src="cid:logo@x">'),
        ("Content-Type: image/png\nContent-ID: <logo@x>", PNG),
        ("Content-Type: image/jpeg; name=photo.jpg\nContent-ID: <LOGO@x>", JPEG),
        subtype="related",
    )
    parsed = parse(raw)
    assert [i.content_type for i in parsed.inline_images] == ["image/png"]
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("photo.jpg", "image/jpeg")
    ]
