"""What a job actually computed, counted where it happens (also inside DataLoader workers).

Records carry these counts in `extra["cost"]`; ndbench run --dry-run predicts the same
numbers before a run.
"""

from __future__ import annotations

import multiprocessing

# decodes: image files decoded (JPEG/PNG -> pixels at the input size)
# image_reads: decoded images read back from the image store instead
# frozen_passes: images pushed through a frozen network
# frozen_reads: frozen-network outputs read back from the feature cache instead
# trained_passes: images pushed through a network that is being trained or was trained for the job
FIELDS = ("decodes", "image_reads", "frozen_passes", "frozen_reads", "trained_passes")


class Counts:
    """Counters shared with the DataLoader workers a job starts (a shared-memory array, so a
    worker's decodes count in the job)."""

    def __init__(self) -> None:
        self._values = multiprocessing.get_context().Array("q", len(FIELDS))

    def add(self, name: str, n: int = 1) -> None:
        """Add `n` to counter `name`."""
        i = FIELDS.index(name)
        with self._values.get_lock():
            self._values[i] += int(n)

    def get(self, name: str) -> int:
        return int(self._values[FIELDS.index(name)])

    def as_dict(self, names: tuple[str, ...] = FIELDS) -> dict[str, int]:
        """The counters `names`, by name."""
        return {name: self.get(name) for name in names}
