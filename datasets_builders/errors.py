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
