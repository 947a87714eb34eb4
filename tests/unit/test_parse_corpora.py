"""Real-world mail from ../shared/corpora (beside the checkout): every message must parse.

The corpora are other projects' test mail (CPython's email tests, mail-parser, talon, notmuch,
flufl.bounce); see their README.md. They are read in place, never copied into this repository.
"""

from __future__ import annotations

import re
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import pytest

from mailbridge.core.model import ParsedMessage
from mailbridge.core.parse import parse_message

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
# The defect codes ParsedMessage documents (its docstring's table): nothing else may appear.
DOCUMENTED_DEFECTS = set(re.findall(r"^\s+``([a-z0-9-]+)``", ParsedMessage.__doc__ or "", re.M))
FOLDERS = ("stdlib-email", "mail-parser", "quoted-replies", "threads-notmuch", "bounces-flufl")
_NOT_MAIL = {".json", ".py", ".md", ".html", ".pyc"}
_SKIP_REASON = f"real-world mail corpora not found at {CORPORA}"

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(not CORPORA.is_dir(), reason=_SKIP_REASON),
]


def _mail_files() -> list[Path]:
    if not CORPORA.is_dir():
        return []
    files: list[Path] = []
    for folder in FOLDERS:
        for path in sorted((CORPORA / folder).rglob("*")):
            if path.is_file() and path.suffix not in _NOT_MAIL and not path.name.endswith("_text"):
                files.append(path)
    return files


MAIL_FILES = _mail_files()


def _parse(relative: str) -> ParsedMessage:
    return parse_message((CORPORA / relative).read_bytes())


def _has_text_body(raw: bytes) -> bool:
    """Whether a text/plain or text/html part with non-blank content exists (stdlib view)."""
    pending = [BytesParser(policy=policy.compat32).parsebytes(raw)]
    while pending:
        part = pending.pop()
        if part.get_content_maintype() == "message":
            continue  # an attached message's text is not this message's body
        if part.is_multipart():
            pending.extend(p for p in part.get_payload() if isinstance(p, Message))
            continue
        if part.get_content_type() in {"text/plain", "text/html"}:
            if part.get_content_disposition() == "attachment":
                continue
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes) and payload.strip():
                return True
    return False


def test_corpora_present_and_complete() -> None:
    for folder in FOLDERS:
        assert (CORPORA / folder).is_dir(), folder
    assert len(MAIL_FILES) > 250


@pytest.mark.parametrize(
    "path", MAIL_FILES, ids=[str(p.relative_to(CORPORA)) for p in MAIL_FILES] if MAIL_FILES else []
)
def test_every_corpus_message_parses(path: Path) -> None:
    raw = path.read_bytes()
    parsed = parse_message(raw)
    assert parsed.size == len(raw)
    assert parsed.date.tzinfo is not None
    assert set(parsed.defects) <= DOCUMENTED_DEFECTS, parsed.defects
    assert parsed.message_key
    if _has_text_body(raw):
        assert parsed.plain_text.strip(), "a message with a text body needs plain_text"
    for text in (parsed.subject, parsed.plain_text, parsed.html, *parsed.defects):
        text.encode("utf-8")  # no surrogates may reach the store


def test_mail_parser_gb2312_labelled_utf8_body() -> None:
    parsed = _parse("mail-parser/mail_test_12")
    assert parsed.subject == "代开各地增值税发票"
    assert parsed.from_address is not None
    assert parsed.from_address.name == "张先生"
    assert "我公司可代开各类增值税发票" in parsed.plain_text


def test_mail_parser_gb2312_subject_and_html() -> None:
    parsed = _parse("mail-parser/mail_test_9")
    assert parsed.subject.startswith("我把镜头拉近些")
    assert "我把镜头拉近些" in parsed.plain_text


