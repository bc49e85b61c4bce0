"""Shared rich consoles: results on stdout, progress and errors on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress


def stdout_console() -> Console:
    """Console for tables and summaries."""
    return Console(highlight=False)


def stderr_console() -> Console:
    """Console for progress bars and status lines (keeps stdout clean for results)."""
    return Console(stderr=True, highlight=False)


class QuietProgress(Progress):
    """A rich `Progress` that leaves nothing on a non-terminal stderr when no task is left
    to show at the end (rich would print an empty render and a blank line)."""

    def stop(self) -> None:
        if self.tasks or self.disable:
            super().stop()
            return
        self.live.transient = True
        self.live.stop()
