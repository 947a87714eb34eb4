"""One account's loop: connect, import every Inbox message, wait (IDLE or poll), repeat.

The Inbox is the queue: mailbridge moves what it has processed, so every message in it that is
not flagged ``\\Deleted`` is work, read or unread (people open shared mail in their own client
before mailbridge sees it). The order of operations is what keeps mail from being lost or
duplicated, and memory bounded:

1. ``UID SEARCH UNDELETED`` in the Inbox, then ``UID FETCH (UID FLAGS INTERNALDATE RFC822.SIZE)``:
   sizes and arrival times, no bodies. A message over ``limits.message_max_size_mb`` is recorded
   as ``too_large`` and moved to Failed without being downloaded (only a few header fields are
   fetched, for the record). The rest is cut into batches of at most ``limits.fetch_batch_size``
   messages and ``limits.fetch_batch_max_mb`` bytes (:func:`plan_batches`).
2. Per batch one ``UID FETCH ... BODY.PEEK[]``; every message is parsed off the event loop. A
   message that cannot be parsed becomes a failure.
3. One repository call writes the whole batch in one committed transaction (each message
   all-or-nothing). Messages already stored (same Message-ID or content hash) are duplicates.
4. Failures are recorded (committed) with their reason.
5. Only then are messages marked ``\\Seen`` and moved: imported and duplicates to Processed,
   failures to Failed.

A crash (or a lost connection) anywhere between 3 and the end of 5 leaves the message in the
Inbox, perhaps already ``\\Seen``: the next pass fetches it again, the repository recognises it
as a duplicate, and it is moved without a second import.

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
from datetime import UTC, date, datetime, timedelta

import structlog
from tenacity import RetryCallState, wait_random_exponential

from mailbridge.config import AccountSettings, Settings
from mailbridge.daemon.importstep import UNREADABLE_AFTER, ImportStep, Prefetched
from mailbridge.daemon.importstep import PassSummary as PassSummary  # moved there
from mailbridge.daemon.importstep import plan_batches as plan_batches  # moved there
from mailbridge.daemon.parse_step import parse_batch as _parse_batch  # noqa: F401 - tests use it
from mailbridge.daemon.parsing import POOL_MIN_BATCH, warm_up_pool
from mailbridge.errors import MailbridgeError, StoreError
from mailbridge.mail.auth.tokens import provider_for
from mailbridge.mail.imap import ImapSession, imap_date
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import AccountState

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
# A token refresh that failed transiently (the identity provider is down) is retried after this.
_REFRESH_RETRY_SECONDS = 60.0
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


async def inbox_backlog(session: ImapSession) -> int:
    """How many messages of the selected folder (the Inbox) arrived over a day ago and are not
    ``\\Deleted``: ``UID SEARCH UNDELETED OLDER 86400`` (RFC 5032 WITHIN), else ``BEFORE``
    yesterday's date (dates only, in the server's time zone: RFC 3501 6.4.4, so a day or two)."""
    if "WITHIN" in session.capabilities:
        return len(await session.search("UNDELETED", "OLDER", "86400"))
    yesterday = imap_date(datetime.now(UTC) - timedelta(days=1))
    return len(await session.search("UNDELETED", "BEFORE", yesterday))


def backlog_remedy(account: AccountSettings) -> str:
    """What to do about an Inbox backlog an operator may not want imported."""
    inbox = account.folders.inbox
    return (
        f"mailbridge imports every message in {inbox!r}, read or not; if old mail should not "
        f"be imported, stop mailbridge and move it to another folder first, e.g. "
        f"'doveadm move -u {account.auth.username} Archive mailbox {inbox} savedbefore 1d' "
        f"or with a mail client; limits.backlog_warning sets this threshold"
    )


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
        # False: the account's stored state is another's to write (a daemon serving it beside
        # `run --once`, or the daemon that took its lease): states are kept here, not stored.
        self.record_state = True
        # When the live loop last finished a pass over the whole Inbox (SEARCH and import):
        # a scheduled sweep after it has no missed Inbox mail to look for.
        self.last_pass: datetime | None = None
        self.state = AccountState(account=account.name, state="starting")
        self.log = log.bind(account=account.name)
        self._failures = 0  # consecutive failures, reset by a completed import pass
        # Set by wake() (the supervisor, on SIGHUP): ends a backoff so a fixed password file is
        # tried at once instead of after up to 30 minutes.
        self._wake = asyncio.Event()
        # The import step, shared with the recovery sweep (daemon/importstep.py).
        self.step = ImportStep(settings, account, repo, stopping=self.stopping, log=self.log)
        self._backlog_checked = False  # the Inbox backlog is looked at once per worker
        self._secret_warned_on: date | None = None  # client_secret_expires: one warning a day
        self._refresh_retry_at = 0.0  # after a transient refresh failure: when to try again

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
        if not self.record_state:
            return
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
                self.log.exception("account_loop_crashed", code="internal")
                await self._backoff(MailbridgeError(f"unexpected error: {exc!r}"))
        await self._set_state("stopped")

    async def _backoff(self, exc: MailbridgeError) -> None:
        self._failures += 1
        delay = backoff_seconds(exc, self._failures)
        # A fault that needs the operator shows as its own code (auth_failed, tls_untrusted ...)
        # so `status` says what to fix; a transient one is just "backoff". Stored before it is
        # logged: whoever reads `status` on seeing the line finds the state the line reports.
        state = "backoff" if exc.transient else exc.code
        await self._set_state(state, code=exc.code, detail=f"{exc} | {exc.remedy}")
        level = "warning" if exc.transient else "error"
        getattr(self.log, level)(
            "account_backoff",
            code=exc.code,
            error=str(exc),
            remedy=exc.remedy,
            retry_in_seconds=round(delay, 1),
            consecutive_failures=self._failures,
        )
        self._wake.clear()  # a wake() before this backoff began is not a reason to end it
        with contextlib.suppress(TimeoutError):
            await self._wait_or_stop(asyncio.wait_for(self._wake.wait(), timeout=delay))
        if self._wake.is_set() and not self.stopping.is_set():
            self.log.info("account_backoff_ended", reason="reload", code=exc.code)

    def wake(self) -> None:
        """End a backoff now (SIGHUP): the operator may have fixed what the last attempt hit."""
        self._wake.set()

    async def _connected_loop(self) -> None:
        self.warn_secret_expiry()
        await self._set_state("connecting")
        session = await open_session(self.account)
        try:
            exists: int | None = await self._prepare(session)
            idle = self.account.mode == "idle" and session.has_idle
            if self.account.mode == "idle" and not session.has_idle:
                self.log.warning(
                    "imap_idle_unsupported_polling", interval=self.account.poll_interval_seconds
                )
            while not self.stopping.is_set():
                # An Inbox that SELECT found empty has nothing to search for (RFC 3501 7.3.1:
                # EXISTS is the number of messages): a fleet of quiet accounts spares a round
                # trip each. Mail that arrives after the SELECT is announced with EXISTS
                # (RFC 3501 5.2), at the latest when IDLE begins, and imported then.
                found = await self._import_pending(session, empty=exists == 0)
                exists = None  # later passes follow a wake-up: always search
                self.last_pass = datetime.now(UTC)
                # Only a completed pass proves the account healthy: a login alone does not (a
                # missing folder or a fault on every FETCH would otherwise reset the backoff
                # after each login and reconnect every second, forever).
                self._failures = 0
                if self.stopping.is_set():
                    break
                if found.handled:
                    # Mail that arrived during the pass is imported now, with one more SEARCH,
                    # rather than after the server's next IDLE push (Dovecot batches pushes for
                    # ~0.5 s): this kept IDLE latency p99 ~120 ms above the server's own.
                    continue
                self.warn_secret_expiry()
                if idle:
                    await self._set_state("idle")
                    await self._wait_or_stop(
                        session.wait_for_mail(self._wait_seconds(self.account.idle_timeout_seconds))
                    )
                else:
                    await self._set_state("polling")
                    await self._wait_or_stop(
                        asyncio.sleep(self._wait_seconds(self.account.poll_interval_seconds))
                    )
                    if not self.stopping.is_set():
                        # The server reports new mail (EXISTS) only at the end of a command
                        # (RFC 3501 section 5.2), and Dovecot's SEARCH runs on the view from
                        # before it: without a NOOP first, mail that arrived while we slept is
                        # found only by the poll after next.
                        await session.noop()
                await self._refresh_token_if_due()
        finally:
            await session.close()

    def _wait_seconds(self, seconds: float) -> float:
        """The IDLE/poll wait, cut short when the OAuth2 token is due for a refresh."""
        if not self.account.auth.is_oauth:
            return seconds
        due = provider_for(self.account).refresh_due_in()
        if due is None:
            return seconds
        retry = self._refresh_retry_at - time.monotonic()
        return max(1.0, min(seconds, max(due, retry)))

    async def _refresh_token_if_due(self) -> None:
        """Renew the OAuth2 token before it expires, while the session is idle: the next login
        (a reconnect, the sweep, SMTP) finds a valid token, and a rotated refresh token is
        saved now. A refused refresh (revoked, expired secret) surfaces here, classified."""
        if not self.account.auth.is_oauth:
            return
        provider = provider_for(self.account)
        due = provider.refresh_due_in()
        if due is None or due > 0 or time.monotonic() < self._refresh_retry_at:
            return
        try:
            await provider.token()
        except MailbridgeError as exc:
            if not exc.transient:
                raise  # revoked, secret expired...: the operator must act; status shows it
            # The identity provider is down for now; the session stays up (it does not need a
            # new token) and the refresh is tried again in a minute.
            self._refresh_retry_at = time.monotonic() + _REFRESH_RETRY_SECONDS
            self.log.warning(
                "oauth_refresh_failed", code=exc.code, error=str(exc), remedy=exc.remedy
            )

    def warn_secret_expiry(self) -> None:
        """Log auth.client_secret_expires from 14 days before, once a day."""
        today = date.today()
        if self._secret_warned_on == today:
            return
        warning = self.account.auth.secret_expiry_warning(today)
        if warning is not None:
            self._secret_warned_on = today
            self.log.warning(
                "client_secret_expiring",
                expires=str(self.account.auth.client_secret_expires),
                days_left=self.account.auth.secret_expiry_days(today),
                detail=warning,
            )

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

    async def _prepare(self, session: ImapSession) -> int | None:
        """Make sure the folders exist and SELECT the Inbox; returns its EXISTS count (None
        when the server sent none)."""
        folders = self.account.folders
        await session.ensure_folders([folders.processed, folders.failed])
        exists = await session.select(folders.inbox)
        if not self._backlog_checked:
            self._backlog_checked = True
            await self._warn_backlog(session, exists)
        # A server that left EXISTS out told nothing: the first pass searches.
        return exists if session.exists_reported else None

    async def _warn_backlog(self, session: ImapSession, exists: int) -> None:
        """At an account's first start: warn when the Inbox holds more old mail than
        ``limits.backlog_warning`` (it is all imported, read or not). ``exists`` is the Inbox's
        message count from SELECT: when it is within the threshold, so is the old mail, and
        the SEARCH is spared (a round trip per account when a fleet starts)."""
        threshold = self.settings.limits.backlog_warning
        if threshold <= 0 or exists <= threshold:
            return
        old = await inbox_backlog(session)
        if old > threshold:
            self.log.warning(
                "inbox_backlog",
                folder=self.account.folders.inbox,
                older_than_a_day=old,
                threshold=threshold,
                remedy=backlog_remedy(self.account),
            )

    # -- one pass ----------------------------------------------------------------------------

    async def _set_failed_state(self, exc: MailbridgeError) -> None:
        """Record a pass that failed: the code itself for faults an operator must fix."""
        state = "error" if exc.transient else exc.code
        await self._set_state(state, code=exc.code, detail=f"{exc} | {exc.remedy}")

    async def run_once(self) -> PassSummary:
        """Connect, import the whole Inbox, disconnect. Raises ServerError if it cannot.

        A FETCH that broke the connection is tried again at once on a new connection, its
        messages alone (:meth:`ImportStep.fetch`), until a damaged message has gone to Failed:
        one such message must not fail ``run --once`` for the whole Inbox."""
        retries = 0
        total = PassSummary()  # what the broken passes did too: they commit batch by batch
        while True:
            unread = self.step.failed_unread
            try:
                return await self._run_pass(total)
            except MailbridgeError as exc:
                if self.step.failed_unread != unread:
                    retries = 0  # one damaged message is in Failed: the next gets its own tries
                if not self.step.may_refetch(exc) or retries > UNREADABLE_AFTER:
                    raise
                retries += 1
                self.log.warning("fetch_retried", code=exc.code, error=str(exc))

    async def _run_pass(self, total: PassSummary) -> PassSummary:
        self.warn_secret_expiry()
        await self._set_state("connecting")
        try:
            session = await open_session(self.account)
        except MailbridgeError as exc:
            await self._set_failed_state(exc)
            raise
        try:
            await self._prepare(session)
            summary = await self._import_pending(session, total)
        except MailbridgeError as exc:
            await self._set_failed_state(exc)
            raise
        finally:
            await session.close()
        await self._set_state("stopped")
        return summary

    async def _import_pending(
        self, session: ImapSession, summary: PassSummary | None = None, *, empty: bool = False
    ) -> PassSummary:
        """Import every Inbox message that is not \\Deleted, batch by batch, adding to
        ``summary`` (a new one by default) as each batch is done. ``empty``: the SELECT just
        made found no message (EXISTS 0), so there is nothing to search for."""
        summary = summary if summary is not None else PassSummary()
        if empty:
            return summary
        uids = await session.undeleted_uids()
        if not uids:
            return summary
        self.log.info("import_pending", messages=len(uids))
        metas = await session.fetch_meta(uids)
        unfetched, batches = await self.step.plan_fetches(session, metas)
        summary.add(unfetched)
        if not batches:
            return summary
        if len(metas) >= POOL_MIN_BATCH:
            warm_up_pool()  # worker processes start while the first batch is fetched

        async def handle(uids: Sequence[int], prefetched: Prefetched) -> None:
            summary.add(await self._import_batch(session, uids, prefetched))

        # Pipelined: the next batch is fetched and parsed while this one is written and moved.
        await self.step.pipelined(session, batches, handle)
        return summary

    async def _import_batch(
        self,
        session: ImapSession,
        uids: Sequence[int],
        prefetched: Prefetched,
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
