"""Tests for mailbridge.core.parse: headers, bodies, charsets, attachments, limits, robustness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.policy import SMTP

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailbridge.core.messagekey import content_fingerprint
from mailbridge.core.model import Address, ParsedMessage
from mailbridge.core.parse import (
    decode_header_value,
    decode_text,
    parse_message,
    summarise_headers,
)
from mailbridge.errors import MessageError

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + b"\x00\xff" * 600


def simple(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = headers.pop("From", "Ann Example <ann@example.com>")
    msg["To"] = headers.pop("To", "support@acme.test")
    msg["Subject"] = headers.pop("Subject", "Hello")
    msg["Date"] = headers.pop("Date", "Tue, 30 Apr 2024 10:00:00 +0200")
    msg["Message-ID"] = headers.pop("Message_ID", "<m1@example.com>")
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello there\n")
    return msg


def parse(raw: bytes | EmailMessage, max_attachment_bytes: int | None = None) -> ParsedMessage:
    data = raw.as_bytes(policy=SMTP) if isinstance(raw, EmailMessage) else raw
    return parse_message(data, now=NOW, max_attachment_bytes=max_attachment_bytes)


def raw_message(headers: str, body: bytes) -> bytes:
    """Hand-built bytes, for what EmailMessage refuses to produce (broken mail)."""
    return headers.strip().replace("\n", "\r\n").encode("ascii") + b"\r\n\r\n" + body


# --- identity and threading headers -----------------------------------------------------------


def test_basic_fields() -> None:
    parsed = parse(simple(Cc="Bob <Bob@Example.com>", Reply_To="help@acme.test"))
    assert parsed.message_id == "m1@example.com"
    assert parsed.message_key == "m1@example.com"
    assert parsed.subject == "Hello"
    assert parsed.from_address == Address("ann@example.com", "Ann Example")
    assert parsed.to == (Address("support@acme.test"),)
    assert parsed.cc == (Address("bob@example.com", "Bob"),)
    assert parsed.reply_to == (Address("help@acme.test"),)
    assert parsed.plain_text == "Hello there"
    assert parsed.html == ""
    assert parsed.date == datetime(2024, 4, 30, 10, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parsed.attachments == ()
    assert parsed.defects == ()
    assert parsed.size > 100


def test_message_key_without_message_id_is_its_content_fingerprint() -> None:
    msg = simple()
    del msg["Message-ID"]
    raw = msg.as_bytes(policy=SMTP)
    parsed = parse_message(raw, now=NOW)
    assert parsed.message_id is None
    assert parsed.fingerprint == content_fingerprint(raw)
    assert parsed.message_key == "sha256:" + parsed.fingerprint
    # Delivered again through another relay: the same message, the same key.
    relayed = parse_message(b"Received: from relay2 by mx2\r\n" + raw, now=NOW)
    assert relayed.message_key == parsed.message_key


def test_unusable_message_id_falls_back_to_hash_with_defect() -> None:
    raw = raw_message("From: a@x.org\nMessage-ID: <>\nSubject: s", b"body")
    parsed = parse(raw)
    assert parsed.message_id is None
    assert parsed.message_key.startswith("sha256:")
    assert "message-id-invalid" in parsed.defects


def test_thread_headers_parsed_robustly() -> None:
    raw = raw_message(
        """
