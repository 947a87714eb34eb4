"""Any :class:`~mailbridge.store.base.Repository` behind ``async`` methods, for the daemon.

The repositories are synchronous (sqlite3, psycopg's blocking API); the event loop must never
wait on the database, so :class:`AsyncRepository` runs every call on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from mailbridge import metrics
from mailbridge.errors import StoreError
from mailbridge.store.base import (
    AccountState,
    ConversationDetail,
    ConversationSummary,
    FailureInfo,
    FailureRecord,
    ImportContext,
    ImportItem,
    ImportResult,
    Reconciliation,
    Repository,
)
from mailbridge.store.outbox import (
    OutboxCopy,
    OutboxFile,
    OutboxFix,
    OutboxRow,
    OutgoingRequest,
    ReplyContext,
    SentRecord,
    TemplateRecords,
)

if TYPE_CHECKING:
    from mailbridge.config import ConversationParentSettings, FollowerParentSettings

T = TypeVar("T")


class AsyncRepository:
    """Any :class:`Repository` behind ``async`` methods, run on one dedicated writer thread.

    ``factory`` is called on that thread, so a connection that must stay on the thread that
    created it (sqlite3's ``check_same_thread``) is created there. Calls run one at a time in
    the order they were made. A cancelled call is not undone: the thread finishes it (an
    import then commits, and the retry sees its messages as duplicates).
    """

    def __init__(self, factory: Callable[[], Repository]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailbridge-db")
        # The first job on the (FIFO, single) worker, so it is done before any call runs.
        self._opened: Future[Repository] = self._executor.submit(factory)
        self._closed = False
        # State changes waiting for the one job that will store them (set_account_state).
        self._states: dict[str, AccountState] = {}
        self._states_flush: asyncio.Future[None] | None = None
        self._states_lock = threading.Lock()
        # Commits of this process that cannot have changed the outbox (state writes), counted
        # on the database thread: the outbox worker's Watch tells them from an integrator's
        # commit and does not wake for each (quiet_commits).
        self._quiet_commits = 0
        # account -> (holder, fencing token) of the lease this daemon serves it under
        # (PostgreSQL, several daemons): every import of the account is fenced with it.
        self._leases: dict[str, tuple[str, int]] = {}

    @classmethod
    def sqlite(
        cls, path: str | os.PathLike[str], *, busy_timeout: float | None = None
    ) -> AsyncRepository:
        """An :class:`AsyncRepository` over a :class:`SqliteRepository` at ``path``."""
        from mailbridge.store.sqlite import DEFAULT_BUSY_TIMEOUT, SqliteRepository

        timeout = DEFAULT_BUSY_TIMEOUT if busy_timeout is None else busy_timeout
        return cls(lambda: SqliteRepository(path, busy_timeout=timeout))

    def _call(self, fn: Callable[[Repository], T]) -> T:
        return fn(self._opened.result())

    async def _run(self, fn: Callable[[Repository], T]) -> T:
        if self._closed:
            raise StoreError("the repository is closed", code="database_error")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    async def migrate(self) -> None:
        await self._run(lambda repo: repo.migrate())

    async def prepare(
        self,
        follower_parents: Sequence[FollowerParentSettings],
        conversation_parents: Sequence[ConversationParentSettings],
    ) -> None:
        fps, cps = tuple(follower_parents), tuple(conversation_parents)
        await self._run(lambda repo: repo.prepare(fps, cps))

    async def backend(self) -> Repository:
        """The repository itself, once opened, for a caller with a thread of its own: the
        lease manager (PostgresRepository is thread-safe; SQLite's is not, never hand it out)."""
        return await asyncio.wrap_future(self._opened)

    def fence(self, account: str, holder: str, token: int) -> None:
        """From now on import ``account``'s mail under this lease: the import transaction
        commits only while the database still shows it (``lease_lost`` otherwise). Kept after
        the lease is lost, so that a late import of the old holder fails its check."""
        self._leases[account] = (holder, token)

    async def import_batch(
        self, context: ImportContext, items: Sequence[ImportItem]
    ) -> list[ImportResult]:
        batch = tuple(items)  # the caller may reuse its list while the thread works
        lease = self._leases.get(context.account)
        if lease is not None and context.lease_holder is None:
            holder, token = lease
            context = dataclasses.replace(context, lease_holder=holder, lease_token=token)

        def timed(repo: Repository) -> list[ImportResult]:
            started = time.perf_counter()
            results = repo.import_batch(context, batch)
            metrics.record_commit(time.perf_counter() - started)  # a no-op without metrics
            return results

        return await self._run(timed)

    async def mark_read(self, conversation_id: int) -> bool:
        return await self._run(lambda repo: repo.mark_read(conversation_id))

    async def record_failures(self, account: str, failures: Sequence[FailureInfo]) -> None:
        batch = tuple(failures)
        await self._run(lambda repo: repo.record_failures(account, batch))

    async def set_failure_folder_uids(self, account: str, folder_uids: dict[str, int]) -> None:
        uids = dict(folder_uids)
        await self._run(lambda repo: repo.set_failure_folder_uids(account, uids))

    async def failures(
        self, account: str | None = None, *, include_resolved: bool = False
    ) -> list[FailureRecord]:
        return await self._run(
            lambda repo: repo.failures(account, include_resolved=include_resolved)
        )

    async def reconcile_failures(
        self,
        account: str,
        uidvalidity: int,
        present: Collection[int],
        known: Sequence[FailureRecord],
    ) -> Reconciliation:
        listed, rows = frozenset(present), tuple(known)
        return await self._run(
            lambda repo: repo.reconcile_failures(account, uidvalidity, listed, rows)
        )

    async def set_account_state(self, state: AccountState) -> None:
        """Store ``state``, coalesced with every other state change made meanwhile.

        Changes wait in a dict (one entry per account; ``imported`` deltas add up) and one job
        on the database thread writes them all in one transaction (``set_account_states``,
        without its own fsync on SQLite). Returns once ``state`` is stored, so a reader never
        sees an older state than a caller that already returned.
        """
        if self._closed:
            raise StoreError("the repository is closed", code="database_error")
        with self._states_lock:
            earlier = self._states.get(state.account)
            if earlier is not None:
                state = dataclasses.replace(
                    state,
                    imported=earlier.imported + state.imported,
                    last_import=state.last_import or earlier.last_import,
                )
            self._states[state.account] = state
            flush = self._states_flush
            if flush is None:
                loop = asyncio.get_running_loop()
                flush = loop.run_in_executor(self._executor, self._call, self._flush_states)
                self._states_flush = flush
        await asyncio.shield(flush)

    def _flush_states(self, repo: Repository) -> None:
        """On the database thread: take every waiting state change and store them at once."""
        with self._states_lock:
            batch = list(self._states.values())
            self._states.clear()
            self._states_flush = None
        # Counted before the commit, so that whoever sees the commit sees the count too (a
        # count without its commit, after a failure, only delays the next look by a second).
        self._quiet_commits += 1
        repo.set_account_states(batch)

    def quiet_commits(self) -> int:
        """How many commits this process made that touch no outbox row (account states)."""
        return self._quiet_commits

    async def account_states(self) -> list[AccountState]:
        return await self._run(lambda repo: repo.account_states())

    async def record_sweep(
        self, account: str, finished: datetime, summary: str, imported: int
    ) -> None:
        await self._run(lambda repo: repo.record_sweep(account, finished, summary, imported))

    async def conversations(
        self, account: str | None = None, search: str | None = None, limit: int = 100
    ) -> list[ConversationSummary]:
        return await self._run(lambda repo: repo.conversations(account, search, limit))

    async def conversation(self, conversation_id: int) -> ConversationDetail | None:
        return await self._run(lambda repo: repo.conversation(conversation_id))

    # -- outbox -------------------------------------------------------------------------------

    async def queue_outgoing(
        self, request: OutgoingRequest, files: Sequence[OutboxFile] = ()
    ) -> int:
        items = tuple(files)
        return await self._run(lambda repo: repo.queue_outgoing(request, items))

    async def outbox_row(self, outbox_id: int) -> OutboxRow | None:
        return await self._run(lambda repo: repo.outbox_row(outbox_id))

    async def outbox_due(
        self, accounts: Sequence[str], now: datetime, limit: int, max_bytes: int | None = None
    ) -> list[OutboxRow]:
        names = tuple(accounts)
        return await self._run(lambda repo: repo.outbox_due(names, now, limit, max_bytes))

    async def outbox_next_due(self, accounts: Sequence[str]) -> datetime | None:
        names = tuple(accounts)
        return await self._run(lambda repo: repo.outbox_next_due(names))

    async def outbox_in_flight(self, accounts: Sequence[str]) -> list[OutboxRow]:
        names = tuple(accounts)
        return await self._run(lambda repo: repo.outbox_in_flight(names))

    async def outbox_files(self, outbox_id: int) -> list[OutboxFile]:
        return await self._run(lambda repo: repo.outbox_files(outbox_id))

    async def reply_context(self, conversation_id: int) -> ReplyContext | None:
        return await self._run(lambda repo: repo.reply_context(conversation_id))

    async def outbox_copies(self, outbox_id: int) -> list[OutboxCopy]:
        return await self._run(lambda repo: repo.outbox_copies(outbox_id))

    async def outbox_copy_sent(self, outbox_id: int, recipient: str, now: datetime) -> None:
        await self._run(lambda repo: repo.outbox_copy_sent(outbox_id, recipient, now))

    async def outbox_begin(
        self, rows: Sequence[tuple[int, OutboxFix | None]], now: datetime
    ) -> set[int]:
        items = tuple(rows)
        return await self._run(lambda repo: repo.outbox_begin(items, now))

    async def outbox_failed_attempt(
        self,
        outbox_id: int,
        *,
        state: str,
        next_attempt: datetime | None,
        code: str,
        error: str,
        now: datetime,
    ) -> None:
        await self._run(
            lambda repo: repo.outbox_failed_attempt(
                outbox_id, state=state, next_attempt=next_attempt, code=code, error=error, now=now
            )
        )

    async def outbox_release(
        self, outbox_ids: Sequence[int], *, code: str, error: str, now: datetime
    ) -> None:
        ids = tuple(outbox_ids)
        await self._run(lambda repo: repo.outbox_release(ids, code=code, error=error, now=now))

    async def outbox_sent(self, context: ImportContext, records: Sequence[SentRecord]) -> list[int]:
        items = tuple(records)
        return await self._run(lambda repo: repo.outbox_sent(context, items))

    async def table_columns(self, tables: Sequence[str]) -> dict[str, frozenset[str]]:
        names = tuple(tables)
        return await self._run(lambda repo: repo.table_columns(names))

    async def template_records(
        self, conversation_id: int, recipient: str, history_limit: int = 20
    ) -> TemplateRecords:
        return await self._run(
            lambda repo: repo.template_records(conversation_id, recipient, history_limit)
        )

    async def automatic_replies_since(self, account: str, address: str, since: datetime) -> int:
        return await self._run(lambda repo: repo.automatic_replies_since(account, address, since))

    async def outbox_watchers(self) -> int | None:
        return await self._run(lambda repo: repo.outbox_watchers())

    async def outbox_queued_accounts(self) -> dict[str, int]:
        return await self._run(lambda repo: repo.outbox_queued_accounts())

    async def outbox_fail_account(
        self,
        account: str,
        *,
        code: str,
        error: str,
        now: datetime,
        created_before: datetime | None = None,
    ) -> list[int]:
        return await self._run(
            lambda repo: repo.outbox_fail_account(
                account, code=code, error=error, now=now, created_before=created_before
            )
        )

    async def lease_holders(self) -> dict[str, str]:
        return await self._run(lambda repo: repo.lease_holders())

    async def aclose(self) -> None:
        """Close the repository on its thread and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close_on_thread)
        finally:
            # The close job was the last one; the idle thread exits without waiting here.
            self._executor.shutdown(wait=False)

    def _close_on_thread(self) -> None:
        if self._opened.exception() is None:
            self._opened.result().close()
