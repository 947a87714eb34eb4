"""How the lease manager calls the supervisor back: losses stopped together, reloads.

A store in memory stands in for PostgreSQL (the database side of leases is tested against a
real one in tests/integration/test_leases.py); what is tested here is the manager's own logic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import structlog.testing

from mailbridge.daemon.leases import LeaseManager
from mailbridge.errors import StoreError
from mailbridge.store.base import LeaseRow


class MemoryStore:
    """One daemon's view: every claim succeeds, renewals keep what ``kept`` allows."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.released: list[str] = []
        self.kept: set[str] | None = None  # None: every lease is renewed

    def claim_leases(
        self, holder: str, accounts: Sequence[str], lease_seconds: float, limit: int
    ) -> dict[str, int]:
        free = [a for a in accounts if a not in self.tokens][:limit]
        for account in free:
            self.tokens[account] = 1
        return dict.fromkeys(free, 1)

    def renew_leases(
        self, holder: str, tokens: dict[str, int], lease_seconds: float
    ) -> dict[str, int]:
        return {a: t for a, t in tokens.items() if self.kept is None or a in self.kept}

    def release_leases(self, holder: str, accounts: Sequence[str]) -> None:
        self.released += accounts
        for account in accounts:
            self.tokens.pop(account, None)

    def survey(self, holder: str, lease_seconds: float) -> tuple[list[LeaseRow], set[str]]:
        return [], {holder}

    def retire(self, holder: str) -> None:
        self.tokens.clear()


async def claim_all(manager: LeaseManager, count: int) -> None:
    for _ in range(100):
        await manager.step()
        if len(manager.held) == count:
            return
        manager._next_claim = 0.0  # skip the random pause between claim steps
    raise AssertionError(f"held {sorted(manager.held)}")


async def test_leases_lost_together_are_stopped_together() -> None:
    store = MemoryStore()
    running = 0
    most = 0

    async def lost(account: str, why: str) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)  # a loop finishing its batch
        running -= 1

    accounts = ["a", "b", "c", "d"]
    manager = LeaseManager(store, accounts, lease_seconds=30, holder="h:1:x", on_lost=lost)
    await claim_all(manager, 4)
    store.kept = {"a"}  # the database says b, c, d passed to another daemon
    manager._next_renew = 0.0  # renew now
    await manager.step()
    assert set(manager.held) == {"a"}
    # Each stop may use the time left before the lease passes on: all at once, not in a row.
    assert most == 3


async def test_set_accounts_gives_up_removed_ones_and_claims_new_ones() -> None:
    store = MemoryStore()
    events: list[tuple[str, str]] = []

    async def acquired(account: str, token: int) -> None:
        events.append(("acquired", account))

    async def lost(account: str, why: str) -> None:
        events.append(("lost", account))

    manager = LeaseManager(
        store, ["a", "b"], lease_seconds=30, holder="h:1:x", on_acquired=acquired, on_lost=lost
    )
    await claim_all(manager, 2)
    manager.set_accounts(["b", "c"])
    await claim_all(manager, 2)
    assert set(manager.held) == {"b", "c"}
    assert ("lost", "a") in events
    assert events.index(("lost", "a")) < events.index(("acquired", "c"))
    assert store.released == ["a"]


class RebalancingStore(MemoryStore):
    """Another daemon has joined (its share is free), and giving leases back fails: the
    database refuses (``error``) or does not answer (``hang`` until set)."""

    def __init__(self) -> None:
        super().__init__()
        self.others = False
        self.error: Exception | None = None
        self.hang: threading.Event | None = None

    def survey(self, holder: str, lease_seconds: float) -> tuple[list[LeaseRow], set[str]]:
        return [], {holder, "other:2:y"} if self.others else {holder}

    def release_leases(self, holder: str, accounts: Sequence[str]) -> None:
        if self.hang is not None:
            self.hang.wait(30)
        if self.error is not None:
            raise self.error
        super().release_leases(holder, accounts)


async def test_a_failed_release_while_rebalancing_does_not_end_the_lease_manager() -> None:
    """Rebalancing gives leases back: a database error then is a warning (the leases, given
    up locally, expire instead), not the end of the manager - which stops the daemon - and a
    database that does not answer does not hold up the renewals of the other leases."""
    store = RebalancingStore()
    manager = LeaseManager(store, ["a", "b", "c", "d"], lease_seconds=3, holder="h:1:x")
    await claim_all(manager, 4)
    store.others = True
    store.error = StoreError("server closed the connection unexpectedly")
    manager._next_claim = 0.0
    await manager.step()  # raised StoreError out of run(): the daemon stopped
    assert len(manager.held) == 3
    store.error = None
    store.hang = threading.Event()
    manager._next_claim = 0.0
    try:
        await asyncio.wait_for(manager.step(), 2 * manager.renew_interval + 5)
    finally:
        store.hang.set()
    assert len(manager.held) == 2


async def test_a_lease_given_up_by_choice_is_info_and_a_lost_one_a_warning() -> None:
    """Rebalancing (another daemon joined) is the fleet working as meant: `lease_given_up` at
    info; a lease that expired before it could be renewed is `lease_lost`, a warning."""
    store = RebalancingStore()
    manager = LeaseManager(store, ["a", "b", "c", "d"], lease_seconds=3, holder="h:1:x")
    await claim_all(manager, 4)
    store.others = True
    manager._next_claim = 0.0
    with structlog.testing.capture_logs() as logs:
        await manager.step()
    given = [e for e in logs if e["event"] in {"lease_given_up", "lease_lost"}]
    assert given
    assert all(e["event"] == "lease_given_up" and e["log_level"] == "info" for e in given)
    assert all(e["reason"].startswith("rebalancing") for e in given)
    with structlog.testing.capture_logs() as logs:
        await manager._lose("a", "the lease could not be renewed in time")
    assert [(e["event"], e["log_level"]) for e in logs] == [("lease_lost", "warning")]
