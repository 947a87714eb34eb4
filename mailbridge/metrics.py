"""Prometheus metrics for a fleet: opt-in with ``metrics: {listen: 127.0.0.1:9464}``.

The daemon records what happens into a :class:`Metrics` object only when metrics are configured
(:func:`enable`); everywhere else the hooks (:func:`record_state`, :func:`record_pass`,
:func:`record_commit`) find no recorder and return at once, so a daemon without metrics pays one
global read per event, and ``prometheus_client`` is imported only by :func:`enable`.

Per-account values live in plain slotted objects (10,000 accounts would otherwise be ~100,000
labelled children in the client library) and are turned into metric families by a collector at
each scrape; the process-wide histograms are the client library's own. Names, types and labels
follow the Prometheus naming conventions (``_total`` counters, ``_seconds`` units, timestamps as
``_timestamp_seconds``); the README's "Metrics" section lists them with example PromQL.

The endpoint is ``prometheus_client``'s HTTP server on its own daemon thread: a scrape never
waits for the event loop, and reads values the loop writes (single attribute reads and writes,
consistent enough for monitoring; the GIL makes each one atomic).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailbridge.store.base import AccountState

# Seconds from a message's arrival on the server (INTERNALDATE) to its commit: IDLE delivers
# in about a second; a backlog or a poll interval shows in the upper buckets.
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)
# One import transaction, synced (synchronous=FULL): milliseconds on a local disk.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(slots=True)
class AccountMetrics:
    """What the endpoint shows for one account."""

    state: str = "starting"
    imported: int = 0
    duplicates: int = 0
    failed: int = 0
    discarded: int = 0  # automatic mail the policy kept out (moved to Processed)
    bounces: int = 0  # delivery reports recorded as delivery errors (moved to Processed)
    reconnects: int = 0
    last_import: float | None = None  # Unix time of the last imported message
    failed_folder: int | None = None  # unresolved failures, refreshed by the daemon
    idle_since: float | None = None  # Unix time the current IDLE was (re)issued; None if not


class Metrics:
    """The recorder and its ``prometheus_client`` registry (imported here, lazily)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.accounts: dict[str, AccountMetrics] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.import_latency = Histogram(
            "mailbridge_import_latency_seconds",
            "Seconds from a message's arrival on the server (INTERNALDATE) to its commit.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "mailbridge_database_commit_seconds",
            "Seconds one import transaction (a batch) took on the database thread.",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_AccountCollector(self))
        self._server: Any = None
        self._thread: Any = None

    def account(self, name: str) -> AccountMetrics:
        found = self.accounts.get(name)
        if found is None:
            found = self.accounts[name] = AccountMetrics()
        return found

    def state(self, state: AccountState) -> None:
        entry = self.account(state.account)
        if state.state == "connecting" and entry.state not in ("starting", "connecting"):
            entry.reconnects += 1  # every connect after the first of the account's worker
        entry.state = state.state
        # Each IDLE (re)issue reports "idle" again: its age resets, so an age far beyond
        # idle_timeout_seconds means a session that stopped answering.
        entry.idle_since = time.time() if state.state == "idle" else None

    def batch(
        self,
        account: str,
        imported: int,
        duplicates: int,
        failed: int,
        arrived: Sequence[float],
        *,
        discarded: int = 0,
        bounces: int = 0,
    ) -> None:
        entry = self.account(account)
        entry.imported += imported
        entry.duplicates += duplicates
        entry.failed += failed
        entry.discarded += discarded
        entry.bounces += bounces
        now = time.time()
        if imported:
            entry.last_import = now
        for when in arrived:
            self.import_latency.observe(max(0.0, now - when))

    def failed_folder(self, counts: Iterable[tuple[str, int]]) -> None:
        for account, count in counts:
            self.account(account).failed_folder = count

    def forget(self, account: str) -> None:
        """An account removed by a reload: its series end."""
        self.accounts.pop(account, None)

    def serve(self, host: str, port: int) -> None:
        """Start the HTTP endpoint on its own thread; OSError if the address is taken."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _AccountCollector:
    """Turns the per-account objects into metric families at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # families vary with the accounts; collect() is the source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        accounts = list(self._metrics.accounts.items())  # a copy: the loop may add one meanwhile
        now = time.time()
        state = GaugeMetricFamily(
            "mailbridge_account_state",
            "1 for the state the account is in (idle, importing, backoff, auth_failed ...).",
            labels=["account", "state"],
        )
        for name, entry in accounts:
            state.add_metric([name, entry.state], 1)
        yield state
        for kind, metric, text, value in _PER_ACCOUNT:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                metric, text, labels=["account"]
            )
            for name, entry in accounts:
                sample = value(entry, now)
                if sample is not None:  # e.g. no import yet: the series is absent, not 0
                    family.add_metric([name], sample)
            yield family


