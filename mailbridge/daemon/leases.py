"""Leases: which daemon serves which account when several share one PostgreSQL database.

Each account is served by exactly one daemon at a time. A daemon holds an account through a row
of the ``lease`` table (holder ``host:pid:random``, expiry on the database's clock, fencing
token) and serves it only while the lease is its own:

* **Claiming.** Every round, a :class:`LeaseManager` says it is alive (``leaseholder``) and
  claims accounts whose lease is free or expired, at most its fair share (the accounts divided
  by the live daemons, itself included) and a quarter of that at a time with a short random
  pause between steps, so that daemons starting together spread the accounts evenly instead of
  the first one taking everything. A daemon holding more than its share gives the excess back
  a step at a time (loops stopped first), so that a daemon joining later gets work too.
* **Renewing.** Held leases are renewed every ``lease_seconds / 3``. A lease the database no
  longer shows as ours (expired and taken over) is lost at once. When renewals fail (the
  database unreachable) or take too long, every lease that could expire within
  ``lease_seconds / 4`` is given up locally - its account's loop stopped - before it expires,
  so that no other daemon ever starts an account this one is still serving. Validity is
  counted on this host's monotonic clock from the moment the renewal was *sent*, which is no
  later than the database's ``now()`` that set the expiry: clock skew between hosts never
  matters.
* **Taking over.** A daemon that dies (kill -9, host loss) stops renewing; the others see its
  leases expire (they wake up at the earliest expiry they know of) and claim them, with a new
  fencing token, within about ``lease_seconds`` of its last renewal.
* **Fencing.** Stopping a loop in time is the daemon's promise; the database's guarantee is the
  token: the import transaction checks that (holder, token) still holds the lease
  (:meth:`mailbridge.store.postgres.PostgresRepository.fence`), so a daemon paused past its
  lease (a stopped VM, a long GC pause) cannot commit after waking up.

With SQLite there is one daemon, and no leases are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar, runtime_checkable

import structlog

from mailbridge.errors import MailbridgeError
from mailbridge.store.base import LeaseRow

log = structlog.get_logger("mailbridge.leases")

T = TypeVar("T")

# A claim step takes at most this fraction of a daemon's fair share (at least one account).
CLAIM_STEPS: Final = 4
# The pause between claim steps while there is more to take, in seconds (random in between).
STEP_PAUSE: Final = (0.05, 0.3)


@runtime_checkable
class LeaseStore(Protocol):
    """What leases need of the database (:class:`~mailbridge.store.postgres.PostgresRepository`
    gives it). Blocking calls: the manager runs them on a thread of its own."""

    def claim_leases(
        self, holder: str, accounts: Sequence[str], lease_seconds: float, limit: int
    ) -> dict[str, int]: ...

    def renew_leases(
        self, holder: str, tokens: dict[str, int], lease_seconds: float
    ) -> dict[str, int]: ...

    def release_leases(self, holder: str, accounts: Sequence[str]) -> None: ...

    def survey(self, holder: str, lease_seconds: float) -> tuple[list[LeaseRow], set[str]]: ...

    def retire(self, holder: str) -> None: ...


def new_holder() -> str:
    """This daemon's holder name: ``host:pid:random`` (the random part tells apart two runs
    that get the same pid, e.g. in containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def fair_share(total: int, daemons: int) -> int:
    """How many of ``total`` accounts one of ``daemons`` live daemons should serve."""
    return math.ceil(total / max(daemons, 1))


def claim_limit(total: int, held: int, daemons: int) -> int:
    """How many accounts to claim in one step: up to the fair share, a quarter of it at most."""
    share = fair_share(total, daemons)
    return max(0, min(share - held, max(1, math.ceil(share / CLAIM_STEPS))))


@dataclass(slots=True)
class _Held:
    token: int
    valid_until: float  # monotonic time the lease surely lasts until (from the request's start)


Callback = Callable[[str, int], Awaitable[None]]
LostCallback = Callable[[str, str], Awaitable[None]]


