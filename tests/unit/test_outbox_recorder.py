"""The outbox's group commit of sent rows (``_SentRecorder``): a failed commit is never lost."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Sequence
from typing import Any

import pytest

from mailbridge.daemon.outbox import OutboxSummary, _SentRecorder
from mailbridge.errors import StoreError


class _Worker:
    """Records which rows each commit got; the first commit fails (a full disk, say)."""

    def __init__(self) -> None:
        self.commits: list[list[Any]] = []

    async def _record_sent(
        self, account: object, batch: Sequence[tuple[Any, bytes, object]], summary: object
    ) -> None:
        self.commits.append([row for row, _raw, _actions in batch])
        if len(self.commits) == 1:
            raise StoreError("database or disk is full", code="database_error")


async def test_a_failed_commit_is_raised_by_flush_even_when_later_rows_were_recorded() -> None:
    """Rows the server accepted stay ``sending`` when their commit fails; only a failing round
    makes the worker resolve them (``recover``). A later row started a new commit task and
    ``flush`` awaited only that one: the failure vanished and the rows stayed ``sending``
    until the daemon restarted (then were sent a second time)."""
    worker = _Worker()
    account = types.SimpleNamespace(name="shared")
    recorder = _SentRecorder(worker, account, OutboxSummary())  # type: ignore[arg-type]
    recorder.add(1, b"", ())  # type: ignore[arg-type]
    recorder.commit()  # the end of a chunk
    first = recorder.task
    assert first is not None
    await asyncio.wait({first})  # the first commit has failed before the next row comes
    recorder.add(2, b"", ())  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="disk is full"):
        await recorder.flush()
    assert worker.commits == [[1], [2]]  # the later row was still recorded


class _SlowWorker(_Worker):
    """Each commit waits until ``done`` is set (a transaction that takes its time)."""

    def __init__(self) -> None:
        super().__init__()
        self.commits.append([])  # no failure this time
        self.done = asyncio.Event()

    async def _record_sent(
        self, account: object, batch: Sequence[tuple[Any, bytes, object]], summary: object
    ) -> None:
        self.commits.append([row for row, _raw, _actions in batch])
        await self.done.wait()


async def test_an_accepted_row_is_recorded_at_once_and_rows_accepted_meanwhile_together() -> None:
    """The first accepted row starts its transaction at once (a kill -9 right after leaves
    nothing unrecorded but the rows in hand); rows accepted while it runs share the next
    one (a group commit, no fsync each: ``Repository.outbox_sent``)."""
    worker = _SlowWorker()
    account = types.SimpleNamespace(name="shared")
    recorder = _SentRecorder(worker, account, OutboxSummary())  # type: ignore[arg-type]
    recorder.add(1, b"", ())  # type: ignore[arg-type]
    recorder.commit()
    await asyncio.sleep(0)  # the recording task starts
    assert worker.commits[1:] == [[1]]  # recorded at once, not at the end of a chunk
    for row in (2, 3):
        recorder.add(row, b"", ())  # type: ignore[arg-type]
        recorder.commit()  # a transaction runs: held for the next one
    worker.done.set()
    await recorder.flush()
    assert worker.commits[1:] == [[1], [2, 3]]
