"""What a job's detector gets from the run besides its data: the image store, the feature
cache, the counters that go into the record, and how to load data (DataLoader workers,
pinned memory)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets_builders.array_store import LOG, ArrayStore, default_budget_bytes, writable_root
from datasets_builders.counts import Counts
from datasets_builders.embedded import cache_root
from datasets_builders.errors import NdbenchError
from datasets_builders.image_store import ImageStore

from .features import FeatureCache

MAX_DEFAULT_WORKERS = 8  # beyond this, decoding rarely limits a single job
# Most DataLoader worker processes a job may start: past this, workers only cost memory.
MAX_WORKERS = 64


@dataclass(frozen=True)
class CacheSettings:
    """The user's choices: caches on or off, their size budget, DataLoader workers."""

    enabled: bool = True
    budget_gb: float | None = None  # None: `default_budget_bytes` (half the free disk, at most 50 GB)
    workers: int | None = None  # None: `default_workers`
    root: Path | None = None  # None: `store_root()` (a benchmark's throw-away store sets one)

    def __post_init__(self) -> None:
        if self.budget_gb is not None and not self.budget_gb >= 0:  # NaN too: no size compares with it
            raise NdbenchError(f"--cache-budget-gb {self.budget_gb} is not 0 or more", "give 0 or more gigabytes")
        check_workers(self.workers)


def check_workers(workers: int | None) -> None:
    """Refuse a --workers value outside 0..MAX_WORKERS (None: the default)."""
    if workers is not None and workers < 0:
        raise NdbenchError(f"--workers {workers} is negative", "give 0 (load in the main process) or more")
    if workers is not None and workers > MAX_WORKERS:
        raise NdbenchError(f"--workers {workers} is more than {MAX_WORKERS}",
                           f"give 0 to {MAX_WORKERS}: each worker is a process holding its own copy of the "
                           "dataset's index, and a few keep a GPU fed")


def store_root() -> Path:
    """Where the image store and the feature cache live: `<cache root>/store`."""
    return cache_root() / "store"


def open_store(settings: CacheSettings) -> ArrayStore | None:
    """The on-disk store (under `store_root()` unless the settings name a root) with the
    settings' budget; None when caching is off."""
    if not settings.enabled:
        return None
    root = settings.root if settings.root is not None else store_root()
    if not writable_root(root):
        LOG.warning("ndbench: cannot write the cache under %s; running without it (set NDBENCH_CACHE)", root)
        return None
    budget = default_budget_bytes(root) if settings.budget_gb is None else settings.budget_gb * 1e9
    return ArrayStore(root, budget)


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(cpus: int | None = None) -> int:
    """DataLoader workers for decoding: one per CPU but the one that runs the model, at most
    `MAX_DEFAULT_WORKERS`."""
    cpus = available_cpus() if cpus is None else cpus
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1))


@dataclass
class JobRuntime:
    """Stores, counters and loading settings of one job."""

    features: FeatureCache
    images: ImageStore | None
    counts: Counts
    workers: int = 0
    pin_memory: bool = False

    @classmethod
    def in_memory(cls) -> JobRuntime:
        """No on-disk caches, no workers: a detector used on its own."""
        counts = Counts()
        return cls(FeatureCache(None, counts), None, counts)

    @classmethod
    def open(cls, settings: CacheSettings, device: torch.device, cpus: int | None = None) -> JobRuntime:
        """The runtime of a job on `device` with `cpus` CPUs (default: those of this process)."""
        counts = Counts()
        store = open_store(settings)
        workers = default_workers(cpus) if settings.workers is None else settings.workers
        return cls(FeatureCache(store, counts), None if store is None else ImageStore(store), counts,
                   workers=workers, pin_memory=device.type == "cuda")
