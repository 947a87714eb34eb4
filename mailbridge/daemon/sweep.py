"""The recovery sweep: retry the Failed folder and import Inbox mail the live loop missed.

One sweep of an account, on its own IMAP connection (the live loop keeps its IDLE):

1. **Failed folder.** Messages that arrived less than ``recovery.max_failed_age_days`` ago are
   fetched and imported again, with the same code as the live loop
   (:meth:`ImportStep.process_fetched`). Imported ones (and ones found already imported) move
   to Processed; ones that fail again stay in Failed, their ``importfailure`` row updated with
   the new reason and one more attempt. ``UID SEARCH SINCE`` only knows whole days of the
   server's own time zone, so it is asked from a day early (:func:`since_date`) and the
   INTERNALDATE of each fetched message decides. Older failures are left for the operator
   (``mailbridge failed retry``), which retries the messages it names regardless of age.
   First, the folder is reconciled with ``importfailure`` (:func:`_reconcile`): a failure whose
   message is no longer in the folder (an operator deleted it, or moved it back to the Inbox,
   by hand) is marked resolved, so ``mailbridge failed`` and the ``failed`` count of ``status``
   show what *is* in the Failed folder. ``failed retry`` does the same.
   A message whose last failure was a bug in mailbridge (code ``internal``) is held: retrying it
   every sweep would only log the same traceback again; ``failed retry`` retries it (after an
   upgrade, say). So is a message the server could not send (``message_unreadable``): fetching
   it would break the sweep's connection before the messages after it.
2. **Inbox.** Mail (read or not, not ``\\Deleted``) older than ``recovery.grace_period_minutes``
   by INTERNALDATE is imported as the live loop would: mail it missed, e.g. a message whose move
   failed after the commit, or mail put back into the Inbox by hand. Younger mail is the live
   loop's: racing it would only cost work (the database recognises the second copy), but the
   grace period avoids even that; it is told apart by the INTERNALDATE fetched without the body.

Both phases read RFC822.SIZE before any body, as the live loop does: a message over
``limits.message_max_size_mb`` fails as ``too_large`` without being downloaded, and batches are
bounded by ``limits.fetch_batch_max_mb`` as well as ``limits.fetch_batch_size``.

:func:`run_schedule` runs sweeps on the ``recovery.schedule`` cron expression beside an
account's live loop in the daemon; ``mailbridge sync`` runs :func:`sweep_and_record` on demand.
Each sweep is logged as one ``sweep_done`` event and its one-line summary is stored for
``mailbridge status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import structlog

from mailbridge.config import AccountSettings, Settings
from mailbridge.daemon.account import open_session
from mailbridge.daemon.importstep import ImportStep, Prefetched
from mailbridge.daemon.parsing import POOL_MIN_BATCH, warm_up_pool
from mailbridge.errors import MailbridgeError
from mailbridge.mail.imap import FetchedMessage, ImapSession, MessageMeta, imap_date
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import RESOLVED_REMOVED, FailureInfo, FailureRecord

log = structlog.get_logger("mailbridge.sweep")

# (phase, done, total): phase is "failed" or "inbox"; called after every batch and once with
# done=0 when the phase's total is known. The CLI draws its progress bar from it.
Progress = Callable[[str, int, int], None]


@dataclass
class SweepSummary:
    """What one sweep (or one ``failed retry``) did for one account."""

    account: str
    started: datetime
    finished: datetime | None = None
    retried: int = 0  # Failed-folder messages tried again
    recovered: int = 0  # of those, imported now
    already_imported: int = 0  # of those, found in the database already (moved to Processed)
    left_old: int = 0  # Failed-folder messages older than max_failed_age_days, not retried
    inbox_imported: int = 0  # missed Inbox mail imported
    inbox_duplicates: int = 0  # missed Inbox mail that was already stored
    skipped_young: int = 0  # Inbox mail within the grace period, left to the live loop
    held_internal: int = 0  # Failed-folder messages whose last failure was a bug: not retried
    reconciled: int = 0  # failures resolved because their message left the Failed folder by hand
    discarded: int = 0  # automatic mail the policy did not import, and bounces (to Processed)
    still_failing: list[FailureInfo] = field(default_factory=list)  # retried, failed again
    new_failures: list[FailureInfo] = field(default_factory=list)  # Inbox mail moved to Failed

    @property
    def imported(self) -> int:
        return self.recovered + self.inbox_imported

    def line(self) -> str:
        """One line for logs, ``status`` and the daemon's record."""
        parts = [
            f"retried {self.retried}",
            f"recovered {self.recovered + self.already_imported}",
            f"still failing {len(self.still_failing)}",
            f"inbox imported {self.inbox_imported}",
            f"new failures {len(self.new_failures)}",
        ]
        if self.skipped_young:
            parts.append(f"skipped (grace period) {self.skipped_young}")
        if self.left_old:
            parts.append(f"older failures left {self.left_old}")
        if self.held_internal:
            parts.append(f"held (internal error or unreadable) {self.held_internal}")
        if self.reconciled:
            parts.append(f"gone from the Failed folder {self.reconciled}")
        if self.discarded:
            parts.append(f"discarded or bounces {self.discarded}")
        return ", ".join(parts)

    def reasons(self) -> dict[str, int]:
        """Failure code -> how many messages of this sweep failed with it."""
        counts: dict[str, int] = {}
        for failure in (*self.still_failing, *self.new_failures):
            counts[failure.code] = counts.get(failure.code, 0) + 1
        return counts


