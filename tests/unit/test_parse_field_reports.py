"""The field reports whose fault is in the parser (../shared/corpora/field-reports/README.md):
each gives the README's values when parsed. (The import-side cases run through Dovecot in
their own test.)"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailbridge.core.identify import thread_candidates
from mailbridge.core.model import ParsedMessage
from mailbridge.core.parse import parse_message
from tests.unit.test_parse_corpora import CORPORA

REPORTS = CORPORA / "field-reports"

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(not REPORTS.is_dir(), reason=f"field reports not found at {REPORTS}"),
]

ARRIVAL = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _parse(name: str) -> ParsedMessage:
    return parse_message((REPORTS / name).read_bytes(), arrival=ARRIVAL)


def test_01_rfc2231_filenames() -> None:
    parsed = _parse("01-rfc2231-filenames.eml")
    assert [a.filename for a in parsed.attachments] == [
        "Übersicht.txt",
        "Lösung.txt",
        "Angebot Nr 42 (P 4) final.pdf.pgp",
        "☃.txt",
        "été.pdf",
    ]
    assert parsed.inline_images == ()
    assert parsed.plain_text == "Anbei fünf Dateien."
    assert not [d for d in parsed.defects if d.startswith("charset")]


def test_03_iso_2022_jp_bodies() -> None:
    parsed = _parse("03-iso-2022-jp-bodies.eml")
    assert parsed.subject == "見積もりのお願い"
    first, second = parsed.plain_text.split("\n")
    assert first == "納品書を添付いたします。ご確認ください。佐藤"
    assert second == "項目①と項目②を確認しました。"
    assert "\x1b" not in parsed.plain_text
    assert "\ufffd" not in parsed.plain_text
    # The first part carries no charset: noted, not hidden.
    assert "charset-mislabelled" in parsed.defects


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("06-three-digit-year-a.eml", datetime(2001, 9, 18, 10, 15, tzinfo=UTC)),
        ("06-three-digit-year-b.eml", datetime(2000, 3, 3, 16, 20, 5, tzinfo=UTC)),
    ],
)
def test_06_three_digit_year(name: str, expected: datetime) -> None:
    parsed = _parse(name)
    assert parsed.date == expected
    assert "date-obsolete-year" in parsed.defects


def test_10_unreferenced_cid_image_is_a_document() -> None:
    parsed = _parse("10-unreferenced-cid-image.eml")
    assert parsed.inline_images == ()
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("damaged-part.jpg", "image/jpeg")
    ]
    assert parsed.attachments[0].data.startswith(b"\xff\xd8\xff")


def test_19_base64_padded_chunks_decode_completely() -> None:
    parsed = _parse("19-base64-padded-chunks.eml")
    lines = parsed.plain_text.split("\n")
    assert len(lines) == 5
    assert lines[0].startswith("####")
    assert "Logwatch 7.8" in lines[0]
    assert lines[3] == " Failed logins from: 203.0.113.7 (3 times)"
    assert "sshd End" in lines[4]
    (archive,) = parsed.attachments
    assert archive.filename == "archive.zip"
    # Every byte of both chunks (the README says 40; the two chunks hold 10 + 26 bytes).
    assert archive.data == b"PK\x03\x04\x14\x00\x00\x00\x08\x00second part of the archive"
    assert "base64-padding-inside" in parsed.defects


def test_22_references_bare_and_bracketed() -> None:
    root = _parse("22-references-bare-and-bracketed-a.eml")
    reply = _parse("22-references-bare-and-bracketed-b.eml")
    assert root.message_id == "root-22@customer.example"
    assert reply.references == ("root-22@customer.example", "wino-22@customer.example")
    assert reply.in_reply_to == ("wino-22@customer.example",)
    # The stored root is among the ids the reply may continue.
    assert root.message_id in thread_candidates(reply)
