"""Unit tests of the recovery pieces that need no server: config, dates, summaries, backoff."""

from __future__ import annotations

import asyncio
import locale
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailbridge.cli import main as cli_main
from mailbridge.config import parse_config
from mailbridge.daemon.account import AccountWorker, backoff_seconds
from mailbridge.daemon.supervisor import _needs_operator
from mailbridge.daemon.sweep import (
    NOTHING_TO_RECOVER,
    SPREAD_MAX,
    SweepSummary,
    imap_date,
    nothing_to_recover,
    spread_offset,
)
from mailbridge.errors import AuthError, ConfigError, ServerError
from mailbridge.store.base import AccountState, FailureInfo

BASE: dict[str, Any] = {
    "accounts": [
        {
            "name": "support",
            "address": "support@example.com",
            "imap": {"host": "imap.example.com"},
            "auth": {"username": "u", "password": "p"},
        }
    ]
}


def test_recovery_defaults_follow_the_reference() -> None:
    recovery = parse_config(BASE).recovery
    assert recovery.enabled is True
    assert recovery.schedule == "*/20 * * * *"
    assert recovery.max_failed_age_days == 1
    assert recovery.grace_period_minutes == 2


def test_recovery_accepts_fractions_and_seconds_field() -> None:
    settings = parse_config(
        {**BASE, "recovery": {"schedule": "* * * * * */30", "grace_period_minutes": 0.5}}
    )
    assert settings.recovery.grace_period_minutes == 0.5


@pytest.mark.parametrize(
    ("recovery", "path"),
    [
        ({"schedule": "every 20 minutes"}, "recovery.schedule"),
        ({"schedule": "61 * * * *"}, "recovery.schedule"),
        ({"max_failed_age_days": 0}, "recovery.max_failed_age_days"),
        ({"grace_period_minutes": -1}, "recovery.grace_period_minutes"),
        ({"enable": False}, "recovery.enable"),
    ],
)
def test_bad_recovery_config_names_the_key(recovery: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "recovery": recovery})
    assert caught.value.path == path


def test_bad_cron_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "accounts:\n"
        "  - {name: support, address: s@example.com, imap: {host: h},"
        " auth: {username: u, password: p}}\n"
        "recovery: {schedule: 'often'}\n"
    )
    assert cli_main(["-c", str(config), "check-config"]) == 78
    assert "recovery.schedule" in capsys.readouterr().err


def test_check_config_names_the_secret_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "accounts:\n"
        "  - {name: support, address: s@example.com, imap: {host: h},"
        f" auth: {{username: u, password_file: {tmp_path / 'missing.pw'}}}}}\n"
    )
    assert cli_main(["-c", str(config), "check-config"]) == 78
    err = capsys.readouterr().err
    assert "accounts[0].auth.password_file (support):" in err
    assert "missing.pw" in err


def test_imap_date_ignores_the_locale() -> None:
    when = datetime(2026, 2, 1, 23, 59, tzinfo=UTC)
    before = locale.setlocale(locale.LC_TIME)
    try:
        for name in ("de_DE.UTF-8", "fr_FR.UTF-8"):
            try:
                locale.setlocale(locale.LC_TIME, name)
            except locale.Error:
                continue
            assert imap_date(when) == "1-Feb-2026"
    finally:
        locale.setlocale(locale.LC_TIME, before)
    assert imap_date(when) == "1-Feb-2026"


def _failure(code: str) -> FailureInfo:
    return FailureInfo(uid=7, message_key=f"<{code}@x>", code=code, reason="r", subject="s")


def test_sweep_summary_line_and_reasons() -> None:
    summary = SweepSummary(account="support", started=datetime.now(UTC))
    summary.retried, summary.recovered, summary.already_imported = 3, 1, 1
    summary.still_failing = [_failure("too_large")]
    summary.inbox_imported = 2
    summary.new_failures = [_failure("unparseable"), _failure("too_large")]
    summary.skipped_young = 4
    assert summary.imported == 3
    assert summary.line() == (
        "retried 3, recovered 2, still failing 1, inbox imported 2, new failures 2, "
        "skipped (grace period) 4"
    )
    assert summary.reasons() == {"too_large": 2, "unparseable": 1}


def test_backoff_respects_the_cause() -> None:
    wrong_password = AuthError("login refused", code="auth_failed")
    refused = ServerError("connection refused", code="unreachable")
    for failures in (1, 2, 5, 20):
        assert 300 <= backoff_seconds(wrong_password, failures) <= 1800
        assert 0 <= backoff_seconds(refused, failures) <= 60


