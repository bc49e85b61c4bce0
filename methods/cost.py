"""A method's cost model: the forward passes it makes per image, so a run's cost can be
counted before it starts (ndbench run --dry-run) and checked against what records count.

A frozen pass is keyed by its `FrozenPart` (the feature-cache key): with the caches, each
distinct image goes through it once per machine; without, once per job. Trained passes
(networks trained, or tuned, for the job) are paid by every job either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .features import FrozenPart


@dataclass(frozen=True)
class FrozenPass:
    """The images of `parts` ("train", "test") through a frozen network; `part` None when its
    outputs are not cached across jobs (random weights, or a network tuned per job). `dtype`:
    how the method stores the outputs (as it passes it to `FeatureCache.get_or_compute`)."""

    part: FrozenPart | None
    parts: tuple[str, ...] = ("train", "test")
    dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float16


@dataclass(frozen=True)
class CostModel:
    """Forward passes per image of one job."""

    frozen: tuple[FrozenPass, ...] = ()
    trained_per_train_image: float = 0.0  # every epoch together
    trained_per_test_image: float = 0.0

    def needs_images(self, part: str) -> bool:
        """Whether trained passes read the images of `part` (so they are needed cached or not)."""
        return (self.trained_per_train_image if part == "train" else self.trained_per_test_image) > 0