def _idle_age(entry: AccountMetrics, now: float) -> float | None:
    return None if entry.idle_since is None else max(0.0, now - entry.idle_since)


# (type, name, help, value of an account at a time). Counter names get "_total" appended by the
# exposition format.
_PER_ACCOUNT: tuple[tuple[str, str, str, Callable[[AccountMetrics, float], float | None]], ...] = (
    (
        "counter",
        "mailbridge_messages_imported",
        "Messages imported into the database.",
        lambda e, _: e.imported,
    ),
    (
        "counter",
        "mailbridge_messages_failed",
        "Messages that could not be imported (moved to, or kept in, the Failed folder).",
        lambda e, _: e.failed,
    ),
    (
        "counter",
        "mailbridge_messages_duplicate",
        "Messages already in the database (or the account's own mail), moved without import.",
        lambda e, _: e.duplicates,
    ),
    (
        "counter",
        "mailbridge_messages_discarded",
        "Automatic mail the policy did not import (automatic_emails, bots.deny), moved to"
        " Processed.",
        lambda e, _: e.discarded,
    ),
    (
        "counter",
        "mailbridge_messages_bounce",
        "Delivery reports recorded as delivery errors, moved to Processed without import.",
        lambda e, _: e.bounces,
    ),
    (
        "counter",
        "mailbridge_reconnects",
        "Connections made after the first one.",
        lambda e, _: e.reconnects,
    ),
    (
        "gauge",
        "mailbridge_last_import_timestamp_seconds",
        "Unix time of the last imported message (absent before the first).",
        lambda e, _: e.last_import,
    ),
    (
        "gauge",
        "mailbridge_failed_folder_messages",
        "Messages in the Failed folder (unresolved import failures).",
        lambda e, _: e.failed_folder,
    ),
    (
        "gauge",
        "mailbridge_idle_age_seconds",
        "Seconds since the account's current IDLE was issued (absent when not in IDLE).",
        _idle_age,
    ),
)


_current: Metrics | None = None


def enable(host: str, port: int) -> Metrics:
    """Create the recorder, serve it on ``host:port`` and make the hooks record into it."""
    global _current
    metrics = Metrics()
    metrics.serve(host, port)
    _current = metrics
    return metrics


def disable() -> None:
    """Stop the endpoint; the hooks record nothing any more."""
    global _current
    metrics, _current = _current, None
    if metrics is not None:
        metrics.close()


def current() -> Metrics | None:
    return _current


def record_state(state: AccountState) -> None:
    if _current is not None:
        _current.state(state)


def record_pass(
    account: str,
    imported: int,
    duplicates: int,
    failed: int,
    arrived: Sequence[datetime | None] = (),
    *,
    discarded: int = 0,
    bounces: int = 0,
) -> None:
    """One import step's outcome; ``arrived``: the INTERNALDATE of each imported message."""
    if _current is not None:
        stamps = [when.timestamp() for when in arrived if when is not None]
        _current.batch(
            account, imported, duplicates, failed, stamps, discarded=discarded, bounces=bounces
        )


def record_commit(seconds: float) -> None:
    if _current is not None:
        _current.commit_seconds.observe(seconds)
