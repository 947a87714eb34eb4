"""The supervisor: one task per account, signals, reload, the systemd protocol, a bounded drain.

``Supervisor.run()`` is ``mailbridge run``: it starts one :class:`AccountWorker` task per enabled
account, each isolated so a crash or a dead server in one never touches another, tells systemd
READY=1, keeps a STATUS= line summarising the accounts, pings the watchdog while its own loop is
healthy, re-reads the config on SIGHUP (restarting only the accounts that changed; a bad new
config is logged and the running one kept), and on SIGTERM/SIGINT lets every worker finish the
batch in hand — never longer than ``drain_seconds`` — then exits 0.

``run_once()`` is ``mailbridge run --once``: one pass over every account, concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from dataclasses import dataclass

import structlog

from mailbridge.config import AccountSettings, Settings, load_config
from mailbridge.daemon.account import AccountWorker, PassSummary
from mailbridge.daemon.sweep import run_schedule
from mailbridge.daemon.systemd import Notifier
from mailbridge.errors import ConfigError, MailbridgeError, ServerError, describe
from mailbridge.store.base import AccountState
from mailbridge.store.sqlite import AsyncRepository, open_repository

log = structlog.get_logger("mailbridge.supervisor")

EX_OK = 0
EX_UNAVAILABLE = 69  # sysexits.h: a service (the mail server) is unavailable
EX_SOFTWARE = 70
EX_TEMPFAIL = 75


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
    ) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.drain_seconds = drain_seconds
        self.repo: AsyncRepository | None = None
        self.running: dict[str, _Running] = {}
        self.states: dict[str, AccountState] = {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    # -- public --------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self) -> int:
        self.repo = await open_repository(self.settings.database, self.settings)
        loop = asyncio.get_running_loop()
        for sig, handler in (
            (signal.SIGTERM, self.request_stop),
            (signal.SIGINT, self.request_stop),
            (signal.SIGHUP, self.request_reload),
        ):
            loop.add_signal_handler(sig, handler)
        try:
            for account in self.settings.accounts:
                if account.enabled:
                    self._start(account)
            log.info("daemon_started", accounts=len(self.running))
            self.notifier.ready()
            self._publish_status()
            await self._supervise()
            log.info("daemon_stopping", drain_seconds=self.drain_seconds)
            self.notifier.stopping()
            await self._stop_workers(list(self.running))
            log.info("daemon_stopped")
            return EX_OK
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.repo.aclose()

    # -- internals -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """The supervisor's own loop: watchdog, reloads, restarting crashed workers."""
        interval = self.notifier.watchdog_interval() or 10.0
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            reload = asyncio.ensure_future(self._reload.wait())
            done, pending = await asyncio.wait(
                {stop, reload}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self.reload()
            self._restart_dead_workers()
            # Pinged from the supervisor loop itself: if it is blocked or dead, systemd notices.
            self.notifier.watchdog()
            self._publish_status()
            del done

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
                    skip=lambda: _needs_operator(worker),
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

    async def _stop_workers(self, names: list[str]) -> None:
        """Bounded drain: ask workers to stop, wait for the batch in hand, then cancel."""
        entries = [self.running.pop(name) for name in names if name in self.running]
        if not entries:
            return
        for entry in entries:
            entry.worker.stopping.set()
        tasks = [entry.task for entry in entries]
        tasks += [entry.sweep for entry in entries if entry.sweep is not None]
        _, pending = await asyncio.wait(tasks, timeout=self.drain_seconds)
        for task in pending:
            log.warning("drain_timeout_cancelling", task=task.get_name())
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def reload(self) -> None:
        """Re-read the config; restart only what changed; keep running on a bad config."""
        self.notifier.reloading()
        source = self.settings.source
        try:
            new = load_config(source)
        except ConfigError as exc:
            log.error("reload_rejected", path=exc.path, error=str(exc), remedy=exc.remedy)
            self.notifier.ready()
            return
        if new.database != self.settings.database:
            log.warning("reload_database_change_ignored", remedy="restart the service to move it")
        old_accounts = {a.name: a for a in self.settings.accounts if a.enabled}
        new_accounts = {a.name: a for a in new.accounts if a.enabled}
        changed = [
            name
            for name in old_accounts
            if name not in new_accounts
            or new_accounts[name] != old_accounts[name]
            or new.limits != self.settings.limits
            or new.recovery != self.settings.recovery  # restarts the sweep schedules
        ]
        # database path changes need a restart; everything else applies now
        self.settings = new.model_copy(update={"database": self.settings.database})
        await self._stop_workers(changed)
        for name in changed:
            self.states.pop(name, None)
        started = [name for name in new_accounts if name not in self.running]
        for name in started:
            self._start(new_accounts[name])
        # An unchanged account may be backing off from a problem fixed outside the config (a
        # password file, a server-side setting): secrets are read at connect, so try now.
        for name, running in self.running.items():
            if name not in started:
                running.worker.wake()
        log.info(
            "config_reloaded",
            restarted=sorted(set(changed) & set(started)),
            stopped=sorted(set(changed) - set(started)),
            started=sorted(set(started) - set(changed)),
        )
        self.notifier.ready()
        self._publish_status()

    def _on_state(self, state: AccountState) -> None:
        previous = self.states.get(state.account)
        self.states[state.account] = state
        if previous is None or previous.state != state.state:
            self._publish_status()

    def _publish_status(self) -> None:
        self.notifier.status(summarise_states(self.states.values(), len(self.running)))


def _needs_operator(worker: AccountWorker) -> str | None:
    """Why a scheduled sweep should not log in now: the live loop's error needs the operator."""
    code = worker.state.code
    if code is not None and not describe(code).transient and worker.state.state == code:
        return f"the account is in {code}; the sweep resumes when it recovers"
    return None


def summarise_states(states: object, total: int) -> str:
    """The systemd STATUS= line: '3 accounts: 2 idle, 1 auth_failed'."""
    counts = Counter(s.state for s in states)  # type: ignore[attr-defined]
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return f"{total} account{'s' if total != 1 else ''}" + (f": {parts}" if parts else "")


@dataclass
class OnceResult:
    account: str
    summary: PassSummary | None
    error: MailbridgeError | None


async def run_once(settings: Settings, accounts: list[str] | None = None) -> list[OnceResult]:
    """One pass over every (or the named) enabled account, concurrently."""
    repo = await open_repository(settings.database, settings)
    try:
        chosen = [
            a for a in settings.accounts if a.enabled and (accounts is None or a.name in accounts)
        ]

        async def one(account: AccountSettings) -> OnceResult:
            worker = AccountWorker(settings, account, repo)
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

        return list(await asyncio.gather(*(one(a) for a in chosen)))
    finally:
        await repo.aclose()


def once_exit_code(results: list[OnceResult]) -> int:
    """0 when every account was served; 69 when one could not connect or log in."""
    if any(isinstance(r.error, ServerError) for r in results):
        return EX_UNAVAILABLE
    if any(r.error is not None for r in results):
        return EX_TEMPFAIL
    return EX_OK
