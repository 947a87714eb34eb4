"""Leases for several daemons, against a real (throwaway) PostgreSQL.

Two :class:`LeaseManager` play two daemons sharing 20 accounts. A "killed" daemon is one whose
rounds stop without giving anything back (what kill -9 or a lost host leaves behind): only the
expiry on the database's clock frees its accounts. Timing bounds are generous (a loaded
2-core machine); what is asserted is who holds what, and that no account is ever taken over
before its previous holder would have stopped serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailbridge.daemon.leases import LeaseManager, claim_limit, fair_share
from mailbridge.errors import StoreError
from mailbridge.store.base import LeaseRow
from mailbridge.store.postgres import PostgresRepository
from tests.conftest import PostgresDatabase

pytestmark = pytest.mark.postgres

LEASE = 5.0  # cluster.lease_seconds' minimum: the fastest take-over a test can wait for
ACCOUNTS = [f"acct{n:02d}" for n in range(20)]


@pytest.fixture
def store(postgres_database: PostgresDatabase) -> Iterator[PostgresRepository]:
    repo = PostgresRepository(postgres_database.url, password=postgres_database.password)
    repo.migrate()
    yield repo
    repo.close()


@dataclass
class Daemon:
    """One lease manager and what its callbacks saw (monotonic times)."""

    manager: LeaseManager
    acquired: dict[str, float] = field(default_factory=dict)
    lost: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


def daemon(store: Any, name: str) -> Daemon:
    d: Daemon

    async def acquired(account: str, token: int) -> None:
        d.acquired[account] = time.monotonic()

    async def lost(account: str, why: str) -> None:
        d.lost[account] = time.monotonic()

    d = Daemon(
        LeaseManager(
            store,
            ACCOUNTS,
            lease_seconds=LEASE,
            holder=f"host-{name}:1:{name}",
            on_acquired=acquired,
            on_lost=lost,
        )
    )
    return d


async def rounds(manager: LeaseManager) -> None:
    """A daemon's rounds without the clean stop of run(): cancelling this is a kill -9."""
    while True:  # noqa: ASYNC110 - the rounds are the loop; cancelling it is the kill
        await asyncio.sleep(await manager.step())


@contextlib.asynccontextmanager
async def running(*daemons: Daemon) -> AsyncIterator[None]:
    for d in daemons:
        d.task = asyncio.create_task(rounds(d.manager))
    try:
        yield
    finally:
        for d in daemons:
            assert d.task is not None
            d.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await d.task


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)
    return value


def split(a: Daemon, b: Daemon) -> tuple[int, int]:
    return len(a.manager.held), len(b.manager.held)


def test_fair_share_and_small_claim_steps() -> None:
    assert fair_share(20, 1) == 20
    assert fair_share(20, 3) == 7
    assert claim_limit(20, 0, 1) == 5  # a quarter of the share per step
    assert claim_limit(20, 8, 2) == 2  # never past the share
    assert claim_limit(20, 10, 2) == 0
    assert claim_limit(3, 0, 2) == 1


async def test_two_daemons_split_twenty_accounts_evenly(store: PostgresRepository) -> None:
    a, b = daemon(store, "a"), daemon(store, "b")
    async with running(a, b):
        await eventually(lambda: split(a, b) == (10, 10), 30, "a 10/10 split")
        held_a, held_b = set(a.manager.held), set(b.manager.held)
        assert held_a | held_b == set(ACCOUNTS)
        assert not held_a & held_b
        holders = store.lease_holders()
        assert {acct for acct, h in holders.items() if h == a.manager.holder} == held_a
        assert {acct for acct, h in holders.items() if h == b.manager.holder} == held_b