def test_mail_parser_iso_8859_1() -> None:
    parsed = _parse("mail-parser/mail_test_10")
    assert "è stato annunciato" in parsed.plain_text
    assert "verrà riconosciuto" in parsed.plain_text
    assert [a.filename for a in parsed.attachments] == ["Move To Eight ZWEP6227F.pdf"]
    assert len(parsed.inline_images) >= 3
    assert all(i.content_id for i in parsed.inline_images)


def test_mail_parser_encoded_subject_and_inline_images() -> None:
    parsed = _parse("mail-parser/mail_test_5")
    assert parsed.subject == "Je prépare mon été zéro complexe !"
    assert parsed.inline_images
    assert "http" not in "".join(
        part for part in parsed.html.split('src="')[1:] if part.startswith("http")
    )


def test_mail_parser_cyrillic_koi8_or_utf8() -> None:
    parsed = _parse("mail-parser/mail_test_1")
    assert parsed.subject == "письмо уведом-е"
    assert "Налогоплательщик" in parsed.plain_text


def test_mail_parser_encoded_comma_in_display_name() -> None:
    parsed = _parse("mail-parser/mail_test_18")
    assert parsed.from_address is not None
    assert parsed.from_address.email == "comma.name@example.com"
    assert parsed.from_address.name == "LastßlName, FirstName"
    assert [a.email for a in parsed.cc] == ["simple@example.net", "john.doe@example.com"]


def test_mail_parser_malformed_boundary_recovered() -> None:
    parsed = _parse("mail-parser/mail_malformed_3")
    assert parsed.html
    assert parsed.plain_text.strip()
    assert parsed.attachments == ()


def test_notmuch_latin1_accented() -> None:
    parsed = _parse("threads-notmuch/default/cur/53:2,")
    assert parsed.subject == "Essai accentué"
    assert parsed.plain_text.startswith("Du texte accentué pour ça")


def test_notmuch_thread_headers() -> None:
    child = _parse("threads-notmuch/threading/ghost-root/child")
    assert child.message_id == "001-child@example.org"
    assert child.in_reply_to == ("000-real-root@example.org",)
    assert child.references == ("000-real-root@example.org",)


def test_quoted_reply_gmail_text() -> None:
    parsed = _parse("quoted-replies/standard_replies/gmail.eml")
    assert parsed.subject == "Re: Test"
    assert parsed.plain_text.startswith("Hello")
    assert parsed.html


def test_bounce_keeps_report_parts_and_auto_headers() -> None:
    parsed = _parse("bounces-flufl/dsn_01.txt")
    assert parsed.auto_headers["content-type"].lower().startswith("multipart/report")
    names = [a.filename for a in parsed.attachments]
    assert names == ["delivery-status.txt", "forwarded-message.eml"]
    forwarded = parse_message(parsed.attachments[1].data)
    assert forwarded.subject


def test_bounce_sender_with_a_quoted_local_part() -> None:
    parsed = _parse("bounces-flufl/simple_36.txt")
    assert parsed.from_address is not None
    assert parsed.from_address.email == '"system administrator"@example.com'


def test_exchange_tnef_correlator_header_alone_is_no_attachment() -> None:
    # The six Exchange bounces carry X-MS-TNEF-Correlator but no winmail.dat part.
    for name in ("simple_34", "simple_35", "simple_36", "simple_37", "qmail_06", "aol_01"):
        parsed = _parse(f"bounces-flufl/{name}.txt")
        assert parsed.attachments == (), name
        assert parsed.plain_text.strip(), name


def test_bounce_raw_gb2312_subject() -> None:
    assert _parse("bounces-flufl/sina_01.txt").subject == "邮件传输失败！"


def test_stdlib_digest_messages_become_attachments() -> None:
    parsed = _parse("stdlib-email/msg_02.txt")
    assert [a.filename for a in parsed.attachments] == ["forwarded-message.eml"] * 5
    assert all(a.content_type == "message/rfc822" for a in parsed.attachments)
    assert parsed.plain_text.startswith("Send Ppp mailing list submissions")
