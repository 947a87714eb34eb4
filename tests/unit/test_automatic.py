"""Automatic-mail verdicts (core/automatic.py): rules, and a score over committed samples.

tests/data/robots/ holds messages written for these tests (invented addresses, headers as the
named systems write them): auto-replies from Exchange, Gmail, Zimbra, vacation(1), Dovecot's
sieve vacation, Lotus Notes; out-of-office replies without any standard header in 14 languages;
list mail (Mailman, Google Groups, Sympa); ESP notifications; reports and challenges; and
people's mail that *looks* automatic. expected.json gives each one's verdict.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.automatic import (
    AutomaticVerdict,
    detect_automatic,
    is_no_reply_address,
    out_of_office_language,
)
from mailbridge.core.model import ParsedMessage
from mailbridge.core.parse import parse_message
from tests.unit.factories import addr, message

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "robots"
EXPECTED: dict[str, dict[str, object]] = json.loads((SAMPLES / "expected.json").read_text())


def _with(headers: dict[str, str], **changes: object) -> ParsedMessage:
    return replace(message(), auto_headers=headers, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_verdict(name: str) -> None:
    verdict = detect_automatic(parse_message((SAMPLES / name).read_bytes()))
    assert verdict.automatic is EXPECTED[name]["automatic"], (name, verdict)
    assert (verdict.reason is not None) is verdict.automatic


def test_sample_score() -> None:
    """The issue's goals: >= 90 % of robots recognised, no person taken for a robot."""
    robots = people = robots_found = people_as_robots = 0
    for name, expected in EXPECTED.items():
        verdict = detect_automatic(parse_message((SAMPLES / name).read_bytes()))
        if expected["automatic"]:
            robots += 1
            robots_found += verdict.automatic
        else:
            people += 1
            people_as_robots += verdict.automatic
    recall = robots_found / robots
    print(
        f"\nautomatic mail: {robots_found}/{robots} robots recognised ({recall:.1%}), "
        f"{people_as_robots}/{people} people taken for robots"
    )
    assert robots >= 30
    assert people >= 15
    assert recall >= 0.90
    assert people_as_robots == 0


def test_samples_cover_every_out_of_office_language() -> None:
    languages = {n.removeprefix("ooo_subject_only_").removesuffix(".eml") for n in EXPECTED}
    assert {"en", "de", "fr", "es", "it", "nl", "sv", "da", "no", "fi", "pl", "pt", "ja", "zh"} <= (
        languages
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("auto-replied", "auto-submitted: auto-replied"),
        ("auto-generated", "auto-submitted: auto-generated"),
        ("Auto-Replied (vacation)", "auto-submitted: auto-replied"),
        ("auto-notified; owner-email=x@y", "auto-submitted: auto-notified"),
    ],
)
def test_auto_submitted_anything_but_no(value: str, reason: str) -> None:
    assert detect_automatic(_with({"auto-submitted": value})) == AutomaticVerdict(True, reason)


def test_auto_submitted_no_outweighs_heuristics_but_not_list_headers() -> None:
    person = _with(
        {"auto-submitted": "no", "x-auto-response-suppress": "All"},
        subject="Automatic reply: still on",
    )
    assert not detect_automatic(person).automatic
    listed = _with({"auto-submitted": "no", "list-id": "<dev.lists.example>"})
    assert detect_automatic(listed) == AutomaticVerdict(True, "list-id")


@pytest.mark.parametrize("value", ["bulk", "junk", "list", "auto_reply", "Bulk"])
def test_precedence(value: str) -> None:
    assert detect_automatic(_with({"precedence": value})).reason == f"precedence: {value.lower()}"


def test_precedence_normal_is_nothing() -> None:
    assert not detect_automatic(_with({"precedence": "normal"})).automatic


@pytest.mark.parametrize("return_path", ["<>", " <> ", "<MAILER-DAEMON@mx.example>"])
def test_null_or_daemon_return_path(return_path: str) -> None:
    assert detect_automatic(_with({"return-path": return_path})).automatic


def test_x_auto_response_suppress_alone_is_a_person() -> None:
    """Outlook puts it on people's meeting requests and ordinary mail."""
    assert not detect_automatic(_with({"x-auto-response-suppress": "All"})).automatic


def test_esp_marker_alone_is_a_person_two_weak_signals_are_a_robot() -> None:
    assert not detect_automatic(_with({"feedback-id": "1:ses"})).automatic
    alert = _with({"feedback-id": "1:ses"}, from_address=addr("alerts@status.example"))
    assert detect_automatic(alert).automatic