async def test_a_killed_daemons_accounts_are_taken_over_after_its_lease(
    store: PostgresRepository,
) -> None:
    a, b = daemon(store, "a"), daemon(store, "b")
    async with running(b):
        a.task = asyncio.create_task(rounds(a.manager))
        try:
            await eventually(lambda: split(a, b) == (10, 10), 30, "a 10/10 split")
            tokens = {acct: a.manager.token(acct) for acct in a.manager.held}
            # The moment a stops renewing, its leases run at most LEASE more seconds.
            valid_until = {acct: h.valid_until for acct, h in a.manager.held.items()}
        finally:
            a.task.cancel()  # kill -9: no release, no more renewals
            with contextlib.suppress(asyncio.CancelledError):
                await a.task
        killed = time.monotonic()
        await eventually(lambda: len(b.manager.held) == 20, 4 * LEASE, "b serving all 20")
        took = max(b.acquired[acct] for acct in tokens) - killed
        assert took <= 4 * LEASE
        for acct, token in tokens.items():
            # Never before a itself would have stopped serving it (its local margin), which
            # the database's expiry guarantees.
            assert b.acquired[acct] >= valid_until[acct] - a.manager.margin
            # Fencing: a's token is stale; b's new one holds.
            assert token is not None
            assert not store.holds_lease(acct, a.manager.holder, token)
            new_token = b.manager.token(acct)
            assert new_token is not None
            assert new_token > token
            assert store.holds_lease(acct, b.manager.holder, new_token)
        # A renewal by the woken-up stale daemon gets nothing back: it would stop its loops.
        assert store.renew_leases(a.manager.holder, tokens_of(tokens), LEASE) == {}


def tokens_of(tokens: dict[str, int | None]) -> dict[str, int]:
    return {acct: token for acct, token in tokens.items() if token is not None}


class FailingStore:
    """The real store, until ``broken``: then every call fails as an unreachable database."""

    def __init__(self, store: PostgresRepository) -> None:
        self.store = store
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise StoreError("connection refused", code="database_unavailable")

    def claim_leases(
        self, holder: str, accounts: Sequence[str], lease_seconds: float, limit: int
    ) -> dict[str, int]:
        self._check()
        return self.store.claim_leases(holder, accounts, lease_seconds, limit)

    def renew_leases(
        self, holder: str, tokens: dict[str, int], lease_seconds: float
    ) -> dict[str, int]:
        self._check()
        return self.store.renew_leases(holder, tokens, lease_seconds)

    def release_leases(self, holder: str, accounts: Sequence[str]) -> None:
        self._check()
        self.store.release_leases(holder, accounts)

    def survey(self, holder: str, lease_seconds: float) -> tuple[list[LeaseRow], set[str]]:
        self._check()
        return self.store.survey(holder, lease_seconds)

    def retire(self, holder: str) -> None:
        self._check()
        self.store.retire(holder)


async def test_a_daemon_that_cannot_renew_stops_its_accounts_before_they_expire(
    store: PostgresRepository,
) -> None:
    cut_off = FailingStore(store)
    a, b = daemon(cut_off, "a"), daemon(store, "b")
    async with running(a, b):
        await eventually(lambda: split(a, b) == (10, 10), 30, "a 10/10 split")
        mine = {acct: h.valid_until for acct, h in a.manager.held.items()}
        cut_off.broken = True  # a loses the database; b still reaches it
        await eventually(lambda: not a.manager.held, 2 * LEASE, "a giving up its accounts")
        await eventually(lambda: len(b.manager.held) == 20, 4 * LEASE, "b serving all 20")
        for acct, until in mine.items():
            assert a.lost[acct] <= until  # stopped before the lease could pass on
            assert b.acquired[acct] > a.lost[acct]


async def test_a_clean_stop_hands_over_at_once_and_a_late_starter_gets_its_share(
    store: PostgresRepository,
) -> None:
    a, b = daemon(store, "a"), daemon(store, "b")
    stop_a = asyncio.Event()
    run_a = asyncio.create_task(a.manager.run(stop_a))
    try:
        await eventually(lambda: len(a.manager.held) == 20, 30, "a alone serving all 20")
        async with running(b):
            # b holds nothing at first; a gives back its excess a step at a time.
            await eventually(lambda: split(a, b) == (10, 10), 6 * LEASE, "a 10/10 rebalance")
            assert all(a.lost[acct] < b.acquired[acct] for acct in b.manager.held)
            stop_a.set()
            await run_a
            stopped = time.monotonic()
            assert store.lease_holders().keys() == b.manager.held.keys()
            await eventually(lambda: len(b.manager.held) == 20, 4 * LEASE, "b serving all 20")
            # Released, not expired: taken well before a lease would have run out.
            assert max(b.acquired.values()) - stopped < LEASE
    finally:
        stop_a.set()
        with contextlib.suppress(asyncio.CancelledError):
            await run_a
