"""Bounces, feedback reports and challenges (core/bounce.py).

The score runs over ../shared/corpora/bounces-flufl (flufl.bounce's own test mail: Postfix,
Exim, qmail, Exchange, Yahoo, AOL, GroupWise, RFC 3464 reports, delay warnings) with its
expected.json; the rules are checked on small messages written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.core.bounce import (
    detect_bounce,
    detect_challenge,
    detect_feedback_report,
    is_valid_address,
)

CORPORA = Path(__file__).resolve().parents[2].parent / "shared" / "corpora"
BOUNCES = CORPORA / "bounces-flufl"
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "robots"
_SKIP_REASON = f"real-world mail corpora not found at {CORPORA}"

# expected.json lists every file flufl.bounce's tests read; these two are not bounces at all
# (a person's reply, an auto-reply), the other empty-answer ones are reports whose address
# cannot be read (anonymised to "david...@gmail.com", or not given).
NOT_BOUNCES = {"groupwise_03.txt": "a person's reply", "qmail_08.txt": "an auto-reply"}


def _expected() -> list[dict[str, object]]:
    if not BOUNCES.is_dir():
        return []
    data: list[dict[str, object]] = json.loads((BOUNCES / "expected.json").read_text())
    return data


@pytest.mark.corpus
@pytest.mark.skipif(not BOUNCES.is_dir(), reason=_SKIP_REASON)
def test_bounce_corpus_score() -> None:
    """Recipients precision >= 0.98, recall >= 0.95; bounce/not-bounce right on >= 95 %;
    permanent/temporary right on >= 95 % of the bounces with recipients."""
    expected = _expected()
    assert len(expected) >= 100
    true_pos = false_pos = false_neg = classified = kind_right = kind_total = 0
    for entry in expected:
        name = str(entry["file"])
        bounce = detect_bounce((BOUNCES / name).read_bytes())
        got = {r.address for r in bounce.recipients} if bounce else set()
        want = {str(a).lower() for a in entry["failed"]}  # type: ignore[attr-defined]
        true_pos += len(got & want)
        false_pos += len(got - want)
        false_neg += len(want - got)
        classified += (bounce is not None) is (name not in NOT_BOUNCES)
        if bounce is not None and want:
            kind_total += 1
            kind_right += (not bounce.permanent) is entry["temporary"]
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / (true_pos + false_neg)
    accuracy = classified / len(expected)
    print(
        f"\nbounces-flufl: recipients precision {precision:.3f} recall {recall:.3f}; "
        f"bounce/not-bounce right {classified}/{len(expected)} ({accuracy:.1%}); "
        f"permanent/temporary right {kind_right}/{kind_total}"
    )
    assert precision >= 0.98
    assert recall >= 0.95
    assert accuracy >= 0.95
    assert kind_right >= 0.95 * kind_total


@pytest.mark.corpus
@pytest.mark.skipif(not CORPORA.is_dir(), reason=_SKIP_REASON)
@pytest.mark.parametrize("folder", ["quoted-replies", "threads-notmuch"])
def test_people_in_other_corpora_are_not_bounces(folder: str) -> None:
    """Replies and list threads: flufl.bounce alone reads "failed addresses" out of a quoted
    header in one of them (quoted-replies/standard_replies/comcast.eml)."""
    found = []
    for path in sorted((CORPORA / folder).rglob("*")):
        if not path.is_file() or path.suffix in {".json", ".py", ".md", ".html"}:
            continue
        if detect_bounce(path.read_bytes()) is not None:
            found.append(path.name)
    assert found == []


def _dsn(action: str = "failed", status: str = "5.1.1", extra: str = "") -> bytes:
    return f"""\
Return-Path: <>
From: Mail Delivery System <MAILER-DAEMON@mx.example.net>
To: support@helpdesk.example
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-1@mx.example.net>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

