"""SIGHUP reload against a real Dovecot: only what changed restarts, a bad config changes nothing.

Each test runs a real :class:`Supervisor` on a config file, edits the file, asks for a reload
(``request_reload`` is what the SIGHUP handler calls; one test sends the real signal) and
watches the workers: an account whose settings did not change keeps its worker object and its
IMAP session (one ``imap_connected``), a changed one gets a new worker. Mail appended after the
reload shows the accounts still import, with the settings they should have.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from mailbridge.config import load_config
from mailbridge.daemon.supervisor import Supervisor
from mailbridge.daemon.systemd import Notifier
from tests.conftest import ImapUser
from tests.integration.test_import_loop import PROCESSED, db, eventually, mail
from tests.unit.test_systemd import Datagrams

pytestmark = pytest.mark.dovecot

Logs = list[MutableMapping[str, Any]]


@pytest.fixture
def users(dovecot: Any) -> list[ImapUser]:
    """Three fresh users, one per account a test may run."""
    made = []
    for _ in range(3):
        login = f"reload-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        dovecot.add_user(login, password)
        made.append(ImapUser(login=login, password=password, address=f"{login}@example.test"))
    return made


def account(name: str, dovecot: Any, user: ImapUser, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "address": user.address,
        "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none", "timeout_seconds": 10},
        "auth": {"username": user.login, "password": user.password},
        "mode": "idle",
        **extra,
    }


def config(tmp_path: Path, *accounts: dict[str, Any], **top: Any) -> dict[str, Any]:
    # No recovery sweep: its own IMAP logins would blur the connect counts.
    data = {
        "database": str(tmp_path / "mailbridge.db"),
        "recovery": {"enabled": False},
        "accounts": list(accounts),
    }
    data.update(top)
    return data


def write(path: Path, data: dict[str, Any] | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@contextlib.asynccontextmanager
async def running(path: Path, **kwargs: Any) -> AsyncIterator[Supervisor]:
    kwargs.setdefault("drain_seconds", 5.0)
    supervisor = Supervisor(load_config(path), **kwargs)
    task = asyncio.create_task(supervisor.run())
    try:
        yield supervisor
    finally:
        supervisor.request_stop()
        assert await asyncio.wait_for(task, timeout=30) == 0


def events(logs: Logs, name: str, **fields: Any) -> Logs:
    return [e for e in logs if e["event"] == name and all(e.get(k) == v for k, v in fields.items())]


async def idle(supervisor: Supervisor, *names: str) -> None:
    def ready() -> bool:
        states = supervisor.states
        return all(n in states and states[n].state == "idle" for n in names)

    await eventually(ready)


async def reload(supervisor: Supervisor, logs: Logs) -> MutableMapping[str, Any]:
    """Ask for a reload; return its outcome: the config_reloaded or reload_rejected event."""
    before = len(outcomes(logs))
    supervisor.request_reload()
    await eventually(lambda: len(outcomes(logs)) > before)
    return outcomes(logs)[-1]


def outcomes(logs: Logs) -> Logs:
    return [e for e in logs if e["event"] in {"config_reloaded", "reload_rejected"}]


def stored_subjects(tmp_path: Path, account_name: str) -> list[str]:
    """The subjects of the account's conversations (read without the config: it may be bad)."""
    conn = sqlite3.connect(tmp_path / "mailbridge.db")
    try:
        rows = conn.execute(
            "SELECT subject FROM conversation WHERE account = ? ORDER BY id", (account_name,)
        ).fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


def deliver(dovecot: Any, user: ImapUser, subject: str) -> None:
    dovecot.append(user.login, user.password, mail(subject, to=user.address).as_bytes())


