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
    """A rich `Progress` that leaves nothing behind when it ends by an error (the error line
    stands alone) or, on a non-terminal stderr, with no task left to show (rich would print an
    empty render and a blank line)."""

    def __init__(self, *columns, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._failed = False

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self._failed = exc_type is not None
        super().__exit__(exc_type, exc_value, traceback)

    def stop(self) -> None:
        if self.disable or (self.tasks and not self._failed):
            super().stop()
            return
        self.live.transient = True
        self.live.stop()
