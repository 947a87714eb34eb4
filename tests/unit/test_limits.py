"""RLIMIT_NOFILE: raised to the hard limit at start; ``fd_limit`` when even that is too low."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from mailbridge.daemon.limits import fds_needed
from mailbridge.errors import describe

# Run in a child: lowering the hard limit cannot be undone in this process.
_CHILD = textwrap.dedent(
    """
    import io, json, resource, sys
    from mailbridge.log import configure_logging
    from mailbridge.daemon.limits import raise_fd_limit
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))
    limit = raise_fd_limit(int(sys.argv[1]))
    print(json.dumps({
        "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "enough": limit.enough,
        "log": [json.loads(line) for line in out.getvalue().splitlines()],
    }))
    """
)


def _run(accounts: int) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(accounts)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    result = _run(100)
    assert result["soft"] == 512
    assert result["enough"] is True
    assert result["log"] == []


def test_a_hard_limit_too_low_for_the_accounts_is_reported_with_its_remedy() -> None:
    result = _run(1_000)
    assert result["soft"] == 512  # raised as far as it goes
    assert result["enough"] is False
    [line] = result["log"]  # type: ignore[misc]
    assert line["event"] == "fd_limit"
    assert line["code"] == "fd_limit"
    assert line["needed"] == fds_needed(1_000)
    assert line["remedy"] == describe("fd_limit").remedy
    assert "LimitNOFILE=" in line["remedy"]


def test_running_out_of_descriptors_is_fd_limit_not_connection_lost() -> None:
    import errno

    from mailbridge.mail.imap import _map_error

    error = _map_error(OSError(errno.EMFILE, "Too many open files"), "connect", 60)
    assert error.code == "fd_limit"
    assert error.transient
