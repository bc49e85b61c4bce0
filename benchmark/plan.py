"""ndbench run --dry-run: what a run will compute, per method, with and without the caches,
before anything runs.

The jobs are walked in the order the local executor runs them, tracking which decoded images
and frozen outputs the store holds (what it holds already, plus what earlier jobs add), so
the counts "with caches" are those the records' `extra["cost"]` will show (as long as the
size budget holds). "Without caches" is what every job pays on its own: each image decoded
once per job, each frozen pass once per job and image.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from datasets_builders.image_store import ImageKey, ImageStore, StagedTransform
from datasets_builders.index import DatasetIndex
from datasets_builders.loading import PARTS, per_class_repeat_counts
from datasets_builders.splits import Manifest
from methods.base import resolve_device
from methods.cost import CostModel, FrozenPass
from methods.features import feature_entry
from methods.runtime import open_store

from .records import NewerRecord, refuse_newer
from .runner import (
    Job,
    RunOptions,
    SplitReader,
    build_detector,
    finished_record,
    job_record_path,
    missing_split,
    weighting,
)


@dataclass
class MethodPlan:
    """Predicted counts of one method's jobs. `None`: the method declares no cost model."""

    method: str
    jobs: int = 0
    skipped: int = 0
    images: int = 0  # train + test images over the jobs that run (an image counts once per job)
    decodes_without: int = 0
    decodes_with: int = 0
    frozen_without: int | None = None
    frozen_with: int | None = None
    trained: int | None = None

    def add_model_counts(self) -> None:
        if self.frozen_without is None:
            self.frozen_without = self.frozen_with = self.trained = 0


@dataclass
class JobPlan:
    """One job as the dry run lists it."""

    job: Job
    train: int
    test: int
    skipped: bool
    refused: bool = False  # a newer ndbench wrote its record: the run fails it rather than overwrite it
    builds_split: bool = False  # its split is not built yet: the run builds it first


@dataclass
class RunPlan:
    jobs: list[JobPlan] = field(default_factory=list)
    methods: dict[str, MethodPlan] = field(default_factory=dict)


class _StoreState:
    """Positions held by each image-store and feature-cache entry, as the run goes."""

    def __init__(self, options: RunOptions):
        self.store = open_store(options.caching)
        self.held: dict[object, np.ndarray] = {}

    def images(self, key: ImageKey) -> np.ndarray:
        """Per index position: whether the image store holds it (for the decode of `key`)."""
        entry = ImageStore(self.store).lookup(key)
        if entry.folder not in self.held:
            self.held[entry.folder] = entry.filled(np.arange(key.n_index_rows))
        return self.held[entry.folder]

    def features(self, frozen: FrozenPass, key: ImageKey) -> np.ndarray:
        """Per index position: whether the feature cache holds the pass's output on it."""
        entry = feature_entry(self.store, frozen.part, key, frozen.dtype)
        if entry.folder not in self.held:
            self.held[entry.folder] = entry.filled(np.arange(key.n_index_rows))
        return self.held[entry.folder]


def plan_run(jobs: list[Job], options: RunOptions, splits: SplitReader | None = None) -> RunPlan:
    """The run's jobs and its predicted counts per method (see the module docstring). A split
    not built yet is planned as the run will build it; nothing is written. `splits`: the
    run's reader of the indexes and manifests (a new one when None)."""
    device = resolve_device(options.device)
    state = _StoreState(options)
    splits = splits or SplitReader(options.splits)
    unbuilt: dict[str, Manifest | None] = {}  # split id -> the manifest the run would build
    plan = RunPlan()
    for job in jobs:
        detector = build_detector(job, options)
        index = splits.index(job.dataset)
        if job.split_id not in unbuilt:
            unbuilt[job.split_id] = missing_split(job, options, index)
        manifest = unbuilt[job.split_id] or splits.manifest(job.split_id)
        positions = {
            "train": np.asarray([index.position(i) for i in manifest.train], dtype=np.int64),
            "test": np.asarray([index.position(i) for i, _ in manifest.test], dtype=np.int64),
        }
        if weighting(job) == "per-class":  # as `job_data` repeats them
            repeats = per_class_repeat_counts([index.rows[p] for p in positions["train"]], manifest.normal_classes)
            positions["train"] = np.repeat(positions["train"], repeats)
        path = job_record_path(job, options, detector)
        try:  # a newer ndbench's record: finished_record raises, and --force must not pass it either
            if options.force:
                refuse_newer(path)
            skipped = not options.force and finished_record(path, manifest.sha256)[0] is not None
            refused = False
        except NewerRecord:
            refused = skipped = True
        plan.jobs.append(JobPlan(job, len(manifest.train), len(manifest.test), skipped, refused,
                                 builds_split=unbuilt[job.split_id] is not None))
        counts = plan.methods.setdefault(job.method, MethodPlan(job.method))
        if skipped:
            counts.skipped += 1
            continue
        counts.jobs += 1
        _plan_job(detector, job.split_id, index, positions, device, state, counts)
    return plan