async def test_reload_restarts_only_the_changed_account(
    tmp_path: Path, dovecot: Any, users: list[ImapUser]
) -> None:
    alpha, beta, gamma = users
    path = write(
        tmp_path / "config.yaml",
        config(tmp_path, account("alpha", dovecot, alpha), account("beta", dovecot, beta)),
    )
    with structlog.testing.capture_logs() as logs:
        async with running(path) as supervisor:
            await idle(supervisor, "alpha", "beta")
            alpha_worker = supervisor.running["alpha"].worker
            beta_worker = supervisor.running["beta"].worker

            # Only beta changes: a new Processed folder and a poll interval.
            beta_changed = account(
                "beta",
                dovecot,
                beta,
                folders={"processed": "Beta Done"},
                poll_interval_seconds=30,
            )
            write(path, config(tmp_path, account("alpha", dovecot, alpha), beta_changed))
            outcome = await reload(supervisor, logs)
            assert outcome["event"] == "config_reloaded"
            assert (outcome["restarted"], outcome["stopped"], outcome["started"]) == (
                ["beta"],
                [],
                [],
            )
            assert outcome["changed_globals"] == []
            assert supervisor.running["alpha"].worker is alpha_worker
            assert not supervisor.running["alpha"].task.done()
            assert supervisor.running["beta"].worker is not beta_worker
            assert beta_worker.stopping.is_set()
            assert supervisor.running["beta"].worker.account.folders.processed == "Beta Done"
            await idle(supervisor, "alpha", "beta")
            # alpha kept its one IMAP session; beta logged in again.
            assert len(events(logs, "imap_connected", account="alpha")) == 1
            assert len(events(logs, "imap_connected", account="beta")) == 2

            deliver(dovecot, alpha, "For alpha")
            deliver(dovecot, beta, "For beta")
            await eventually(lambda: stored_subjects(tmp_path, "alpha") == ["For alpha"])
            await eventually(lambda: stored_subjects(tmp_path, "beta") == ["For beta"])
            await eventually(lambda: dovecot.folder_uids(beta.login, beta.password, "Beta Done"))
            # Moved after the commit: polled, as the row above may be seen before the MOVE.
            await eventually(
                lambda: len(dovecot.folder_uids(alpha.login, alpha.password, PROCESSED)) == 1
            )

            # alpha removed, gamma added, beta as it is: beta's worker stays.
            beta_worker = supervisor.running["beta"].worker
            write(path, config(tmp_path, beta_changed, account("gamma", dovecot, gamma)))
            outcome = await reload(supervisor, logs)
            assert (outcome["restarted"], outcome["stopped"], outcome["started"]) == (
                [],
                ["alpha"],
                ["gamma"],
            )
            assert sorted(supervisor.running) == ["beta", "gamma"]
            assert alpha_worker.stopping.is_set()
            assert alpha_worker.state.state == "stopped"
            assert supervisor.running["beta"].worker is beta_worker
            await idle(supervisor, "beta", "gamma")
            assert len(events(logs, "imap_connected", account="beta")) == 2

            deliver(dovecot, gamma, "For gamma")
            deliver(dovecot, alpha, "Nobody reads alpha now")
            await eventually(lambda: stored_subjects(tmp_path, "gamma") == ["For gamma"])
            assert stored_subjects(tmp_path, "alpha") == ["For alpha"]
            assert len(dovecot.unseen(alpha.login, alpha.password)) == 1  # left in the Inbox

            # Disabling an account stops it like removing it.
            write(
                path,
                config(tmp_path, beta_changed, account("gamma", dovecot, gamma, enabled=False)),
            )
            outcome = await reload(supervisor, logs)
            assert outcome["stopped"] == ["gamma"]
            assert sorted(supervisor.running) == ["beta"]


async def test_real_sighup_reloads(tmp_path: Path, dovecot: Any, users: list[ImapUser]) -> None:
    alpha, beta, _ = users
    path = write(tmp_path / "config.yaml", config(tmp_path, account("alpha", dovecot, alpha)))
    with structlog.testing.capture_logs() as logs:
        async with running(path) as supervisor:
            await idle(supervisor, "alpha")
            write(
                path,
                config(tmp_path, account("alpha", dovecot, alpha), account("beta", dovecot, beta)),
            )
            os.kill(os.getpid(), signal.SIGHUP)  # the handler is the supervisor's while it runs
            await eventually(lambda: events(logs, "config_reloaded"))
            assert events(logs, "config_reloaded")[0]["started"] == ["beta"]
            deliver(dovecot, beta, "After SIGHUP")
            await eventually(lambda: stored_subjects(tmp_path, "beta") == ["After SIGHUP"])


