"""Every field-reports case through a real Dovecot: APPEND, one ``run --once``, the database.

``../shared/corpora/field-reports/README.md`` gives, for each case, what a careful user expects
after one pass; each test below APPENDs the case's files (``-a``, ``-b``, ... in that order) to a
fresh user's Inbox, runs one import, and asserts those values from the database as an
integrator reads them. The mailbox of the corpus is ``support@example.com``: it is configured as
an alias of the test account, so mail "to the mailbox" reaches the account's own identity.
"""

from __future__ import annotations

from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final

import pytest
from structlog.testing import capture_logs

from mailbridge.cli import main as cli_main
from mailbridge.config import Settings, parse_config
from tests.integration.test_conversation_model import deliver, import_all, rows
from tests.integration.test_import_loop import FAILED, PROCESSED, config_data, write_config

pytestmark = pytest.mark.dovecot

FIELD_REPORTS: Final = (
    Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "field-reports"
)
MAILBOX: Final = "support@example.com"


def case_files(case: str) -> list[Path]:
    """The case's .eml files in APPEND order: ``NN-name.eml`` or ``NN-name-a.eml``, ``-b`` ..."""
    found = sorted(FIELD_REPORTS.glob(f"{case}*.eml"))
    assert found, f"no files for field report {case} in {FIELD_REPORTS}"
    return found


def corpus_settings(
    tmp_path: Path, dovecot: Any, user: Any, top: dict[str, Any] | None = None
) -> Settings:
    data = config_data(tmp_path, dovecot, user, aliases=[MAILBOX])
    data["limits"] = {"attachment_max_size_mb": 25}
    data.update(top or {})
    return parse_config(data)


async def import_case(
    tmp_path: Path, dovecot: Any, user: Any, case: str, top: dict[str, Any] | None = None
) -> Settings:
    """APPEND the case's files in order, run one pass, check nothing failed or stayed."""
    settings = corpus_settings(tmp_path, dovecot, user, top)
    deliver(dovecot, user, *(path.read_bytes() for path in case_files(case)))
    await import_all(settings)
    assert rows(settings, "SELECT code, reason FROM importfailure") == []
    assert dovecot.folder_uids(user.login, user.password, FAILED) == []
    assert dovecot.folder_uids(user.login, user.password, "INBOX") == []
    return settings


def one(settings: Settings, query: str, *params: object) -> tuple[Any, ...]:
    [row] = rows(settings, query, *params)
    return row


async def test_01_rfc2231_filenames(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "01-rfc2231-filenames")
    names = [name for (name,) in rows(settings, "SELECT filename FROM document ORDER BY id")]
    assert names == [
        "Übersicht.txt",
        "Lösung.txt",
        "Angebot Nr 42 (P 4) final.pdf.pgp",
        "☃.txt",
        "été.pdf",
    ]


async def test_03_iso_2022_jp_bodies(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "03-iso-2022-jp-bodies")
    subject, plaintext = one(settings, "SELECT subject, plaintext FROM conversationmessage")
    assert subject == "見積もりのお願い"
    assert "納品書を添付いたします。ご確認ください。佐藤" in plaintext
    assert "項目①と項目②を確認しました。" in plaintext
    assert "\x1b" not in plaintext
    assert "\ufffd" not in plaintext


