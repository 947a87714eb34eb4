"""The opt-in Prometheus endpoint: the daemon imports a message and a scrape shows it."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailbridge.testing.dovecot import free_port
from tests.integration.test_import_loop import PROCESSED, config_data, mail

pytestmark = pytest.mark.dovecot


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback http
            return str(response.read().decode())
    except OSError:
        return ""


def _value(text: str, sample: str) -> float | None:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_metrics_endpoint_counts_an_import(tmp_path: Path, dovecot: Any, imap_user: Any) -> None:
    port = free_port()
    data = config_data(tmp_path, dovecot, imap_user)
    data["metrics"] = {"listen": f"127.0.0.1:{port}"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    url = f"http://127.0.0.1:{port}/metrics"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailbridge", "-c", str(config), "--log-format", "json", "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while _value(text, 'mailbridge_account_state{account="support",state="idle"}') != 1:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
            text = _scrape(url)
        assert _value(text, 'mailbridge_messages_imported_total{account="support"}') == 0
        dovecot.append(
            imap_user.login, imap_user.password, mail("Hi", to=imap_user.address).as_bytes()
        )
        imported = 'mailbridge_messages_imported_total{account="support"}'
        while _value(text, imported) != 1:
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
            text = _scrape(url)
        robot = mail("Automatic reply: Hi", to=imap_user.address, Auto_Submitted="auto-replied")
        dovecot.append(imap_user.login, imap_user.password, robot.as_bytes())
        discarded = 'mailbridge_messages_discarded_total{account="support"}'
        while _value(text, discarded) != 1:  # not imported, and counted
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
            text = _scrape(url)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert len(dovecot.folder_uids(imap_user.login, imap_user.password, PROCESSED)) == 2
    assert _value(text, 'mailbridge_messages_bounce_total{account="support"}') == 0
    assert "# TYPE mailbridge_messages_imported_total counter" in text
    assert _value(text, 'mailbridge_messages_failed_total{account="support"}') == 0
    assert _value(text, 'mailbridge_messages_duplicate_total{account="support"}') == 0
    assert _value(text, 'mailbridge_reconnects_total{account="support"}') == 0
    last = _value(text, 'mailbridge_last_import_timestamp_seconds{account="support"}')
    assert last is not None
    assert abs(last - time.time()) < 600
    assert _value(text, 'mailbridge_failed_folder_messages{account="support"}') == 0
    assert _value(text, "mailbridge_import_latency_seconds_count") == 1
    assert (_value(text, "mailbridge_database_commit_seconds_count") or 0) >= 1
    assert "# TYPE mailbridge_import_latency_seconds histogram" in text


def test_metrics_listen_is_validated_with_its_key(tmp_path: Path) -> None:
    from mailbridge.config import parse_config
    from mailbridge.errors import ConfigError

    data: dict[str, Any] = {
        "database": str(tmp_path / "db"),
        "metrics": {"listen": "9464"},
        "accounts": [
            {
                "name": "a",
                "address": "a@example.com",
                "imap": {"host": "h"},
                "auth": {"username": "u", "password": "pw"},
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"metrics\.listen: '9464' is not HOST:PORT"):
        parse_config(data)
    data["metrics"] = {"listen": "[::1]:9464"}
    metrics = parse_config(data).metrics
    assert metrics is not None
    assert (metrics.host, metrics.port) == ("::1", 9464)
