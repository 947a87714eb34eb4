"""The import step the account loop and the recovery sweep share: parse, import in one
transaction, record the failures, then move.

:meth:`ImportStep.process_fetched` is the one path by which fetched mail enters the database
and leaves the Inbox (see :mod:`mailbridge.daemon.account` for the order of operations that
keeps mail from being lost or duplicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailbridge import metrics
from mailbridge.config import AccountSettings, Settings
from mailbridge.core.messagekey import failure_key
from mailbridge.core.parse import summarise_headers
from mailbridge.daemon.autoreply import queue_auto_replies
from mailbridge.daemon.parse_step import parse_batch as _parse_batch
from mailbridge.daemon.parse_step import portable
from mailbridge.daemon.parsing import parse_off_loop
from mailbridge.errors import MailbridgeError, describe
from mailbridge.mail.imap import FetchedMessage, ImapSession, MessageMeta
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import (
    FailureInfo,
    ImportContext,
    ImportItem,
    ImportResult,
    Outcome,
)


@dataclass
class PassSummary:
    """What one import pass did."""

    imported: int = 0
    duplicates: int = 0
    failed: int = 0
    failures: list[FailureInfo] = field(default_factory=list)
    discarded: int = 0  # automatic mail the policy did not import (moved to Processed)
    bounces: int = 0  # delivery reports recorded as delivery errors (moved to Processed)

    @property
    def handled(self) -> int:
        """Messages this pass took out of the Inbox (or left in Failed), whatever became of
        them: the live loop searches again at once after any."""
        return self.imported + self.duplicates + self.failed + self.discarded + self.bounces

    def add(self, other: PassSummary) -> None:
        self.imported += other.imported
        self.discarded += other.discarded
        self.bounces += other.bounces
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.failures.extend(other.failures)


def _failure_from_result(
    item: ImportItem, result: ImportResult, arrived: datetime | None
) -> FailureInfo:
    msg = item.message
    return FailureInfo(
        uid=item.uid,
        message_key=failure_key(msg.message_id, msg.fingerprint),  # as for a parse failure
        code=result.error_code or "import_failed",
        reason=result.error_reason or "the database refused the message",
        message_id=msg.message_id,
        subject=msg.subject,
        from_address=msg.from_address.email if msg.from_address else "",
        date=arrived or msg.date,  # INTERNALDATE, as for a message that failed to parse
        size=msg.size,
        traceback=result.traceback,
    )


def _failure_too_large(meta: MessageMeta, headers: bytes | None, limit_bytes: int) -> FailureInfo:
    """The failure of a message over ``limits.message_max_size_mb``, from its RFC822.SIZE and
    the few header fields fetched instead of the body. Without a Message-ID its key is a hash of
    those fields and the size (the whole message, which the usual key hashes, is not fetched)."""
    summary = summarise_headers(headers or b"")
    key = summary.message_id or (
        "sha256:" + hashlib.sha256((headers or b"") + b"\0" + str(meta.size).encode()).hexdigest()
    )
    mib = 1024 * 1024
    return FailureInfo(
        uid=meta.uid,
        message_key=key,
        code="too_large",
        reason=f"the message is {meta.size / mib:.1f} MB, over limits.message_max_size_mb "
        f"({limit_bytes / mib:g} MB); it was not downloaded",
        message_id=summary.message_id,
        subject=summary.subject,
        from_address=summary.from_address,
        date=meta.internaldate,
        size=meta.size,
    )


# A message whose FETCH broke the connection this many times in a row, fetched on its own each
# time, is sent to Failed (message_unreadable) without its body, so that one damaged message on
# the server (Dovecot drops the session when a mail file is shorter than its index says) stops
# only itself, not the account's Inbox.
UNREADABLE_AFTER = 3
# The codes of a FETCH that broke the session: the message's doing or the network's, which a
# message fetched on its own tells apart.
_BROKEN_FETCH = frozenset({"connection_lost", "timeout"})


def _failure_unreadable(meta: MessageMeta, attempts: int) -> FailureInfo:
    """The failure of a message whose FETCH broke the connection ``attempts`` times in a row
    (the last ``UNREADABLE_AFTER`` with it alone in the FETCH), from its
    RFC822.SIZE and arrival time only (fetching even its header fields might break it again).
    Its key hashes those and the UID: the message itself was never read."""
    seed = f"{meta.uid}\0{meta.size}\0{meta.internaldate.isoformat() if meta.internaldate else ''}"
    return FailureInfo(
        uid=meta.uid,
        message_key="sha256:" + hashlib.sha256(seed.encode()).hexdigest(),
        code="message_unreadable",
        reason=f"the server broke the connection the {attempts} times in a row this message "
        f"({meta.size} bytes) was fetched, the last {UNREADABLE_AFTER} on its own; it was not read",
        date=meta.internaldate,
        size=meta.size,
    )


def plan_batches(
    sizes: Sequence[tuple[int, int]], max_count: int, max_bytes: int
) -> list[list[int]]:
    """Cut ``(uid, size)`` pairs, in order, into UID batches of at most ``max_count`` messages
    whose sizes add up to at most ``max_bytes``. A message larger than ``max_bytes`` on its own
    (but within the message size limit, checked before) is a batch by itself."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for uid, size in sizes:
        if current and (len(current) >= max_count or total + size > max_bytes):
            batches.append(current)
            current, total = [], 0
        current.append(uid)
        total += size
    if current:
        batches.append(current)
    return batches


