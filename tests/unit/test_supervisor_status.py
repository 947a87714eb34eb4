"""The systemd STATUS= line at fleet scale: counted as states change, sent at most once a second."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mailbridge.config import parse_config
from mailbridge.daemon import supervisor as supervisor_module
from mailbridge.daemon.supervisor import Supervisor, format_status
from mailbridge.store.base import AccountState


class RecordingNotifier:
    def __init__(self) -> None:
        self.statuses: list[str] = []

    def status(self, text: str) -> bool:
        self.statuses.append(text)
        return True

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: True


def _supervisor(tmp_path: Path, notifier: RecordingNotifier) -> Supervisor:
    settings = parse_config(
        {
            "database": str(tmp_path / "db.sqlite"),
            "accounts": [
                {
                    "name": "support",
                    "address": "support@example.com",
                    "imap": {"host": "imap.example.com"},
                    "auth": {"username": "support@example.com", "password": "pw"},
                }
            ],
        }
    )
    return Supervisor(settings, notifier=notifier)  # type: ignore[arg-type]


class NoWalkDict(dict[str, AccountState]):
    """The supervisor's per-account states: walking them all is what must not happen."""

    def values(self) -> Any:
        raise AssertionError("the STATUS= line walked every account")

    def __iter__(self) -> Any:
        raise AssertionError("the STATUS= line walked every account")


async def test_status_is_counted_incrementally_and_throttled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = RecordingNotifier()
    supervisor = _supervisor(tmp_path, notifier)
    supervisor.states = NoWalkDict()
    supervisor.running = {f"a{i}": None for i in range(10_000)}  # type: ignore[misc]
    monkeypatch.setattr(supervisor_module, "STATUS_MIN_INTERVAL_SECONDS", 0.2)
    for state in ("starting", "connecting", "idle"):
        for i in range(10_000):
            supervisor._on_state(AccountState(account=f"a{i}", state=state))
    # 30,000 changes: the first is sent at once, the rest coalesce into one scheduled line.
    assert len(notifier.statuses) == 1
    assert dict(supervisor.state_counts) == {"idle": 10_000}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(notifier.statuses) < 2:
        assert loop.time() < deadline, "the throttled STATUS= line was never sent"
        await asyncio.sleep(0.05)
    assert notifier.statuses[-1] == "10000 accounts: 10000 idle"
    supervisor._on_state(AccountState(account="a1", state="auth_failed"))
    supervisor._forget_state("a2")
    assert dict(supervisor.state_counts) == {"idle": 9_998, "auth_failed": 1}


def test_format_status() -> None:
    assert format_status({"idle": 2, "auth_failed": 1, "gone": 0}, 3) == (
        "3 accounts: 1 auth_failed, 2 idle"
    )
    assert format_status({}, 1) == "1 account"
