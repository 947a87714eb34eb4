"""The shipped unit file, ``systemd/mailbridge.service``, says what the daemon needs of systemd.

The daemon's side (READY, STATUS, WATCHDOG, the SIGTERM drain, SIGHUP) is tested against a real
notify socket and a real Dovecot elsewhere; this holds the unit to the same facts, so the two
cannot drift apart: systemd(1) units are read here as systemd reads them (a key may repeat).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from mailbridge.daemon.supervisor import Supervisor

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "mailbridge.service"


def unit() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def one(key: str) -> str:
    values = unit()[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_notify_service_with_check_reload_and_config_exit_code() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    # RestartPreventExitStatus= does not cover ExecStartPre=: a config check there would be
    # restarted for ever; `run` checks the config itself (exit 78).
    assert "ExecStartPre" not in unit()
    assert one("ExecStart").endswith("-c /etc/mailbridge/config.yaml run")
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    assert "78" in one("RestartPreventExitStatus").split()  # EX_CONFIG: a restart cannot fix it


def test_the_readme_install_steps_match_the_unit() -> None:
    """The paths the unit names are the ones the README's install steps create."""
    readme = (UNIT.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Running under systemd") :]
    start = section.index("```sh\n") + len("```sh\n")
    steps = section[start : section.index("```", start)]
    executable = one("ExecStart").split()[0]
    assert executable == "/opt/mailbridge/bin/mailbridge"
    assert "python3 -m venv /opt/mailbridge" in steps
    assert "/usr/local/bin/mailbridge" in steps  # the later `mailbridge ...` commands
    doc = one("Documentation").removeprefix("file://")
    assert f"install -D -m 0644 README.md {doc}" in steps
    assert f"install -d -m {one('ConfigurationDirectoryMode')} -g mailbridge /etc/mailbridge" in (
        steps
    )
    for line in steps.splitlines():
        if line and not line.startswith(("#", "(")):
            command = line.split("#")[0].strip()
            assert command in UNIT.read_text(encoding="utf-8") or command.startswith(
                ("journalctl", "systemctl daemon-reload")
            ), command


def test_stop_timeout_leaves_room_for_the_drain() -> None:
    drain = inspect.signature(Supervisor).parameters["drain_seconds"].default
    assert seconds(one("TimeoutStopSec")) > drain


def test_watchdog_is_on() -> None:
    assert seconds(one("WatchdogSec")) >= 10


def test_hardening_and_owner_only_state() -> None:
    keys = unit()
    assert one("User") == one("Group") == "mailbridge"
    assert one("StateDirectory") == "mailbridge"
    assert one("StateDirectoryMode") == "0700"
    assert one("UMask") == "0077"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
    }.items():
        assert one(key) == value, key
    assert one("CapabilityBoundingSet") == ""
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in keys["SystemCallFilter"]
    # With ProtectSystem=strict only the state directory is writable: the database lives there.
    assert one("ReadWritePaths") == "/var/lib/mailbridge"


def test_open_files_limit_fits_ten_thousand_accounts() -> None:
    from mailbridge.daemon.limits import fds_needed

    soft, _, hard = one("LimitNOFILE").partition(":")
    assert int(soft) >= fds_needed(10_000)
    assert int(hard or soft) >= int(soft)
    # the daemon's own setrlimit (raising soft to hard) must not be killed by the filter
    allowed_again = [v for v in unit()["SystemCallFilter"] if not v.startswith("~")]
    assert any("setrlimit" in v.split() and "prlimit64" in v.split() for v in allowed_again)