class _StateSink:
    """Just enough repository for a worker's state writes."""

    def __init__(self) -> None:
        self.states: list[AccountState] = []

    async def set_account_state(self, state: AccountState) -> None:
        self.states.append(state)


async def test_wake_ends_a_long_backoff_at_once() -> None:
    settings = parse_config(BASE)
    sink = _StateSink()
    worker = AccountWorker(settings, settings.accounts[0], sink)  # type: ignore[arg-type]
    worker.wake()  # a wake before the backoff must not cut it short
    backoff = asyncio.ensure_future(worker._backoff(AuthError("refused", code="auth_failed")))
    await asyncio.sleep(0.05)
    assert not backoff.done()
    assert sink.states[-1].state == "auth_failed"
    assert _needs_operator(worker) is not None  # the scheduled sweep stays away meanwhile
    worker.wake()
    await asyncio.wait_for(backoff, timeout=1)


async def test_stop_ends_a_backoff_too() -> None:
    settings = parse_config(BASE)
    worker = AccountWorker(settings, settings.accounts[0], _StateSink())  # type: ignore[arg-type]
    backoff = asyncio.ensure_future(worker._backoff(ServerError("gone", code="unreachable")))
    await asyncio.sleep(0.01)
    worker.stopping.set()
    await asyncio.wait_for(backoff, timeout=1)
    assert _needs_operator(worker) is None  # transient: sweeps go on


def test_sweeps_of_a_fleet_are_spread_after_each_slot() -> None:
    """1,000 accounts on a 20-minute schedule sweep over 5 minutes after the slot, not in the
    same second; each account at a stable offset; a tight schedule spreads over half its gap."""
    gap = timedelta(minutes=20)
    offsets = [spread_offset(f"account{n}", gap) for n in range(1000)]
    assert all(0 <= o < SPREAD_MAX.total_seconds() for o in offsets)
    assert spread_offset("account7", gap) == offsets[7]  # stable across calls (and restarts)
    per_second = [0] * 300
    for o in offsets:
        per_second[int(o)] += 1
    assert max(per_second) <= 15  # ~3.3 a second on average; never a storm
    assert max(offsets) - min(offsets) > 0.95 * SPREAD_MAX.total_seconds()
    assert all(0 <= spread_offset(f"a{n}", timedelta(seconds=2)) < 1 for n in range(100))


def test_a_sweep_has_nothing_to_recover_only_without_failures_and_with_a_waiting_loop() -> None:
    at = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    reason = nothing_to_recover(0, at)
    assert reason is not None
    assert reason.startswith(NOTHING_TO_RECOVER)
    assert "2026-12-01T09:00:00+00:00" in reason
    assert nothing_to_recover(1, at) is None  # a failed import to retry: sweep
    assert nothing_to_recover(0, None) is None  # the loop connecting, importing, backing off


async def test_a_failed_skip_check_sweeps_and_the_schedule_goes_on(tmp_path: Path) -> None:
    """The skip rule reads the database: a locked database at a slot must not end the
    account's schedule (the task ended, silently, and no failure was ever retried again).
    The slot sweeps instead (here against a closed port: logged, and the schedule goes on)."""
    import socket

    import structlog.testing

    from mailbridge.daemon.sweep import run_schedule
    from mailbridge.errors import StoreError
    from mailbridge.store.asyncrepo import AsyncRepository

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    account = {**BASE["accounts"][0], "imap": {"host": "127.0.0.1", "port": closed, "tls": "none"}}
    settings = parse_config(
        {
            "database": str(tmp_path / "db"),
            "accounts": [account],
            "recovery": {"schedule": "* * * * * *"},
        }
    )
    calls: list[int] = []

    async def skip() -> str | None:
        calls.append(1)
        if len(calls) == 1:
            raise StoreError("database is locked", code="database_locked")
        return "nothing to recover: a test"

    repo = AsyncRepository.sqlite(tmp_path / "db")
    stopping = asyncio.Event()
    try:
        await repo.migrate()
        with structlog.testing.capture_logs() as logs:
            task = asyncio.ensure_future(
                run_schedule(settings, settings.accounts[0], repo, stopping, skip=skip)
            )
            for _ in range(100):
                if len(calls) >= 2:
                    break
                await asyncio.sleep(0.1)
            assert not task.done()  # the schedule lives on
            stopping.set()
            await asyncio.wait_for(task, 10)
    finally:
        await repo.aclose()
    assert len(calls) >= 2
    [warning] = [e for e in logs if e["event"] == "sweep_skip_check_failed"]
    assert warning["code"] == "database_locked"
    assert any(e["event"] == "sweep_failed" for e in logs)  # it swept (and could not connect)
