"""The command line's usage errors: one exit code (64, sysexits EX_USAGE) for every wrong
argument, whether argparse or a command finds it."""

from __future__ import annotations

import pytest

from mailbridge.cli import main as cli_main


@pytest.mark.parametrize(
    "argv",
    [
        ["errors", "--conversation", "abc"],  # not a number
        ["conversations", "--limit", "many"],
        ["run", "--no-such-option"],
        ["no-such-command"],
    ],
)
def test_a_wrong_argument_exits_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main(["-c", "/nonexistent/config.yaml", *argv])
    assert caught.value.code == 64
    assert "error:" in capsys.readouterr().err