def since_date(since: datetime) -> str:
    """The ``UID SEARCH SINCE`` date that finds every message that arrived at or after ``since``.

    SINCE compares the *date* of the internal date, "disregarding time and timezone" (RFC 3501
    section 6.4.4): the server takes that date in its own time zone, which we do not know. A
    message that arrived at 01:00 UTC on the 2nd is on the 1st for a server at UTC-5, and
    ``SINCE 2-...`` would miss it. Time zones lie within a day of UTC, so asking from the day
    before ``since``'s UTC date finds it wherever the server is; the exact age is then checked
    on each fetched message's INTERNALDATE.
    """
    return imap_date(since.astimezone(UTC) - timedelta(days=1))


async def sweep(
    settings: Settings,
    account: AccountSettings,
    repo: AsyncRepository,
    *,
    progress: Progress | None = None,
    now: datetime | None = None,
    stopping: asyncio.Event | None = None,
) -> SweepSummary:
    """One recovery sweep of ``account`` (see the module docstring). Raises ServerError when it
    cannot connect or a command fails; what it did before that is committed."""
    now = now or datetime.now(UTC)
    recovery = settings.recovery
    summary = SweepSummary(account=account.name, started=datetime.now(UTC))
    worker = _worker(settings, account, repo, stopping)
    session = await open_session(account)
    try:
        folders = account.folders
        await session.ensure_folders([folders.processed, folders.failed])
        await _retry_failed(
            worker,
            session,
            summary,
            since=now - timedelta(days=recovery.max_failed_age_days),
            progress=progress,
        )
        await _import_missed(
            worker,
            session,
            summary,
            before=now - timedelta(minutes=recovery.grace_period_minutes),
            progress=progress,
        )
    finally:
        await session.close()
    summary.finished = datetime.now(UTC)
    return summary


async def retry_failed(
    settings: Settings,
    account: AccountSettings,
    repo: AsyncRepository,
    uids: Sequence[int] | None = None,
    *,
    progress: Progress | None = None,
) -> SweepSummary:
    """``mailbridge failed retry``: retry the named Failed-folder UIDs (None: all), any age."""
    summary = SweepSummary(account=account.name, started=datetime.now(UTC))
    worker = _worker(settings, account, repo, None)
    session = await open_session(account)
    try:
        folders = account.folders
        await session.ensure_folders([folders.processed, folders.failed])
        await _retry_failed(worker, session, summary, since=None, uids=uids, progress=progress)
    finally:
        await session.close()
    summary.finished = datetime.now(UTC)
    return summary


async def fetch_failed(
    account: AccountSettings, uids: Sequence[int], fields: Sequence[str], whole_up_to: int = 0
) -> list[tuple[MessageMeta, FetchedMessage, bool]]:
    """Size, arrival and the header ``fields`` of these UIDs in the Failed folder, as the server
    has them, and whether the whole message was fetched: only one of at most ``whole_up_to``
    bytes is (BODY.PEEK[]); a larger one (maybe the one too large to download) never is."""
    session = await open_session(account)
    try:
        await session.select(account.folders.failed)
        metas = {m.uid: m for m in await session.fetch_meta(uids)}
        small = [uid for uid, meta in metas.items() if meta.size <= whole_up_to]
        whole = {m.uid: m for m in await session.fetch(small)} if small else {}
        rest = [uid for uid in metas if uid not in whole]
        headers = {h.uid: h for h in await session.fetch_headers(rest, fields)} if rest else {}
        found = [(metas[u], whole[u], True) for u in metas if u in whole]
        found += [(metas[u], headers[u], False) for u in metas if u in headers]
        return found
    finally:
        await session.close()