The mail system could not deliver your message.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Original-Recipient: rfc822; Gone@Customer.example
Final-Recipient: rfc822; gone@internal.customer.example
Action: {action}
Status: {status}
Diagnostic-Code: smtp; 550 {status} User unknown in virtual mailbox table
{extra}
--B
Content-Type: text/rfc822-headers

From: support@helpdesk.example
To: gone@customer.example
Message-ID: <reply-7@helpdesk.example>
Subject: Re: Ticket 7

--B--
""".encode()


def test_dsn_fields() -> None:
    bounce = detect_bounce(_dsn())
    assert bounce is not None
    assert bounce.kind == "dsn"
    assert bounce.original_message_id == "reply-7@helpdesk.example"
    assert bounce.reporting_mta == "mx.example.net"
    [recipient] = bounce.recipients
    assert recipient.address == "gone@customer.example"  # Original-Recipient, RFC 3464 2.3.1
    assert recipient.permanent
    assert recipient.status == "5.1.1"
    assert recipient.diagnostic is not None
    assert "User unknown" in recipient.diagnostic


def test_delayed_is_temporary_delivered_is_no_failure() -> None:
    delayed = detect_bounce(_dsn(action="delayed", status="4.4.7"))
    assert delayed is not None
    assert [r.permanent for r in delayed.recipients] == [False]
    assert not delayed.permanent
    delivered = detect_bounce(_dsn(action="delivered", status="2.0.0"))
    assert delivered is not None  # a report, but with nothing failed in it
    assert delivered.recipients == ()


def test_failed_with_a_4xx_status_is_still_final() -> None:
    bounce = detect_bounce(_dsn(status="4.4.1"))
    assert bounce is not None
    assert bounce.recipients[0].permanent


def test_exim_text_bounce_with_x_failed_recipients() -> None:
    raw = b"""\
From: Mail Delivery System <Mailer-Daemon@mx.example.net>
To: support@helpdesk.example
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: lost@customer.example
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  lost@customer.example
    host mx.customer.example [192.0.2.1]
    SMTP error from remote mail server after RCPT TO:<lost@customer.example>:
    550 5.1.1 <lost@customer.example>: Recipient address rejected

------ This is a copy of the message, including all the headers. ------

