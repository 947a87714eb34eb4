"""The import step the account loop and the recovery sweep share: parse, import in one
transaction, record the failures, then move.

:meth:`ImportStep.process_fetched` is the one path by which fetched mail enters the database
and leaves the Inbox (see :mod:`mailbridge.daemon.account` for the order of operations that
keeps mail from being lost or duplicated).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailbridge.config import AccountSettings, Settings
from mailbridge.core.messagekey import content_fingerprint, message_key
from mailbridge.core.parse import parse_message, summarise_headers
from mailbridge.core.policy import analyse
from mailbridge.daemon.parsing import parse_off_loop
from mailbridge.errors import MessageError, describe
from mailbridge.mail.imap import FetchedMessage, ImapSession
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

    def add(self, other: PassSummary) -> None:
        self.imported += other.imported
        self.discarded += other.discarded
        self.bounces += other.bounces
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.failures.extend(other.failures)


def _parse_batch(
    fetched: Sequence[FetchedMessage], max_attachment_bytes: int
) -> tuple[list[ImportItem], list[FailureInfo]]:
    """Parse a fetched batch; runs on a worker thread, never on the event loop."""
    items: list[ImportItem] = []
    failures: list[FailureInfo] = []
    for message in fetched:
        try:
            parsed = parse_message(
                message.raw,
                max_attachment_bytes=max_attachment_bytes,
                # A missing, broken or future Date falls back to when the message arrived.
                arrival=message.internaldate,
            )
        except MessageError as exc:
            failures.append(_failure_from_raw(message, exc.code, str(exc)))
        except Exception as exc:  # the parser promises MessageError; a bug must not stop the batch
            failures.append(_failure_from_raw(message, "unparseable", f"parser bug: {exc!r}"))
        else:
            # What core/policy.py needs: the automatic verdict and any delivery report.
            automatic, report = analyse(message.raw, parsed)
            items.append(
                ImportItem(uid=message.uid, message=parsed, automatic=automatic, report=report)
            )
    return items, failures


def _failure_from_raw(message: FetchedMessage, code: str, reason: str) -> FailureInfo:
    """Describe a message we could not parse, from what its headers still tell."""
    headers = summarise_headers(message.raw)
    return FailureInfo(
        uid=message.uid,
        # The parser's key, so that a later successful import resolves this failure.
        message_key=message_key(headers.message_id, content_fingerprint(message.raw)),
        code=code,
        reason=reason,
        message_id=headers.message_id,
        subject=headers.subject,
        from_address=headers.from_address,
        # When it arrived (INTERNALDATE), as the recovery sweep's age limit counts it.
        date=message.internaldate,
        size=len(message.raw),
    )


def _failure_from_result(
    item: ImportItem, result: ImportResult, arrived: datetime | None
) -> FailureInfo:
    msg = item.message
    return FailureInfo(
        uid=item.uid,
        message_key=result.message_key,  # derived when the message reuses a stored id
        code=result.error_code or "import_failed",
        reason=result.error_reason or "the database refused the message",
        message_id=msg.message_id,
        subject=msg.subject,
        from_address=msg.from_address.email if msg.from_address else "",
        date=arrived or msg.date,  # INTERNALDATE, as for a message that failed to parse
        size=msg.size,
    )


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
                _parse_batch, fetched, self.settings.limits.max_message_bytes
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
                self.log.warning(
                    "message_failed",
                    uid=failure.uid,
                    folder=self.account.folders.failed if in_failed else self.account.folders.inbox,
                    message_id=failure.message_id,
                    code=failure.code,
                    reason=failure.reason,
                    remedy=describe(failure.code).remedy,
                )
        summary.failed = len(failures)
        summary.failures = failures

        # Only now, with everything committed, does mail leave the Inbox.
        folders = self.account.folders
        # \Seen is set on the moved copies, after the MOVE (needs the COPYUID mapping, i.e.
        # UIDPLUS): flagging first and then losing the connection before the MOVE would leave
        # committed mail \Seen in the Inbox, where UNSEEN never finds it again (found by
        # tests/integration/test_faults.py). Without UIDPLUS there is no mapping: flag first.
        flag_first = not session.has_uidplus
        seen: dict[str, list[int]] = {}
        if done_uids:
            moved = await session.move(done_uids, folders.processed, mark_seen=flag_first)
            seen[folders.processed] = list(moved.values())
        if failures and in_failed:
            # Still where it was: recording the failure cleared its Failed-folder UID; restore it.
            uids = {f.message_key: f.uid for f in failures}
            await self.repo.set_failure_folder_uids(self.account.name, uids)
        elif failures:
            moved = await session.move(
                [f.uid for f in failures], folders.failed, mark_seen=flag_first
            )
            seen[folders.failed] = list(moved.values())
            keyed = {f.message_key: moved[f.uid] for f in failures if f.uid in moved}
            if keyed:
                await self.repo.set_failure_folder_uids(self.account.name, keyed)
        for folder, moved_uids in seen.items():
            await session.mark_seen_in(folder, moved_uids)
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