async def sweep_and_record(
    settings: Settings,
    account: AccountSettings,
    repo: AsyncRepository,
    *,
    progress: Progress | None = None,
    stopping: asyncio.Event | None = None,
) -> SweepSummary:
    """Run :func:`sweep`, log it as ``sweep_done`` and store its summary for ``status``.

    A sweep that cannot run is logged as ``sweep_failed`` with code and remedy, stored as such,
    and re-raised.
    """
    bound = log.bind(account=account.name)
    try:
        summary = await sweep(settings, account, repo, progress=progress, stopping=stopping)
    except MailbridgeError as exc:
        # Stored, then logged: `status` read on seeing the line shows what it reports.
        with contextlib.suppress(MailbridgeError):  # the sweep's own error is the news
            await repo.record_sweep(account.name, datetime.now(UTC), f"failed: {exc.code}", 0)
        bound.warning("sweep_failed", code=exc.code, error=str(exc), remedy=exc.remedy)
        raise
    assert summary.finished is not None  # set by sweep()
    await repo.record_sweep(account.name, summary.finished, summary.line(), summary.imported)
    bound.info(
        "sweep_done",
        retried=summary.retried,
        recovered=summary.recovered + summary.already_imported,
        still_failing=len(summary.still_failing),
        inbox_imported=summary.inbox_imported,
        new_failures=len(summary.new_failures),
        skipped_young=summary.skipped_young,
        older_failures_left=summary.left_old,
        held_internal=summary.held_internal,
        reconciled=summary.reconciled,
        discarded=summary.discarded,  # automatic mail and bounces, moved to Processed
        reasons=summary.reasons(),
        seconds=round((summary.finished - summary.started).total_seconds(), 3),
    )
    return summary


async def run_schedule(
    settings: Settings,
    account: AccountSettings,
    repo: AsyncRepository,
    stopping: asyncio.Event,
    *,
    skip: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """Sweep ``account`` on ``recovery.schedule`` until ``stopping`` is set (the daemon's task).

    ``skip`` may return a reason to let a scheduled run pass: the live loop is in an error that
    needs the operator (a wrong password: a second login attempt would only add to the
    server's failed-login count), or there is nothing to recover
    (:func:`nothing_to_recover`). A failed sweep is logged and the schedule goes on.
    """
    bound = log.bind(account=account.name)
    schedule = settings.recovery.schedule
    while not stopping.is_set():
        # From "now" every time: a sweep that overran its slot is not followed by a burst.
        slot, following = next_slots(schedule, datetime.now().astimezone())
        next_run = slot + timedelta(seconds=spread_offset(account.name, following - slot))
        delay = max(0.0, (next_run - datetime.now().astimezone()).total_seconds())
        bound.debug("sweep_scheduled", at=next_run.isoformat(), in_seconds=round(delay, 1))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=delay)
        if stopping.is_set():
            break
        try:
            reason = await skip() if skip is not None else None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the look (a database read) failed: sweep, as if unsure
            code = exc.code if isinstance(exc, MailbridgeError) else "internal"
            bound.warning("sweep_skip_check_failed", code=code, error=str(exc) or repr(exc))
            reason = None
        if reason:
            # A fleet's healthy accounts skip every slot: a line each only when asked for.
            level = "debug" if reason.startswith(NOTHING_TO_RECOVER) else "info"
            getattr(bound, level)("sweep_skipped", reason=reason)
            continue
        try:
            await sweep_and_record(settings, account, repo, stopping=stopping)
        except asyncio.CancelledError:
            raise
        except MailbridgeError:
            pass  # logged by sweep_and_record; the next slot tries again
        except Exception:  # a bug in the sweep must not end the schedule (or the daemon)
            bound.exception("sweep_crashed")


NOTHING_TO_RECOVER = "nothing to recover"


