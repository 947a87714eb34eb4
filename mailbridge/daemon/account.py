"""One account's loop: connect, import every unseen Inbox message, wait (IDLE or poll), repeat.

The order of operations is what keeps mail from being lost or duplicated:

1. ``UID SEARCH UNSEEN`` in the Inbox, then per batch one ``UID FETCH ... BODY.PEEK[]`` (PEEK so a
   crash leaves the message unseen and it is fetched again).
2. Parse every message (off the event loop). A message that cannot be parsed becomes a failure.
3. One repository call writes the whole batch in one committed transaction (each message
   all-or-nothing). Messages already stored (same Message-ID or content hash) are duplicates.
4. Failures are recorded (committed) with their reason.
5. Only then are messages marked ``\\Seen`` and moved: imported and duplicates to Processed,
   failures to Failed.

A crash between 3 and 5 leaves the message in the Inbox, still unseen: the next pass fetches it
again, the repository recognises it as a duplicate, and it is moved without a second import.

Connection trouble is retried with exponential backoff and jitter (tenacity); the wait depends on
the error's catalogue entry: transient faults retry within seconds to a minute, problems an
operator must fix (a wrong password) back off to many minutes so the server is not hammered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import structlog
from tenacity import RetryCallState, wait_random_exponential

from mailbridge.config import AccountSettings, Settings
from mailbridge.daemon.importstep import ImportStep
from mailbridge.daemon.importstep import PassSummary as PassSummary  # moved there
from mailbridge.daemon.importstep import _parse_batch as _parse_batch  # moved there
from mailbridge.daemon.parsing import parse_off_loop
from mailbridge.errors import MailbridgeError, StoreError
from mailbridge.mail.imap import FetchedMessage, ImapSession
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import (
    AccountState,
    FailureInfo,
    ImportItem,
)

log = structlog.get_logger("mailbridge.account")

# Transient faults: 1 s growing to 60 s, with full jitter so a fleet of accounts that lost the
# same server does not reconnect in lock-step. Faults an operator must fix: 5 to 30 minutes.
_TRANSIENT_WAIT = wait_random_exponential(multiplier=1, max=60)
_PERMANENT_WAIT = wait_random_exponential(multiplier=300, min=300, max=1800)

# At most this many accounts of one process connect and log in at the same moment. A fleet
# that starts (or lost its server) together would otherwise overflow the server's listen
# backlog (Dovecot's is 100): the kernel silently drops the surplus handshakes, and an IMAP
# client, waiting for the greeting, only notices at its timeout. With 1,000 accounts that cost
# 60 s and 607 backoffs (found by scripts/bench); with the limit they connect in seconds.
CONNECT_CONCURRENCY = 20
_connect_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


async def open_session(account: AccountSettings) -> ImapSession:
    """:meth:`ImapSession.open`, at most CONNECT_CONCURRENCY at a time per event loop."""
    loop = asyncio.get_running_loop()
    slots = _connect_slots.get(loop)
    if slots is None:
        slots = _connect_slots[loop] = asyncio.Semaphore(CONNECT_CONCURRENCY)
    async with slots:
        return await ImapSession.open(account)


def backoff_seconds(error: MailbridgeError, failures: int) -> float:
    """How long to wait before reconnecting after ``failures`` consecutive failures."""
    wait = _TRANSIENT_WAIT if error.transient else _PERMANENT_WAIT
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, failures)
    return float(wait(state))


class AccountWorker:
    """Runs one account: ``run()`` forever (the daemon) or ``run_once()`` (one pass)."""

    def __init__(
        self,
        settings: Settings,
        account: AccountSettings,
        repo: AsyncRepository,
        *,
        stopping: asyncio.Event | None = None,
        on_state: Callable[[AccountState], None] | None = None,
    ) -> None:
        self.settings = settings
        self.account = account
        self.repo = repo
        self.stopping = stopping or asyncio.Event()
        self.on_state = on_state
        self.state = AccountState(account=account.name, state="starting")
        self.log = log.bind(account=account.name)
        self._failures = 0  # consecutive failures, reset by a completed import pass
        # Set by wake() (the supervisor, on SIGHUP): ends a backoff so a fixed password file is
        # tried at once instead of after up to 30 minutes.
        self._wake = asyncio.Event()
        self.busy = False  # True while a batch is between fetch and move: the drain waits for it
        # The import step, shared with the recovery sweep (daemon/importstep.py).
        self.step = ImportStep(settings, account, repo, stopping=self.stopping, log=self.log)

    # -- state -------------------------------------------------------------------------------

    async def _set_state(
        self,
        state: str,
        *,
        code: str | None = None,
        detail: str = "",
        imported: int = 0,
        last_import: datetime | None = None,
    ) -> None:
        now = datetime.now(UTC)
        since = self.state.since if state == self.state.state and self.state.since else now
        self.state = AccountState(
            account=self.account.name,
            state=state,
            code=code,
            detail=detail,
            since=since,
            last_import=last_import or self.state.last_import,
            imported=imported,
            updated=now,
        )
        if self.on_state is not None:
            self.on_state(self.state)
        try:
            await self.repo.set_account_state(self.state)
        except StoreError as exc:  # status is advisory; never let it stop the import loop
            self.log.warning("account_state_not_saved", code=exc.code, error=str(exc))

    # -- the daemon loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Import forever: reconnect with backoff on any error, until ``stopping`` is set."""
        while not self.stopping.is_set():
            try:
                await self._connected_loop()
            except asyncio.CancelledError:
                raise
            except MailbridgeError as exc:
                await self._backoff(exc)
            except Exception as exc:  # a bug in one account must not stop the others
                self.log.exception("account_loop_crashed")
                await self._backoff(MailbridgeError(f"unexpected error: {exc!r}"))
        await self._set_state("stopped")

    async def _backoff(self, exc: MailbridgeError) -> None:
        self._failures += 1
        delay = backoff_seconds(exc, self._failures)
        level = "warning" if exc.transient else "error"
        getattr(self.log, level)(
            "account_backoff",
            code=exc.code,
            error=str(exc),
            remedy=exc.remedy,
            retry_in_seconds=round(delay, 1),
            consecutive_failures=self._failures,
        )
        # A fault that needs the operator shows as its own code (auth_failed, tls_untrusted ...)
        # so `status` says what to fix; a transient one is just "backoff".
        state = "backoff" if exc.transient else exc.code
        await self._set_state(state, code=exc.code, detail=f"{exc} | {exc.remedy}")
        self._wake.clear()  # a wake() before this backoff began is not a reason to end it
        with contextlib.suppress(TimeoutError):
            await self._wait_or_stop(asyncio.wait_for(self._wake.wait(), timeout=delay))
        if self._wake.is_set() and not self.stopping.is_set():
            self.log.info("account_backoff_ended", reason="reload", code=exc.code)

    def wake(self) -> None:
        """End a backoff now (SIGHUP): the operator may have fixed what the last attempt hit."""
        self._wake.set()

    async def _connected_loop(self) -> None:
        await self._set_state("connecting")
        session = await open_session(self.account)
        try:
            await self._prepare(session)
            idle = self.account.mode == "idle" and session.has_idle
            if self.account.mode == "idle" and not session.has_idle:
                self.log.warning(
                    "imap_idle_unsupported_polling", interval=self.account.poll_interval_seconds
                )
            while not self.stopping.is_set():
                found = await self._import_pending(session)
                # Only a completed pass proves the account healthy: a login alone does not (a
                # missing folder or a fault on every FETCH would otherwise reset the backoff
                # after each login and reconnect every second, forever).
                self._failures = 0
                if self.stopping.is_set():
                    break
                if found.imported or found.duplicates or found.failed:
                    # Mail that arrived during the pass is imported now, with one more SEARCH,
                    # rather than after the server's next IDLE push (Dovecot batches pushes for
                    # ~0.5 s): this kept IDLE latency p99 ~120 ms above the server's own.
                    continue
                if idle:
                    await self._set_state("idle")
                    await self._wait_or_stop(
                        session.wait_for_mail(self.account.idle_timeout_seconds)
                    )
                else:
                    await self._set_state("polling")
                    await self._wait_or_stop(asyncio.sleep(self.account.poll_interval_seconds))
        finally:
            await session.close()

    async def _wait_or_stop(self, waiter: Awaitable[object]) -> None:
        """Wait for new mail (or the poll interval) unless the daemon is asked to stop first."""
        task = asyncio.ensure_future(waiter)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # re-raise a connection error from IDLE
        finally:
            for pending in (task, stop):
                if not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MailbridgeError):
                        await pending

    async def _prepare(self, session: ImapSession) -> None:
        folders = self.account.folders
        await session.ensure_folders([folders.processed, folders.failed])
        await session.select(folders.inbox)

    # -- one pass ----------------------------------------------------------------------------

    async def _set_failed_state(self, exc: MailbridgeError) -> None:
        """Record a pass that failed: the code itself for faults an operator must fix."""
        state = "error" if exc.transient else exc.code
        await self._set_state(state, code=exc.code, detail=f"{exc} | {exc.remedy}")

    async def run_once(self) -> PassSummary:
        """Connect, import everything unseen, disconnect. Raises ServerError if it cannot."""
        await self._set_state("connecting")
        try:
            session = await open_session(self.account)
        except MailbridgeError as exc:
            await self._set_failed_state(exc)
            raise
        try:
            await self._prepare(session)
            summary = await self._import_pending(session)
        except MailbridgeError as exc:
            await self._set_failed_state(exc)
            raise
        finally:
            await session.close()
        await self._set_state("stopped")
        return summary

    async def _import_pending(self, session: ImapSession) -> PassSummary:
        """Import every unseen Inbox message, batch by batch."""
        summary = PassSummary()
        uids = await session.unseen_uids()
        if not uids:
            return summary
        self.log.info("import_pending", unseen=len(uids))
        size = self.settings.limits.fetch_batch_size
        batches = [uids[start : start + size] for start in range(0, len(uids), size)]
        # Pipelined: the next batch is fetched and parsed while this one is written and moved,
        # so IMAP, parsing and SQLite overlap. Reading ahead risks nothing (BODY.PEEK[]: nothing
        # is committed or moved), the session lock keeps IMAP commands in order, and each batch
        # is still committed before it is moved.
        ahead = asyncio.ensure_future(self._fetch_and_parse(session, batches[0]))
        try:
            for index, batch_uids in enumerate(batches):
                if self.stopping.is_set():
                    break  # the drain: finish the batch in hand, start no new one
                prefetched = await ahead
                if index + 1 < len(batches):
                    ahead = asyncio.ensure_future(
                        self._fetch_and_parse(session, batches[index + 1])
                    )
                summary.add(await self._import_batch(session, batch_uids, prefetched))
        finally:
            if not ahead.done():
                ahead.cancel()  # drops the connection if mid-FETCH; nothing was committed
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ahead  # retrieve its outcome; an error was raised above already
        return summary

    async def _fetch_and_parse(
        self, session: ImapSession, uids: Sequence[int]
    ) -> tuple[list[FetchedMessage], tuple[list[ImportItem], list[FailureInfo]]]:
        fetched = await session.fetch(uids)
        # A thread for a few messages, worker processes for a backlog (see daemon/parsing.py).
        parsed = await parse_off_loop(_parse_batch, fetched, self.settings.limits.max_message_bytes)
        return fetched, parsed

    async def _import_batch(
        self,
        session: ImapSession,
        uids: Sequence[int],
        prefetched: tuple[list[FetchedMessage], tuple[list[ImportItem], list[FailureInfo]]],
    ) -> PassSummary:
        self.busy = True
        try:
            return await self._import_batch_inner(session, uids, prefetched)
        finally:
            self.busy = False

    async def _import_batch_inner(
        self,
        session: ImapSession,
        uids: Sequence[int],
        prefetched: tuple[list[FetchedMessage], tuple[list[ImportItem], list[FailureInfo]]],
    ) -> PassSummary:
        started = time.monotonic()
        await self._set_state("importing")
        fetched, parsed = prefetched
        summary = await self.step.process_fetched(session, fetched, parsed=parsed)

        now = datetime.now(UTC)
        await self._set_state(
            "importing",
            imported=summary.imported,
            last_import=now if summary.imported else None,
        )
        self.log.info(
            "batch_done",
            messages=len(uids),
            imported=summary.imported,
            duplicates=summary.duplicates,
            discarded=summary.discarded,
            bounces=summary.bounces,
            failed=summary.failed,
            seconds=round(time.monotonic() - started, 3),
        )
        return summary
