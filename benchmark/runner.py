"""Jobs: (method + config, split, seed) -> fitted detector -> scores -> metrics -> record.

`expand_jobs` turns the CLI's lists into jobs, `prepare` builds whatever the jobs share once
(splits, pre-trained embedded backbones), `run_job` runs one job and writes its record
atomically. Jobs are independent, so executors only map `run_job` over them.
"""

from __future__ import annotations

import platform
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex
from datasets_builders.loading import ManifestDataset, load_split
from datasets_builders.sources import check_dataset
from datasets_builders.splits import SETTINGS, Manifest
from methods.backbones import create_backbone
from methods.base import BaseDetector, config_hash, resolve_device
from methods.pretrain import resolve_weights
from methods.registry import get_class
from methods.runtime import CacheSettings, JobRuntime

from .build import BuildRequest, build_splits
from .metrics import novelty_metrics
from .records import Record, record_path, write_record

EMBEDDED = "embedded"


@dataclass(frozen=True)
class Job:
    """One unit of work. Plain data, so it pickles to Ray workers."""

    method: str
    dataset: str
    setting: str
    split: str  # name inside the setting: "3", "except-3", "normal-0-1"
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()
    preset: str = ""  # a named preset given with --preset ("paper" = each method's paper recipe)

    @property
    def split_id(self) -> str:
        return f"{self.dataset}/{self.setting}/{self.split}"

    def describe(self) -> str:
        return f"{self.method} {self.split_id} seed {self.seed}"


@dataclass(frozen=True)
class RunOptions:
    """Where things go and how jobs run (shared by every job of a run)."""

    out: Path = Path("results")
    splits_root: Path | None = None  # default: <out>/splits
    device: str = "auto"
    weights: str | None = None  # overrides every method's `weights`
    force: bool = False
    progress: bool = True
    caching: CacheSettings = CacheSettings()  # image store, feature cache, DataLoader workers

    @property
    def splits(self) -> Path:
        return self.splits_root if self.splits_root is not None else Path(self.out) / "splits"


@dataclass
class JobResult:
    """What happened to a job: done, skipped (record existed) or failed."""

    job: Job
    status: str
    record: Path | None = None
    auroc: float | None = None
    error: str | None = None
    user_error: bool = False
    extra: dict = field(default_factory=dict)


def split_name(setting: str, class_id: int) -> str:
    """uni-class: the normal class; multi-class: all-vs-one, named after the abnormal class."""
    return str(class_id) if setting == "uni-class" else f"except-{class_id}"


def ensure_index(dataset: str, options: RunOptions) -> DatasetIndex:
    """The dataset's index under the splits root, building every split when it is missing."""
    folder = options.splits / dataset
    if not (folder / "index.json").is_file():
        build_splits(BuildRequest(dataset=dataset, out=options.splits))
    return DatasetIndex.read(folder)


def expand_jobs(
    methods: list[str],
    *,
    dataset: str = EMBEDDED,
    settings: list[str],
    classes: list[int] | None,
    seeds: list[int],
    options: RunOptions,
    overrides: dict[str, Any] | None = None,
    preset: str = "",
) -> list[Job]:
    """Every (method, split, seed) job of a request, in a stable order."""
    check_dataset(dataset)
    for method in methods:
        cls = get_class(method)  # unknown names fail before any work
        if preset:
            cls.resolve_preset(preset)
    for setting in settings:
        if setting not in SETTINGS:
            raise NdbenchError(f"unknown setting {setting!r}", "use uni-class or multi-class")
    index = ensure_index(dataset, options)
    known = index.class_ids()
    chosen = known if classes is None else classes
    for c in chosen:
        if c not in known:
            raise NdbenchError(f"unknown class {c} for {dataset}", f"use ids {known[0]}..{known[-1]}")
    frozen = tuple(sorted((overrides or {}).items()))
    return [
        Job(method, dataset, setting, split_name(setting, c), seed, frozen, preset)
        for method in methods
        for setting in settings
        for c in chosen
        for seed in seeds
    ]


def preset_chain(job: Job) -> str:
    """The presets a job's detector is built with, "+"-joined: the embedded preset and its
    per-setting layer on the embedded dataset, then the resolved `--preset` ("" = defaults)."""
    chain = [f"{EMBEDDED}/{job.setting}"] if job.dataset == EMBEDDED else []
    if job.preset:
        resolved = get_class(job.method).resolve_preset(job.preset)
        if resolved:
            chain.append(resolved)
    return "+".join(chain)


def build_detector(job: Job, options: RunOptions):
    """The job's detector: paper defaults, its preset chain (`preset_chain`), then the job's
    overrides and `--weights`."""
    cls = get_class(job.method)
    overrides = dict(job.overrides)
    if options.weights is not None:
        overrides["weights"] = options.weights
    return cls.with_preset(preset_chain(job), **overrides)


