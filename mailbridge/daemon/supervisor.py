"""The supervisor: one task per account, signals, reload, the systemd protocol, a bounded drain.

``Supervisor.run()`` is ``mailbridge run``: it starts one :class:`AccountWorker` task per enabled
account, each isolated so a crash or a dead server in one never touches another, tells systemd
READY=1, keeps a STATUS= line summarising the accounts, pings the watchdog while its own loop is
healthy, re-reads the config on SIGHUP (restarting only the accounts that changed; a bad new
config is logged and the running one kept), and on SIGTERM/SIGINT lets every worker finish the
batch in hand — never longer than ``drain_seconds`` — then exits 0.

Reload: an account restarts when its own settings changed, starts when added (or enabled) and
stops when removed (or disabled); the others keep their worker and IMAP session. A change to a
global key that shapes importing (``identification``, the parents, ``limits``, ``recovery``)
restarts every account, since each worker holds the Settings it was started with; before that
the repository prepares the new parent tables against the database, as at start-up, and a
config it refuses is rejected like one that does not parse.

Watchdog: ``WATCHDOG=1`` is sent only when systemd asked for it (``$WATCHDOG_USEC``, and
``$WATCHDOG_PID`` ours if set), every half of that interval, from the supervisor loop itself.
A reload and the final drain may each wait ``drain_seconds`` for workers, so they run as a task
beside the loop, which keeps pinging; one that overruns that bound by ``STUCK_GRACE_SECONDS``
counts as a hung loop and the pings stop, so systemd restarts the service.

Several daemons (PostgreSQL): accounts are not all started. A :class:`LeaseManager`
(daemon/leases.py) competes for the enabled accounts with the other daemons sharing the
database; an account's worker and its scheduled sweep start when this daemon acquires its
lease (so each account is served, and swept, by exactly one daemon) and stop when the lease is
lost, within a fraction of ``cluster.lease_seconds``, before any other daemon may take it. Every
import of the account is fenced with the lease's token (AsyncRepository.fence). The outbox
worker sends only for the accounts held. SIGTERM drains the workers, then releases every lease
so that the others take over at once; SIGHUP changes the accounts competed for. With SQLite
there is one daemon: every enabled account starts at once, no leases.

``run_once()`` is ``mailbridge run --once``: one pass over every account, concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import signal
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from mailbridge import metrics
from mailbridge.config import AccountSettings, LogSettings, Settings, load_config
from mailbridge.daemon.account import AccountWorker, PassSummary
from mailbridge.daemon.leases import LeaseManager, LeaseStore
from mailbridge.daemon.limits import raise_fd_limit
from mailbridge.daemon.outbox import OutboxSummary, OutboxWorker, served_by_daemons
from mailbridge.daemon.sweep import nothing_to_recover, run_schedule
from mailbridge.daemon.systemd import Notifier
from mailbridge.errors import EX_OK, ConfigError, MailbridgeError, describe, exit_status
from mailbridge.store.asyncrepo import AsyncRepository
from mailbridge.store.base import AccountState
from mailbridge.store.factory import open_repository

log = structlog.get_logger("mailbridge.supervisor")

EX_SOFTWARE = 70

# How often the supervisor loop wakes to restart a crashed worker when no watchdog ping is due.
HOUSEKEEPING_SECONDS = 10.0
# A reload or the final drain is bounded by drain_seconds (then workers are cancelled); this much
# longer (a config file, a prepare queued behind an import on the database thread) and it is
# hung: the watchdog pings stop so that systemd restarts the service.
STUCK_GRACE_SECONDS = 60.0


# Keys of Settings that are not global import settings: accounts are compared one by one, a new
# database path needs a service restart, and log is applied on its own (reconfigure_log, where
# flags override it). Every other key, including one added later, restarts every account.
# The outbox worker reads `outbox` afresh at every look, so it needs no restart either.
# `cluster` (lease_seconds) is handed to the lease manager at once.
_NOT_IMPORT_GLOBALS = frozenset(
    {"accounts", "database", "log", "metrics", "source", "outbox", "cluster"}
)
# How often the Failed-folder sizes shown by the metrics endpoint are read from the database.
METRICS_REFRESH_SECONDS = 30.0
# At most one STATUS= datagram per this many seconds from state changes: 10,000 accounts
# connecting make tens of thousands of changes, and systemd needs to show only the latest line.
STATUS_MIN_INTERVAL_SECONDS = 1.0


@dataclass
class _Running:
    worker: AccountWorker
    task: asyncio.Task[None]
    settings: AccountSettings
    sweep: asyncio.Task[None] | None = None  # the recovery sweep's schedule, beside the loop


class Supervisor:
    """Runs every account until SIGTERM; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        notifier: Notifier | None = None,
        drain_seconds: float = 30.0,
        only: frozenset[str] | None = None,
        reconfigure_log: Callable[[LogSettings], None] | None = None,
    ) -> None:
        # Applies a reload's new `log:` settings (the CLI passes one that keeps --log-level /
        # --log-format given on the command line); without it a change needs a restart.
        self.reconfigure_log = reconfigure_log
        # `mailbridge run --account A`: these accounts only, at start and after every reload.
        self.only = only
        if only is not None:
            settings = _only(settings, only)
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.drain_seconds = drain_seconds
        self.repo: AsyncRepository | None = None
        self.running: dict[str, _Running] = {}
        self.states: dict[str, AccountState] = {}
        # Accounts per state, kept up to date at each change: the STATUS= line is built from
        # these counts, never by walking every account (O(accounts) per change before).
        self.state_counts: Counter[str] = Counter()
        self._status_handle: asyncio.TimerHandle | None = None
        self._status_sent = -math.inf  # loop time of the last STATUS= datagram
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.outbox: OutboxWorker | None = None
        # PostgreSQL: the leases of the accounts this daemon serves (None with SQLite).
        self.leases: LeaseManager | None = None
        self._lease_stop = asyncio.Event()
        self.exit_code = EX_OK

    # -- public --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self) -> int:
        self.repo = await open_repository(self.settings.database, self.settings)
        raise_fd_limit(sum(1 for a in self.settings.accounts if a.enabled))
        refresh: asyncio.Task[None] | None = None
        if self.settings.metrics is not None:
            try:
                metrics.enable(self.settings.metrics.host, self.settings.metrics.port)
            except OSError as exc:
                await self.repo.aclose()
                raise ConfigError(
                    f"cannot listen on {self.settings.metrics.listen}: {exc.strerror or exc}",
                    path="metrics.listen",
                ) from exc
            log.info("metrics_listening", listen=self.settings.metrics.listen)
            refresh = asyncio.create_task(self._refresh_metrics(), name="metrics")
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            loop.add_signal_handler(sig, handler)
        lease_task: asyncio.Task[None] | None = None
        try:
            # Sending: one task for every account's outbox rows (daemon/outbox.py).
            outbox = OutboxWorker(lambda: self.settings, self.repo, only=self.only)
            self.outbox = outbox
            if self.settings.sqlite_path is None:
                # Several daemons may share the database: serve what this one holds a lease of.
                outbox.only = frozenset()
                lease_task = await self._start_leases()
            else:
                for account in self.settings.accounts:
                    if account.enabled:
                        self._start(account)
            outbox_task = asyncio.create_task(outbox.run(), name="outbox")
            log.info(
                "daemon_started",
                accounts=len(self.running),
                holder=self.leases.holder if self.leases is not None else None,
            )
            self.notifier.ready()
            self._publish_status()
            try:
                await self._supervise()  # returns once SIGTERM's drain is done
            finally:
                if lease_task is not None:
                    # Loops are stopped (the drain): give every lease back, so that the other
                    # daemons take the accounts at once instead of after lease_seconds.
                    self._lease_stop.set()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.wait_for(lease_task, self.drain_seconds)
                # The message in hand is finished (its row recorded), then the worker stops.
                outbox.stopping.set()
                _, pending = await asyncio.wait({outbox_task}, timeout=self.drain_seconds)
                for task in pending:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await outbox_task
            log.info("daemon_stopped")
            return self.exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if refresh is not None:
                refresh.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresh
                metrics.disable()
            await self.repo.aclose()

    # -- internals -----------------------------------------------------------------------------

    async def _start_leases(self) -> asyncio.Task[None]:
        """PostgreSQL: start competing for the enabled accounts (see the module docstring)."""
        assert self.repo is not None
        store = await self.repo.backend()
        if not isinstance(store, LeaseStore):  # pragma: no cover - PostgresRepository is one
            raise TypeError(f"{type(store).__name__} keeps no leases")
        self.leases = LeaseManager(
            store,
            [a.name for a in self.settings.accounts if a.enabled],
            lease_seconds=self.settings.cluster.lease_seconds,
            on_acquired=self._lease_acquired,
            on_lost=self._lease_lost,
        )
        task = asyncio.create_task(self.leases.run(self._lease_stop), name="leases")
        task.add_done_callback(self._leases_ended)
        return task

    def _leases_ended(self, task: asyncio.Task[None]) -> None:
        """The lease manager ended (its loops stopped by release_all): before SIGTERM's drain
        asked for it, that is a bug - the daemon stops, with an error, rather than run without
        leases."""
        if self._lease_stop.is_set():
            return
        exc = task.exception() if not task.cancelled() else None
        log.error("leases_failed", code="internal", error=repr(exc), remedy="report the bug")
        self.exit_code = EX_SOFTWARE
        self.request_stop()

    async def _lease_acquired(self, account: str, token: int) -> None:
        """This daemon now holds ``account``: fence its imports, start its loop and sweep."""
        assert self.repo is not None
        assert self.leases is not None
        self.repo.fence(account, self.leases.holder, token)
        settings = next((a for a in self.settings.accounts if a.name == account), None)
        if self._stop.is_set() or settings is None or not settings.enabled:
            return  # draining, or gone in a reload: the lease is given back at the next round
        if account not in self.running:
            self._start(settings)
        self._outbox_follows_leases()

    async def _lease_lost(self, account: str, why: str) -> None:
        """``account``'s lease is lost (or given up): stop its loop and sweep well before
        another daemon may start it - the batch in hand gets an eighth of the lease time, then
        the tasks are cancelled (an import already sent to the database is fenced)."""
        assert self.leases is not None
        self._outbox_follows_leases()
        within = self.leases.lease_seconds / 8

        async def stop_loop() -> None:
            if account in self.running:
                # The next holder writes the account's state: a last "stopped" from here
                # (written late, after a pause) would overwrite its live one.
                self.running[account].worker.record_state = False
                await self._stop_workers([account], within=within, why=f"lease: {why}")
                self._forget_state(account)

        # Its outbox rows in hand settled too (none left marked sending for the next holder's
        # recovery to send again), in the same time as the loop.
        settle = self.outbox.let_go(account, within) if self.outbox is not None else None
        await asyncio.gather(stop_loop(), *([settle] if settle is not None else []))

    def _outbox_follows_leases(self) -> None:
        """The outbox sends for the accounts this daemon holds (and --account allows)."""
        if self.outbox is None or self.leases is None:
            return
        held = frozenset(self.leases.held)
        self.outbox.only = held if self.only is None else held & self.only
        self.outbox.wake()  # an account just taken may have rows due

    async def _refresh_metrics(self) -> None:
        """Every METRICS_REFRESH_SECONDS: the Failed-folder size of each account, for metrics."""
        assert self.repo is not None
        while True:
            recorder = metrics.current()
            if recorder is not None:
                try:
                    states = await self.repo.account_states()
                except MailbridgeError as exc:
                    log.warning("metrics_refresh_failed", code=exc.code, error=str(exc))
                else:
                    # An account without a row yet (just started) has no failures either.
                    counts = dict.fromkeys(self.running, 0)
                    counts.update((s.account, s.failed) for s in states if s.account in counts)
                    recorder.failed_folder(counts.items())
            await asyncio.sleep(METRICS_REFRESH_SECONDS)

    async def _supervise(self) -> None:
        """The supervisor's own loop: watchdog, reloads, restarting crashed workers, the drain.

        A reload and the drain after SIGTERM run as a task (one at a time) beside this loop, so a
        worker that takes its ``drain_seconds`` to stop does not starve the watchdog. A SIGHUP
        during a reload is served after it; SIGTERM during a reload waits for it (bounded too).
        """
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_interval()  # None: systemd asked for no watchdog
        next_ping = loop.time()
        work: asyncio.Task[None] | None = None
        started = deadline = math.inf  # when the running work began, and when it counts as hung
        hung_logged = False
        draining = False
        try:
            while True:
                if work is not None and work.done():
                    _log_task_failure(work)
                    work = None
                if work is None:
                    if draining:
                        return
                    if self._stop.is_set():
                        draining = True
                        log.info("daemon_stopping", drain_seconds=self.drain_seconds)
                        self.notifier.stopping()
                        work = asyncio.create_task(
                            self._stop_workers(list(self.running)), name="drain"
                        )
                    elif self._reload.is_set():
                        self._reload.clear()
                        work = asyncio.create_task(self.reload(), name="reload")
                    else:
                        self._restart_dead_workers()
                    if work is not None:
                        started = loop.time()
                        deadline = started + self.drain_seconds + STUCK_GRACE_SECONDS
                        hung_logged = False
                now = loop.time()
                healthy = work is None or now < deadline
                if not healthy and not hung_logged:
                    hung_logged = True
                    assert work is not None
                    log.error(
                        "supervisor_hung",
                        task=work.get_name(),
                        seconds=round(now - started),
                        watchdog=interval is not None,
                        remedy="systemd's watchdog restarts the service; report the hang",
                    )
                if interval is not None and now >= next_ping:
                    next_ping = now + interval
                    if healthy:
                        # Pinged from this loop itself: if it is blocked or dead, systemd notices.
                        self.notifier.watchdog()
                if not draining:
                    self._publish_status()
                timeout = HOUSEKEEPING_SECONDS
                if interval is not None:
                    timeout = min(timeout, max(0.0, next_ping - loop.time()))
                await self._wait_for_news(work, timeout)
        finally:
            if work is not None and not work.done():  # the supervisor itself was cancelled
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work

    async def _wait_for_news(self, work: asyncio.Task[None] | None, seconds: float) -> None:
        """Sleep ``seconds``, or until the running work ends (with none: SIGTERM or SIGHUP)."""
        if work is not None:
            await asyncio.wait({work}, timeout=seconds)
            return
        waiters = {
            asyncio.ensure_future(self._stop.wait()),
            asyncio.ensure_future(self._reload.wait()),
        }
        _, pending = await asyncio.wait(
            waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()

    def _restart_dead_workers(self) -> None:
        for name, running in list(self.running.items()):
            if running.task.done() and not running.worker.stopping.is_set():
                exc = running.task.exception() if not running.task.cancelled() else None
                log.error("account_task_died", account=name, error=repr(exc))
                running.worker.stopping.set()  # ends its sweep schedule; _start makes a new one
                self._start(running.settings)

    def _start(self, account: AccountSettings) -> None:
        assert self.repo is not None
        worker = AccountWorker(self.settings, account, self.repo, on_state=self._on_state)
        task = asyncio.create_task(worker.run(), name=f"account:{account.name}")
        sweep_task = None
        if self.settings.recovery.enabled:
            # Its own task and IMAP connection; it stops with the worker (same event).
            sweep_task = asyncio.create_task(
                run_schedule(
                    self.settings,
                    account,
                    self.repo,
                    worker.stopping,
                    skip=functools.partial(_sweep_skip, worker),
                ),
                name=f"sweep:{account.name}",
            )
        self.running[account.name] = _Running(worker, task, account, sweep_task)
        if not account.imap.verify_certificate:
            log.warning(
                "tls_verification_disabled",
                account=account.name,
                remedy="set imap.ca_file to the server's CA and verify_certificate: true",
            )

    async def _stop_workers(
        self, names: list[str], within: float | None = None, why: str = "stopping"
    ) -> None:
        """Bounded drain: ask workers to stop, wait for the batch in hand (``within`` seconds,
        ``drain_seconds`` by default), then cancel. ``why`` is said when a task is cancelled
        (the daemon stopping, a reload, a lease about to lapse)."""
        entries = [self.running.pop(name) for name in names if name in self.running]
        if not entries:
            return
        for entry in entries:
            entry.worker.stopping.set()
        tasks = [entry.task for entry in entries]
        tasks += [entry.sweep for entry in entries if entry.sweep is not None]
        timeout = self.drain_seconds if within is None else within
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.warning("drain_timeout_cancelling", task=task.get_name(), reason=why)
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass  # cancelled above, after its drain time: logged as drain_timeout_cancelling
            except Exception as exc:  # a worker that failed is reported, never swallowed
                log.error(
                    "drain_task_failed",
                    task=task.get_name(),
                    code="internal",
                    error=repr(exc),
                    exc_info=exc,
                )

    async def reload(self) -> None:
        """Re-read the config; restart only what changed; keep running on a bad config."""
        self.notifier.reloading()
        try:
            await self._reload_config()
        finally:
            # Type=notify-reload waits for READY=1 after RELOADING=1, whatever the outcome.
            self.notifier.ready()
            self._publish_status()

    async def _reload_config(self) -> None:
        assert self.repo is not None
        try:
            new = load_config(self.settings.source)
        except ConfigError as exc:
            self._reject(exc)
            return
        if new.database != self.settings.database:
            log.warning("reload_database_change_ignored", remedy="restart the service to move it")
        if new.metrics != self.settings.metrics:
            log.warning("reload_metrics_change_ignored", remedy="restart the service to apply it")
        if new.log != self.settings.log:
            if self.reconfigure_log is None:
                log.warning("reload_log_change_ignored", remedy="restart the service to apply it")
            else:
                self.reconfigure_log(new.log)
                log.info("log_reconfigured", level=new.log.level, format=new.log.format)
        if self.only is not None:
            new = _only(new, self.only)
        # database path changes need a restart; everything else applies now
        new = new.model_copy(update={"database": self.settings.database})
        changed_globals = import_globals_changed(self.settings, new)
        if changed_globals:
            try:
                # The start-up check: create new parent tables, check existing ones and the
                # search paths against the database. One transaction: a refusal changes nothing.
                await self.repo.prepare(new.follower_parents, new.conversation_parents)
            except MailbridgeError as exc:
                self._reject(exc)
                return
        new_accounts = {a.name: a for a in new.accounts if a.enabled}
        # Compared with what each worker runs, not with the old file: that is what must change.
        changed = [
            name
            for name, running in self.running.items()
            if changed_globals or new_accounts.get(name) != running.settings
        ]
        self.settings = new
        await self._stop_workers(changed, why="reload: settings changed")
        for name in changed:
            self._forget_state(name)
            if name not in new_accounts:
                recorder = metrics.current()
                if recorder is not None:
                    recorder.forget(name)
        started = [name for name in new_accounts if name not in self.running]
        if self.leases is not None:
            # Only what this daemon holds starts now; the rest is the lease manager's to claim.
            self.leases.lease_seconds = new.cluster.lease_seconds
            self.leases.set_accounts(list(new_accounts))
            started = [name for name in started if name in self.leases.held]
        if started:
            raise_fd_limit(len(new_accounts))  # says fd_limit if the new fleet is too large
        for name in started:
            self._start(new_accounts[name])
        # An unchanged account may be backing off from a problem fixed outside the config (a
        # password file, a server-side setting): secrets are read at connect, so try now.
        for name, running in self.running.items():
            if name not in started:
                running.worker.wake()
        if self.outbox is not None:
            self.outbox.wake()  # it reads the new settings at its next look
        log.info(
            "config_reloaded",
            restarted=sorted(set(changed) & set(started)),
            stopped=sorted(set(changed) - set(started)),
            started=sorted(set(started) - set(changed)),
            changed_globals=changed_globals,
        )

    def _reject(self, exc: MailbridgeError) -> None:
        """A reload that cannot apply: say why, and keep the running config and accounts."""
        log.error(
            "reload_rejected",
            code=exc.code,
            path=exc.path if isinstance(exc, ConfigError) else None,
            error=str(exc),
            remedy=exc.remedy,
            kept="the running config",
        )

    def _on_state(self, state: AccountState) -> None:
        """A worker's state changed: O(1), and STATUS= follows within a second (throttled)."""
        metrics.record_state(state)  # every report, also a renewed IDLE (its age restarts)
        previous = self.states.get(state.account)
        self.states[state.account] = state
        if previous is not None and previous.state == state.state:
            return
        if previous is not None:
            self._uncount(previous.state)
        self.state_counts[state.state] += 1
        self._status_soon()

    def _forget_state(self, account: str) -> None:
        previous = self.states.pop(account, None)
        if previous is not None:
            self._uncount(previous.state)

    def _uncount(self, state: str) -> None:
        self.state_counts[state] -= 1
        if self.state_counts[state] <= 0:
            del self.state_counts[state]

    def _status_soon(self) -> None:
        """Publish STATUS= now, or once STATUS_MIN_INTERVAL_SECONDS after the last one."""
        if self._status_handle is not None:
            return  # one is scheduled; it will show the counts as they are then
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the daemon's loop (a test): no throttling
            self._publish_status()
            return
        delay = self._status_sent + STATUS_MIN_INTERVAL_SECONDS - loop.time()
        if delay <= 0:
            self._publish_status()
        else:
            self._status_handle = loop.call_later(delay, self._publish_status)

    def _publish_status(self) -> None:
        if self._status_handle is not None:
            self._status_handle.cancel()
            self._status_handle = None
        with contextlib.suppress(RuntimeError):
            self._status_sent = asyncio.get_running_loop().time()
        self.notifier.status(format_status(self.state_counts, len(self.running)))


def import_globals_changed(old: Settings, new: Settings) -> list[str]:
    """The global keys (not ``accounts``, ``database``, ``log``) whose values differ."""
    return sorted(
        name
        for name in Settings.model_fields
        if name not in _NOT_IMPORT_GLOBALS and getattr(old, name) != getattr(new, name)
    )


def _log_task_failure(task: asyncio.Task[None]) -> None:
    """Retrieve a finished reload's or drain's outcome; a bug in one must not stop the loop."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("supervisor_task_failed", task=task.get_name(), error=repr(exc))


async def _sweep_skip(worker: AccountWorker) -> str | None:
    """Why the account's scheduled sweep should let this slot pass, or None (it runs)."""
    reason = _needs_operator(worker)
    waiting = worker.last_pass if worker.state.state in {"idle", "polling"} else None
    if reason is not None or waiting is None:
        return reason  # (no look at the database unless the rule could skip)
    failures = await worker.repo.failures(worker.account.name)
    return nothing_to_recover(len(failures), waiting)


def _needs_operator(worker: AccountWorker) -> str | None:
    """Why a scheduled sweep should not log in now: the live loop's error needs the operator."""
    code = worker.state.code
    if code is not None and not describe(code).transient and worker.state.state == code:
        return f"the account is in {code}; the sweep resumes when it recovers"
    return None


def summarise_states(states: object, total: int) -> str:
    """The systemd STATUS= line: '3 accounts: 2 idle, 1 auth_failed'."""
    return format_status(Counter(s.state for s in states), total)  # type: ignore[attr-defined]


def format_status(counts: Mapping[str, int], total: int) -> str:
    """The STATUS= line from accounts per state: O(distinct states), not O(accounts)."""
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()) if n > 0)
    return f"{total} account{'s' if total != 1 else ''}" + (f": {parts}" if parts else "")


