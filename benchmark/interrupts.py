"""Ctrl-C (SIGINT) and SIGTERM as one exception, so a run stops cleanly.

Inside `signals_raise_interrupted()` both signals raise `Interrupted` in the main thread:
`finally` blocks run (temporary files and job locks are removed), executors add how many
jobs had finished, and the CLI prints one line and exits 128 + the signal number.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop request (BaseException, like KeyboardInterrupt, so `except Exception` in job
    isolation does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.finished: int | None = None  # jobs whose record exists, set by the executor
        self.total: int | None = None
        self.note: str | None = None  # what was kept, where the command knows better than "nothing"
        self.forced = False  # the interrupted run had --force: resuming means running it without

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM: the shell's convention."""
        return 128 + self.signum

    def discard(self) -> Interrupted:
        """This interrupt, its message promising nothing: the jobs ran in a throw-away folder
        that is deleted, so no record is kept and no run resumes."""
        return self.keeping("nothing is kept (the jobs ran in a temporary folder)")

    def keeping(self, note: str) -> Interrupted:
        """This interrupt, its message saying `note` about what was kept."""
        self.note = note
        return self

    def message(self) -> str:
        """The one line the CLI prints."""
        if self.note is not None:
            return f"interrupted by {self.signal_name}; {self.note}"
        if self.total is None:
            return f"interrupted by {self.signal_name}; nothing half-written was kept"
        resume = "run it again without --force to resume" if self.forced else "run the same command again to resume"
        return (f"interrupted by {self.signal_name}: {self.finished} of {self.total} jobs finished and their "
                f"records are kept; {resume}")


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within the block, the first SIGINT or SIGTERM raises `Interrupted`; later ones are
    ignored, so a second Ctrl-C cannot cut short the clean-up the first one started (main
    thread only; elsewhere signals cannot be handled and the block changes nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def raise_once(signum: int, frame) -> None:
        if not stopping:
            stopping.append(signum)
            _raise_interrupted(signum, frame)

    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    for signum in HANDLED:
        signal.signal(signum, raise_once)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def signals_raise_keyboard_interrupt() -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt (what blocking calls of
    libraries such as Ray expect); the yielded list receives the numbers of the signals that
    arrived, so the caller can tell the two apart."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.getsignal(signum) for signum in HANDLED}
    for signum in HANDLED:
        signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
