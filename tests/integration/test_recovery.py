"""The recovery sweep, ``sync``, ``failed`` and the cause-aware backoff against a real Dovecot.

A message fails (the attachment limit is lowered), the operator raises the limit, and the
sweep - scheduled in the daemon or run by ``mailbridge sync`` / ``failed retry`` - imports it.
The grace period is shown with INTERNALDATEs set at APPEND time, so no test waits for it.
The CLI tests read what an operator reads: the table's columns, mail text printed literally
(never as rich markup), and the progress bar, which only a terminal gets (a pseudo-terminal here).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import queue
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import yaml

from mailbridge.cli import main as cli_main
from mailbridge.cli_ops import _size
from mailbridge.config import Settings, parse_config
from mailbridge.daemon.outbox import wake_address
from mailbridge.daemon.supervisor import Supervisor, run_once
from mailbridge.daemon.sweep import retry_failed, since_date, sweep, sweep_and_record
from mailbridge.mail.imap import ImapSession
from mailbridge.store.base import RESOLVED_IMPORTED, RESOLVED_REMOVED, AccountState
from mailbridge.store.factory import open_repository, open_store
from tests.integration.test_import_loop import (
    FAILED,
    PROCESSED,
    config_data,
    db,
    eventually,
    mail,
)

pytestmark = pytest.mark.dovecot


def big_mail(subject: str, to: str) -> bytes:
    """A message over a 1 MB attachment limit and under a 5 MB one."""
    msg = mail(subject, to=to)
    msg.add_attachment(
        bytes(2 * 1024 * 1024), maintype="application", subtype="octet-stream", filename="scan.pdf"
    )
    return msg.as_bytes()


def settings_with(
    tmp_path: Path, dovecot: Any, user: Any, *, limit_mb: float = 1, **top: Any
) -> Settings:
    data = config_data(tmp_path, dovecot, user)
    data["limits"] = {"attachment_max_size_mb": limit_mb}
    data.update(top)
    return parse_config(data)


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def failure_rows(settings: Settings) -> list[dict[str, Any]]:
    with db(settings) as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM importfailure ORDER BY id")]


async def fail_one(tmp_path: Path, dovecot: Any, user: Any, subject: str = "Huge scan") -> None:
    """Deliver a too-large message and let the live loop's pass put it in Failed."""
    dovecot.append(user.login, user.password, big_mail(subject, user.address))
    results = await run_once(settings_with(tmp_path, dovecot, user, limit_mb=1))
    assert results[0].summary is not None
    assert results[0].summary.failed == 1
    assert len(dovecot.folder_uids(user.login, user.password, FAILED)) == 1