# A fetched batch and what parsing it gave: the items to import and the messages that failed.
Prefetched = tuple[list[FetchedMessage], tuple[list[ImportItem], list[FailureInfo]]]


class ImportStep:
    """One account's import step: ``log`` is bound to the account (and ``sweep=True`` when the
    recovery sweep uses it); ``stopping`` is the drain's event, read by the sweep between
    batches."""

    def __init__(
        self,
        settings: Settings,
        account: AccountSettings,
        repo: AsyncRepository,
        *,
        stopping: asyncio.Event,
        log: Any,
    ) -> None:
        self.settings = settings
        self.account = account
        self.repo = repo
        self.stopping = stopping
        self.log = log
        # Inbox UID -> FETCHes in a row that broke the connection with it in the batch; kept
        # across passes and reconnections (the step lives as long as the account's worker).
        self.broken_fetches: dict[int, int] = {}
        self.failed_unread = 0  # messages sent to Failed unread (message_unreadable) so far

    def may_refetch(self, exc: MailbridgeError) -> bool:
        """Whether ``exc`` broke a FETCH whose messages are now to be fetched alone."""
        return exc.code in _BROKEN_FETCH and bool(self.broken_fetches)

    async def fetch(self, session: ImapSession, uids: Sequence[int]) -> list[FetchedMessage]:
        """``session.fetch(uids)``, remembering the UIDs of a FETCH that broke the connection so
        that :meth:`plan_fetches` fetches them alone next time and, after
        ``UNREADABLE_AFTER`` breaks alone, sends them to Failed unread. Raises as the fetch."""
        try:
            fetched = await session.fetch(uids)
        except MailbridgeError as exc:
            if exc.code in _BROKEN_FETCH:
                for uid in uids:
                    self.broken_fetches[uid] = self.broken_fetches.get(uid, 0) + 1
            raise
        if self.broken_fetches:  # nearly always empty: no walk over every batch
            for uid in uids:
                self.broken_fetches.pop(uid, None)
        return fetched

    async def plan_fetches(
        self, session: ImapSession, metas: Sequence[MessageMeta], *, in_failed: bool = False
    ) -> tuple[PassSummary, list[list[int]]]:
        """Send to Failed, unread, what is not to be fetched: messages over
        ``limits.message_max_size_mb`` (``too_large``) and, in the Inbox, messages whose FETCH
        broke the connection too often (:meth:`_fail_unreadable`); return that pass and the
        batches (UIDs) of the rest: first each message whose FETCH broke the connection, alone,
        then batches bounded by ``limits.fetch_batch_size`` and ``limits.fetch_batch_max_mb``
        (:func:`plan_batches`). With ``in_failed`` (the sweep, in the selected Failed folder)
        they stay where they are.
        """
        limits = self.settings.limits
        limit = limits.message_max_bytes
        too_large = [m for m in metas if m.size > limit]
        fits = [m for m in metas if m.size <= limit]
        summary = PassSummary()
        suspects: list[int] = []
        if not in_failed and self.broken_fetches:
            unread, gone = await self._fail_unreadable(session, fits)
            summary.add(unread)
            fits = [m for m in fits if m.uid not in gone]
            suspects = [m.uid for m in fits if m.uid in self.broken_fetches]
        for start in range(0, len(too_large), limits.fetch_batch_size):
            chunk = too_large[start : start + limits.fetch_batch_size]
            headers = {m.uid: m.raw for m in await session.fetch_headers([m.uid for m in chunk])}
            failures = [_failure_too_large(m, headers.get(m.uid), limit) for m in chunk]
            summary.add(
                await self.process_fetched(session, [], in_failed=in_failed, parsed=([], failures))
            )
        alone = set(suspects)
        rest = [(m.uid, m.size) for m in fits if m.uid not in alone]
        batches = [[uid] for uid in suspects]
        batches += plan_batches(rest, limits.fetch_batch_size, limits.fetch_batch_max_bytes)
        return summary, batches

    async def _fail_unreadable(
        self, session: ImapSession, metas: Sequence[MessageMeta]
    ) -> tuple[PassSummary, set[int]]:
        """Send to Failed, unread (``message_unreadable``), the Inbox messages whose FETCH broke
        the connection more than ``UNREADABLE_AFTER`` times in a row; that pass and their UIDs."""
        broken = self.broken_fetches
        unreadable = [m for m in metas if broken.get(m.uid, 0) > UNREADABLE_AFTER]
        if not unreadable:
            return PassSummary(), set()
        failures = [_failure_unreadable(m, broken[m.uid]) for m in unreadable]
        summary = await self.process_fetched(session, [], parsed=([], failures))
        for m in unreadable:
            del broken[m.uid]
        self.failed_unread += len(unreadable)
        return summary, {m.uid for m in unreadable}

    async def fetch_and_parse(self, session: ImapSession, uids: Sequence[int]) -> Prefetched:
        """``UID FETCH`` the batch ``uids`` and parse it off the event loop."""
        fetched = await self.fetch(session, uids)
        # A thread for a few messages, worker processes for a backlog (see daemon/parsing.py).
        parsed = await parse_off_loop(
            _parse_batch, portable(fetched), self.settings.limits.max_message_bytes
        )
        return fetched, parsed

    async def pipelined(
        self,
        session: ImapSession,
        batches: Sequence[Sequence[int]],
        handle: Callable[[Sequence[int], Prefetched], Awaitable[None]],
    ) -> None:
        """Fetch and parse ``batches`` (UIDs) in order, handing each to ``handle`` (which
        imports and moves it, :meth:`process_fetched`) while the next one is fetched and parsed,
        so IMAP, parsing and the database overlap. The live loop and the recovery sweep both
        import a backlog through this.

        At most two batches (twice ``limits.fetch_batch_max_mb`` of raw mail) are in memory.
        Reading ahead risks nothing (``BODY.PEEK[]``: nothing is committed or moved), the
        session lock keeps IMAP commands in order, and each batch is still committed before it
        is moved. ``stopping`` (the drain) is read between batches: the batch in hand is
        finished, no new one is started.
        """
        if not batches:
            return
        ahead = asyncio.ensure_future(self.fetch_and_parse(session, batches[0]))
        try:
            for index, uids in enumerate(batches):
                if self.stopping.is_set():
                    break
                prefetched = await ahead
                if index + 1 < len(batches):
                    ahead = asyncio.ensure_future(self.fetch_and_parse(session, batches[index + 1]))
                await handle(uids, prefetched)
        finally:
            if not ahead.done():
                ahead.cancel()  # drops the connection if mid-FETCH; nothing was committed
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ahead  # retrieve its outcome; an error was raised above already

    async def process_fetched(
        self,
        session: ImapSession,
        fetched: Sequence[FetchedMessage],
        *,
        in_failed: bool = False,
        parsed: tuple[list[ImportItem], list[FailureInfo]] | None = None,
    ) -> PassSummary:
        """Parse, import in one transaction, record the failures, then move: the one import step.

        The live loop calls it for Inbox mail; the recovery sweep (:mod:`mailbridge.daemon.sweep`)
        for Inbox mail the loop missed and, with ``in_failed``, for messages retried where they
        are, in the (selected) Failed folder. Imported mail and duplicates go to Processed. A
        failing Inbox message goes to Failed; a failing retried one stays in Failed, its row in
        ``importfailure`` updated (attempts + 1, the new reason) and keeping its Failed-folder UID.
        ``parsed`` is ``_parse_batch(fetched)`` when the caller parsed ahead (the pipelined loop).
        """
        if parsed is None:
            # A thread for a few messages, worker processes for a backlog (daemon/parsing.py).
            parsed = await parse_off_loop(
                _parse_batch, portable(fetched), self.settings.limits.max_message_bytes
            )
        items, failures = parsed
        context = ImportContext.for_account(self.settings, self.account)
        results = await self.repo.import_batch(context, items) if items else []

        summary = PassSummary()
        done_uids: list[int] = []
        by_uid = {item.uid: item for item in items}
        arrived = {message.uid: message.internaldate for message in fetched}
        for result in results:
            if result.outcome is Outcome.FAILED:
                item = by_uid[result.uid]
                failures.append(_failure_from_result(item, result, arrived.get(result.uid)))
                continue
            done_uids.append(result.uid)
            if result.outcome is Outcome.IMPORTED:
                summary.imported += 1
                parsed_message = by_uid[result.uid].message
                self.log.info(
                    "message_imported",
                    uid=result.uid,
                    message_id=parsed_message.message_id,
                    message_key=result.message_key,
                    conversation=result.conversation_id,
                    new_conversation=result.new_conversation,
                )
                if result.reused_key is not None:
                    # Stored already (committed above); the sender reuses its Message-IDs.
                    self.log.warning(
                        "message_id_reused",
                        uid=result.uid,
                        message_id=parsed_message.message_id,
                        message_key=result.message_key,
                        stored_message_key=result.reused_key,
                    )
                if parsed_message.defects:
                    # Stored on the message (conversationmessage.defects) before this line.
                    self.log.info(
                        "message_defects",  # the account is bound to self.log
                        uid=result.uid,
                        message_key=result.message_key,
                        defects=list(parsed_message.defects),
                    )
            elif result.outcome is Outcome.DISCARDED:
                summary.discarded += 1
                self.log.info(
                    "message_discarded",
                    uid=result.uid,
                    message_id=by_uid[result.uid].message.message_id,
                    reason=result.error_reason,
                )
            elif result.outcome is Outcome.BOUNCE:
                summary.bounces += 1
                report = by_uid[result.uid].report
                event = "bounce_recorded" if result.delivery_errors_matched else "bounce_unmatched"
                log_method = self.log.info if result.delivery_errors_matched else self.log.warning
                log_method(
                    event,
                    uid=result.uid,
                    message_id=by_uid[result.uid].message.message_id,
                    kind=report.kind if report is not None else None,
                    original_message_id=report.original_message_id if report else None,
                    recipients=[r.address for r in report.recipients] if report else [],
                    errors=result.delivery_errors,
                    matched=result.delivery_errors_matched,
                )
            elif result.outcome is Outcome.IGNORED:
                # The account's own mail continuing nothing: moved to Processed, not stored.
                summary.duplicates += 1
                self.log.info(
                    "message_ignored", uid=result.uid, reason=result.error_reason or "own mail"
                )
            else:
                summary.duplicates += 1
                self.log.info("message_duplicate", uid=result.uid, message_key=result.message_key)
        if failures:
            # Committed before the move: a message never reaches Failed without its reason.
            rows = await self._with_inbox_uids(failures) if in_failed else failures
            await self.repo.record_failures(self.account.name, rows)
            for failure in failures:
                # A bug (code internal) is an error with its traceback, so it can be reported.
                emit = self.log.error if failure.traceback else self.log.warning
                extra = {"traceback": failure.traceback} if failure.traceback else {}
                emit(
                    "message_failed",
                    uid=failure.uid,
                    folder=self.account.folders.failed if in_failed else self.account.folders.inbox,
                    message_id=failure.message_id,
                    code=failure.code,
                    reason=failure.reason,
                    remedy=describe(failure.code).remedy,
                    **extra,
                )
        summary.failed = len(failures)
        summary.failures = failures
        # Automatic replies to new conversations, queued in the outbox (daemon/autoreply.py).
        await queue_auto_replies(self.settings, self.account, self.repo, items, results, arrived)
        metrics.record_pass(
            self.account.name,
            summary.imported,
            summary.duplicates,
            summary.failed,
            [arrived.get(r.uid) for r in results if r.outcome is Outcome.IMPORTED],
            discarded=summary.discarded,
            bounces=summary.bounces,
        )

        # Only now, with everything committed, does mail leave the Inbox. \Seen is set just
        # before the move, on the Inbox copies (no SELECT of the target folder): a connection
        # lost between the two leaves committed mail \Seen in the Inbox, which the next pass
        # finds all the same (the Inbox is the queue, not UNSEEN) and moves as a duplicate.
        folders = self.account.folders
        if done_uids:
            await session.move(done_uids, folders.processed)
        if failures and in_failed:
            # Still where it was: recording the failure cleared its Failed-folder UID; restore it.
            uids = {f.message_key: f.uid for f in failures}
            await self.repo.set_failure_folder_uids(self.account.name, uids)
        elif failures:
            moved = await session.move([f.uid for f in failures], folders.failed)
            keyed = {f.message_key: moved[f.uid] for f in failures if f.uid in moved}
            if keyed:
                await self.repo.set_failure_folder_uids(self.account.name, keyed)
        return summary

    async def _with_inbox_uids(self, failures: Sequence[FailureInfo]) -> list[FailureInfo]:
        """Failures of retried messages, carrying the Inbox UID of their first failure.

        ``importfailure.uid`` is the UID the message had in the Inbox; a retry only knows its
        Failed-folder UID, which must not overwrite it.
        """
        known = {
            r.message_key: r.uid
            for r in await self.repo.failures(self.account.name, include_resolved=True)
        }
        return [
            dataclasses.replace(f, uid=known[f.message_key]) if f.message_key in known else f
            for f in failures
        ]
