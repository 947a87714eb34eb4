"""``mailbridge inspect FILE [--json]``, run as the program (python -m mailbridge)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.core.inspect import not_a_message

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "robots"


def _run(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MAILBRIDGE_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "mailbridge", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def _inspect_json(path: Path) -> dict[str, Any]:
    result = _run("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr.decode()
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_json_shape_of_a_bounce() -> None:
    data = _inspect_json(SAMPLES / "postfix_dsn.eml")
    assert data["automatic"] is True
    assert isinstance(data["automatic_reason"], str)
    assert data["bounce"]["recipients"] == [
        {
            "address": "gone@customer.example",
            "permanent": True,
            "status": "5.1.1",
            "diagnostic": "550 5.1.1 User unknown",
        }
    ]
    assert data["bounce"]["original_message_id"] == "out-1@helpdesk.example"
    assert data["from"]["address"] == "mailer-daemon@mx.example.net"
    assert data["message_id"] == data["message_key"]


def test_json_of_a_person_with_threading_keys() -> None:
    data = _inspect_json(SAMPLES / "person_via_ses.eml")
    assert data["automatic"] is False
    assert data["automatic_reason"] is None
    assert data["bounce"] is None
    assert data["threading"]["in_reply_to"] == ["out-9@helpdesk.example"]
    assert "out-9@helpdesk.example" in data["threading"]["candidates"]
    assert data["from"] == {
        "address": "maria.lopez@lopez-consulting.example",
        "name": "Maria Lopez",
    }


def test_json_of_an_out_of_office_reply() -> None:
    data = _inspect_json(SAMPLES / "ooo_subject_only_de.eml")
    assert data["automatic"] is True
    assert data["automatic_reason"] == "out-of-office subject (de)"
    assert data["bounce"] is None


def test_text_output_and_stdin(tmp_path: Path) -> None:
    raw = (SAMPLES / "o365_ndr.eml").read_bytes()
    result = _run("inspect", "-", stdin=raw, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert "Automatic:    yes" in text
    assert "nobody@contoso.example: permanent 5.1.10" in text
    assert "original message out-2@helpdesk.example" in text


def test_plus_keys_with_a_configured_account(tmp_path: Path) -> None:
    config = tmp_path / "mailbridge.yaml"
    config.write_text(
        f"database: {tmp_path / 'db.sqlite'}\n"
        "accounts:\n"
        "  - name: support\n"
        "    address: support@helpdesk.example\n"
        "    imap: {host: 127.0.0.1}\n"
        "    auth: {username: support, password: x}\n"
    )
    config.chmod(0o600)
    message = tmp_path / "m.eml"
    message.write_bytes(
        b"From: ann@customer.example\nTo: support+abcdefghijk23456@helpdesk.example\n"
        b"Subject: hello\nMessage-ID: <p1@customer.example>\n\nhi\n"
    )
    result = _run("-c", str(config), "inspect", str(message), "--json", "--account", "support")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["threading"]["plus_keys"] == ["abcdefghijk23456"]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, 66),
        (b"", 65),
        (b"hello world\n", 65),  # a text file: no header field
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 65),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 65),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), 65),  # an Outlook .msg
    ],
)
def test_errors(tmp_path: Path, content: bytes | None, code: int) -> None:
    path = tmp_path / "m.eml"
    if content is not None:
        path.write_bytes(content)
    result = _run("inspect", str(path))
    assert result.returncode == code
    assert str(path) in result.stderr.decode()
    if content is not None and content.startswith(b"\xd0\xcf"):
        assert "save it as .eml" in result.stderr.decode()


def _no_field_first(raw: bytes) -> bool:
    """The first line is no header field (no colon) and no continuation line or mbox
    "From " line, after which a parser would still read fields."""
    first = re.split(rb"\r|\n", raw, maxsplit=1)[0]
    return b":" not in first and not raw[:1].isspace() and not raw.startswith(b"From ")


@given(st.binary(max_size=200).filter(_no_field_first))
def test_input_without_a_header_field_is_never_a_message(raw: bytes) -> None:
    # RFC 5322 section 2.1: header fields first. A first line with no colon is no field.
    assert not_a_message(raw) is not None


@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.eml"))[:20], ids=lambda p: p.name)
def test_every_sample_message_is_a_message(sample: Path) -> None:
    assert not_a_message(sample.read_bytes()) is None


def test_disposition_under_the_default_policy() -> None:
    data = _inspect_json(SAMPLES / "exchange_online_ooo.eml")
    reason = "automatic: auto-submitted: auto-generated"
    assert data["disposition"] == {
        "new": {"action": "discard", "reason": reason},
        "reply": {"action": "import", "reason": reason},
    }
    person = _inspect_json(SAMPLES / "person_contact_form.eml")["disposition"]
    assert person["new"] == {"action": "import", "reason": None}
    bounce = _inspect_json(SAMPLES / "o365_ndr.eml")["disposition"]
    assert bounce["reply"] == {"action": "bounce", "reason": "bounce: dsn"}


def test_inspect_sees_what_the_import_sees() -> None:
    """A challenge and an ARF report are automatic even without an RFC 3834 header; the ARF
    report is a feedback report, not a bounce."""
    challenge = _inspect_json(SAMPLES / "tmda_challenge.eml")
    assert challenge["automatic"] is True
    assert challenge["challenge"] == "challenge-response: x-delivery-agent"
    arf = _inspect_json(SAMPLES / "arf_report.eml")
    assert arf["automatic"] is True
    assert arf["bounce"] is None
    assert arf["feedback_report"]["recipients"] == ["angry@isp.example"]
    assert arf["disposition"]["new"]["action"] == "bounce"


def test_account_policy_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "mailbridge.yaml"
    config.write_text(
        f"database: {tmp_path / 'db.sqlite'}\n"
        "automatic_emails: import\n"
        "accounts:\n"
        "  - name: support\n"
        "    address: support@helpdesk.example\n"
        "    imap: {host: 127.0.0.1}\n"
        "    auth: {username: support, password: x}\n"
    )
    config.chmod(0o600)
    sample = str(SAMPLES / "gmail_vacation.eml")
    result = _run("-c", str(config), "inspect", sample, "--json", "--account", "support")
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout)["disposition"]["new"]["action"] == "import"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`mailbridge inspect --json FILE | head -1`: no traceback, the SIGPIPE exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "inspect", "--json", str(SAMPLES / "o365_ndr.eml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err