async def test_sweep_imports_a_failed_message_once_the_limit_is_raised(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    await fail_one(tmp_path, dovecot, imap_user)
    raised = settings_with(tmp_path, dovecot, imap_user, limit_mb=5)
    repo = await open_repository(raised.database)
    try:
        with structlog.testing.capture_logs() as logs:
            summary = await sweep_and_record(raised, raised.accounts[0], repo)
    finally:
        await repo.aclose()

    assert (summary.retried, summary.recovered, summary.still_failing) == (1, 1, [])
    assert dovecot.folder_uids(imap_user.login, imap_user.password, FAILED) == []
    processed = dovecot.folder_messages(imap_user.login, imap_user.password, PROCESSED)
    assert len(processed) == 1
    assert b"Huge scan" in processed[0]
    (row,) = failure_rows(raised)
    assert row["resolved"] is not None
    with db(raised) as conn:
        stored = conn.execute("SELECT subject FROM conversationmessage").fetchall()
        assert [r["subject"] for r in stored] == ["Huge scan"]
        assert conn.execute("SELECT count(*) FROM document").fetchone()[0] == 1
        state = conn.execute(
            "SELECT imported, lastsweep, sweepsummary FROM accountstate"
        ).fetchone()
        assert state["imported"] == 1
        assert state["lastsweep"]
        assert "retried 1" in state["sweepsummary"]
    done = [e for e in logs if e["event"] == "sweep_done"]
    assert done
    assert done[0]["account"] == "support"
    assert done[0]["recovered"] == 1


async def test_a_message_that_fails_again_stays_with_the_new_attempt(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    await fail_one(tmp_path, dovecot, imap_user)
    (before,) = failure_rows(settings_with(tmp_path, dovecot, imap_user))
    folder_uid = dovecot.folder_uids(imap_user.login, imap_user.password, FAILED)[0]
    assert before["folderuid"] == folder_uid

    still = settings_with(tmp_path, dovecot, imap_user, limit_mb=1.5)  # still too small
    repo = await open_repository(still.database)
    try:
        summary = await sweep(still, still.accounts[0], repo)
    finally:
        await repo.aclose()

    assert summary.retried == 1
    assert summary.recovered == 0
    assert [f.code for f in summary.still_failing] == ["too_large"]
    # Still in Failed, same UID, not moved, not marked anything new.
    assert dovecot.folder_uids(imap_user.login, imap_user.password, FAILED) == [folder_uid]
    (after,) = failure_rows(still)
    assert after["attempts"] == 2
    assert after["code"] == "too_large"
    assert "1.5" in after["reason"] or "1572864" in after["reason"] or "limit" in after["reason"]
    assert after["folderuid"] == folder_uid  # still findable by 'failed show UID'
    assert after["uid"] == before["uid"]  # the Inbox UID of the first failure is kept
    assert after["resolved"] is None


async def test_grace_period_leaves_young_inbox_mail_to_the_live_loop(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    now = datetime.now(UTC)
    login, password = imap_user.login, imap_user.password
    dovecot.append(
        login, password, mail("Old one", to=imap_user.address).as_bytes(),
        date=now - timedelta(minutes=10),
    )  # fmt: skip
    dovecot.append(
        login, password, mail("Young one", to=imap_user.address).as_bytes(),
        date=now - timedelta(seconds=30),
    )  # fmt: skip
    settings = settings_with(tmp_path, dovecot, imap_user, recovery={"grace_period_minutes": 2})
    repo = await open_repository(settings.database)
    try:
        summary = await sweep(settings, settings.accounts[0], repo, now=now)
    finally:
        await repo.aclose()

    assert summary.inbox_imported == 1
    assert summary.skipped_young == 1
    inbox = dovecot.folder_messages(login, password, "INBOX")
    assert len(inbox) == 1
    assert b"Young one" in inbox[0]
    assert len(dovecot.unseen(login, password)) == 1  # fetched with PEEK: still unseen
    assert b"Old one" in dovecot.folder_messages(login, password, PROCESSED)[0]
    with db(settings) as conn:
        subjects = [r[0] for r in conn.execute("SELECT subject FROM conversationmessage")]
    assert subjects == ["Old one"]


async def test_old_failures_are_left_to_the_operator_and_failed_retry_takes_them(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    now = datetime.now(UTC)
    login, password = imap_user.login, imap_user.password
    # Moved to Failed by hand (no importfailure row): the sweep retries whatever is there.
    dovecot.append(
        login, password, mail("Three days old", to=imap_user.address).as_bytes(),
        folder=FAILED, flags=["\\Seen"], date=now - timedelta(days=3),
    )  # fmt: skip
    dovecot.append(
        login, password, mail("Two hours old", to=imap_user.address).as_bytes(),
        folder=FAILED, flags=["\\Seen"], date=now - timedelta(hours=2),
    )  # fmt: skip
    settings = settings_with(tmp_path, dovecot, imap_user)
    account = settings.accounts[0]
    repo = await open_repository(settings.database)
    try:
        summary = await sweep(settings, account, repo, now=now)
        assert (summary.retried, summary.recovered, summary.left_old) == (1, 1, 1)
        (old_uid,) = dovecot.folder_uids(login, password, FAILED)
        assert b"Three days old" in dovecot.folder_messages(login, password, FAILED)[0]

        again = await retry_failed(settings, account, repo, [old_uid])
    finally:
        await repo.aclose()
    assert (again.retried, again.recovered) == (1, 1)
    assert dovecot.folder_uids(login, password, FAILED) == []
    assert len(dovecot.folder_uids(login, password, PROCESSED)) == 2


def test_since_date_is_a_day_before_the_utc_date() -> None:
    # The server compares SINCE in its own time zone (RFC 3501 section 6.4.4); a day early
    # covers every zone (UTC-12 .. UTC+14), the INTERNALDATE check does the rest.
    assert since_date(datetime(2026, 2, 2, 0, 30, tzinfo=UTC)) == "1-Feb-2026"
    assert since_date(datetime(2026, 2, 2, 23, 59, tzinfo=UTC)) == "1-Feb-2026"
    assert since_date(datetime(2026, 1, 1, 0, 0, tzinfo=UTC)) == "31-Dec-2025"
    assert since_date(datetime(2024, 3, 1, 12, 0, tzinfo=UTC)) == "29-Feb-2024"
    # 20:00 on 1 Feb at UTC-5 is 01:00 on 2 Feb UTC: the UTC date counts, not the local one.
    local = datetime(2026, 2, 1, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert since_date(local) == "1-Feb-2026"


async def test_sweep_searches_from_a_day_early_and_checks_the_exact_age(
    tmp_path: Path, dovecot: Any, imap_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Failed folder is searched from the day before the cut-off's UTC date; what that
    wider search returns is decided by INTERNALDATE, to the minute."""
    login, password = imap_user.login, imap_user.password
    now = datetime(2026, 2, 2, 0, 30, tzinfo=UTC)  # max_failed_age_days 1: cut-off 1 Feb 00:30
    for subject, arrived in (
        # 19:45 on 31 Jan at UTC-5: the server's own date for it may be the 31st.
        ("Within the day", datetime(2026, 1, 31, 19, 45, tzinfo=timezone(timedelta(hours=-5)))),
        ("Just too old", datetime(2026, 2, 1, 0, 15, tzinfo=UTC)),
        ("Two days old", datetime(2026, 1, 31, 0, 15, tzinfo=UTC)),
    ):
        dovecot.append(
            login, password, mail(subject, to=imap_user.address).as_bytes(),
            folder=FAILED, flags=["\\Seen"], date=arrived,
        )  # fmt: skip
    searched: list[tuple[str, ...]] = []
    real_search = ImapSession.search

    async def spy(self: ImapSession, *criteria: str) -> list[int]:
        searched.append(criteria)
        return await real_search(self, *criteria)

    monkeypatch.setattr(ImapSession, "search", spy)
    settings = settings_with(tmp_path, dovecot, imap_user, limit_mb=5)
    repo = await open_repository(settings.database)
    try:
        summary = await sweep(settings, settings.accounts[0], repo, now=now)
    finally:
        await repo.aclose()

    assert ("SINCE", "31-Jan-2026", "UNDELETED") in searched
    assert (summary.retried, summary.recovered, summary.left_old) == (1, 1, 2)
    left = b"".join(dovecot.folder_messages(login, password, FAILED))
    assert b"Just too old" in left
    assert b"Two days old" in left
    assert b"Within the day" not in left
    assert b"Within the day" in dovecot.folder_messages(login, password, PROCESSED)[0]


def _cells(out: str, text: str) -> list[str]:
    """The cells of the one table row of ``out`` that contains ``text``."""
    (line,) = [line for line in out.splitlines() if text in line]
    return [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]


def test_cli_failed_list_show_retry_and_sync(
    tmp_path: Path,
    dovecot: Any,
    imap_user: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever the CI sets: the point below is that a pipe gets no progress bar.
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    login, password = imap_user.login, imap_user.password
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"] = {"attachment_max_size_mb": 1}
    path = write_config(tmp_path, data)
    # Mail text that is also rich markup (and an emoji code): printed as is, never interpreted
    # (nor a MarkupError).
    tagged = "[external] Invoice [/b] :warning:"
    # An arrival time to find in the date column (recent enough for the sweep to retry).
    arrived = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    dovecot.append(login, password, big_mail("Huge scan", imap_user.address), date=arrived)
    dovecot.append(login, password, big_mail(tagged, imap_user.address), date=arrived)
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    uids = dovecot.folder_uids(login, password, FAILED)
    assert len(uids) == 2
    sizes = [len(raw) for raw in dovecot.folder_messages(login, password, FAILED)]
    capsys.readouterr()

    assert cli_main(["-c", str(path), "failed"]) == 0
    out = capsys.readouterr().out
    assert "2 failed message(s)" in out
    assert "UID in the account's Failed folder" in out
    header = _cells(out, "attempts")
    assert header == [
        "account", "UID", "date", "from", "subject", "size", "last reason", "attempts"
    ]  # fmt: skip
    for uid, subject, size in zip(uids, ["Huge scan", tagged], sizes, strict=True):
        row = dict(zip(header, _cells(out, subject), strict=True))
        assert row["account"] == "support"
        assert row["UID"] == str(uid)
        assert row["date"] == arrived.isoformat()  # when it arrived (INTERNALDATE), in UTC
        assert "john@customer.example" in row["from"]  # the sender of big_mail()
        assert row["subject"] == subject
        assert row["size"] == _size(size) == f"{size / 1024 / 1024:.1f} MB"
        assert row["last reason"].startswith("too_large: attachments total")
        assert row["attempts"] == "1"

    assert cli_main(["-c", str(path), "failed", "show", str(uids[1])]) == 0
    out = capsys.readouterr().out
    assert "too_large" in out
    assert f"  subject       {tagged}\n" in out  # what is stored
    assert f"  Subject: {tagged}\n" in out  # the header as the server has it
    assert "attempts      1" in out
    assert f"on the server: {sizes[1]} bytes" in out  # fetched from Dovecot

    # A sweep before the fix: both fail again, one attempt more each; no bar in a pipe.
    assert cli_main(["-c", str(path), "sync"]) == 0
    out = capsys.readouterr().out
    assert f"{tagged!r}" in out  # "still failing ... '[external] Invoice [/b]' — too_large"
    assert "support: Failed folder" not in out
    assert "support: Inbox" not in out
    assert cli_main(["-c", str(path), "failed"]) == 0
    out = capsys.readouterr().out
    assert dict(zip(header, _cells(out, tagged), strict=True))["attempts"] == "2"
    assert dict(zip(header, _cells(out, "Huge scan"), strict=True))["attempts"] == "2"
    # Retried by hand, still too large: said, and not "done" (exit 1) so a script can tell.
    assert cli_main(["-c", str(path), "failed", "retry", str(uids[0])]) == 1
    assert "still failing 1" in capsys.readouterr().out

    # The operator raises the limit: one message by UID, the rest by sync.
    data["limits"] = {"attachment_max_size_mb": 5}
    write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "failed", "retry", str(uids[0])]) == 0
    out = capsys.readouterr().out
    assert "recovered 1" in out
    assert dovecot.folder_uids(login, password, FAILED) == [uids[1]]
    # A UID that is not (or no longer) in Failed is "not found": said, and exit 1.
    assert cli_main(["-c", str(path), "failed", "retry", str(uids[0])]) == 1
    assert "1 UID(s) not in the Failed folder" in capsys.readouterr().out

    assert cli_main(["-c", str(path), "sync"]) == 0
    out = capsys.readouterr().out
    assert "support" in out
    assert "retried" in out
    assert dovecot.folder_uids(login, password, FAILED) == []
    assert cli_main(["-c", str(path), "failed"]) == 0
    assert "0 failed message" in capsys.readouterr().out
    assert cli_main(["-c", str(path), "failed", "--all"]) == 0
    out = capsys.readouterr().out
    resolved = dict(zip([*header, "resolved", "resolution"], _cells(out, tagged), strict=True))
    assert resolved["resolved"]
    assert resolved["resolution"] == RESOLVED_IMPORTED

    assert cli_main(["-c", str(path), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    row = status["accounts"][0]
    assert row["failed"] == 0
    assert row["imported"] == 2
    assert row["last_sweep"]
    assert "retried 1" in row["sweep"]
    with db(parse_config(data)) as conn:
        stored = {r[0] for r in conn.execute("SELECT subject FROM conversationmessage")}
    assert stored == {"Huge scan", tagged}


def _imap_name(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_cli_sync_resolves_failures_removed_from_the_failed_folder_by_hand(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator deletes one failed message and moves another back to the Inbox, by hand:
    the next sweep ('sync') marks their failures resolved, so 'failed' and 'status' count what
    is in the Failed folder; the one still there stays listed."""
    login, password = imap_user.login, imap_user.password
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"] = {"attachment_max_size_mb": 1}
    path = write_config(tmp_path, data)
    subjects = ("Deleted by hand", "Moved back by hand", "Still failing")
    for subject in subjects:
        dovecot.append(login, password, big_mail(subject, imap_user.address))
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    folder_uid = {row["subject"]: row["folderuid"] for row in failure_rows(parse_config(data))}
    assert sorted(folder_uid.values()) == dovecot.folder_uids(login, password, FAILED)
    capsys.readouterr()

    with dovecot.client(login, password) as conn:
        assert conn.select(_imap_name(FAILED))[0] == "OK"
        deleted = str(folder_uid["Deleted by hand"])
        assert conn.uid("STORE", deleted, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert conn.expunge()[0] == "OK"
        assert conn.uid("MOVE", str(folder_uid["Moved back by hand"]), "INBOX")[0] == "OK"
    assert dovecot.folder_uids(login, password, FAILED) == [folder_uid["Still failing"]]

    assert cli_main(["-c", str(path), "sync"]) == 0
    out = capsys.readouterr().out
    assert "support: 2 failure(s) no longer in the Failed folder" in out

    assert cli_main(["-c", str(path), "failed"]) == 0
    out = capsys.readouterr().out
    assert "1 failed message(s)" in out
    assert "Still failing" in out
    assert "by hand" not in out
    assert cli_main(["-c", str(path), "status", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["accounts"][0]
    assert row["failed"] == 1
    assert "gone from the Failed folder 2" in row["sweep"]
    rows = {r["subject"]: r for r in failure_rows(parse_config(data))}
    for subject in ("Deleted by hand", "Moved back by hand"):
        assert rows[subject]["resolved"] is not None
        assert rows[subject]["resolution"] == RESOLVED_REMOVED
    still = rows["Still failing"]
    assert (still["resolved"], still["attempts"]) == (None, 2)  # retried by the sweep, in place
    assert cli_main(["-c", str(path), "failed", "--all"]) == 0
    out = capsys.readouterr().out
    header = _cells(out, "attempts")
    assert header[-2:] == ["resolved", "resolution"]
    for subject in ("Deleted by hand", "Moved back by hand"):
        cells = dict(zip(header, _cells(out, subject), strict=True))
        assert cells["resolution"] == RESOLVED_REMOVED

    # The last one goes too: 'failed' and 'status' show none.
    with dovecot.client(login, password) as conn:
        assert conn.select(_imap_name(FAILED))[0] == "OK"
        still_uid = str(folder_uid["Still failing"])
        assert conn.uid("STORE", still_uid, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert conn.expunge()[0] == "OK"
    assert cli_main(["-c", str(path), "sync"]) == 0
    assert cli_main(["-c", str(path), "failed"]) == 0
    assert "0 failed message(s)" in capsys.readouterr().out
    assert cli_main(["-c", str(path), "status", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["accounts"][0]
    assert row["failed"] == 0
    assert "gone from the Failed folder 1" in row["sweep"]


def _uidvalidity(dovecot: Any, user: Any, folder: str) -> int:
    with dovecot.client(user.login, user.password) as conn:
        assert conn.select(_imap_name(folder), readonly=True)[0] == "OK"
        _typ, data = conn.response("UIDVALIDITY")
    return int(data[0])


async def test_a_recreated_failed_folder_resolves_nothing(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """The Failed folder is deleted and recreated (new UIDVALIDITY) with the failed message put
    back under another UID: its stored UID means nothing now, so the sweep must not take its
    absence for a removal. It forgets the UID; the retry in place records the new one."""
    login, password = imap_user.login, imap_user.password
    await fail_one(tmp_path, dovecot, imap_user)
    settings = settings_with(tmp_path, dovecot, imap_user, limit_mb=1)
    (before,) = failure_rows(settings)
    raw = dovecot.folder_messages(login, password, FAILED)[0]
    old_validity = _uidvalidity(dovecot, imap_user, FAILED)
    repo = await open_repository(settings.database)
    try:
        first = await sweep(settings, settings.accounts[0], repo)  # remembers the UIDVALIDITY
        assert (first.reconciled, len(first.still_failing)) == (0, 1)

        with dovecot.client(login, password) as conn:
            assert conn.delete(_imap_name(FAILED))[0] == "OK"
            assert conn.create(_imap_name(FAILED))[0] == "OK"
        dovecot.append(login, password, mail("Filler").as_bytes(), folder=FAILED)
        dovecot.append(login, password, raw, folder=FAILED, flags=["\\Seen"])
        with dovecot.client(login, password) as conn:
            assert conn.select(_imap_name(FAILED))[0] == "OK"
            assert conn.store("1", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
            assert conn.expunge()[0] == "OK"
        (new_uid,) = dovecot.folder_uids(login, password, FAILED)
        assert new_uid != before["folderuid"]
        assert _uidvalidity(dovecot, imap_user, FAILED) != old_validity

        with structlog.testing.capture_logs() as logs:
            summary = await sweep(settings, settings.accounts[0], repo)
    finally:
        await repo.aclose()

    assert summary.reconciled == 0
    (changed,) = [e for e in logs if e["event"] == "failed_folder_uidvalidity_changed"]
    assert (changed["previous"], changed["uids_forgotten"]) == (old_validity, 1)
    assert not [e for e in logs if e["event"] == "failures_reconciled"]
    (after,) = failure_rows(settings)
    assert after["resolved"] is None
    assert after["attempts"] == 3
    assert after["folderuid"] == new_uid  # recorded again by the retry in place
    with db(settings) as conn:
        (stored,) = conn.execute("SELECT faileduidvalidity FROM accountstate").fetchone()
    assert stored == changed["current"] != old_validity


async def test_sweep_logs_the_failures_it_reconciles(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    login, password = imap_user.login, imap_user.password
    await fail_one(tmp_path, dovecot, imap_user)
    settings = settings_with(tmp_path, dovecot, imap_user, limit_mb=1)
    with dovecot.client(login, password) as conn:
        assert conn.select(_imap_name(FAILED))[0] == "OK"
        assert conn.store("1:*", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert conn.expunge()[0] == "OK"
    repo = await open_repository(settings.database)
    try:
        with structlog.testing.capture_logs() as logs:
            summary = await sweep_and_record(settings, settings.accounts[0], repo)
    finally:
        await repo.aclose()
    assert (summary.reconciled, summary.retried) == (1, 0)
    assert "gone from the Failed folder 1" in summary.line()
    (event,) = [e for e in logs if e["event"] == "failures_reconciled"]
    assert (event["account"], event["count"], event["folder"]) == ("support", 1, FAILED)
    (done,) = [e for e in logs if e["event"] == "sweep_done"]
    assert done["reconciled"] == 1
    (row,) = failure_rows(settings)
    assert row["resolution"] == RESOLVED_REMOVED


def two_accounts(tmp_path: Path, dovecot: Any, imap_user: Any) -> tuple[dict[str, Any], Any]:
    """Config data for 'support' (imap_user) and 'sales' (a second fresh user)."""
    sales_login = f"sales-{secrets.token_hex(4)}"
    sales_password = secrets.token_urlsafe(12)
    dovecot.add_user(sales_login, sales_password)
    sales = SimpleNamespace(
        login=sales_login, password=sales_password, address=f"{sales_login}@example.test"
    )
    data = config_data(tmp_path, dovecot, imap_user)
    (second,) = config_data(tmp_path, dovecot, sales)["accounts"]
    data["accounts"].append({**second, "name": "sales"})
    return data, sales


def test_cli_failed_per_account_and_retry_all(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data, sales = two_accounts(tmp_path, dovecot, imap_user)
    data["limits"] = {"attachment_max_size_mb": 1}
    path = write_config(tmp_path, data)
    users = {"support": imap_user, "sales": sales}
    subjects = {"support": ["Support scan 1", "Support scan 2"], "sales": ["Sales scan"]}
    for name, user in users.items():
        for subject in subjects[name]:
            dovecot.append(user.login, user.password, big_mail(subject, user.address))
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    for name, user in users.items():
        assert len(dovecot.folder_uids(user.login, user.password, FAILED)) == len(subjects[name])
    capsys.readouterr()

    assert cli_main(["-c", str(path), "failed"]) == 0
    out = capsys.readouterr().out
    assert "3 failed message(s)" in out
    for name, own in subjects.items():
        # The positional form: that account's rows and no other's.
        assert cli_main(["-c", str(path), "failed", name]) == 0
        out = capsys.readouterr().out
        assert f"{len(own)} failed message(s)" in out
        for subject in own:
            assert _cells(out, subject)[0] == name
        others = [s for other, subs in subjects.items() if other != name for s in subs]
        assert not any(subject in out for subject in others)
    assert (
        cli_main(["-c", str(path), "failed", "nobody"]) == 1
    )  # the argument is wrong, not the config
    assert "no account named 'nobody'" in capsys.readouterr().err

    data["limits"] = {"attachment_max_size_mb": 5}
    write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "failed", "retry", "--all"]) == 0
    out = capsys.readouterr().out
    assert "support: retried 2, recovered 2, still failing 0" in out
    assert "sales: retried 1, recovered 1, still failing 0" in out
    for name, user in users.items():
        assert dovecot.folder_uids(user.login, user.password, FAILED) == []
        processed = dovecot.folder_messages(user.login, user.password, PROCESSED)
        assert len(processed) == len(subjects[name])
    assert cli_main(["-c", str(path), "failed"]) == 0
    assert "0 failed message(s)" in capsys.readouterr().out
    settings = parse_config(data)
    assert all(row["resolved"] for row in failure_rows(settings))
    with db(settings) as conn:
        stored = conn.execute("SELECT account, subject FROM conversationmessage").fetchall()
    assert sorted((r[0], r[1]) for r in stored) == sorted(
        (name, subject) for name, subs in subjects.items() for subject in subs
    )


_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def _run_on_a_terminal(argv: list[str], within: float = 60.0) -> tuple[int, str]:
    """Run ``argv`` with stdout on a pseudo-terminal (200x50); its exit code and what it drew.

    stderr (the log) stays a pipe: only the operator's screen is a terminal here.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"}
    }
    env["TERM"] = "xterm-256color"
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env
        )
    finally:
        os.close(slave)  # the child holds it now: EOF on master once the child exits
    chunks: list[bytes] = []
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        else:
            raise AssertionError(f"{argv} did not finish within {within}s")
        code = proc.wait(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        with contextlib.suppress(OSError):
            proc.stderr.close()
    text = b"".join(chunks).decode("utf-8", "replace")
    return code, _ANSI.sub("", text).replace("\r", "\n")


def test_cli_sync_draws_a_progress_bar_on_a_terminal(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    login, password = imap_user.login, imap_user.password
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"] = {"attachment_max_size_mb": 1}
    path = write_config(tmp_path, data)
    dovecot.append(login, password, big_mail("Huge scan", imap_user.address))
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    assert len(dovecot.folder_uids(login, password, FAILED)) == 1
    data["limits"] = {"attachment_max_size_mb": 5}
    write_config(tmp_path, data)

    code, screen = _run_on_a_terminal([sys.executable, "-m", "mailbridge", "-c", str(path), "sync"])

    assert code == 0, screen
    # The bar: one line per phase, with done/total (drawn, then cleared: transient).
    assert re.search(r"support: Failed folder\s+━+\s+1/1", screen), screen
    assert re.search(r"support: Inbox\s+━+\s+0/0", screen), screen
    # The summary table after it.
    assert "recovery sweep" in screen
    header = _cells(screen, "still failing")
    row = dict(zip(header, _cells(screen, "│ support "), strict=True))
    assert (row["retried"], row["recovered"], row["still failing"]) == ("1", "1", "0")
    assert dovecot.folder_uids(login, password, FAILED) == []
    assert len(dovecot.folder_uids(login, password, PROCESSED)) == 1


def test_cli_sync_reports_still_failing_and_why(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["limits"] = {"attachment_max_size_mb": 1}
    path = write_config(tmp_path, data)
    dovecot.append(imap_user.login, imap_user.password, big_mail("Huge scan", imap_user.address))
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    capsys.readouterr()

    assert cli_main(["-c", str(path), "sync", "support"]) == 0
    out = capsys.readouterr().out
    assert "still failing" in out
    assert "too_large" in out
    assert "Huge scan" in out
    (row,) = failure_rows(parse_config(data))
    assert row["attempts"] == 2


def test_cli_sync_exits_69_when_the_account_cannot_log_in(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"]["password"] = "wrong"
    path = write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "sync"]) == 69
    out = capsys.readouterr()
    assert "auth_failed" in out.out + out.err
    assert "auth.username" in out.out + out.err  # the remedy


def _status_row(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli_main(["-c", str(path), "status", "--json"]) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["accounts"]
    return rows[0]


@pytest.mark.parametrize("command", [["sync"], ["failed", "retry", "--all"]])
def test_a_command_that_logs_in_clears_the_error_run_once_left(
    tmp_path: Path,
    dovecot: Any,
    imap_user: Any,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    """`run --once` with a wrong password leaves auth_failed in `status`; once the password is
    fixed, a `sync` (or `failed retry`) that logged in and did its work leaves it `stopped`, as
    a successful `run --once` would, instead of asking to fix what is fixed."""
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"]["password"] = "wrong"
    path = write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "run", "--once"]) == 69
    row = _status_row(path, capsys)
    assert (row["state"], row["code"]) == ("auth_failed", "auth_failed")
    assert row["last_import"] is None  # none yet: null, as last_sweep is
    assert row["last_sweep"] is None

    # Still wrong: the command fails too and the error stays.
    assert cli_main(["-c", str(path), *command]) == 69
    assert _status_row(path, capsys)["code"] == "auth_failed"

    data["accounts"][0]["auth"]["password"] = imap_user.password
    write_config(tmp_path, data)
    # While a daemon serves the database (its wake socket answers), its state is its own.
    settings = parse_config(data)
    assert settings.sqlite_path is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
        daemon.bind(wake_address(settings.sqlite_path))
        assert cli_main(["-c", str(path), *command]) == 0
        assert _status_row(path, capsys)["code"] == "auth_failed"
    assert cli_main(["-c", str(path), *command]) == 0
    row = _status_row(path, capsys)
    assert (row["state"], row["code"], row["detail"]) == ("stopped", None, "")


def test_run_once_beside_a_daemon_leaves_the_daemons_state_in_status(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`status` shows what the daemon does: a `run --once` beside it (cron, an operator) does
    its pass without storing its own states, which end "stopped" while the daemon IDLEs on."""
    data = config_data(tmp_path, dovecot, imap_user)
    path = write_config(tmp_path, data)
    assert cli_main(["-c", str(path), "run", "--once"]) == 0
    assert _status_row(path, capsys)["state"] == "stopped"  # no daemon: its own state
    settings = parse_config(data)
    assert settings.sqlite_path is not None
    repo = open_store(settings, write=True)
    assert repo is not None
    try:
        idle = AccountState(account="support", state="idle", since=datetime.now(UTC))
        repo.set_account_state(idle)  # as the daemon stores it
    finally:
        repo.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
        daemon.bind(wake_address(settings.sqlite_path))  # a daemon serves the database
        dovecot.append(imap_user.login, imap_user.password, mail("Beside").as_bytes())
        assert cli_main(["-c", str(path), "run", "--once"]) == 0
        assert "imported 1" in capsys.readouterr().out  # the pass itself still works
    assert _status_row(path, capsys)["state"] == "idle"


async def test_daemon_runs_the_sweep_on_its_schedule(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    await fail_one(tmp_path, dovecot, imap_user)
    # croniter's sixth field is seconds: every second, so the test need not wait a minute.
    settings = settings_with(
        tmp_path, dovecot, imap_user, limit_mb=5, recovery={"schedule": "* * * * * *"}
    )
    supervisor = Supervisor(settings, drain_seconds=5)
    task = asyncio.ensure_future(supervisor.run())
    try:
        await eventually(
            lambda: dovecot.folder_uids(imap_user.login, imap_user.password, FAILED) == []
        )
        await eventually(lambda: failure_rows(settings)[0]["resolved"] is not None)
    finally:
        supervisor.request_stop()
        assert await task == 0
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 1


def _logins(dovecot: Any, login: str) -> int:
    """How many times the server let ``login`` in (its log's imap-login lines)."""
    return sum(f"Login: user=<{login}>" in line for line in dovecot.log_text().splitlines())


async def test_a_healthy_account_with_nothing_failed_is_not_swept_again(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    """With no failed import and a live loop waiting for the server's push after a pass over
    the Inbox, a scheduled sweep has nothing to recover: it lets the slot pass instead of a
    second login (a fleet's idle cost: 10,000 accounts on the default schedule logged in
    eight times a second). Once a message fails, the next slot sweeps again."""
    settings = settings_with(
        tmp_path, dovecot, imap_user, limit_mb=1, recovery={"schedule": "* * * * * *"}
    )
    supervisor = Supervisor(settings, drain_seconds=5)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.ensure_future(supervisor.run())
        try:
            await eventually(
                lambda: (
                    "support" in supervisor.running
                    and supervisor.running["support"].worker.state.state == "idle"
                ),
                what="the live loop idle",
            )
            before = _logins(dovecot, imap_user.login)
            await asyncio.sleep(3.5)  # three slots of the schedule: no event to poll for
            assert _logins(dovecot, imap_user.login) == before  # no sweep logged in
            sweeps = len([e for e in logs if e["event"] == "sweep_done"])

            # A message over the limit fails in the live loop: now there is work.
            dovecot.append(imap_user.login, imap_user.password, big_mail("Scan", imap_user.address))
            await eventually(lambda: len(failure_rows(settings)) == 1, what="the failure")
            await eventually(
                lambda: len([e for e in logs if e["event"] == "sweep_done"]) > sweeps,
                what="a sweep",
            )
        finally:
            supervisor.request_stop()
            assert await task == 0
    assert _logins(dovecot, imap_user.login) > before
    done = [e for e in logs if e["event"] == "sweep_done"][sweeps]
    assert done["retried"] == 1  # still too large: retried, and left in Failed


async def test_recovery_disabled_runs_no_sweep(
    tmp_path: Path, dovecot: Any, imap_user: Any
) -> None:
    settings = settings_with(
        tmp_path, dovecot, imap_user, recovery={"enabled": False, "schedule": "* * * * * *"}
    )
    supervisor = Supervisor(settings, drain_seconds=5)
    task = asyncio.ensure_future(supervisor.run())
    try:
        await eventually(lambda: "support" in supervisor.running)
        assert supervisor.running["support"].sweep is None
    finally:
        supervisor.request_stop()
        assert await task == 0


class _Lines:
    """The JSON log lines of a subprocess's stderr, read on a thread as they come."""

    def __init__(self, stream: Any) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.raw: list[bytes] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.raw.append(line)
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def close(self) -> None:
        """Wait for the reader to see the end of the stream (the process has exited)."""
        self._thread.join(timeout=10)

    def wait_for(self, event: str, within: float = 30.0, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event} {fields} within {within}s")
            try:
                entry = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                return entry


def start_daemon(path: Path) -> tuple[subprocess.Popen[bytes], _Lines]:
    """``mailbridge run`` with JSON logs as a child process, and its log lines as they come."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(path), "--log-format", "json", "run"],
        env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc, _Lines(proc.stderr)


def stop_daemon(proc: subprocess.Popen[bytes], lines: _Lines) -> None:
    """Kill the daemon if it still runs, and read its log to the end."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    lines.close()
    assert proc.stderr is not None
    proc.stderr.close()


def test_wrong_password_backs_off_long_and_recovers_on_sighup(
    tmp_path: Path, dovecot: Any, imap_user: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mailbridge run` with a wrong password file: auth_failed, a long backoff (no hammering),
    status says what to fix; the operator fixes the file and reloads; it imports at once."""
    secret = tmp_path / "support.pw"
    secret.write_text("not-the-password\n")
    secret.chmod(0o600)
    data = config_data(tmp_path, dovecot, imap_user)
    data["accounts"][0]["auth"] = {"username": imap_user.login, "password_file": str(secret)}
    path = write_config(tmp_path, data)
    proc, lines = start_daemon(path)
    try:
        backoff = lines.wait_for("account_backoff", code="auth_failed")
        assert backoff["retry_in_seconds"] >= 300  # an operator's problem: no hammering
        assert "password" in backoff["remedy"]

        assert cli_main(["-c", str(path), "status", "--json"]) == 0
        row = json.loads(capsys.readouterr().out)["accounts"][0]
        assert row["state"] == "auth_failed"
        assert row["code"] == "auth_failed"
        assert "SIGHUP" in row["remedy"]
        assert "refused" in row["detail"]

        # The fix: only the file's content changes, so the config is equal and no account is
        # restarted; SIGHUP must still end the backoff.
        secret.write_text(imap_user.password + "\n")
        dovecot.append(
            imap_user.login,
            imap_user.password,
            mail("After the fix", to=imap_user.address).as_bytes(),
        )
        proc.send_signal(signal.SIGHUP)
        lines.wait_for("config_reloaded", within=30)
        lines.wait_for("account_backoff_ended", within=30)
        lines.wait_for("message_imported", within=60)
        # Logged after the commit, before the MOVE: the server is polled.
        deadline = time.monotonic() + 60
        while len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) != 1:
            assert time.monotonic() < deadline, "not moved to Processed within 60 s"
            time.sleep(0.1)

        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        stop_daemon(proc, lines)
    assert proc.returncode == 0
    assert imap_user.password.encode() not in b"".join(lines.raw)
