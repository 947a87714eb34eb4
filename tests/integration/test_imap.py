"""mailbridge.mail.imap against a real Dovecot: login, folders, fetch, move, IDLE, TLS, failures.

The MOVE-less fallback (UID COPY + STORE \\Deleted + UID EXPUNGE) is forced by removing MOVE
from ``session.capabilities``, which is what :meth:`ImapSession.move` consults; Dovecot itself
still supports MOVE, so the test proves our fallback path, not the server's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import trustme
from structlog.testing import capture_logs

from mailbridge.errors import AuthError, FolderError, ServerError
from mailbridge.mail.imap import (
    ImapSession,
    decode_mailbox,
    encode_mailbox,
    parse_uid_set,
    uid_set,
)
from mailbridge.testing.dovecot import Dovecot, free_port
from tests.conftest import ImapUser

pytestmark = pytest.mark.dovecot

PROCESSED = "Mailbridge Processed"


def message(n: int) -> bytes:
    # CRLF line ends: what IMAP stores and returns byte for byte.
    return (
        f"From: sender{n}@example.org\r\nTo: shared@example.test\r\n"
        f"Subject: message {n}\r\nMessage-ID: <m{n}@example.org>\r\n\r\n"
        f"Body of message {n}.\r\n(parentheses) {{42}} and a line\r\n"
    ).encode()


async def open_session(dovecot: Dovecot, user: ImapUser, **kwargs: object) -> ImapSession:
    account = dovecot.account(user.login, user.password, **kwargs)  # type: ignore[arg-type]
    return await ImapSession.open(account)


# -- pure helpers ------------------------------------------------------------------------------


def test_uid_set_is_compact_and_round_trips() -> None:
    assert uid_set([7, 1, 2, 3, 5, 8]) == "1:3,5,7:8"
    assert parse_uid_set("1:3,5,8:7") == [1, 2, 3, 5, 7, 8]


def test_modified_utf7_round_trip() -> None:
    for name in ("INBOX", "Entwürfe", "A & B", "日本語", "Mailbridge Processed"):
        assert decode_mailbox(encode_mailbox(name)) == name
    assert encode_mailbox("Entwürfe") == "Entw&APw-rfe"


# -- login -------------------------------------------------------------------------------------


async def test_connect_and_login_plain(dovecot: Dovecot, imap_user: ImapUser) -> None:
    with capture_logs() as logs:
        session = await open_session(dovecot, imap_user)
    try:
        assert {"IDLE", "MOVE", "UIDPLUS", "IMAP4REV1"} <= session.capabilities
        assert session.has_idle
        assert session.has_move
        assert session.has_uidplus
        assert await session.select("INBOX") == 0
        await session.noop()
    finally:
        await session.close()
    connected = [e for e in logs if e["event"] == "imap_connected"]
    assert connected
    assert connected[0]["port"] == dovecot.port
    assert imap_user.password not in repr(logs)


async def test_wrong_password_is_auth_failed(dovecot: Dovecot, imap_user: ImapUser) -> None:
    account = dovecot.account(imap_user.login, "not-the-password")
    with pytest.raises(AuthError) as caught:
        await ImapSession.open(account)
    # How fast is the benchmark's business: a timing bound here fails on a loaded machine.
    assert caught.value.code == "auth_failed"
    assert not caught.value.transient
    assert "not-the-password" not in str(caught.value)


async def test_secret_argument_overrides_configured_password(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    account = dovecot.account(imap_user.login, "stale-password")
    session = await ImapSession.open(account, secret=imap_user.password)
    await session.close()


async def test_unreachable_port(dovecot: Dovecot, imap_user: ImapUser) -> None:
    account = dovecot.account(imap_user.login, imap_user.password).model_copy(
        update={
            "imap": dovecot.account(imap_user.login, imap_user.password).imap.model_copy(
                update={"port": free_port()}
            )
        }
    )
    with pytest.raises(ServerError) as caught:
        await ImapSession.open(account)
    assert caught.value.code == "unreachable"
    assert caught.value.transient


# -- folders -----------------------------------------------------------------------------------


async def test_ensure_folders_creates_names_with_spaces(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        await session.ensure_folders(["INBOX", PROCESSED, "Mailbridge Failed", "Entwürfe"])
        await session.ensure_folders([PROCESSED])  # idempotent
        assert await session.select(PROCESSED) == 0
    finally:
        await session.close()
    folders = dovecot.folders(imap_user.login, imap_user.password)
    assert {"INBOX", PROCESSED, "Mailbridge Failed", encode_mailbox("Entwürfe")} <= set(folders)


async def test_select_missing_folder_is_folder_error(dovecot: Dovecot, imap_user: ImapUser) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        with pytest.raises(FolderError) as caught:
            await session.select("No Such Folder")
        assert caught.value.code == "folder_unavailable"
        assert await session.select("INBOX") == 0  # the session is still usable
    finally:
        await session.close()


# -- fetch and search --------------------------------------------------------------------------


async def test_fetch_returns_exact_bytes_without_setting_seen(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    raws = [message(n) for n in range(1, 4)]
    dovecot.append_many(imap_user.login, imap_user.password, raws)
    dovecot.append(imap_user.login, imap_user.password, message(4), flags=["\\Seen"])
    session = await open_session(dovecot, imap_user)
    try:
        assert await session.select("INBOX") == 4
        # The Inbox is the queue: read mail is in it too.
        assert await session.undeleted_uids() == [1, 2, 3, 4]
        assert await session.search("UNSEEN") == [1, 2, 3]
        assert await session.search("BEFORE", "01-Jan-2000") == []
        fetched = await session.fetch([3, 1, 2, 99])  # 99 never existed: skipped
    finally:
        await session.close()
    assert [m.uid for m in fetched] == [1, 2, 3]
    assert [m.raw for m in fetched] == raws
    assert all(m.internaldate is not None and m.internaldate.tzinfo for m in fetched)
    assert all("\\Seen" not in m.flags for m in fetched)
    assert dovecot.unseen(imap_user.login, imap_user.password) == [1, 2, 3]


async def test_fetch_many_small_messages_in_one_command(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    # aioimaplib recurses once per response line within a read; ~1,000 tiny messages in one
    # response used to exceed the recursion limit and drop the connection.
    raws = [b"Subject: %d\r\n\r\nx\r\n" % n for n in range(1000)]
    dovecot.append_many(imap_user.login, imap_user.password, raws)
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")
        fetched = await session.fetch(await session.undeleted_uids())
    finally:
        await session.close()
    assert [m.raw for m in fetched] == raws


async def test_fetch_meta_gives_sizes_and_dates_and_headers_without_bodies(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    big = message(2) + b"x" * 200_000 + b"\r\n"
    raws = [message(1), big, message(3)]
    dovecot.append_many(imap_user.login, imap_user.password, raws)
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")
        metas = await session.fetch_meta([3, 1, 2, 77])
        headers = await session.fetch_headers([2])
    finally:
        await session.close()
    assert [(m.uid, m.size) for m in metas] == [(i + 1, len(r)) for i, r in enumerate(raws)]
    assert all(m.internaldate is not None for m in metas)
    assert [h.uid for h in headers] == [2]
    assert b"Subject: message 2" in headers[0].raw
    assert len(headers[0].raw) < 1000  # the header fields only, not the 200 kB body


# -- move --------------------------------------------------------------------------------------


async def test_move_marks_seen_and_returns_copyuid_map(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    dovecot.append_many(imap_user.login, imap_user.password, [message(n) for n in range(5)])
    session = await open_session(dovecot, imap_user)
    try:
        await session.ensure_folders([PROCESSED])
        await session.select("INBOX")
        mapping = await session.move([1, 2, 3, 5], PROCESSED)
    finally:
        await session.close()
    assert mapping == {1: 1, 2: 2, 3: 3, 5: 4}
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == [4]
    flags = dovecot.folder_flags(imap_user.login, imap_user.password, PROCESSED)
    assert sorted(flags) == [1, 2, 3, 4]
    assert all("\\Seen" in f for f in flags.values())


async def test_move_fallback_copy_store_expunge(dovecot: Dovecot, imap_user: ImapUser) -> None:
    dovecot.append_many(imap_user.login, imap_user.password, [message(n) for n in range(3)])
    session = await open_session(dovecot, imap_user)
    try:
        # Force the RFC 4315 path although Dovecot supports MOVE (see module docstring).
        session.capabilities = session.capabilities - {"MOVE"}
        assert not session.has_move
        await session.ensure_folders([PROCESSED])
        await session.select("INBOX")
        mapping = await session.move([1, 3], PROCESSED, mark_seen=False)
    finally:
        await session.close()
    assert mapping == {1: 1, 3: 2}
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == [2]
    flags = dovecot.folder_flags(imap_user.login, imap_user.password, PROCESSED)
    assert all("\\Seen" not in f and "\\Deleted" not in f for f in flags.values())


async def test_move_without_uidplus_keeps_other_deleted_mail(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    dovecot.append_many(imap_user.login, imap_user.password, [message(n) for n in range(2)])
    dovecot.append(imap_user.login, imap_user.password, message(9), flags=["\\Deleted"])
    session = await open_session(dovecot, imap_user)
    try:
        session.capabilities = session.capabilities - {"MOVE", "UIDPLUS"}
        await session.ensure_folders([PROCESSED])
        await session.select("INBOX")
        with capture_logs() as logs:
            await session.move([1], PROCESSED)
        assert await session.undeleted_uids() == [2]  # the \Deleted original is not work
    finally:
        await session.close()
    # No plain EXPUNGE: message 3 (someone else's \Deleted) survives, and so does our original.
    assert dovecot.folder_uids(imap_user.login, imap_user.password, "INBOX") == [1, 2, 3]
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 1
    assert any(e["event"] == "imap_expunge_skipped" for e in logs)


async def test_move_to_missing_folder_is_folder_error(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    dovecot.append(imap_user.login, imap_user.password, message(1))
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")
        with pytest.raises(FolderError):
            await session.move([1], "Does Not Exist", mark_seen=False)
    finally:
        await session.close()


# -- append ------------------------------------------------------------------------------------


async def test_append_returns_appenduid(dovecot: Dovecot, imap_user: ImapUser) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        await session.ensure_folders([PROCESSED])
        uid = await session.append(PROCESSED, message(1), flags=["\\Seen"])
    finally:
        await session.close()
    assert uid == 1
    assert dovecot.folder_messages(imap_user.login, imap_user.password, PROCESSED) == [message(1)]


# -- IDLE --------------------------------------------------------------------------------------


async def test_idle_reports_new_mail(dovecot: Dovecot, imap_user: ImapUser) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")

        def deliver() -> None:
            time.sleep(0.3)
            dovecot.append(imap_user.login, imap_user.password, message(1))

        thread = threading.Thread(target=deliver)
        thread.start()
        try:
            assert await session.wait_for_mail(30) is True  # before its timeout: pushed
        finally:
            await asyncio.to_thread(thread.join)
        assert await session.undeleted_uids() == [1]  # the session works after DONE
    finally:
        await session.close()


async def test_idle_times_out_without_mail(dovecot: Dovecot, imap_user: ImapUser) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")
        started = time.monotonic()
        assert await session.wait_for_mail(0.5) is False
        # Not before its time; the upper bound only has to hold on a loaded machine.
        assert 0.4 < time.monotonic() - started < 20
        await session.noop()
    finally:
        await session.close()


# -- TLS ---------------------------------------------------------------------------------------


async def test_implicit_tls_with_ca_file(tls_dovecot: Dovecot, tls_imap_user: ImapUser) -> None:
    session = await open_session(tls_dovecot, tls_imap_user, tls="implicit")
    try:
        assert await session.select("INBOX") == 0
    finally:
        await session.close()


async def test_starttls(tls_dovecot: Dovecot, tls_imap_user: ImapUser) -> None:
    session = await open_session(tls_dovecot, tls_imap_user, tls="starttls")
    try:
        assert "STARTTLS" not in session.capabilities  # re-read after TLS (RFC 3501 6.2.1)
        assert await session.select("INBOX") == 0
    finally:
        await session.close()


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_untrusted_ca_is_tls_untrusted(
    tls_dovecot: Dovecot, tls_imap_user: ImapUser, tmp_path: Path, tls: str
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(ServerError) as caught:
        await open_session(tls_dovecot, tls_imap_user, tls=tls, ca_file=other_ca)
    assert caught.value.code == "tls_untrusted"


async def test_implicit_tls_against_plain_port_is_tls_failed(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    account = dovecot.account(imap_user.login, imap_user.password, verify_certificate=False)
    account = account.model_copy(
        update={"imap": account.imap.model_copy(update={"tls": "implicit"})}
    )
    with pytest.raises(ServerError) as caught:
        await ImapSession.open(account)
    assert caught.value.code == "tls_failed"


async def test_starttls_not_offered_is_its_own_code(dovecot: Dovecot, imap_user: ImapUser) -> None:
    with pytest.raises(ServerError) as caught:
        await open_session(dovecot, imap_user, tls="starttls", verify_certificate=False)
    # Not "the handshake failed, set tls to starttls": it is set; the port has none to offer.
    assert caught.value.code == "starttls_unavailable"
    assert "imap.tls: implicit" in caught.value.remedy


async def test_unverified_tls_connects_and_warns(
    tls_dovecot: Dovecot, tls_imap_user: ImapUser
) -> None:
    with capture_logs() as logs:
        session = await open_session(
            tls_dovecot, tls_imap_user, tls="implicit", verify_certificate=False
        )
        await session.close()
    warnings = [e for e in logs if e["event"] == "imap_tls_unverified"]
    assert warnings
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["account"] == "test"


# -- a server that goes away -------------------------------------------------------------------


async def test_restart_fails_next_command_fast(dovecot: Dovecot, imap_user: ImapUser) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")
        await asyncio.to_thread(dovecot.restart)
        with pytest.raises(ServerError) as caught:
            await session.noop()
        # Noticed as lost, not after imap.timeout_seconds (that would be code "timeout").
        assert caught.value.code in {"connection_lost", "unreachable"}
        assert caught.value.transient
        assert not session.usable
    finally:
        await session.close()
    # A new session works against the restarted server.
    again = await open_session(dovecot, imap_user)
    await again.close()


async def test_silent_server_times_out(dovecot: Dovecot, imap_user: ImapUser) -> None:
    # A listener that accepts but never greets: the open must fail with 'timeout', not hang.
    writers: list[asyncio.StreamWriter] = []

    def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    account = dovecot.account(imap_user.login, imap_user.password, timeout_seconds=0.5)
    account = account.model_copy(update={"imap": account.imap.model_copy(update={"port": port})})
    try:
        with pytest.raises(ServerError) as caught:
            await ImapSession.open(account)
        assert caught.value.code == "timeout"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_restart_during_idle_raises_connection_lost(
    dovecot: Dovecot, imap_user: ImapUser
) -> None:
    session = await open_session(dovecot, imap_user)
    try:
        await session.select("INBOX")
        restart = asyncio.create_task(asyncio.to_thread(dovecot.restart))
        with pytest.raises(ServerError) as caught:
            await session.wait_for_mail(20)
        # Raised as lost: waiting out the 20 s IDLE would have returned False instead.
        assert caught.value.code == "connection_lost"
        await restart
    finally:
        await session.close()
