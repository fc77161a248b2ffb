"""The rich console the commands print to: standard output, no syntax highlighting.

Piped or captured output (no terminal) gets a wide console, so tables keep one line per row.
"""
from __future__ import annotations

from rich.console import Console

PIPE_WIDTH = 200


def make_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console
