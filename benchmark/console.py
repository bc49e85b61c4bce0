"""Shared rich consoles: results on stdout, progress and errors on stderr."""

from __future__ import annotations

from rich.console import Console


def stdout_console() -> Console:
    """Console for tables and summaries."""
    return Console(highlight=False)


def stderr_console() -> Console:
    """Console for progress bars and status lines (keeps stdout clean for results)."""
    return Console(stderr=True, highlight=False)
