"""A test-only detector that misbehaves on request, for the fault tests.

`FaultyDetector` ("faulty") scores an image by a hash of its id: deterministic, and it reads no
pixels, so a job takes a fraction of a second.
Its `fault` option picks the misbehaviour, applied only to jobs on the split `fault_split`
("" = every split):

- "none": none.
- "nan" / "inf" / "short": a NaN score, an infinite score, one score too few.
- "raise": `fit` raises RuntimeError (a crash); "user-error": `fit` raises NdbenchError.
- "wait": `fit` writes `<markers>/started-<split>` and waits until `<markers>/release` exists.
- "block": `fit` writes `<markers>/started-<split>` and waits until it is interrupted.
- "kill-once": on the first attempt for a split (no `<markers>/killed-<split>` yet), `fit` writes
  that marker and kills its own process with SIGKILL, as an out-of-memory kill would.

Every `fit` appends `<split> <pid>` to `<markers>/fits.log`, so tests can count runs of a job.
Waits give up after WAIT_LIMIT_S (a RuntimeError), so a broken test cannot hang.
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets_builders.errors import NdbenchError
from methods.base import BaseDetector
from methods.registry import REGISTRY

NAME = "faulty"
FAULTS = ("none", "nan", "inf", "short", "raise", "user-error", "wait", "block", "kill-once")
WAIT_LIMIT_S = 120.0


@dataclass(frozen=True)
class FaultyConfig:
    """What goes wrong, and where (the input transform's fields are never used)."""

    fault: str = "none"
    fault_split: str = ""  # the split name ("0", "except-3") that misbehaves; "" = all
    markers: str = ""  # folder of marker files and fits.log
    img_size: int = 16
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise NdbenchError(f"unknown fault {self.fault!r}", f"use one of {', '.join(FAULTS)}")


class FaultyDetector(BaseDetector):
    """A hash of the image id as the novelty score, with faults on request."""

    Config = FaultyConfig
    description = "test-only: hashed image ids as scores, with injected faults"
    paper = "none"

    def __init__(self, config: FaultyConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.split = ""

    def _marker(self, name: str) -> Path:
        return Path(self.config.markers) / f"{name}-{self.split}"

    def _faulty(self) -> bool:
        return self.config.fault_split in ("", self.split)

    def _wait_for(self, release: Path | None) -> None:
        self._marker("started").touch()
        deadline = time.monotonic() + WAIT_LIMIT_S
        while time.monotonic() < deadline:
            if release is not None and release.exists():
                return
            time.sleep(0.02)
        raise RuntimeError("the test never released or interrupted this job")

    def fit(self, train, *, device, progress=None) -> None:
        self.split = train.split_id.rsplit("/", 1)[1]
        if self.config.markers:
            with open(Path(self.config.markers) / "fits.log", "a") as log:
                log.write(f"{self.split} {os.getpid()}\n")
        fault = self.config.fault if self._faulty() else "none"
        if fault == "raise":
            raise RuntimeError("simulated crash in fit")
        if fault == "user-error":
            raise NdbenchError("simulated bad input", "fix the simulated input")
        if fault == "wait":
            self._wait_for(Path(self.config.markers) / "release")
        if fault == "block":
            self._wait_for(None)
        if fault == "kill-once" and not self._marker("killed").exists():
            self._marker("killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.fitted = True

    def score(self, images, *, device, progress=None) -> np.ndarray:
        scores = np.array([zlib.crc32(image_id.encode()) / 2**32 for image_id in images.image_ids])
        fault = self.config.fault if self._faulty() else "none"
        if fault == "nan":
            scores[0] = np.nan
        if fault == "inf":
            scores[0] = np.inf
        if fault == "short":
            scores = scores[:-1]
        return scores

    def state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        self.fitted = True


def register_fault_methods() -> None:
    """Register "faulty" in the package registry (in a subprocess or a Ray worker)."""
    REGISTRY.register(NAME)(FaultyDetector)