def nothing_to_recover(unresolved_failures: int, waiting_since: datetime | None) -> str | None:
    """Why a scheduled sweep need not log in, or None.

    A sweep does two things: it retries the account's failed imports (the unresolved rows of
    ``importfailure``: a message is moved to the Failed folder only after its row is
    recorded), and it imports Inbox mail the live loop missed. ``waiting_since`` is when the
    live loop, now waiting on its session for the server's next push (IDLE, or between polls),
    finished its last pass over the whole Inbox (``UID SEARCH UNDELETED`` and import); None
    when it is not waiting so (connecting, importing, in a backoff). With no unresolved
    failure and such a loop there is neither: mail is pushed to the loop as it comes, a
    silent connection is replaced within ``idle_timeout_seconds``, and the sweep would only
    be a second login (for 10,000 accounts on the default schedule, about eight a second,
    for nothing).
    """
    if unresolved_failures or waiting_since is None:
        return None
    return (
        f"{NOTHING_TO_RECOVER}: no failed import, and the live loop has waited for new mail "
        f"since its pass over the Inbox at {waiting_since.isoformat(timespec='seconds')}"
    )


# schedule -> (computed at, next slot, the slot after): shared by a fleet's schedules.
_slots: dict[str, tuple[datetime, datetime, datetime]] = {}


def next_slots(schedule: str, now: datetime) -> tuple[datetime, datetime]:
    """The first two slots of the cron expression ``schedule`` after ``now`` (aware).

    Every account of a fleet asks at start-up (croniter: ~1 ms each, seen by py-spy); the
    answer computed at ``t0`` holds for any ``now`` from ``t0`` until that first slot, since
    no slot lies between, so it is reused for that long."""
    cached = _slots.get(schedule)
    if cached is not None and cached[0] <= now < cached[1]:
        return cached[1], cached[2]
    from croniter import croniter

    slots = croniter(schedule, now)
    slot: datetime = slots.get_next(datetime)
    following: datetime = slots.get_next(datetime)
    _slots[schedule] = (now, slot, following)
    return slot, following


# A fleet's sweeps are spread over at most this long after each slot of the schedule.
SPREAD_MAX = timedelta(minutes=5)


def spread_offset(account: str, gap: timedelta) -> float:
    """Seconds after a schedule slot at which ``account`` sweeps: a stable share of
    min(half the gap between slots, SPREAD_MAX), taken from a hash of the account's name.

    1,000 accounts on "*/20 * * * *" would otherwise all log in a second time in the same
    second (a connection storm for the server, and a CPU spike here, seen in scripts/bench);
    spread, they sweep a few per second. Stable, so an operator can tell when an account
    sweeps from its ``sweep_scheduled`` debug line, and the same after every restart."""
    window = min(gap / 2, SPREAD_MAX).total_seconds()
    share = int.from_bytes(hashlib.sha256(account.encode()).digest()[:8], "big") / 2**64
    return share * max(0.0, window)


# Failures the scheduled sweep does not retry (README "Failed messages and the recovery sweep").
HELD_CODES: Final = frozenset({"internal", "message_unreadable"})


# -- internals ---------------------------------------------------------------------------------


def _worker(
    settings: Settings,
    account: AccountSettings,
    repo: AsyncRepository,
    stopping: asyncio.Event | None,
) -> ImportStep:
    # The import step alone: the sweep never writes the account's state (that is the live
    # loop's); its own summary is recorded separately.
    bound = structlog.get_logger("mailbridge.account").bind(account=account.name, sweep=True)
    return ImportStep(settings, account, repo, stopping=stopping or asyncio.Event(), log=bound)


