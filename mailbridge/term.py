"""Terminal output for the commands: one Console factory, so every command prints alike.

Mail text (subjects, names, bodies, filenames) is printed by these commands, and mail text is not
rich markup: "[external] Invoice" would lose its tag and "[/quote]" would raise MarkupError. So
markup is off; styles are given as ``style=`` or :class:`rich.text.Text` spans, never inline.
"""

from __future__ import annotations

import sys

from rich.console import Console


def console() -> Console:
    # Piped output (scripts, tests, journald) gets wide lines instead of wrapped table cells.
    return Console(markup=False, highlight=False, width=None if sys.stdout.isatty() else 240)