def _plan_job(detector, split_id: str, index: DatasetIndex, positions: dict[str, np.ndarray], device: torch.device,
              state: _StoreState, counts: MethodPlan) -> None:
    model: CostModel | None = detector.cost_model(device, split_id)
    transform = detector.transform()
    staged = isinstance(transform, StagedTransform)
    image_key = (ImageKey(index.content_sha256, transform.decode.signature, len(index.rows), transform.finish.signature)
                 if staged else None)
    files = index.storage == "files"
    # Per listed image: whether the job decodes it, with the caches (`needed`) and without.
    needed = {part: np.zeros(len(positions[part]), dtype=bool) for part in PARTS}
    needed_without = {part: np.zeros(len(positions[part]), dtype=bool) for part in PARTS}
    if model is None:
        for part in PARTS:
            needed[part][:] = needed_without[part][:] = True
    else:
        counts.add_model_counts()
        for part in PARTS:
            needed[part] |= model.needs_images(part)
            needed_without[part] |= model.needs_images(part)
        for frozen in model.frozen:
            for part in frozen.parts:
                where = positions[part]
                # A repeated image (per-class weighting) passes once per job, cached or not.
                first = np.zeros(len(where), dtype=bool)
                first[np.unique(where, return_index=True)[1]] = True
                counts.frozen_without += int(first.sum())
                needed_without[part] |= first
                if frozen.part is None or image_key is None or state.store is None:
                    missing = first
                else:
                    held = state.features(frozen, image_key)
                    missing = ~held[where] & first
                    held[where] = True
                counts.frozen_with += int(missing.sum())
                needed[part] |= missing
        counts.trained += int(round(model.trained_per_train_image * len(positions["train"])
                                    + model.trained_per_test_image * len(positions["test"])))
    for part in PARTS:
        counts.images += len(np.unique(positions[part]))
        if not files:
            continue
        counts.decodes_without += int(needed_without[part].sum())
        wanted = positions[part][needed[part]]
        if staged and state.store is not None and part in detector.store_parts:
            held = state.images(image_key)
            counts.decodes_with += len(np.unique(wanted[~held[wanted]]))
            held[wanted] = True
        else:
            counts.decodes_with += len(wanted)


def plan_totals(plan: RunPlan) -> dict[str, int]:
    """Totals over every method (None counts as 0)."""
    totals: dict[str, int] = defaultdict(int)
    for m in plan.methods.values():
        for name in ("jobs", "skipped", "images", "decodes_without", "decodes_with", "frozen_without",
                     "frozen_with", "trained"):
            totals[name] += getattr(m, name) or 0
    return dict(totals)


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _saving(without: int | None, with_: int | None) -> str:
    if without is None or with_ is None:
        return "-"
    if with_ == 0:
        return "all" if without else "-"
    return f"{without / with_:.1f}x"


def print_plan(plan: RunPlan, console) -> None:
    """The jobs, then the predicted counts per method (and in total)."""
    from rich.table import Table

    jobs = Table(title=f"ndbench run --dry-run: {len(plan.jobs)} jobs")
    for column in ("method", "split", "seed", "train images", "test images", "status"):
        jobs.add_column(column)
    for j in plan.jobs:
        jobs.add_row(j.job.method, j.job.split_id, str(j.job.seed), f"{j.train:,}", f"{j.test:,}",
                     "refuse (newer record)" if j.refused
                     else "skip (record exists)" if j.skipped
                     else "build split, run" if j.builds_split else "run")
    console.print(jobs)
    unbuilt = list(dict.fromkeys(j.job.split_id for j in plan.jobs if j.builds_split))
    if unbuilt:
        console.print(f"{len(unbuilt)} split(s) not built yet, which the run builds first: {', '.join(unbuilt)}",
                      soft_wrap=True, markup=False)
    costs = Table(title="forward passes and decodes: without caches -> with caches (this machine's store now)")
    for column in ("method", "jobs", "images", "decodes", "frozen passes", "saved", "trained passes"):
        costs.add_column(column)
    rows = list(plan.methods.values())
    for m in rows:
        costs.add_row(m.method, str(m.jobs), f"{m.images:,}",
                      f"{m.decodes_without:,} -> {m.decodes_with:,}",
                      f"{_count(m.frozen_without)} -> {_count(m.frozen_with)}",
                      _saving(m.frozen_without, m.frozen_with) if m.frozen_without is not None
                      else _saving(m.decodes_without, m.decodes_with),
                      _count(m.trained))
    if len(rows) > 1:
        t = plan_totals(plan)
        costs.add_row("all", str(t["jobs"]), f"{t['images']:,}", f"{t['decodes_without']:,} -> {t['decodes_with']:,}",
                      f"{t['frozen_without']:,} -> {t['frozen_with']:,}", "", f"{t['trained']:,}")
    console.print(costs)
    console.print("'-': the method declares no cost model (only its decodes are counted). Decodes and frozen "
                  "passes 'with caches' assume the store's size budget holds.")
