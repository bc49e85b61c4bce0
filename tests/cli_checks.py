"""Assertions shared by the command-line tests."""

from __future__ import annotations


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Assert the CLI ended with exit 2 and one `ndbench: error:` line holding every needle;
    return that line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("ndbench: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