def job_record_path(job: Job, options: RunOptions, detector=None) -> Path:
    """Where a job's record goes (it depends on the config hash)."""
    detector = detector or build_detector(job, options)
    return record_path(options.out, job.method, job.dataset, job.setting, job.split,
                       config_hash(detector.config), job.seed)


def prepare(jobs: list[Job], options: RunOptions) -> None:
    """Do once what jobs share: build missing splits, pre-train embedded backbones."""
    resolve_device(options.device)
    for dataset in sorted({job.dataset for job in jobs}):
        ensure_index(dataset, options)
    for job in jobs:
        if not Path(options.splits / job.dataset / job.setting / f"{job.split}.json").is_file():
            kind = job.split.removeprefix("except-")
            build_splits(BuildRequest(dataset=job.dataset, out=options.splits,
                                      setting=job.setting, classes=(int(kind),)))
    # Build each distinct backbone once: missing or wrong weights fail here, in one line,
    # before any job starts (and embedded backbones get pre-trained once, not per job).
    seen: set[tuple[str, str]] = set()
    for job in jobs:
        config = build_detector(job, options).config
        key = (getattr(config, "backbone", ""), str(getattr(config, "weights", "")))
        if key not in seen and key[0]:
            seen.add(key)
            create_backbone(key[0], weights=resolve_weights(*key), num_classes=0)


def seed_everything(seed: int) -> None:
    """Fix python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    """Versions of the software that produced a record."""
    found = {"python": platform.python_version()}
    for name in ("ndbench", "torch", "torchvision", "timm", "numpy", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def describe_device(device: torch.device) -> str:
    """`cpu (N threads)` or `cuda:0 (GPU name)`."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def job_data(job: Job, detector, options: RunOptions) -> tuple[Manifest, ManifestDataset, ManifestDataset]:
    """The job's manifest and its train and test images, in the detector's input transform,
    decoded through the detector's runtime (image store, counters) for its `store_parts`."""
    index, manifest = load_split(options.splits, job.split_id)
    transform = detector.transform()
    runtime = detector.runtime

    def part(name: str) -> ManifestDataset:
        store = runtime.images if name in detector.store_parts else None
        return ManifestDataset(index, manifest, name, transform=transform, store=store, counts=runtime.counts)

    return manifest, part("train"), part("test")


def job_cost(detector, runtime: JobRuntime) -> dict[str, int]:
    """What the job computed, counted as it happened: decodes and image-store reads always;
    frozen and trained passes for methods with a cost model (they count them)."""
    names = ("decodes", "image_reads")
    if type(detector).cost_model is not BaseDetector.cost_model:
        names += ("frozen_passes", "frozen_reads", "trained_passes")
    return runtime.counts.as_dict(names)


def run_job(job: Job, options: RunOptions, progress: Progress | None = None, cpus: int | None = None) -> JobResult:
    """Run one job unless its record exists (or `force`); write the record atomically.
    `cpus`: the CPUs reserved for the job (sets the DataLoader workers' default)."""
    detector = build_detector(job, options)
    path = job_record_path(job, options, detector)
    if path.is_file() and not options.force:
        return JobResult(job, "skipped", path, Record.from_json(path.read_text()).metrics["auroc"])
    device = resolve_device(options.device)
    runtime = JobRuntime.open(options.caching, device, cpus)
    detector.use_runtime(runtime)
    manifest, train, test = job_data(job, detector, options)
    seed_everything(job.seed)
    start = time.perf_counter()
    detector.fit(train, device=device, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = np.asarray(detector.score(test, device=device, progress=progress), dtype=np.float64)
    infer_seconds = time.perf_counter() - start
    metrics = novelty_metrics(test.labels, scores)

    record = Record(
        method=job.method,
        config_hash=config_hash(detector.config),
        config=asdict(detector.config),
        dataset=job.dataset,
        setting=job.setting,
        split=job.split,
        split_sha256=manifest.sha256,
        normal_classes=list(manifest.normal_classes),
        seed=job.seed,
        metrics=metrics,
        counts=manifest.counts(),
        train_seconds=train_seconds,
        inference_images_per_s=len(test) / max(infer_seconds, 1e-9),
        device=describe_device(device),
        versions=versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        extra={**getattr(detector, "record_extra", lambda: {})(), "cost": job_cost(detector, runtime)},
        preset=preset_chain(job),
    )
    write_record(path, record, test.image_ids, test.labels, scores)
    return JobResult(job, "done", path, metrics["auroc"])


def safe_run_job(job: Job, options: RunOptions, progress: Progress | None = None,
                 cpus: int | None = None) -> JobResult:
    """`run_job` that turns a failure into a failed result, so other jobs go on."""
    try:
        return run_job(job, options, progress, cpus)
    except NdbenchError as exc:
        return JobResult(job, "failed", error=str(exc), user_error=True)
    except Exception as exc:  # noqa: BLE001 - one job's crash must not lose the others
        return JobResult(job, "failed", error=f"{type(exc).__name__}: {exc}")


def job_progress(console) -> Progress:
    """The progress display of a run: the job bar plus each method's fit/score bars."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
