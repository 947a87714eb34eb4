"""State changes of a large fleet: coalesced into one unsynced commit, never one fsync each."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from pathlib import Path

from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import AccountState
from mailbridge.store.sqlite import SqliteRepository


async def test_concurrent_state_changes_are_one_transaction_without_fsync(
    tmp_path: Path,
) -> None:
    repo = AsyncRepository.sqlite(tmp_path / "db.sqlite")
    statements: list[str] = []
    try:
        await repo.migrate()

        def trace(r: object) -> None:
            assert isinstance(r, SqliteRepository)
            r._conn.set_trace_callback(statements.append)

        await repo._run(trace)
        # Hold the database thread, as an import in progress does, while 10,000 accounts
        # change state three times each.
        release = threading.Event()
        busy = asyncio.ensure_future(repo._run(lambda _: release.wait(30)))
        when = datetime(2026, 1, 1, tzinfo=UTC)
        writes = [
            asyncio.ensure_future(
                repo.set_account_state(
                    AccountState(
                        account=f"a{i:05d}",
                        state=state,
                        imported=1,
                        last_import=when if state == "importing" else None,
                    )
                )
            )
            for state in ("connecting", "importing", "idle")
            for i in range(10_000)
        ]
        await asyncio.sleep(0)
        release.set()
        await busy
        await asyncio.gather(*writes)
        states = {s.account: s for s in await repo.account_states()}
    finally:
        await repo.aclose()
    assert len(states) == 10_000
    assert {s.state for s in states.values()} == {"idle"}
    assert {s.imported for s in states.values()} == {3}  # the deltas of coalesced changes add up
    assert {s.last_import for s in states.values()} == {when}
    writes_begun = [i for i, sql in enumerate(statements) if sql == "BEGIN IMMEDIATE"]
    assert len(writes_begun) == 1, "one transaction for every waiting state change"
    relaxed = statements.index("PRAGMA synchronous=NORMAL")
    assert relaxed < writes_begun[0]
    assert statements[writes_begun[0] + 1 :].index("COMMIT") < statements[
        writes_begun[0] + 1 :
    ].index("PRAGMA synchronous=FULL"), "imports are synced again after the state commit"