async def test_04_reused_message_id(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    message_id = "q8XvT2pLm0NwYr4Kd7@mailer.parcels.example"
    # A parcel tracker's notifications are automatic mail (a no-reply sender): an operator who
    # wants them as conversations allow-lists the sender (issue 13's default would discard them).
    allow = {"bots": {"allow": ["parcels.example"]}}
    with capture_logs() as logs:
        settings = await import_case(tmp_path, dovecot, imap_user, "04-reused-message-id", allow)
    stored = rows(
        settings,
        "SELECT messageid, messagekey, subject, date, conversation FROM conversationmessage"
        " ORDER BY date",
    )
    # Both different messages are stored, each in its own conversation.
    assert [(mid, subject, date) for mid, _key, subject, date, _c in stored] == [
        (message_id, "Your parcel 1111 is on its way", "2025-06-25T06:00:00Z"),
        (message_id, "Your parcel 2222 was delivered", "2025-07-03T14:30:00Z"),
    ]
    first_key, second_key = stored[0][1], stored[1][1]
    assert first_key == message_id  # the first keeps the bare Message-ID
    assert second_key.startswith(f"{message_id}#")
    assert stored[0][4] != stored[1][4]
    [warning] = [e for e in logs if e["event"] == "message_id_reused"]
    assert warning["log_level"] == "warning"
    assert (warning["message_key"], warning["stored_message_key"]) == (second_key, first_key)

    path = write_config(tmp_path, config_data(tmp_path, dovecot, imap_user, aliases=[MAILBOX]))
    assert cli_main(["-c", str(path), "conversation", "show", str(stored[1][4])]) == 0
    out = capsys.readouterr().out
    assert f"Message-ID: {message_id}\n" in out
    assert f"Message key: {second_key}\n" in out

    # The same message fetched again (a crash before the move) and re-delivered through
    # another relay to an alias (other transport headers): still stored once.
    first = case_files("04-reused-message-id")[0].read_bytes()
    redelivered = (
        b"Return-Path: <bounce-77@parcels.example>\r\nDelivered-To: help@example.com\r\n"
        b"Received: from mx2.example.com by imap with LMTP; Wed, 25 Jun 2025 08:00:09 +0200\r\n"
        + first
    )
    deliver(dovecot, imap_user, first, redelivered)
    await import_all(settings)
    assert len(rows(settings, "SELECT id FROM conversationmessage")) == 2
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == []
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 4


async def test_06_three_digit_year(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "06-three-digit-year")
    dates = rows(settings, "SELECT subject, date FROM conversationmessage ORDER BY subject")
    assert dates == [
        ("Old archive mail 1", "2001-09-18T10:15:00Z"),
        ("Old archive mail 2", "2000-03-03T16:20:05Z"),
    ]


async def test_10_unreferenced_cid_image(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "10-unreferenced-cid-image")
    assert rows(settings, "SELECT filename, contenttype FROM document") == [
        ("damaged-part.jpg", "image/jpeg")
    ]
    assert rows(settings, "SELECT id FROM embeddedfile") == []


async def test_19_base64_padded_chunks(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "19-base64-padded-chunks")
    (plaintext,) = one(settings, "SELECT plaintext FROM conversationmessage")
    lines = plaintext.strip("\n").splitlines()
    assert len(lines) == 5
    assert "Logwatch 7.8" in lines[0]
    assert "sshd End" in lines[4]
    # The whole archive: both chunks. (The corpus README says 40 bytes; the two base64 chunks
    # decode to 10 + 26 = 36, which is what is checked, byte for byte.)
    archive = b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"second part of the archive"
    assert rows(settings, "SELECT filename, size, document FROM document") == [
        ("archive.zip", len(archive), archive)
    ]


async def test_20_contact_form_reply_to(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "20-contact-form-reply-to")
    levels = rows(
        settings,
        "SELECT m.messageid, f.email, f.name, mf.participationlevel FROM messagefollower AS mf"
        " JOIN follower AS f ON f.id = mf.follower"
        " JOIN conversationmessage AS m ON m.id = mf.conversationmessage ORDER BY mf.id",
    )
    # (a) From = To = the mailbox: stored as the customer's incoming, unread message, and the
    # customer (only in Reply-To) is its follower.
    direction, conversation = one(
        settings,
        "SELECT direction, conversation FROM conversationmessage WHERE messageid = ?",
        "form-20a@www.example.com",
    )
    assert direction == "incoming"
    assert one(settings, "SELECT earliestunread FROM conversation WHERE id = ?", conversation)[0]
    assert ("form-20a@www.example.com", "rita.client@mail.example", "Rita Client", "replyto") in (
        levels
    )
    assert [row for row in levels if row[0] == "form-20a@www.example.com"] == [
        ("form-20a@www.example.com", "rita.client@mail.example", "Rita Client", "replyto")
    ]
    # (b) From www-data@: the customer in Reply-To is a follower too.
    assert ("form-20b@web.example", "hannah@customer.example", "", "replyto") in levels
    assert ("form-20b@web.example", "www-data@web.example", "", "from") in levels

    path = write_config(tmp_path, config_data(tmp_path, dovecot, imap_user, aliases=[MAILBOX]))
    assert cli_main(["-c", str(path), "conversation", "show", str(conversation)]) == 0
    assert "followers: Rita Client <rita.client@mail.example>" in capsys.readouterr().out


async def test_22_references_bare_and_bracketed(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = await import_case(tmp_path, dovecot, imap_user, "22-references-bare-and-bracketed")
    conversations = rows(
        settings, "SELECT messageid, conversation FROM conversationmessage ORDER BY date"
    )
    assert [mid for mid, _c in conversations] == [
        "root-22@customer.example",
        "reply-22@customer.example",
    ]
    assert conversations[0][1] == conversations[1][1]


def test_every_case_has_a_test() -> None:
    cases = {path.name.split("-")[0] for path in FIELD_REPORTS.glob("*.eml")}
    tested = {
        name.split("_")[1] for name in globals() if name.startswith("test_") and name[5].isdigit()
    }
    assert cases == tested


# -- defects: stored on the message, logged once, shown ---------------------------------------


async def test_defects_are_stored_logged_after_the_commit_and_shown(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = corpus_settings(tmp_path, dovecot, imap_user)
    # No Date header (the parser uses the arrival time and notes date-missing).
    undated = (
        b"From: Ann <ann@customer.example>\r\nTo: support@example.com\r\n"
        b"Subject: No date on this one\r\nMessage-ID: <undated@customer.example>\r\n\r\nHello\r\n"
    )
    deliver(dovecot, imap_user, undated)
    with capture_logs() as logs:
        await import_all(settings)
    row_id, key, defects, conversation = one(
        settings, "SELECT id, messagekey, defects, conversation FROM conversationmessage"
    )
    assert key == "undated@customer.example"
    assert defects is not None
    assert defects == "date-missing"
    [line] = [e for e in logs if e["event"] == "message_defects"]
    assert line["log_level"] == "info"
    assert line["message_key"] == key
    assert line["uid"] == 1
    assert line["defects"] == defects.split("\n")
    # Logged after the commit: the same run logged the import before it.
    events = [e["event"] for e in logs]
    assert events.index("message_imported") < events.index("message_defects")

    path = write_config(tmp_path, config_data(tmp_path, dovecot, imap_user, aliases=[MAILBOX]))
    assert cli_main(["-c", str(path), "conversation", "show", str(conversation)]) == 0
    out = capsys.readouterr().out
    assert "  defect: date-missing" in out
    assert f"#{row_id}" in out


def test_failed_show_lists_what_the_parser_notes(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)  # attachments up to 1 MB
    path = write_config(tmp_path, data)
    big = EmailMessage()
    big["From"] = "Ann <ann@customer.example>"
    big["To"] = imap_user.address
    big["Subject"] = "Scans, undated"
    big["Message-ID"] = "<big-undated@customer.example>"
    big.set_content("Scans attached.")
    big.add_attachment(b"\0" * 1_200_000, maintype="application", subtype="octet-stream")
    deliver(dovecot, imap_user, big.as_bytes())
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    [uid] = dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)
    capsys.readouterr()
    assert cli_main(["-c", str(path), "failed", "show", str(uid)]) == 0
    out = capsys.readouterr().out
    assert "too_large" in out
    assert "  defect: date-missing" in out


def test_failed_show_does_not_parse_a_message_it_did_not_download(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message over limits.message_max_size_mb is never downloaded, in `failed show` either;
    its header fields alone would read as a multipart without its boundaries (made-up
    defects), so it is not parsed."""
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"] = {"message_max_size_mb": 1, "attachment_max_size_mb": 5}
    path = write_config(tmp_path, data)
    big = EmailMessage()
    big["From"] = "Ann <ann@customer.example>"
    big["To"] = imap_user.address
    big["Subject"] = "Scans"
    big["Date"] = "Mon, 30 Nov 2026 11:00:00 +0000"
    big["Message-ID"] = "<big-scans@customer.example>"
    big.set_content("Scans attached.")
    big.add_attachment(b"\0" * 1_500_000, maintype="application", subtype="octet-stream")
    deliver(dovecot, imap_user, big.as_bytes())
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    [uid] = dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)
    capsys.readouterr()
    assert cli_main(["-c", str(path), "failed", "show", str(uid)]) == 0
    out = capsys.readouterr().out
    assert "too_large" in out
    assert "Subject: Scans" in out
    assert "defect:" not in out
    assert "not downloaded" in out


def test_reused_id_failures_are_one_row_each_and_kept_by_other_imports(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 follow-up: two different notices under one Message-ID that both fail (too
    large) are two failures, each tracing its message in Failed; importing a third notice
    under that id resolves neither (it was one row, resolved by any import of the id)."""
    # 1 MB limit; parcel notices are automatic mail, allow-listed as an operator would.
    data = config_data(tmp_path, dovecot, imap_user)
    data["bots"] = {"allow": ["parcels.example"]}
    path = write_config(tmp_path, data)

    def notice(number: int, attachment: int) -> bytes:
        mail = EmailMessage()
        mail["From"] = "Parcel Notifications <noreply@parcels.example>"
        mail["To"] = imap_user.address
        mail["Subject"] = f"Your parcel {number} is on its way"
        mail["Date"] = f"Wed, 25 Jun 2025 08:0{number}:00 +0200"
        mail["Message-ID"] = "<q8XvT2pLm0NwYr4Kd7@mailer.parcels.example>"
        mail.set_content(f"Parcel {number} has left our depot.")
        if attachment:
            mail.add_attachment(b"\0" * attachment, maintype="application", subtype="pdf")
        return mail.as_bytes()

    deliver(dovecot, imap_user, notice(1, 1_200_000), notice(2, 1_300_000))
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    failed_uids = dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)
    assert len(failed_uids) == 2
    settings = parse_config(data)
    query = "SELECT folderuid, subject FROM importfailure WHERE resolved IS NULL ORDER BY id"
    assert rows(settings, query) == [
        (failed_uids[0], "Your parcel 1 is on its way"),
        (failed_uids[1], "Your parcel 2 is on its way"),
    ]

    deliver(dovecot, imap_user, notice(3, 0))
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    assert rows(settings, "SELECT subject FROM conversationmessage") == [
        ("Your parcel 3 is on its way",)
    ]
    assert len(rows(settings, query)) == 2
    capsys.readouterr()
    assert cli_main(["-c", str(path), "failed", "show", str(failed_uids[1])]) == 0
    assert "Your parcel 2 is on its way" in capsys.readouterr().out