async def _retry_failed(
    worker: ImportStep,
    session: ImapSession,
    summary: SweepSummary,
    *,
    since: datetime | None,
    uids: Sequence[int] | None = None,
    progress: Progress | None,
) -> None:
    """Retry Failed-folder messages: those named, or those newer than ``since`` (None: all).

    The folder is reconciled with ``importfailure`` first (:func:`_reconcile`)."""
    # Read before the folder is listed: see Repository.reconcile_failures.
    known = await worker.repo.failures(worker.account.name)
    await session.select(worker.account.folders.failed)
    await _reconcile(worker, session, summary, known)
    present = await session.search("UNDELETED")
    if uids is not None:
        wanted = set(uids)
        candidates = [uid for uid in present if uid in wanted]
    elif since is not None:
        # SINCE compares dates only (RFC 3501 6.4.4), in the server's time zone: a day early
        # (since_date); the INTERNALDATE check below is exact.
        candidates = await session.search("SINCE", since_date(since), "UNDELETED")
    else:
        candidates = present
    summary.left_old += len(present) - len(candidates) if uids is None else 0
    metas = await session.fetch_meta(candidates)  # sizes and dates, no bodies
    if since is not None:
        recent = [m for m in metas if m.internaldate is None or m.internaldate >= since]
        summary.left_old += len(metas) - len(recent)
        # A bug (code internal) fails again on every sweep, and an unreadable message would break
        # the sweep's connection each time; `failed retry` names them instead.
        held = {r.folder_uid for r in known if r.code in HELD_CODES and r.folder_uid is not None}
        metas = [m for m in recent if m.uid not in held]
        summary.held_internal += len(recent) - len(metas)
    if progress is not None:
        progress("failed", 0, len(metas))
    if len(metas) >= POOL_MIN_BATCH:
        warm_up_pool()  # parse workers start while the first batch is fetched
    large, batches = await worker.plan_fetches(session, metas, in_failed=True)
    summary.retried += large.failed
    summary.still_failing.extend(large.failures)
    done = large.failed

    async def handle(batch: Sequence[int], prefetched: Prefetched) -> None:
        nonlocal done
        fetched, parsed = prefetched
        if fetched:
            result = await worker.process_fetched(session, fetched, in_failed=True, parsed=parsed)
            summary.retried += len(fetched)
            summary.recovered += result.imported
            summary.already_imported += result.duplicates
            summary.discarded += result.discarded + result.bounces
            summary.still_failing.extend(result.failures)
        done += len(batch)
        if progress is not None:
            progress("failed", done, len(metas))

    # Pipelined as the live loop: the next batch is fetched and parsed during this one's write.
    await worker.pipelined(session, batches, handle)


async def _reconcile(
    worker: ImportStep,
    session: ImapSession,
    summary: SweepSummary,
    known: Sequence[FailureRecord],
) -> None:
    """Resolve the failures whose message is no longer in the (selected) Failed folder.

    One ``UID SEARCH ALL`` (a message flagged ``\\Deleted`` but not expunged is still there),
    skipped when no failure has a Failed-folder UID to look for. The repository also checks the
    folder's UIDVALIDITY: after a change the stored UIDs mean nothing and nothing is resolved.
    Failures without a Failed-folder UID (no UIDPLUS) cannot be matched and stay as they are.
    Messages in the folder without a failure row (put there by hand) are simply retried.
    """
    bound = worker.log.bind(folder=worker.account.folders.failed)
    validity = session.uidvalidity
    if validity is None:
        bound.warning(
            "failures_not_reconciled",
            reason="the server sent no UIDVALIDITY for the Failed folder",
        )
        return
    wanted = any(r.folder_uid is not None for r in known)
    present = await session.search("ALL") if wanted else []
    result = await worker.repo.reconcile_failures(
        worker.account.name, validity, present, known if wanted else ()
    )
    if result.uidvalidity_changed:
        bound.warning(
            "failed_folder_uidvalidity_changed",
            previous=result.previous_uidvalidity,
            current=validity,
            uids_forgotten=result.forgotten,
            detail="the Failed folder was recreated: its stored UIDs were cleared and no failure"
            " was resolved",
        )
    if result.resolved:
        summary.reconciled += result.resolved
        bound.info("failures_reconciled", count=result.resolved, resolution=RESOLVED_REMOVED)


async def _import_missed(
    worker: ImportStep,
    session: ImapSession,
    summary: SweepSummary,
    *,
    before: datetime,
    progress: Progress | None,
) -> None:
    """Import Inbox mail (not \\Deleted) that arrived before ``before`` (the grace period's
    start); younger mail is told apart by its INTERNALDATE, without fetching its body."""
    await session.select(worker.account.folders.inbox)
    metas = await session.fetch_meta(await session.undeleted_uids())
    old = [m for m in metas if m.internaldate is None or m.internaldate <= before]
    summary.skipped_young += len(metas) - len(old)
    if progress is not None:
        progress("inbox", 0, len(old))
    large, batches = await worker.plan_fetches(session, old)
    summary.new_failures.extend(large.failures)
    done = large.failed
    if len(old) >= POOL_MIN_BATCH:
        warm_up_pool()  # parse workers start while the first batch is fetched

    async def handle(batch: Sequence[int], prefetched: Prefetched) -> None:
        nonlocal done
        fetched, parsed = prefetched
        if fetched:
            result = await worker.process_fetched(session, fetched, parsed=parsed)
            summary.inbox_imported += result.imported
            summary.inbox_duplicates += result.duplicates
            summary.discarded += result.discarded + result.bounces
            summary.new_failures.extend(result.failures)
        done += len(batch)
        if progress is not None:
            progress("inbox", done, len(old))

    await worker.pipelined(session, batches, handle)