BAD_CONFIGS = {
    "invalid-yaml": (
        "accounts: [\n  - name: broken\n   bad indentation: {\n",
        "config.yaml at line",
    ),
    "unknown-key": ("unknown-key", "accounts[1].pol_interval_seconds: unknown key"),
    "unknown-account-in-parents": (
        "unknown-account-in-parents",
        "conversation_parents[0].accounts[0]: no account named 'nobody'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
async def test_bad_config_on_reload_is_rejected_and_accounts_keep_importing(
    tmp_path: Path, dovecot: Any, users: list[ImapUser], case: str
) -> None:
    alpha, beta, _ = users
    good = config(tmp_path, account("alpha", dovecot, alpha), account("beta", dovecot, beta))
    path = write(tmp_path / "config.yaml", good)
    text, reason = BAD_CONFIGS[case]
    bad: dict[str, Any] | str = text
    if case == "unknown-key":
        bad = config(
            tmp_path,
            account("alpha", dovecot, alpha, poll_interval_seconds=5),
            account("beta", dovecot, beta, pol_interval_seconds=5),  # misspelt
        )
    elif case == "unknown-account-in-parents":
        bad = {**good, "conversation_parents": [{"table": "ticket", "accounts": ["nobody"]}]}
    with structlog.testing.capture_logs() as logs:
        async with running(path) as supervisor:
            await idle(supervisor, "alpha", "beta")
            workers = {name: r.worker for name, r in supervisor.running.items()}
            settings = supervisor.settings

            write(path, bad)
            outcome = await reload(supervisor, logs)
            assert outcome["event"] == "reload_rejected"
            assert reason in outcome["error"]
            # A YAML syntax error has its own code (its fix names a line, not a key).
            assert outcome["code"] == (
                "config_syntax" if case == "invalid-yaml" else "config_invalid"
            )
            assert outcome["remedy"]
            assert supervisor.settings is settings
            assert {name: r.worker for name, r in supervisor.running.items()} == workers
            assert not events(logs, "config_reloaded")

            deliver(dovecot, alpha, "After the bad reload")
            deliver(dovecot, beta, "Also after it")
            await eventually(lambda: stored_subjects(tmp_path, "alpha") == ["After the bad reload"])
            await eventually(lambda: stored_subjects(tmp_path, "beta") == ["Also after it"])
            assert len(events(logs, "imap_connected")) == 2  # nobody reconnected

            # Fixing the file and reloading again applies it.
            write(path, good)
            assert (await reload(supervisor, logs))["event"] == "config_reloaded"


PARENTS: dict[str, Any] = {
    "identification": "subject",
    "follower_parents": [{"table": "person"}],
    "conversation_parents": [
        {
            "table": "ticket",
            "properties": [
                {"column": "subject", "message_property": "subject"},
                {
                    "column": "person",
                    "message_property": "from_address",
                    "search_path": "person.email",
                },
            ],
        }
    ],
}


async def test_global_model_change_restarts_every_account_with_the_new_settings(
    tmp_path: Path, dovecot: Any, users: list[ImapUser]
) -> None:
    alpha, beta, _ = users
    accounts = (account("alpha", dovecot, alpha), account("beta", dovecot, beta))
    path = write(tmp_path / "config.yaml", config(tmp_path, *accounts))
    with structlog.testing.capture_logs() as logs:
        async with running(path) as supervisor:
            await idle(supervisor, "alpha", "beta")
            old = {name: r.worker for name, r in supervisor.running.items()}

            write(path, config(tmp_path, *accounts, **PARENTS))
            outcome = await reload(supervisor, logs)
            assert outcome["event"] == "config_reloaded"
            assert outcome["changed_globals"] == [
                "conversation_parents",
                "follower_parents",
                "identification",
            ]
            assert outcome["restarted"] == ["alpha", "beta"]
            for name, worker in old.items():
                new = supervisor.running[name].worker
                assert new is not worker
                assert new.settings.identification == "subject"
                assert [p.table for p in new.settings.conversation_parents] == ["ticket"]

            # The reload prepared the database: the person table exists for the integrator.
            with db(supervisor.settings) as conn:
                conn.execute(
                    "INSERT INTO person (id, email, name) VALUES (11, 'john@customer.example', 'J')"
                )
            deliver(dovecot, alpha, "Printer on fire")
            deliver(dovecot, beta, "Paper jam")
            await eventually(lambda: stored_subjects(tmp_path, "beta") == ["Paper jam"])
            await eventually(lambda: stored_subjects(tmp_path, "alpha") == ["Printer on fire"])
            with db(supervisor.settings) as conn:
                tickets = conn.execute(
                    "SELECT c.account, t.subject, t.person FROM conversation AS c"
                    " JOIN ticket AS t ON t.id = c.ticket ORDER BY c.account"
                ).fetchall()
                followers = conn.execute("SELECT DISTINCT person FROM follower").fetchall()
            assert [tuple(t) for t in tickets] == [
                ("alpha", "Printer on fire", 11),
                ("beta", "Paper jam", 11),
            ]
            assert [f["person"] for f in followers] == [11]


async def test_a_config_the_database_refuses_is_rejected_on_reload(
    tmp_path: Path, dovecot: Any, users: list[ImapUser]
) -> None:
    """The repository's prepare step fails (a search path naming a table that does not exist,
    exit 78 at start-up): the reload is rejected, nothing of it reaches the database."""
    alpha, beta, _ = users
    accounts = (account("alpha", dovecot, alpha), account("beta", dovecot, beta))
    path = write(tmp_path / "config.yaml", config(tmp_path, *accounts))
    refused = {
        "conversation_parents": [
            {
                "table": "ticket",
                "properties": [
                    {"column": "subject", "message_property": "subject"},
                    {
                        "column": "customer",
                        "message_property": "from_address",
                        "search_path": "customer.email",
                    },
                ],
            }
        ]
    }
    with structlog.testing.capture_logs() as logs:
        async with running(path) as supervisor:
            await idle(supervisor, "alpha", "beta")
            workers = {name: r.worker for name, r in supervisor.running.items()}
            settings = supervisor.settings

            write(path, config(tmp_path, *accounts, **refused))
            outcome = await reload(supervisor, logs)
            assert outcome["event"] == "reload_rejected"
            assert outcome["path"] == "conversation_parents[0].properties[1].search_path"
            assert "no table 'customer' in the database" in outcome["error"]
            assert supervisor.settings is settings
            assert {name: r.worker for name, r in supervisor.running.items()} == workers
            with db(settings) as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert "ticket" not in tables  # created in the refused transaction, rolled back

            deliver(dovecot, alpha, "Still imported")
            await eventually(lambda: stored_subjects(tmp_path, "alpha") == ["Still imported"])
            with db(settings) as conn:
                columns = {r["name"] for r in conn.execute("PRAGMA table_info(conversation)")}
            assert "ticket" not in columns


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word: a hung IMAP server."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


async def test_a_slow_drain_during_reload_does_not_starve_the_watchdog(
    tmp_path: Path, dovecot: Any, users: list[ImapUser], path_socket: tuple[socket.socket, str]
) -> None:
    """The reload waits drain_seconds for an account stuck in its connect; meanwhile the
    supervisor loop keeps sending WATCHDOG=1 every half WatchdogSec."""
    sock, address = path_socket
    alpha = users[0]
    with silent_server() as port:
        slow = account(
            "slow",
            dovecot,
            alpha,
            imap={"host": "127.0.0.1", "port": port, "tls": "none", "timeout_seconds": 60},
        )
        path = write(
            tmp_path / "config.yaml", config(tmp_path, account("alpha", dovecot, alpha), slow)
        )
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
        with structlog.testing.capture_logs() as logs:
            async with (
                Datagrams(sock) as datagrams,
                running(path, notifier=notifier, drain_seconds=4.0) as supervisor,
            ):
                await idle(supervisor, "alpha")
                await eventually(lambda: supervisor.states.get("slow"))
                assert supervisor.states["slow"].state == "connecting"

                write(
                    path,
                    config(tmp_path, account("alpha", dovecot, alpha), {**slow, "mode": "poll"}),
                )
                outcome = await reload(supervisor, logs)
                assert outcome["restarted"] == ["slow"]
                began = await datagrams.wait_for(b"RELOADING=1")
                ended = await datagrams.wait_for(b"READY=1", after=began)
        assert events(logs, "drain_timeout_cancelling", task="account:slow")
    assert ended - began >= 3.8  # the drain did wait for the stuck account
    pings = [at for at in datagrams.times(b"WATCHDOG=1") if began <= at <= ended]
    marks = [began, *pings, ended]
    gaps = [later - earlier for earlier, later in itertools.pairwise(marks)]
    # Every 0.1 s; a starved loop would show one gap as long as the drain (4 s). The bound is
    # loose so that it holds on a loaded machine (two test suites side by side).
    assert max(gaps) < 2.0, gaps


async def test_run_for_chosen_accounts_stays_with_them_after_a_reload(
    tmp_path: Path, dovecot: Any, users: list[ImapUser]
) -> None:
    """`mailbridge run --account alpha`: a reload reads the whole file, and must still run
    alpha only, not every account the file names."""
    alpha, beta, gamma = users
    path = write(
        tmp_path / "config.yaml",
        config(tmp_path, account("alpha", dovecot, alpha), account("beta", dovecot, beta)),
    )
    with structlog.testing.capture_logs() as logs:
        async with running(path, only=frozenset({"alpha"})) as supervisor:
            await idle(supervisor, "alpha")
            assert sorted(supervisor.running) == ["alpha"]
            write(
                path,
                config(
                    tmp_path,
                    account("alpha", dovecot, alpha, poll_interval_seconds=30),
                    account("beta", dovecot, beta),
                    account("gamma", dovecot, gamma),
                ),
            )
            outcome = await reload(supervisor, logs)
            assert (outcome["restarted"], outcome["stopped"], outcome["started"]) == (
                ["alpha"],
                [],
                [],
            )
            assert sorted(supervisor.running) == ["alpha"]
    assert not events(logs, "imap_connected", account="beta")


async def test_a_log_change_is_applied_by_the_callback_or_logged_as_ignored(
    tmp_path: Path, dovecot: Any, users: list[ImapUser]
) -> None:
    alpha = users[0]
    path = write(tmp_path / "config.yaml", config(tmp_path, account("alpha", dovecot, alpha)))
    applied: list[Any] = []
    with structlog.testing.capture_logs() as logs:
        async with running(path, reconfigure_log=applied.append) as supervisor:
            await idle(supervisor, "alpha")
            write(path, config(tmp_path, account("alpha", dovecot, alpha), log={"level": "debug"}))
            outcome = await reload(supervisor, logs)
            assert outcome["restarted"] == []  # logging alone restarts no account
    assert [(s.level, s.format) for s in applied] == [("debug", "auto")]
    assert events(logs, "log_reconfigured", level="debug")
    with structlog.testing.capture_logs() as logs:
        async with running(path) as supervisor:  # no callback: a restart is needed
            await idle(supervisor, "alpha")
            write(path, config(tmp_path, account("alpha", dovecot, alpha), log={"level": "error"}))
            await reload(supervisor, logs)
    assert events(logs, "reload_log_change_ignored")


def _daemon_log(tmp_path: Path, path: Path, *cli: str) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mailbridge",
                "-c",
                str(path),
                "--log-format",
                "json",
                *cli,
                "run",
            ],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    return proc, log_path


def _events_in(log_path: Path) -> list[str]:
    out = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line)["event"])
    return out


