"""The fleet server of ``scripts/bench`` (``Dovecot(hibernate_seconds=...)``): IDLE sessions are
parked in ``imap-hibernate`` while ``imap`` processes are reused for the next logins
(``service_count``), and a parked session still gets its new mail.

Every wait polls with a generous bound: the suite runs on a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailbridge.mail.imap import ImapSession
from mailbridge.testing.dovecot import Dovecot

pytestmark = pytest.mark.dovecot

SESSIONS = 8
PASSWORD = "hibernate-pw"  # a throwaway local server's password


def _mail(n: int) -> bytes:
    return (
        f"From: a@example.org\r\nTo: b@example.test\r\nSubject: wake {n}\r\n"
        f"Message-ID: <wake{n}@example.org>\r\n\r\nbody\r\n"
    ).encode()


@pytest.fixture(scope="module")
def fleet_server() -> Iterator[Dovecot]:
    # Under /tmp, not pytest's basetemp (which another pytest session resets to 0700, locking
    # the server's processes out): as tests/conftest.py's running_dovecot does.
    workdir = Path(tempfile.mkdtemp(prefix="mailbridge-hibernate-", dir="/tmp"))
    try:
        with Dovecot(workdir, process_limit=100, hibernate_seconds=1, client_limit=100) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _wait_until(what: str, check: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:g}s: {what}")
        await asyncio.sleep(0.2)


async def test_idle_sessions_are_parked_and_woken_by_new_mail(fleet_server: Dovecot) -> None:
    users = [fleet_server.add_user(f"hib{n}", PASSWORD) for n in range(SESSIONS)]
    sessions = []
    for login in users:
        session = await ImapSession.open(fleet_server.account(login, PASSWORD, name=login))
        await session.select("INBOX")
        sessions.append(session)
    waits = [asyncio.ensure_future(s.wait_for_mail(120)) for s in sessions]
    try:
        # Parked: imap-hibernate holds every session's connection (the imap processes that
        # served them stay, idle, for the next logins: service_count).
        await _wait_until(
            "the IDLE sessions parked in imap-hibernate",
            lambda: fleet_server.parked_sessions() >= SESSIONS,
        )
        assert not any(wait.done() for wait in waits)
        fleet_server.append(users[3], PASSWORD, _mail(3))
        assert await asyncio.wait_for(waits[3], 60) is True  # the parked session was woken
        assert not any(wait.done() for n, wait in enumerate(waits) if n != 3)
        # The woken session is usable again: the mail is there.
        assert await sessions[3].undeleted_uids() == [1]
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        for session in sessions:
            await session.close()


async def test_reused_imap_processes_serve_logins_one_after_another(
    fleet_server: Dovecot,
) -> None:
    """service_count above 1: a login after a logout is served by a process that already
    served a session (no fork per login), and each user still sees only their own mail."""
    first, second = (fleet_server.add_user(f"reuse{n}", PASSWORD) for n in range(2))
    fleet_server.append(first, PASSWORD, _mail(10))
    for login, expected in ((first, [1]), (second, []), (first, [1])):
        session = await ImapSession.open(fleet_server.account(login, PASSWORD, name=login))
        try:
            await session.select("INBOX")
            assert await session.undeleted_uids() == expected
        finally:
            await session.close()