@dataclass
class OnceResult:
    account: str
    summary: PassSummary | None
    error: MailbridgeError | None
    outbox: OutboxSummary | None = None  # the outbox's line (account "outbox")


async def run_once(settings: Settings, accounts: list[str] | None = None) -> list[OnceResult]:
    """One pass over every (or the named) enabled account, concurrently."""
    repo = await open_repository(settings.database, settings)
    try:
        chosen = [
            a for a in settings.accounts if a.enabled and (accounts is None or a.name in accounts)
        ]
        raise_fd_limit(len(chosen))
        served = await served_by_daemons(settings, repo, [a.name for a in chosen]) or set()

        async def one(account: AccountSettings) -> OnceResult:
            worker = AccountWorker(settings, account, repo)
            # Beside a daemon serving the account, `status` shows the daemon's state, not this
            # pass's (which ends "stopped" while the daemon IDLEs on).
            worker.record_state = account.name not in served
            try:
                return OnceResult(account.name, await worker.run_once(), None)
            except MailbridgeError as exc:
                log.error(
                    "account_pass_failed",
                    account=account.name,
                    code=exc.code,
                    error=str(exc),
                    remedy=exc.remedy,
                )
                return OnceResult(account.name, None, exc)

        results = list(await asyncio.gather(*(one(a) for a in chosen)))
        # Then what is due in the outbox (replies to what was just imported included).
        only = frozenset(accounts) if accounts is not None else None
        outbox = await OutboxWorker(settings, repo, only=only).run_once()
        if outbox.sent or outbox.retrying or outbox.failed:
            results.append(OnceResult("outbox", None, None, outbox))
        return results
    finally:
        await repo.aclose()


def _only(settings: Settings, names: frozenset[str]) -> Settings:
    return settings.model_copy(
        update={"accounts": tuple(a for a in settings.accounts if a.name in names)}
    )


def once_exit_code(results: list[OnceResult]) -> int:
    """0 when every account was served, else :func:`~mailbridge.errors.exit_status` of the
    errors: 78 for an account's config (its secret) or an unusable database, 69 when one
    could not connect or log in, 75 for anything temporary."""
    return exit_status([r.error for r in results if r.error is not None])
