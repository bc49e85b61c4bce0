"""The one exception type ndbench raises for bad user input.

The CLI turns it into a single line on stderr and exit code 2. Its message names the problem
and, where there is one, the fix.
"""


class NdbenchError(Exception):
    """Bad input or environment that the user can fix; shown as one line, never a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)

    def __reduce__(self):
        # Keep problem and fix apart when the error crosses a process boundary (Ray workers).
        return type(self), (self.problem, self.fix)


class WriteFailure(NdbenchError):
    """An output could not be written (disk full, file too large, read-only folder). Every
    later write would fail too, so a run stops at once instead of failing job after job."""
