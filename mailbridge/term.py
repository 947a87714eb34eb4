"""Terminal output for the commands: one Console factory, so every command prints alike.

Mail text (subjects, names, bodies, filenames) is printed by these commands, and mail text is not
rich markup: "[external] Invoice" would lose its tag, "[/quote]" would raise MarkupError and
":warning:" would turn into an emoji. So markup and emoji codes are off; styles are given as
``style=`` or :class:`rich.text.Text` spans, never inline.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when a command prints, not at start-up (issue 10)
    from rich.console import Console
    from rich.text import Text

# Terminal control sequences (ESC, CSI, BEL ...) in mail text: a message must not be able to
# drive the operator's terminal. Tabs and line breaks stay.
_TERMINAL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def console() -> Console:
    from rich.console import Console

    # Piped output (scripts, tests, journald) gets wide lines instead of wrapped table cells,
    # unless the operator set COLUMNS, which wins as it does for the terminal (POSIX sh).
    width: int | None = None
    if not sys.stdout.isatty():
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 0 else 240
    return Console(markup=False, emoji=False, highlight=False, width=width)


def mail_text(value: str) -> Text:
    """Mail text (subject, names, body) to print exactly as written, without control bytes."""
    from rich.text import Text

    return Text(_TERMINAL_CONTROL.sub("", value))