def _wait_for(check: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("cli_level", [None, "error"])
def test_sighup_applies_the_files_log_level_unless_the_command_line_set_one(
    tmp_path: Path, dovecot: Any, users: list[ImapUser], cli_level: str | None
) -> None:
    """`mailbridge run` under `log.level: error`, then the file says `info` and SIGHUP: the
    daemon's info lines appear - unless --log-level error was given, which stays in force."""
    alpha, beta, _ = users
    path = write(
        tmp_path / "config.yaml",
        config(tmp_path, account("alpha", dovecot, alpha), log={"level": "error"}),
    )
    proc, log_path = _daemon_log(tmp_path, path, *(["--log-level", cli_level] if cli_level else []))
    try:
        _wait_for(lambda: (tmp_path / "mailbridge.db").exists())
        time.sleep(1)
        assert "daemon_started" not in _events_in(log_path)  # info, under level error
        # info from now on, and a new account whose wrong password is an error either way
        broken = account("beta", dovecot, beta, auth={"username": beta.login, "password": "no"})
        write(
            path,
            config(tmp_path, account("alpha", dovecot, alpha), broken, log={"level": "info"}),
        )
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: "account_backoff" in _events_in(log_path))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    seen = _events_in(log_path)
    if cli_level is None:
        assert "config_reloaded" in seen
    else:
        assert "config_reloaded" not in seen
    assert proc.returncode == 0
