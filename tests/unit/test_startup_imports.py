"""Start-up does not import what only some commands need (issue 10: rich, pulled in by
structlog whenever it is installed, and requests/urllib3, for OAuth2 only): checked in a fresh
interpreter, as ``mailbridge`` starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("rich", "requests", "urllib3", "msal", "google.auth")

PROBE = """
import json, sys
from pathlib import Path
from mailbridge.cli import main
argv = json.loads(sys.argv[1])
if argv[0] == "daemon":  # what `mailbridge run` loads before its accounts connect
    from mailbridge.config import load_config
    from mailbridge.daemon import account, importstep, supervisor, sweep  # noqa: F401
    from mailbridge.log import configure_logging
    settings = load_config(Path(argv[1]))
    configure_logging("info", "json")
    code = 0
else:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
loaded = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"code": code, "loaded": loaded}))
"""


def _probe(*argv: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def config(tmp_path: Path) -> Path:
    secret = tmp_path / "password"
    secret.write_text("pw\n")
    secret.chmod(0o600)
    path = tmp_path / "config.yaml"
    path.write_text(
        f"database: {tmp_path / 'db.sqlite'}\n"
        "accounts:\n"
        "  - name: support\n"
        "    address: support@example.com\n"
        "    imap: {host: imap.example.com}\n"
        f"    auth: {{username: u, password_file: {secret}}}\n"
    )
    path.chmod(0o600)
    return path


def test_help_imports_neither_rich_nor_the_oauth_stack() -> None:
    assert _probe("--help") == {"code": 0, "loaded": []}


def test_check_config_imports_neither_rich_nor_the_oauth_stack(config: Path) -> None:
    assert _probe("-c", str(config), "check-config") == {"code": 0, "loaded": []}


def test_daemon_start_up_imports_neither_rich_nor_the_oauth_stack(config: Path) -> None:
    assert _probe("daemon", str(config)) == {"code": 0, "loaded": []}


def test_commands_that_print_tables_still_get_rich(config: Path) -> None:
    result = _probe("-c", str(config), "status")
    assert "rich" in result["loaded"]  # type: ignore[operator]
