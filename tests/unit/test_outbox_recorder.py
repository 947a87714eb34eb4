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


async def test_a_chunk_s_rows_are_recorded_in_one_commit() -> None:
    """Rows accepted within one chunk wait for its end (``commit``): one transaction, one
    fsync, for all of them (scripts/bench, sending row); ``flush`` records what is held."""
    worker = _Worker()
    worker.commits.append([])  # no failure this time
    account = types.SimpleNamespace(name="shared")
    recorder = _SentRecorder(worker, account, OutboxSummary())  # type: ignore[arg-type]
    for row in (1, 2, 3):
        recorder.add(row, b"", ())  # type: ignore[arg-type]
    assert recorder.task is None  # nothing recorded mid-chunk
    recorder.commit()
    assert recorder.task is not None
    await asyncio.wait({recorder.task})
    recorder.add(4, b"", ())  # type: ignore[arg-type]
    await recorder.flush()  # the last chunk's rows, held when sending ended
    assert worker.commits[1:] == [[1, 2, 3], [4]]
