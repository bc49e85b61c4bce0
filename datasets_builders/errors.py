"""The one exception type ndbench raises for bad user input.

The CLI turns it into a single line on stderr and exit code 2. Its message names the problem
and, where there is one, the fix.
"""

import re
from pathlib import Path

# How torch's DataLoader re-raises an error of one of its worker processes: the worker's whole
# traceback becomes the message, ending with the error's own "module.Type: message" line.
WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")


class NdbenchError(Exception):
    """Bad input or environment that the user can fix; shown as one line, never a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        lines = str(problem).splitlines()
        if fix is None and lines and WORKER_ERROR.match(lines[0]):
            lines = [next(line for line in reversed(lines) if line.strip()).split(": ", 1)[-1]]
        # One line, whatever a wrapped library message brought along.
        self.problem = " ".join(lines)
        self.fix = None if fix is None else " ".join(str(fix).splitlines())
        super().__init__(f"{self.problem} ({self.fix})" if self.fix else self.problem)

    def __reduce__(self):
        # Keep problem and fix apart when the error crosses a process boundary (Ray workers).
        return type(self), (self.problem, self.fix)


class WriteFailure(NdbenchError):
    """An output could not be written (disk full, file too large, read-only folder). Every
    later write would fail too, so a run stops at once instead of failing job after job."""


def not_a_folder(path: Path) -> str:
    """What is wrong with a path that is not a folder: "is a file, not a folder" or "does not exist"."""
    return "is a file, not a folder" if Path(path).exists() else "does not exist"


def not_a_file(path: Path) -> str:
    """What is wrong with a path that is not a regular file: "is a folder, not a file", ... ."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    return "is not a regular file" if path.exists() else "does not exist"