def test_list_unsubscribe_on_a_reply_is_a_person() -> None:
    headers = {"list-unsubscribe": "<mailto:u@x.example>"}
    assert detect_automatic(_with(headers)).automatic
    assert not detect_automatic(_with(headers, in_reply_to=("out-1@helpdesk.example",))).automatic


def test_no_reply_sender_with_a_human_reply_to_is_the_visitor() -> None:
    form = _with({}, from_address=addr("no-reply@shop.example"))
    assert detect_automatic(form) == AutomaticVerdict(True, "no-reply sender")
    visitor = replace(form, reply_to=(addr("jane@mail.example"),))
    assert not detect_automatic(visitor).automatic
    robot_reply_to = replace(form, reply_to=(addr("noreply-replies@shop.example"),))
    assert detect_automatic(robot_reply_to).automatic


@pytest.mark.parametrize(
    "email",
    [
        "noreply@x.example",
        "no-reply@x.example",
        "do-not-reply@x.example",
        "DoNotReply@x.example",
        "no_reply@x.example",
        "noreply-billing@x.example",
        "forms-noreply@x.example",
        "bounces+123@x.example",
        "ne-pas-repondre@x.example",
    ],
)
def test_no_reply_addresses(email: str) -> None:
    assert is_no_reply_address(email)


@pytest.mark.parametrize("email", ["nora.reply@x.example", "reply@x.example", "info@x.example"])
def test_not_no_reply_addresses(email: str) -> None:
    assert not is_no_reply_address(email)


@pytest.mark.parametrize(
    ("subject", "language"),
    [
        ("Automatic reply: Order 1", "en"),
        ("Out of Office AutoReply: x", "en"),
        ("[Auto-Reply] your message", "en"),
        ("AUTO: Ann is out of the office (returning 1/12)", "en"),
        ("AUTO: Re: Order 7", "en"),
        ("Auto: Ola is away until Monday", "en"),
        ("Out of office", "en"),
        ("Abwesenheitsnotiz: Rechnung", "de"),
        ("Automatische Antwort: Rechnung", "de"),
        ("Réponse automatique : Facture", "fr"),
        ("Absent du bureau : Facture", "fr"),
        ("Respuesta automática: Factura", "es"),
        ("Risposta automatica: Fattura", "it"),
        ("Automatisch antwoord: Factuur", "nl"),
        ("Automatiskt svar: Faktura", "sv"),
        ("Automatisk svar: Faktura", "da"),
        ("Fraværsmelding: Faktura", "no"),
        ("Automaattinen vastaus: Lasku", "fi"),
        ("Odpowiedź automatyczna: Faktura", "pl"),
        ("Resposta automática: Fatura", "pt"),
        ("自動応答: 請求書", "ja"),
        ("【不在】ご連絡", "ja"),
        ("自动回复: 发票", "zh"),
        ("自動回覆：發票", "zh"),
    ],
)
def test_out_of_office_subjects(subject: str, language: str) -> None:
    assert out_of_office_language(subject) == language


@pytest.mark.parametrize(
    "subject",
    [
        "Re: Automatic reply: Order 1",
        "Fwd: Out of Office: x",
        "AW: Abwesenheitsnotiz: Rechnung",
        "Out of office next week, ship Monday?",
        "Holiday booking",
        "Vacation request",
        "Auto parts arrived broken",
        "Auto: Kratzer nach der Reparatur",
        "auto: windshield cracked",
        "Abwesenheit vom 1.-5.12.",
        "休暇中の注文について",
        "外出期间的订单",
        "My automatic reply settings",
        "",
    ],
)
def test_not_out_of_office_subjects(subject: str) -> None:
    assert out_of_office_language(subject) is None


@given(
    subject=st.text(max_size=80),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "auto-submitted",
                "precedence",
                "list-id",
                "return-path",
                "content-type",
                "x-auto-response-suppress",
                "feedback-id",
                "content-class",
            ]
        ),
        st.text(max_size=40),
    ),
)
def test_never_raises_and_reason_matches_verdict(subject: str, headers: dict[str, str]) -> None:
    verdict = detect_automatic(_with(headers, subject=subject))
    assert (verdict.reason is not None) is verdict.automatic


@given(
    st.sampled_from(["Re: ", "RE: ", "Fwd: ", "AW: ", "SV: ", "TR: ", "WG: "]), st.text(max_size=40)
)
def test_a_reply_or_forward_prefix_is_never_an_out_of_office_subject(
    prefix: str, rest: str
) -> None:
    assert out_of_office_language(prefix + "Automatic reply: " + rest) is None