Message-ID: <reply-9@helpdesk.example>
From: support@helpdesk.example
Subject: Re: Ticket 9
"""
    bounce = detect_bounce(raw)
    assert bounce is not None
    assert bounce.kind == "non-standard"
    assert [(r.address, r.permanent, r.status) for r in bounce.recipients] == [
        ("lost@customer.example", True, "5.1.1")
    ]
    assert bounce.original_message_id == "reply-9@helpdesk.example"


def test_ndr_answering_the_original_gives_its_message_id() -> None:
    bounce = detect_bounce((SAMPLES / "o365_ndr.eml").read_bytes())
    assert bounce is not None
    assert bounce.original_message_id == "out-2@helpdesk.example"
    assert [r.status for r in bounce.recipients] == ["5.1.10"]


@pytest.mark.parametrize(
    "name",
    [
        "person_forwards_bounce.eml",
        "person_reply_undeliverable.eml",
        "person_pastes_bounce.eml",
        "person_pastes_bounce_no_name.eml",
        "person_postmaster_writes.eml",
        "person_forwards_automatic_reply.eml",
        "exchange_online_ooo.eml",
        "arf_report.eml",
        "tmda_challenge.eml",
    ],
)
def test_not_bounces(name: str) -> None:
    assert detect_bounce((SAMPLES / name).read_bytes()) is None


def test_feedback_report() -> None:
    report = detect_feedback_report((SAMPLES / "arf_report.eml").read_bytes())
    assert report is not None
    assert report.feedback_type == "abuse"
    assert report.recipients == ("angry@isp.example",)
    assert report.original_message_id == "out-3@helpdesk.example"
    assert report.user_agent == "ISP-FBL/1.0"
    assert detect_feedback_report(_dsn()) is None


def test_challenges() -> None:
    assert detect_challenge((SAMPLES / "tmda_challenge.eml").read_bytes()) == (
        "challenge-response: x-delivery-agent"
    )
    boxbe = b"From: Boxbe <notification@boxbe.com>\nSubject: Request to join my Guest List\n\nx\n"
    assert detect_challenge(boxbe) == "challenge-response: boxbe.com"
    person = b"From: ann@x.example\nSubject: Please confirm your email change\n\nhi\n"
    assert detect_challenge(person) is None


@pytest.mark.parametrize(
    ("address", "valid"),
    [
        ("ann@example.com", True),
        ("ann.b+tag@mail.example.co.uk", True),
        ("david...@gmail.com", False),
        (".ann@example.com", False),
        ("ann@localhost", False),
        ("userx@sims-ms-daemon", False),
    ],
)
def test_is_valid_address(address: str, valid: bool) -> None:
    assert is_valid_address(address) is valid


@settings(max_examples=150)
@given(st.binary(max_size=2000))
def test_never_raises_on_junk(raw: bytes) -> None:
    detect_bounce(raw)
    detect_challenge(raw)
    detect_feedback_report(raw)


@settings(max_examples=60)
@given(st.text(max_size=300))
def test_never_raises_on_junk_reports(body: str) -> None:
    raw = (
        "From: MAILER-DAEMON@x.example\nSubject: Undeliverable\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        f"--B\nContent-Type: message/delivery-status\n\n{body}\n--B--\n"
    ).encode("utf-8", "surrogateescape")
    detect_bounce(raw)


def _all_mail() -> list[Path]:
    files = sorted(SAMPLES.glob("*.eml"))
    if CORPORA.is_dir():
        for folder in ("stdlib-email", "mail-parser", "quoted-replies", "bounces-flufl"):
            files.extend(
                p
                for p in sorted((CORPORA / folder).rglob("*"))
                if p.is_file() and p.suffix not in {".json", ".py", ".md", ".html"}
            )
    return files


def test_the_cheap_pre_check_never_hides_a_report() -> None:
    """core/policy.analyse reads the MIME tree again only when might_be_report says so."""
    from mailbridge.core.bounce import might_be_report, parse_raw
    from mailbridge.core.parse import parse_message

    files = _all_mail()
    assert len(files) > 60
    skipped = 0
    for path in files:
        raw = path.read_bytes()
        view = parse_raw(raw)
        found = detect_bounce(view) or detect_feedback_report(view) or detect_challenge(view)
        if not might_be_report(parse_message(raw)):
            skipped += 1
            assert found is None, path.name
    assert skipped > 20  # and it does spare the people's mail


@pytest.mark.parametrize(
    "subject",
    [
        "Unzustellbar: Rechnung",
        "Non remis : Facture",
        "No se puede entregar: Factura",
        "Non recapitabile: Fattura",
        "Onbestelbaar: Factuur",
        "Icke levererbart: Faktura",
        "Kan ikke leveres: Faktura",
        "Ei voida toimittaa: Lasku",
        "Niedostarczalne: Faktura",
        "Não é possível entregar: Fatura",
        "配信不能: 請求書",
        "无法投递: 发票",
    ],
)
def test_localised_ndr_subjects_from_an_unnamed_gateway(subject: str) -> None:
    """Exchange's NDR subjects in its languages, from a sender that says nothing itself."""
    from email.header import Header

    raw = (
        "From: gateway@mx.customer.example\nTo: support@helpdesk.example\n"
        f"Subject: {Header(subject, 'utf-8').encode()}\nMessage-ID: <n1@mx.customer.example>\n\n"
        "Delivery has failed to these recipients or groups:\n\n"
        "gone@customer.example\nThe e-mail address you entered couldn't be found.\n"
    ).encode()
    bounce = detect_bounce(raw)
    assert bounce is not None
    assert [r.address for r in bounce.recipients] == ["gone@customer.example"]