class LeaseManager:
    """Claims, renews and gives up this daemon's leases; see the module docstring.

    ``on_acquired(account, token)`` starts serving an account; ``on_lost(account, why)`` must
    stop its loop before returning (the lease may pass to another daemon right after). Both
    are awaited from :meth:`run`'s task.
    """

    def __init__(
        self,
        store: LeaseStore,
        accounts: Sequence[str],
        *,
        lease_seconds: float,
        holder: str | None = None,
        on_acquired: Callback | None = None,
        on_lost: LostCallback | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.accounts = tuple(dict.fromkeys(accounts))
        self.lease_seconds = lease_seconds
        self.holder = holder or new_holder()
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self.held: dict[str, _Held] = {}
        self._rng = rng or random.Random()  # jitter only, nothing secret
        # Its own thread: a renewal must never queue behind an import batch.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailbridge-lease")
        self._next_renew = 0.0
        self._next_claim = 0.0
        self._wake = asyncio.Event()  # set_accounts: claim at once instead of at the next round

    @property
    def renew_interval(self) -> float:
        return self.lease_seconds / 3

    @property
    def margin(self) -> float:
        """A lease this close to expiry without a successful renewal is given up locally."""
        return self.lease_seconds / 4

    def set_accounts(self, accounts: Sequence[str]) -> None:
        """The accounts to compete for from now on (a reload). Held ones no longer among them
        are given up (loops stopped first) and new ones claimed at the next round, which is
        now."""
        self.accounts = tuple(dict.fromkeys(accounts))
        self._next_claim = 0.0
        self._wake.set()

    def token(self, account: str) -> int | None:
        """The fencing token of ``account``'s lease, None when not held."""
        held = self.held.get(account)
        return held.token if held is not None else None

    async def _call(self, fn: Callable[[], T], within: float | None = None) -> T:
        """``fn()`` on the lease thread; TimeoutError after ``within`` seconds (the thread
        finishes the call on its own)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, fn)
        return await asyncio.wait_for(future, within)

    # -- one round ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until ``stop`` is set; then give every lease back (loops stopped first)."""
        try:
            while not stop.is_set():
                delay = await self.step()
                if self._wake.is_set():
                    self._wake.clear()
                    continue
                waiters = {
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(self._wake.wait()),
                }
                try:
                    await asyncio.wait(
                        waiters, timeout=max(delay, 0.0), return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                self._wake.clear()
        finally:
            await self.release_all()

    async def step(self) -> float:
        """One round: renew when due, give up what is too close to expiry, claim. Returns the
        seconds until the next round is due."""
        loop = asyncio.get_running_loop()
        removed = [account for account in self.held if account not in self.accounts]
        if removed:  # gone from the config (a reload): loops stopped, then the leases freed
            await self._lose_many(removed, "the account was removed from the config", given_up=True)
            await self._release(removed)
        if self.held and loop.time() >= self._next_renew:
            await self._renew()
        await self._drop_expiring()
        if loop.time() >= self._next_claim:
            await self._claim()
        now = loop.time()
        due = [self._next_claim]
        if self.held:
            due.append(self._next_renew)
            due.append(min(h.valid_until for h in self.held.values()) - self.margin)
        return max(0.0, min(due) - now)

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        tokens = {account: held.token for account, held in self.held.items()}
        # Waiting longer than the earliest lease can be trusted is pointless: it is given up.
        budget = min(h.valid_until for h in self.held.values()) - self.margin - started
        try:
            kept = await self._call(
                lambda: self.store.renew_leases(self.holder, tokens, self.lease_seconds),
                within=max(budget, 0.001),
            )
        except (MailbridgeError, TimeoutError) as exc:
            code = exc.code if isinstance(exc, MailbridgeError) else "timeout"
            error = str(exc) or "no answer in time"  # a TimeoutError says nothing itself
            log.warning("lease_renewal_failed", holder=self.holder, code=code, error=error)
            # Retry soon; _drop_expiring gives up what cannot wait any longer.
            self._next_renew = started + min(self.renew_interval, 1.0)
            return
        self._next_renew = started + self.renew_interval
        gone = []
        for account in list(self.held):
            if account in kept:
                self.held[account].valid_until = started + self.lease_seconds
            else:
                gone.append(account)
        await self._lose_many(gone, "the lease expired and another daemon took it")

    async def _drop_expiring(self) -> None:
        now = asyncio.get_running_loop().time()
        expiring = [a for a, held in self.held.items() if held.valid_until - self.margin <= now]
        if not expiring:
            return
        await self._lose_many(expiring, "the lease could not be renewed in time")
        # A renewal still pending (the database slow, a lock) may yet extend these leases
        # after they were given up here, keeping every daemon - this one too - off them until
        # they expire again. A release queued behind it on the lease thread undoes that.
        self._release_later(expiring)

    async def _release(self, accounts: Sequence[str]) -> None:
        """Release ``accounts`` (given up locally already) within a renewal interval; a
        database that refuses or does not answer is a warning: they expire instead."""
        try:
            await self._call(
                lambda: self.store.release_leases(self.holder, accounts),
                within=self.renew_interval,
            )
        except (MailbridgeError, TimeoutError) as exc:
            log.warning("lease_release_failed", holder=self.holder, error=str(exc))

    def _release_later(self, accounts: Sequence[str]) -> None:
        """Release ``accounts`` on the lease thread after what is queued there; not awaited
        (nobody waits for a database that is slow to answer), errors logged."""
        holder, store = self.holder, self.store
        gone = list(accounts)

        def release() -> None:
            try:
                store.release_leases(holder, gone)
            except MailbridgeError as exc:  # the leases expire instead
                log.warning("lease_release_failed", holder=holder, error=str(exc))

        with contextlib.suppress(RuntimeError):  # the thread is gone: the daemon is stopping
            self._executor.submit(release)

    async def _claim(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_claim = loop.time() + self.renew_interval
        try:
            rows, alive = await self._call(
                lambda: self.store.survey(self.holder, self.lease_seconds),
                within=self.renew_interval,
            )
        except (MailbridgeError, TimeoutError) as exc:
            log.warning("lease_claim_failed", holder=self.holder, error=str(exc))
            return
        others = [r for r in rows if r.holder != self.holder]
        daemons = len(alive | {self.holder})
        share = fair_share(len(self.accounts), daemons)
        step = max(1, math.ceil(share / CLAIM_STEPS))
        if len(self.held) > share and daemons > 1:
            # More than a fair share while others run (one started later): give some back,
            # loops stopped first, a step at a time; the newcomers take them.
            extra = sorted(self.held)[-min(len(self.held) - share, step) :]
            await self._lose_many(
                extra, "rebalancing: another daemon has room for it", given_up=True
            )
            await self._release(extra)
            self._next_claim = loop.time() + self._rng.uniform(*STEP_PAUSE)
            return
        limit = claim_limit(len(self.accounts), len(self.held), daemons)
        free = [a for a in self.accounts if a not in self.held]
        if limit <= 0 or not free:
            self._wake_at_expiry(others)
            return
        started = loop.time()
        try:
            claimed = await self._call(
                lambda: self.store.claim_leases(self.holder, free, self.lease_seconds, limit),
                within=self.renew_interval,
            )
        except (MailbridgeError, TimeoutError) as exc:
            log.warning("lease_claim_failed", holder=self.holder, error=str(exc))
            return
        for account, token in sorted(claimed.items()):
            self.held[account] = _Held(token, started + self.lease_seconds)
            log.info("lease_acquired", account=account, holder=self.holder, token=token)
            if self.on_acquired is not None:
                await self.on_acquired(account, token)
        if self.held and not self._next_renew:
            self._next_renew = started + self.renew_interval
        if claimed and len(self.held) < share:
            # More to take: the next small step soon, after a random pause that lets the
            # other starting daemons take their turn.
            self._next_claim = loop.time() + self._rng.uniform(*STEP_PAUSE)
        else:
            self._wake_at_expiry(others)

    def _wake_at_expiry(self, others: Sequence[LeaseRow]) -> None:
        """Claim again right after the earliest other lease expires (a dead daemon's)."""
        if not others:
            return
        loop = asyncio.get_running_loop()
        soonest = loop.time() + min(r.remaining for r in others) + 0.2
        self._next_claim = min(self._next_claim, soonest)

    async def _lose(self, account: str, why: str) -> None:
        await self._lose_many([account], why)

    async def _lose_many(
        self, accounts: Sequence[str], why: str, *, given_up: bool = False
    ) -> None:
        """Forget ``accounts`` and stop their loops, all at once: the time left before another
        daemon may take them (``margin``) is shared by all, not spent one account after
        another. ``given_up``: this daemon lets them go by its own decision (removed from the
        config, rebalancing), logged ``lease_given_up`` at info; otherwise they were lost
        (expired, not renewed in time), a warning ``lease_lost``."""
        for account in accounts:
            self.held.pop(account, None)
            if given_up:
                log.info("lease_given_up", account=account, holder=self.holder, reason=why)
            else:
                log.warning("lease_lost", account=account, holder=self.holder, reason=why)
        if self.on_lost is not None and accounts:
            lost = self.on_lost
            await asyncio.gather(*(lost(account, why) for account in accounts))

    async def release_all(self) -> None:
        """Stop every account's loop, then give the leases back and leave the live daemons, so
        that the others take the accounts at once. Once only (the lease thread ends); a
        database that cannot be reached lets them expire instead."""
        accounts = sorted(self.held)
        for account in accounts:
            self.held.pop(account, None)
        if self.on_lost is not None and accounts:
            lost = self.on_lost
            await asyncio.gather(*(lost(account, "the daemon is stopping") for account in accounts))
        try:
            await self._call(lambda: self.store.retire(self.holder), within=self.lease_seconds)
        except (MailbridgeError, TimeoutError) as exc:
            log.warning("lease_release_failed", holder=self.holder, error=str(exc))
        finally:
            self._executor.shutdown(wait=False)
