"""The one exception type ndbench raises for bad user input.

The CLI turns it into a single line on stderr and exit code 2. Its message names the problem
and, where there is one, the fix.
"""

from pathlib import Path


class NdbenchError(Exception):
    """Bad input or environment that the user can fix; shown as one line, never a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        # One line, whatever a wrapped library message brought along.
        self.problem = " ".join(str(problem).splitlines())
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
