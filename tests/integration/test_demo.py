"""``scripts/demo`` as a newcomer runs it: its own Dovecot, sample mail, one pass, the results.

The shell wrapper only installs what is missing and then runs ``scripts/demo.py`` with the venv's
Python; this runs that same program and reads what it prints.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.dovecot


def test_demo_shows_conversations_a_failure_and_the_folders() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "COLUMNS": "200"},
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert "support: imported 5, duplicates 0, discarded 0, bounces 0, failed 1" in out
    # The thread of three is one conversation, shown with its messages and followers.
    assert "Order 1042 arrived damaged" in out
    assert "$ mailbridge -c config.yaml conversation show" in out
    assert "jane@customer.example" in out
    assert "inline image: cid:" in out
    # The too-large mail is listed in Failed with its reason, and the server agrees.
    assert "too_large" in out
    assert "INBOX                  0 message(s)" in out
    assert "Mailbridge Processed   5 message(s)" in out
    assert "Mailbridge Failed      1 message(s)" in out