From: a@x.org
Message-ID: < Own@Example.ORG >
In-Reply-To: <parent@x.org> (Bob's message of "Mon, 1 Jan 2024")
References: <root@x.org>
 <middle@x.org>,
\t<parent@x.org> missing@x.org
""",
        b"text",
    )
    parsed = parse(raw)
    assert parsed.message_id == "Own@example.org"
    assert parsed.in_reply_to == ("parent@x.org",)
    # A bare id beside bracketed ones is an id too (clients that drop the brackets).
    assert parsed.references == ("root@x.org", "middle@x.org", "parent@x.org", "missing@x.org")


def test_thread_headers_without_brackets() -> None:
    raw = raw_message("From: a@x.org\nIn-Reply-To: parent@x.org\nReferences: a@x.org b@x.org", b"t")
    parsed = parse(raw)
    assert parsed.in_reply_to == ("parent@x.org",)
    assert parsed.references == ("a@x.org", "b@x.org")


# --- RFC 2047 and addresses -------------------------------------------------------------------


def test_rfc2047_subject_and_names() -> None:
    raw = raw_message(
        """
From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <Juergen@Example.DE>
To: =?iso-8859-1?q?Fran=E7ois?= <francois@example.fr>, "Plain, Name" <plain@x.org>,
 =?utf-8?B?5byg5LiJ?= <zhang@example.cn>
Subject: =?utf-8?B?R3LDvMOfZQ==?= =?utf-8?Q?_aus_K=C3=B6ln?=
 und =?iso-8859-1?Q?Z=FCrich?=
""",
        b"x",
    )
    parsed = parse(raw)
    assert parsed.subject == "Grüße aus Köln und Zürich"
    assert parsed.from_address == Address("juergen@example.de", "Jürgen Müller")
    assert parsed.to == (
        Address("francois@example.fr", "François"),
        Address("plain@x.org", "Plain, Name"),
        Address("zhang@example.cn", "张三"),
    )


def test_rfc2047_multibyte_split_across_words() -> None:
    # "日本語" in UTF-8 split in the middle of a character, as some encoders do.
    value = "=?utf-8?B?5pel5pys?= =?utf-8?B?6Kq@?="
    assert decode_header_value(value).startswith("日本")
    split = "=?utf-8?Q?=E6=97=A5=E6?= =?utf-8?Q?=9C=AC?="
    assert decode_header_value(split) == "日本"


def test_rfc2047_broken_charset_and_junk_never_raise() -> None:
    assert decode_header_value("=?x-bogus?Q?caf=C3=A9?=") == "café"
    assert decode_header_value("=?base64?B?aGk=?=") == "hi"
    assert decode_header_value("=?utf-8?B?not base64!?=") != ""
    assert decode_header_value("=?utf-8?X?weird?=") == "=?utf-8?X?weird?="
    assert decode_header_value("a\x00b\x07c") == "abc"


def test_raw_8bit_subject_and_name_decoded() -> None:
    headers = "From: \xc3\x89lodie <elodie@x.org>\r\nSubject: Caf\xc3\xa9 cr\xc3\xa8me\r\n"
    raw = headers.encode("latin-1") + b"\r\nbody"
    parsed = parse(raw)
    assert parsed.subject == "Café crème"
    assert parsed.from_address == Address("elodie@x.org", "Élodie")


def test_raw_8bit_subject_uses_message_charset_hint() -> None:
    subject = "邮件传输失败".encode("gb2312")
    raw = (
        b"From: a@x.org\r\nSubject: " + subject + b"\r\n"
        b'Content-Type: text/plain; charset="gb2312"\r\n\r\n' + "正文".encode("gb2312")
    )
    parsed = parse(raw)
    assert parsed.subject == "邮件传输失败"
    assert parsed.plain_text == "正文"


def test_addresses_lowercased_invalid_and_duplicates_dropped() -> None:
    raw = raw_message(
        """
From: Ann <ANN@Example.COM>
To: bob@x.org, Bob Again <BOB@x.org>, not-an-address, , <@x.org>, undisclosed-recipients:;
Cc: carol@x.org
Cc: dave@x.org, carol@x.org
Bcc: "Eve" <eve@x.org>
Delivered-To: Support@Acme.test
X-Original-To: <sales@acme.test>
Delivered-To: support@acme.test
""",
        b"x",
    )
    parsed = parse(raw)
    assert parsed.from_address == Address("ann@example.com", "Ann")
    assert parsed.to == (Address("bob@x.org"),)
    assert parsed.cc == (Address("carol@x.org"), Address("dave@x.org"))
    assert parsed.bcc == (Address("eve@x.org", "Eve"),)
    assert parsed.delivered_to == ("support@acme.test", "sales@acme.test")
    assert [p.email for p, _ in parsed.participants()] == [
        "ann@example.com",
        "bob@x.org",
        "carol@x.org",
        "dave@x.org",
        "eve@x.org",
    ]


def test_quoted_local_parts_are_addresses() -> None:
    raw = raw_message(
        """
From: <"System Administrator"@Example.com>
To: "ann"@x.org, "bob..b"@x.org, "un"closed"@x.org, ""@x.org
""",
        b"x",
    )
    parsed = parse(raw)
    assert parsed.from_address == Address('"system administrator"@example.com')
    # Quotes that protect nothing go; quotes around what a bare address cannot hold stay.
    assert [a.email for a in parsed.to] == ["ann@x.org", '"bob..b"@x.org']


def test_missing_from_uses_sender_else_none() -> None:
    assert parse(raw_message("Sender: s@x.org", b"x")).from_address == Address("s@x.org")
    assert parse(raw_message("Subject: no sender", b"x")).from_address is None


# --- dates ------------------------------------------------------------------------------------


def test_date_naive_becomes_utc() -> None:
    parsed = parse(raw_message("From: a@x.org\nDate: Tue, 30 Apr 2024 10:00:00 -0000", b"x"))
    assert parsed.date == datetime(2024, 4, 30, 10, 0, tzinfo=UTC)
    assert parsed.date.tzinfo is not None


def test_date_missing_uses_now_with_defect() -> None:
    parsed = parse(raw_message("From: a@x.org", b"x"))
    assert parsed.date == NOW
    assert "date-missing" in parsed.defects


@pytest.mark.parametrize("value", ["yesterday", "Tue, 99 Foo 2024 99:99:99", "0", ""])
def test_date_unparseable_uses_now_with_defect(value: str) -> None:
    parsed = parse(raw_message(f"From: a@x.org\nDate: {value}", b"x"))
    assert parsed.date == NOW
    assert {"date-invalid", "date-missing"} & set(parsed.defects)


def test_date_default_now_is_aware() -> None:
    before = datetime.now(UTC)
    parsed = parse_message(raw_message("From: a@x.org", b"x"))
    assert before <= parsed.date <= datetime.now(UTC)


# --- bodies and charsets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        ("gb2312", "你好，世界"),
        ("iso-8859-1", "Grüße, café"),
        ("iso-8859-2", "Zażółć gęślą jaźń"),
        ("iso-8859-15", "Prix: 5 €"),
        ("koi8-r", "Привет, мир"),
        ("shift_jis", "こんにちは世界"),
        ("euc-jp", "こんにちは"),
        ("iso-2022-jp", "こんにちは"),
        ("big5", "中文測試"),
        ("euc-kr", "안녕하세요"),
        ("windows-1251", "Здравствуйте"),
        ("windows-1252", "“quotes” – dash"),
        ("utf-8", "emoji 🎉 ok"),
    ],
)
def test_legacy_charsets_decode(charset: str, text: str) -> None:
    body = text.encode(charset if charset != "shift_jis" else "cp932")
    raw = raw_message(
        f"From: a@x.org\nContent-Type: text/plain; charset={charset}\n"
        "Content-Transfer-Encoding: 8bit",
        body,
    )
    parsed = parse(raw)
    assert parsed.plain_text == text
    assert not any("charset" in d for d in parsed.defects)


def test_quoted_printable_and_base64_bodies() -> None:
    qp = raw_message(
        "From: a@x.org\nContent-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable",
        b"Gr=FC=DFe, soft=\r\n break",
    )
    assert parse(qp).plain_text == "Grüße, soft break"
    b64 = raw_message(
        'From: a@x.org\nContent-Type: text/plain; charset="utf-8"\n'
        "Content-Transfer-Encoding: Base64 ",
        b"w6nDqMOg\r\n",
    )
    assert parse(b64).plain_text == "éèà"


@pytest.mark.parametrize(
    ("declared", "body", "expected"),
    [
        ("x-unknown-charset", "naïve café".encode(), "naïve café"),
        ("x-unknown-charset", "naïve café".encode("cp1252"), "naïve café"),
        ("utf-8", "naïve café".encode("latin-1"), "naïve café"),
        ("us-ascii", "naïve café".encode(), "naïve café"),
        ("iso-8859-1", "naïve café".encode(), "naïve café"),
        ("gb2312", "naïve café".encode(), "naïve café"),
        ('"utf-8"', "naïve café".encode(), "naïve café"),
        ("base64", b"plain", "plain"),
        ("unknown-8bit", "€uro".encode("cp1252"), "€uro"),
    ],
)
def test_broken_charset_declarations(declared: str, body: bytes, expected: str) -> None:
    raw = raw_message(f"From: a@x.org\nContent-Type: text/plain; charset={declared}", body)
    assert parse(raw).plain_text == expected


def test_no_charset_8bit_body_is_sniffed() -> None:
    assert parse(raw_message("From: a@x.org", "Grüße".encode())).plain_text == "Grüße"
    assert parse(raw_message("From: a@x.org", "Grüße".encode("cp1252"))).plain_text == "Grüße"


def test_decode_text_never_raises_on_partial_garbage() -> None:
    text, note = decode_text("日本語".encode("shift_jis") + b"\x82", "shift_jis")
    assert text.startswith("日本語")
    assert note is not None


def test_multipart_alternative_prefers_plain_and_html() -> None:
    msg = simple()
    msg.set_content("Plain version")
    msg.add_alternative(
        "<p style='color: red'>HTML <b>version</b></p><script>x()</script>", subtype="html"
    )
    parsed = parse(msg)
    assert parsed.plain_text == "Plain version"
    assert "<b>version</b>" in parsed.html
    assert "color:red" in parsed.html.replace(" ", "")
    assert "script" not in parsed.html


def test_html_only_message_gets_plain_text() -> None:
    msg = simple()
    msg.set_content(
        "<html><head><style>p{}</style></head><body><p>Dear Ann,</p>"
        "<p>Your order&nbsp;#42 has <b>shipped</b>.<br>Thanks</p></body></html>",
        subtype="html",
    )
    parsed = parse(msg)
    assert parsed.plain_text == "Dear Ann,\n\nYour order #42 has shipped.\nThanks"
    assert "<b>shipped</b>" in parsed.html


def test_html_meta_charset_used_when_part_declares_none() -> None:
    html = '<html><head><meta charset="koi8-r"></head><body>Привет</body></html>'
    raw = raw_message("From: a@x.org\nContent-Type: text/html", html.encode("koi8-r"))
    assert parse(raw).plain_text == "Привет"


def test_nested_mixed_alternative_related() -> None:
    msg = simple()
    msg.set_content("Plain body")
    msg.add_alternative('<p>See <img src="cid:logo@acme"></p>', subtype="html")
    html_part = msg.get_body(preferencelist=("html",))
    assert html_part is not None
    html_part.add_related(PNG, maintype="image", subtype="png", cid="<logo@acme>")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice.pdf")
    parsed = parse(msg)
    assert parsed.plain_text == "Plain body"
    assert 'src="cid:logo@acme"' in parsed.html
    assert len(parsed.inline_images) == 1
    image = parsed.inline_images[0]
    assert image.content_id == "logo@acme"
    assert image.content_type == "image/png"
    assert image.data == PNG
    assert image.filename == "image-1.png"
    assert [(a.filename, a.content_type, a.data) for a in parsed.attachments] == [
        ("invoice.pdf", "application/pdf", PDF)
    ]


def test_inline_mailing_list_footer_is_appended_to_plain_body() -> None:
    raw = raw_message(
        'From: a@x.org\nContent-Type: multipart/mixed; boundary="b"',
        b"--b\r\nContent-Type: text/plain\r\n\r\nMain text\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\n_____\r\nList footer\r\n--b--\r\n",
    )
    assert parse(raw).plain_text == "Main text\n_____\nList footer"


def test_inline_text_with_filename_becomes_body_only_when_nothing_else() -> None:
    raw = raw_message(
        'From: a@x.org\nContent-Type: multipart/mixed; boundary="b"',
        b'--b\r\nContent-Type: text/plain\r\nContent-Disposition: inline; filename="a.txt"\r\n'
        b"\r\nfirst\r\n"
        b'--b\r\nContent-Type: text/plain\r\nContent-Disposition: inline; filename="b.txt"\r\n'
        b"\r\nsecond\r\n--b--\r\n",
    )
    parsed = parse(raw)
    assert parsed.plain_text == "first"
    assert [a.filename for a in parsed.attachments] == ["b.txt"]


def test_format_flowed_is_unwrapped() -> None:
    raw = raw_message(
        "From: a@x.org\nContent-Type: text/plain; charset=utf-8; format=flowed; delsp=no",
        b"This is a long \r\nline.\r\n> quoted soft \r\n> line\r\n-- \r\nSig",
    )
    assert parse(raw).plain_text == "This is a long line.\n> quoted soft line\n-- \nSig"


def test_broken_boundary_is_guessed() -> None:
    raw = raw_message(
        'From: a@x.org\nContent-Type: multipart/alternative; boundary="wrong"',
        b"--real\r\nContent-Type: text/plain\r\n\r\nRecovered text\r\n"
        b"--real\r\nContent-Type: text/html\r\n\r\n<p>Recovered html</p>\r\n--real--\r\n",
    )
    parsed = parse(raw)
    assert parsed.plain_text == "Recovered text"
    assert "<p>Recovered html</p>" in parsed.html
    assert parsed.attachments == ()
    assert any("boundary" in d for d in parsed.defects)


def test_multipart_without_boundary_read_as_text() -> None:
    raw = raw_message("From: a@x.org\nContent-Type: multipart/alternative;", b"Blah blah\r\n")
    assert parse(raw).plain_text == "Blah blah"


# --- attachments ------------------------------------------------------------------------------


def test_attachment_filenames_rfc2231_and_rfc2047() -> None:
    raw = raw_message(
        'From: a@x.org\nContent-Type: multipart/mixed; boundary="b"',
        b"--b\r\nContent-Type: text/plain\r\n\r\nSee attached\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment;\r\n filename*=UTF-8''Rechnung%20M%C3%A4rz.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n"
        b"--b\r\nContent-Type: application/octet-stream;\r\n"
        b' name="=?utf-8?B?5oql5ZGKLmRvY3g=?="\r\nContent-Disposition: attachment\r\n\r\nxx\r\n'
        b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment;\r\n"
        b" filename*0*=iso-8859-1''Gr%FC%DF;\r\n filename*1=e.pdf\r\n\r\nyy\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="C:\\\\Users\\\\x\\\\evil\x01.exe"\r\n'
        b"\r\nzz\r\n"
        b"--b\r\nContent-Type: APPLICATION/X-Thing\r\nContent-Disposition: attachment\r\n\r\nq\r\n"
        b"--b--\r\n",
    )
    parsed = parse(raw)
    assert parsed.plain_text == "See attached"
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("Rechnung März.pdf", "application/pdf"),
        ("报告.docx", "application/octet-stream"),
        ("Grüße.pdf", "application/pdf"),
        ("evil.exe", "application/octet-stream"),
        ("attachment-1.bin", "application/x-thing"),
    ]
    assert parsed.attachments[0].data == b"%PDF-"


def test_emailmessage_attachment_roundtrip_with_non_ascii_name() -> None:
    msg = simple()
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="Überweisung 2024.pdf")
    msg.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="data.csv")
    parsed = parse(msg)
    assert parsed.plain_text == "Hello there"
    assert [(a.filename, a.data) for a in parsed.attachments] == [
        ("Überweisung 2024.pdf", PDF),
        ("data.csv", b"a,b\n1,2\n"),
    ]


def test_text_attachment_is_not_body() -> None:
    msg = simple()
    msg.add_attachment("log line\n", subtype="plain", filename="log.txt")
    parsed = parse(msg)
    assert parsed.plain_text == "Hello there"
    assert [a.filename for a in parsed.attachments] == ["log.txt"]


def test_image_with_cid_outside_related_referenced_is_inline() -> None:
    msg = simple()
    msg.set_content('<p><img src="cid:pic1"></p>', subtype="html")
    msg.add_attachment(PNG, maintype="image", subtype="png", cid="<pic1>", disposition="inline")
    msg.add_attachment(PNG, maintype="image", subtype="gif", cid="<unused>")
    parsed = parse(msg)
    assert [i.content_id for i in parsed.inline_images] == ["pic1"]
    assert [(a.filename, a.content_id) for a in parsed.attachments] == [("image-1.gif", "unused")]


def test_forwarded_message_and_tnef_kept_as_attachments() -> None:
    inner = simple(Subject="Inner", Message_ID="<inner@x.org>")
    msg = simple()
    msg.add_attachment(inner)
    msg.add_attachment(b"\x78\x9f\x3e\x22tnef", maintype="application", subtype="ms-tnef")
    parsed = parse(msg)
    assert parsed.message_id == "m1@example.com"
    assert parsed.subject == "Hello"
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("forwarded-message.eml", "message/rfc822"),
        ("winmail.dat", "application/ms-tnef"),
    ]
    forwarded = parse(parsed.attachments[0].data)
    assert forwarded.subject == "Inner"
    assert forwarded.message_id == "inner@x.org"
    assert forwarded.plain_text == "Hello there"
    assert parsed.attachments[1].data == b"\x78\x9f\x3e\x22tnef"


def test_tnef_under_its_registered_type_is_winmail_dat() -> None:
    msg = simple()
    msg.add_attachment(b"\x78\x9f\x3e\x22tnef", maintype="application", subtype="vnd.ms-tnef")
    parsed = parse(msg)
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("winmail.dat", "application/vnd.ms-tnef")
    ]


def test_delivery_report_parts() -> None:
    raw = raw_message(
        "From: MAILER-DAEMON@x.org\nReturn-Path: <>\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"',
        b"--b\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; x.org\r\n\r\nFinal-Recipient: rfc822; gone@y.org\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: original\r\n--b--\r\n",
    )
    parsed = parse(raw)
    assert parsed.plain_text == "Delivery failed."
    assert parsed.auto_headers["return-path"] == "<>"
    assert parsed.auto_headers["content-type"].startswith("multipart/report")
    names = [a.filename for a in parsed.attachments]
    assert names == ["delivery-status.txt", "rfc822-headers.txt"]
    assert b"Final-Recipient: rfc822; gone@y.org" in parsed.attachments[0].data


def test_too_large_raises_with_sizes() -> None:
    msg = simple()
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="a.pdf")
    msg.add_attachment(PNG, maintype="image", subtype="png", filename="b.png")
    total = len(PDF) + len(PNG)
    with pytest.raises(MessageError) as caught:
        parse(msg, max_attachment_bytes=total - 1)
    assert caught.value.code == "too_large"
    assert str(caught.value) == (
        f"attachments total {total} bytes, over the limit of {total - 1} bytes"
    )
    assert len(parse(msg, max_attachment_bytes=total).attachments) == 2


def test_auto_headers_collected() -> None:
    raw = raw_message(
        """
From: a@x.org
Auto-Submitted: auto-replied
X-Auto-Response-Suppress: All
Precedence: bulk
List-Id: Team list
 <team.x.org>
X-Autoreply: yes
X-Failed-Recipients: gone@y.org
X-Unrelated: no
""",
        b"x",
    )
    parsed = parse(raw)
    assert parsed.auto_headers == {
        "auto-submitted": "auto-replied",
        "x-auto-response-suppress": "All",
        "precedence": "bulk",
        "list-id": "Team list <team.x.org>",
        "x-autoreply": "yes",
        "x-failed-recipients": "gone@y.org",
    }


# --- failures and robustness ------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r\n\r\n", b"\n"])
def test_empty_input_is_unparseable(raw: bytes) -> None:
    with pytest.raises(MessageError) as caught:
        parse_message(raw)
    assert caught.value.code == "unparseable"


def test_headers_only_and_body_only_parse() -> None:
    assert parse(b"Subject: only headers\r\n").subject == "only headers"
    body_only = parse(b"just some text without headers")
    assert body_only.plain_text == "just some text without headers"
    assert body_only.message_key.startswith("sha256:")


def test_deep_nesting_does_not_crash() -> None:
    depth = 200
    head = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(depth)
    )
    raw = b"From: a@x.org\r\n" + head + b"Content-Type: text/plain\r\n\r\ndeep\r\n"
    outcome = _outcome(raw)
    if isinstance(outcome, MessageError):
        assert outcome.code == "unparseable"
    else:
        assert "mime-too-deep" in outcome.defects


def _outcome(raw: bytes, max_attachment_bytes: int | None = None) -> ParsedMessage | MessageError:
    """The parse result, or the MessageError; any other exception fails the test."""
    try:
        return parse_message(raw, now=NOW, max_attachment_bytes=max_attachment_bytes)
    except MessageError as exc:
        return exc


def test_defects_are_stable_codes_each_listed_once() -> None:
    part = b"--b\r\nContent-Type: text/plain; charset=x-bad-%d\r\n\r\n\xff\xfe\r\n"
    parts = b"".join(part % i for i in range(50))
    raw = raw_message('From: a@x.org\nContent-Type: multipart/mixed; boundary="b"', parts)
    parsed = parse(raw)
    assert parsed.defects == ("date-missing", "charset-unknown", "boundary-unclosed")


def test_output_strings_are_encodable() -> None:
    # Surrogates from 8-bit headers must never reach the store (SQLite would refuse them).
    raw = (
        b"From: \xff\xfe <a\xe9@x.org>\r\nSubject: \x81\x8d\x8f\r\nMessage-ID: <\xe9@x>\r\n"
        b"Content-Type: text/plain; charset=\xe9\r\n"
        b"Content-Disposition: attachment; filename=\xe9.txt\r\n\r\n\xe9"
    )
    parsed = parse(raw)
    _assert_encodable(parsed)


def _assert_encodable(parsed: ParsedMessage) -> None:
    strings = [parsed.message_key, parsed.subject, parsed.plain_text, parsed.html]
    strings += [parsed.message_id or "", *parsed.in_reply_to, *parsed.references]
    strings += [a.email + a.name for a in (*parsed.to, *parsed.cc, *parsed.bcc, *parsed.reply_to)]
    if parsed.from_address:
        strings.append(parsed.from_address.email + parsed.from_address.name)
    files = (*parsed.attachments, *parsed.inline_images)
    strings += [a.filename + (a.content_id or "") for a in files]
    strings += [*parsed.auto_headers.values(), *parsed.defects, *parsed.delivered_to]
    for text in strings:
        text.encode("utf-8")


SEEDS = [
    simple().as_bytes(policy=SMTP),
    raw_message(
        "From: =?utf-8?Q?A?= <a@x.org>\nSubject: =?gb2312?B?1tDOxA==?=\n"
        'Content-Type: multipart/mixed; boundary="b"',
        b"--b\r\nContent-Type: text/html; charset=koi8-r\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\nPHA+aGk8L3A+\r\n--b\r\nContent-Type: image/png; name*=utf-8''x%C3%A9.png\r\n"
        b"Content-ID: <c@x>\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--b--\r\n",
    ),
]


MUTATION_TOKENS = [b"\r\n", b"--b", b"=?", b"?=", b"<", b";", b'"', b"\x00"]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        position = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["replace", "insert", "delete", "splice"]))
        chunk = draw(st.binary(min_size=1, max_size=12))
        if action == "replace":
            data[position : position + len(chunk)] = chunk
        elif action == "insert":
            data[position:position] = chunk
        elif action == "delete":
            del data[position : position + draw(st.integers(min_value=1, max_value=200))]
        else:
            token = draw(st.sampled_from(MUTATION_TOKENS))
            data[position:position] = token
    return bytes(data)


def _parses_or_message_error(raw: bytes) -> None:
    outcome = _outcome(raw, max_attachment_bytes=10_000_000)
    if isinstance(outcome, MessageError):
        assert outcome.code in {"unparseable", "too_large"}
    else:
        assert isinstance(outcome, ParsedMessage)
        assert outcome.date.tzinfo is not None
        _assert_encodable(outcome)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_message_error(raw: bytes) -> None:
    _parses_or_message_error(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_messages())
def test_mutated_messages_parse_or_message_error(raw: bytes) -> None:
    _parses_or_message_error(raw)


def test_header_summary_of_an_unimportable_message_is_decoded_like_an_import() -> None:
    """What `mailbridge failed` shows of a message that failed to parse: decoded like an
    imported one, so the operator reads "Überweisung" and john@customer.example."""
    raw = (
        b"From: =?utf-8?q?J=C3=BCrgen_Doe?= <JOHN@Customer.Example>\r\n"
        b"Subject: =?utf-8?b?w5xiZXJ3ZWlzdW5n?= 2026\r\n"
        b"Message-ID: <Abc.1@Customer.Example>\r\n"
        b"Date: Mon, 30 Nov 2026 10:00:00 +0100\r\n"
        b"\r\nbody\r\n"
    )
    summary = summarise_headers(raw)
    parsed = parse_message(raw)
    assert summary.subject == parsed.subject == "\u00dcberweisung 2026"
    assert summary.from_address == "john@customer.example"
    assert summary.message_id == parsed.message_id


def test_header_summary_without_headers_is_empty() -> None:
    summary = summarise_headers(b"no headers at all")
    assert (summary.message_id, summary.subject, summary.from_address) == (None, "", "")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_header_summary_never_raises(raw: bytes) -> None:
    summary = summarise_headers(raw)
    assert isinstance(summary.subject, str)
    assert isinstance(summary.from_address, str)
