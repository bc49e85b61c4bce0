"""Jobs: (method + config, split, seed) -> fitted detector -> scores -> metrics -> record.

`expand_jobs` turns the CLI's lists into jobs, `prepare` builds whatever the jobs share once
(splits, pre-trained embedded backbones), `run_job` runs one job under its lock file and
writes its record atomically. Jobs are independent, so executors only map `run_job` over them.
"""

from __future__ import annotations

import hashlib
import platform
import random
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from datasets_builders.atomic import remove_abandoned_temporaries, write_error
from datasets_builders.embedded import N_CLASSES, check_generated_scenes
from datasets_builders.errors import NdbenchError, WriteFailure
from datasets_builders.index import DatasetIndex, build_command
from datasets_builders.loading import ManifestDataset
from datasets_builders.sources import check_dataset, is_builtin
from datasets_builders.splits import (
    SETTINGS,
    DegenerateSplit,
    Manifest,
    all_vs_one_split,
    describe_ids,
    protocol_classes,
    uni_class_split,
)
from methods.backbones import create_backbone
from methods.base import BaseDetector, config_hash, resolve_device
from methods.pretrain import resolve_weights
from methods.registry import get_class
from methods.runtime import CacheSettings, JobRuntime
from methods.shipped_weights import check_embedded_arch
from methods.weight_sources import EMBEDDED_WEIGHTS

from .build import BuildRequest, build_splits, make_manifests
from .console import QuietProgress, stderr_console
from .interrupts import Interrupted
from .locks import remove_stale_lock, try_lock
from .metrics import novelty_metrics
from .overrides import WEIGHTING_OPTION, split_overrides
from .records import NewerRecord, Record, read_record, record_path, refuse_newer, write_record

EMBEDDED = "embedded"
# How a multi-class training set is weighted. The authors' released code concatenates one image
# set per normal class (SMSD75/Redefining_Normal_ACCV24:DeFeND/data.py:161-166, the per-class
# folders written at :120-137), so an image holding two normal classes is seen twice per epoch:
# "per-class" reproduces that (the default); "unique" sees each image once. Manifests always
# list each image once; this is a run option (`--set multi_class_weighting=unique`).
WEIGHTINGS = ("per-class", "unique")
DEFAULT_WEIGHTING = "per-class"


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
    save_models: bool = False  # keep each job's fitted detector beside its record
    force: bool = False
    progress: bool = True
    retries: int = 0  # times a crashed job (or, on Ray, a job whose worker died) is tried again
    caching: CacheSettings = CacheSettings()  # image store, feature cache, DataLoader workers

    @property
    def splits(self) -> Path:
        return self.splits_root if self.splits_root is not None else Path(self.out) / "splits"


# JobResult.status values. RUNNING_ELSEWHERE: another run holds the job's lock; not a failure.
DONE, SKIPPED, FAILED, RUNNING_ELSEWHERE = "done", "skipped", "failed", "running elsewhere"


class MethodFailure(Exception):
    """A method misbehaved (NaN or infinite scores, one score per image not kept): the job
    fails like a crash, and no record is written."""


@dataclass
class JobResult:
    """What happened to a job: done, skipped (record existed), running elsewhere or failed."""

    job: Job
    status: str
    record: Path | None = None
    auroc: float | None = None
    error: str | None = None  # why it failed; who runs it, when running elsewhere
    user_error: bool = False
    extra: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # warning lines for the user (a stale lock taken over, ...)


class SplitReader:
    """The dataset indexes and split manifests under a splits root, each read once: one reader
    serves the jobs of one run, whose splits `prepare` builds before any job and leaves as they
    are. A read that fails fails the same way for every job asking again."""

    def __init__(self, splits_root: Path):
        self.root = Path(splits_root)
        self._indexes: dict[str, DatasetIndex | NdbenchError] = {}
        self._manifests: dict[str, Manifest | NdbenchError] = {}

    def index(self, dataset: str) -> DatasetIndex:
        """The dataset's index (raises NdbenchError as `DatasetIndex.read`)."""
        return self._once(self._indexes, dataset, lambda: DatasetIndex.read(self.root / dataset))

    def manifest(self, split_id: str) -> Manifest:
        """The manifest of `<dataset>/<setting>/<name>` (raises NdbenchError as `Manifest.read`)."""
        return self._once(self._manifests, split_id, lambda: Manifest.read(self.root / f"{split_id}.json"))

    def split(self, split_id: str) -> tuple[DatasetIndex, Manifest]:
        """The index and manifest of a split, as `datasets_builders.loading.load_split` gives
        them: a manifest built from another index than the one beside it is refused."""
        dataset = split_id.split("/")[0]
        index, manifest = self.index(dataset), self.manifest(split_id)
        if manifest.index_sha256 != index.sha256:
            index_dir = self.root / dataset
            raise NdbenchError(f"manifest {index_dir / split_id.split('/', 1)[1]}.json built from another index than "
                               f"{index_dir / 'index.csv'}", f"rebuild with `{build_command(index_dir)}`")
        return index, manifest

    @staticmethod
    def _once(found: dict, key: str, read: Callable[[], Any]) -> Any:
        if key not in found:
            try:
                found[key] = read()
            except NdbenchError as exc:
                found[key] = exc
        if isinstance(found[key], NdbenchError):
            raise found[key]
        return found[key]


def _check_classes(chosen: list[int], known: list[int], dataset: str) -> None:
    for c in chosen:
        if c not in known:
            raise NdbenchError(f"unknown class {c} for {dataset}", f"use {describe_ids(known)}")


def split_name(setting: str, class_id: int) -> str:
    """uni-class: the normal class; multi-class: all-vs-one, named after the abnormal class."""
    return str(class_id) if setting == "uni-class" else f"except-{class_id}"


def ensure_index(dataset: str, options: RunOptions, splits: SplitReader | None = None) -> DatasetIndex:
    """The dataset's index under the splits root (read by `splits`, the run's reader, when
    given), building every split when it is missing (built-in datasets only: a custom
    dataset's sources are the user's to name)."""
    folder = options.splits / dataset
    if not index_built(dataset, options):
        if not is_builtin(dataset):
            raise _custom_split_missing(dataset, options, f"no index {folder / 'index.json'}")
        build_splits(BuildRequest(dataset=dataset, out=options.splits))
    return (splits or SplitReader(options.splits)).index(dataset)


def index_built(dataset: str, options: RunOptions) -> bool:
    """Whether the dataset's index is under the splits root (else `ensure_index` builds it)."""
    return (options.splits / dataset / "index.json").is_file()


def _custom_split_missing(dataset: str, options: RunOptions, what: str, options_text: str = "") -> NdbenchError:
    """The error for a custom dataset's missing index or split: ndbench cannot rebuild it."""
    from datasets_builders.coco_format import build_command_for

    out = shlex.quote(str(options.splits))
    command = f"{build_command_for(options.splits / dataset, dataset)} --out {out}{options_text}"
    return NdbenchError(f"{dataset}: {what}; ndbench cannot build a custom dataset by itself",
                        f"build it with `{command}`")


def _built_classes(index: DatasetIndex, setting: str, options: RunOptions) -> list[int]:
    """Classes of a custom dataset whose split of `setting` was built from its current index
    (a manifest left by an earlier build of other files is not run)."""
    folder = options.splits / index.dataset / setting
    return [c for c in index.class_ids() if _built_from(folder / f"{split_name(setting, c)}.json", index)]


def _protocol_classes(index: DatasetIndex, setting: str, options: RunOptions) -> list[int]:
    """Classes of the built index's protocol in `setting` (a --root holding some classes
    forms theirs only): those whose split is built, and those whose missing split can form
    (one that cannot is left out, as `build-splits` leaves it out)."""
    folder = options.splits / index.dataset / setting
    chosen = []
    for c in protocol_classes(index):
        if not (folder / f"{split_name(setting, c)}.json").is_file():
            try:
                (uni_class_split if setting == "uni-class" else all_vs_one_split)(index, c)
            except DegenerateSplit:
                continue
        chosen.append(c)
    return chosen


def _built_normal_sets(index: DatasetIndex, setting: str, options: RunOptions) -> list[str]:
    """Names of the multi-class splits built from the current index with a chosen normal set
    (`build-splits --normal 1,3`: `normal-1-3`), beside the all-vs-one `except-k` ones."""
    if setting != "multi-class":
        return []
    paths = sorted((options.splits / index.dataset / setting).glob("*.json"))
    return [path.stem for path in paths if not path.stem.startswith("except-") and _built_from(path, index)]


def _built_from(path: Path, index: DatasetIndex) -> bool:
    """Whether the manifest at `path` exists and was built from `index` as it is now (a
    damaged manifest, or one left by an earlier build of other files, is not a split to run)."""
    try:
        return path.is_file() and Manifest.read(path).index_sha256 == index.sha256
    except (NdbenchError, KeyError, TypeError):
        return False


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
    splits: SplitReader | None = None,
) -> list[Job]:
    """Every (method, split, seed) job of a request, in a stable order. `overrides` are the
    run's --set options, each given to the methods that have it (`split_overrides`); `splits`:
    the run's reader of the index (a new one when None)."""
    check_dataset(dataset, options.splits)
    check_weighting(overrides or {})
    for method in methods:
        cls = get_class(method)  # unknown names fail before any work
        if preset:
            cls.resolve_preset(preset)
    per_method, _ = split_overrides(methods, overrides or {})
    frozen = {method: freeze_overrides(per_method[method]) for method in methods}
    for setting in settings:
        if setting not in SETTINGS:
            raise NdbenchError(f"unknown setting {setting!r}", "use uni-class or multi-class")
        for method in methods:  # unknown or mistyped --set options, too
            config = build_detector(Job(method, dataset, setting, "", 0, frozen[method], preset), options).config
            if getattr(config, "weights", None) == EMBEDDED_WEIGHTS:
                check_embedded_arch(config.backbone)
    if dataset == EMBEDDED and classes is not None:  # known before the scenes are generated
        _check_classes(classes, list(range(N_CLASSES)), dataset)
    index = ensure_index(dataset, options, splits)
    known = index.class_ids()
    chosen = known if classes is None else classes
    _check_classes(chosen, known, dataset)
    per_setting = {setting: chosen for setting in settings}
    if classes is None and is_builtin(dataset):
        per_setting = {setting: _protocol_classes(index, setting, options) for setting in settings}
    elif classes is None:
        # A custom dataset runs the splits it was built with (rare classes may have none).
        per_setting = {setting: _built_classes(index, setting, options) for setting in settings}
    names = {setting: [split_name(setting, c) for c in per_setting[setting]] for setting in settings}
    if classes is None:  # and every normal set built with --normal (CIFAR-10: paper Table 5's)
        for setting in settings:
            names[setting] += _built_normal_sets(index, setting, options)
    for setting in settings:
        if not names[setting] and not is_builtin(dataset):
            raise _custom_split_missing(dataset, options, f"no {setting} split was built")
    jobs = (
        Job(method, dataset, setting, name, seed, frozen[method], preset)
        for method in methods
        for setting in settings
        for name in names[setting]
        for seed in seeds
    )
    return list(dict.fromkeys(jobs))  # a class or seed given twice is one job


def freeze_overrides(overrides: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A job's options as a sorted tuple; lists (e.g. --set mean=[0.5,0.5,0.5]) become tuples,
    so jobs stay hashable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()))


def preset_chain(job: Job) -> str:
    """The presets a job's detector is built with, "+"-joined: the embedded preset and its
    per-setting layer on the embedded dataset, then the resolved `--preset` ("" = defaults)."""
    chain = [f"{EMBEDDED}/{job.setting}"] if job.dataset == EMBEDDED else []
    if job.preset:
        resolved = get_class(job.method).resolve_preset(job.preset)
        if resolved:
            chain.append(resolved)
    return "+".join(chain)


def weighting(job: Job) -> str:
    """The job's multi-class training weighting ("" for uni-class jobs, where it has no effect)."""
    if job.setting != "multi-class":
        return ""
    return str(dict(job.overrides).get(WEIGHTING_OPTION, DEFAULT_WEIGHTING))


def check_weighting(overrides: dict[str, Any]) -> None:
    """Refuse an unknown `--set multi_class_weighting=...` before any work."""
    value = overrides.get(WEIGHTING_OPTION, DEFAULT_WEIGHTING)
    if value not in WEIGHTINGS:
        raise NdbenchError(f"unknown {WEIGHTING_OPTION} {value!r}",
                           f"use --set {WEIGHTING_OPTION}=per-class (the released code's) or =unique")


def job_hash(job: Job, detector) -> str:
    """The job key's method part: the config hash, extended by a non-default weighting."""
    base = config_hash(detector.config)
    chosen = weighting(job)
    if chosen in ("", DEFAULT_WEIGHTING):
        return base
    return hashlib.sha256(f"{base}/{WEIGHTING_OPTION}={chosen}".encode()).hexdigest()[:10]


def build_detector(job: Job, options: RunOptions):
    """The job's detector: paper defaults, its preset chain (`preset_chain`), then the job's
    overrides (less the run option `multi_class_weighting`) and `--weights`."""
    cls = get_class(job.method)
    overrides = {k: v for k, v in job.overrides if k != WEIGHTING_OPTION}
    if options.weights is not None:
        overrides["weights"] = options.weights
    return cls.with_preset(preset_chain(job), **overrides)


def job_record_path(job: Job, options: RunOptions, detector=None) -> Path:
    """Where a job's record goes (it depends on the config hash)."""
    detector = detector or build_detector(job, options)
    return record_path(options.out, job.method, job.dataset, job.setting, job.split,
                       job_hash(job, detector), job.seed)


def prepare(jobs: list[Job], options: RunOptions, splits: SplitReader | None = None) -> None:
    """Do once what jobs share: build missing splits, pre-train embedded backbones; remove
    what killed runs left half-written under the results folder. `splits`: the run's reader."""
    resolve_device(options.device)
    for folder in ("runs", "tables"):
        remove_abandoned_temporaries(options.out / folder)
    for dataset in sorted({job.dataset for job in jobs}):
        index = ensure_index(dataset, options, splits)
        if dataset == "embedded":
            check_generated_scenes(index.root)
    for job in jobs:
        manifest = missing_split(job, options)
        if manifest is not None:
            manifest.write(options.splits)
    # Build each distinct backbone once: missing or wrong weights fail here, in one line,
    # before any job starts (and embedded backbones get pre-trained once, not per job).
    seen: set[tuple[str, str]] = set()
    for job in jobs:
        config = build_detector(job, options).config
        key = (getattr(config, "backbone", ""), str(getattr(config, "weights", "")))
        if key not in seen and key[0]:
            seen.add(key)
            create_backbone(key[0], weights=resolve_weights(*key), num_classes=0)


def missing_split(job: Job, options: RunOptions, index: DatasetIndex | None = None) -> Manifest | None:
    """The manifest `prepare` writes for the job's split when it is not built (None when it is):
    a built-in dataset's protocol split, formed from the index under the splits root (`index`,
    when given) as `build-splits` formed it (the same --root, year and class order: the data at
    the default root may be another tree). Nothing is written. Raises NdbenchError for a custom
    dataset's missing split: ndbench cannot build it."""
    if (options.splits / job.dataset / job.setting / f"{job.split}.json").is_file():
        return None
    if not is_builtin(job.dataset):
        raise _custom_split_missing(job.dataset, options, f"no split {job.setting}/{job.split}",
                                    f" --setting {job.setting} --classes {job.split.removeprefix('except-')}")
    index = index or DatasetIndex.read(options.splits / job.dataset)
    kind = job.split.removeprefix("except-")
    request = BuildRequest(dataset=job.dataset, out=options.splits, setting=job.setting, classes=(int(kind),))
    (manifest,) = make_manifests(index, request)[0]
    return manifest


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


def job_data(job: Job, detector, options: RunOptions,
             splits: SplitReader | None = None) -> tuple[Manifest, ManifestDataset, ManifestDataset]:
    """The job's manifest and its train and test images, in the detector's input transform,
    decoded through the detector's runtime (image store, counters) for its `store_parts`;
    multi-class training images repeated per normal class under the "per-class" weighting.
    `splits`: the run's reader of indexes and manifests (default: a fresh one)."""
    index, manifest = (splits or SplitReader(options.splits)).split(job.split_id)
    transform = detector.transform()
    runtime = detector.runtime

    def part(name: str) -> ManifestDataset:
        store = runtime.images if name in detector.store_parts else None
        return ManifestDataset(index, manifest, name, transform=transform, store=store, counts=runtime.counts)

    train = part("train")
    if weighting(job) == "per-class":
        train = train.per_class_repeats(manifest.normal_classes)
    return manifest, train, part("test")


def job_cost(detector, runtime: JobRuntime) -> dict[str, int]:
    """What the job computed, counted as it happened: decodes and image-store reads always;
    frozen and trained passes for methods with a cost model (they count them)."""
    names = ("decodes", "image_reads")
    if type(detector).cost_model is not BaseDetector.cost_model:
        names += ("frozen_passes", "frozen_reads", "trained_passes")
    return runtime.counts.as_dict(names)


def finished_record(path: Path, split_sha256: str | None = None) -> tuple[Record | None, tuple[str, ...]]:
    """The job's record when it exists whole and, given the split's current `split_sha256`,
    was made on that build of the split; a damaged or outdated one counts as absent (with a note).
    Raises NewerRecord for a record a newer ndbench wrote: its job must not run over it."""
    if not path.is_file():
        return None, ()
    try:
        record = read_record(path)
    except NewerRecord:
        raise
    except NdbenchError as exc:
        return None, (f"ndbench: warning: {exc.problem}; re-running its job",)
    if split_sha256 is not None and record.split_sha256 != split_sha256:
        return None, (f"ndbench: warning: record {path} was made on an earlier build of split "
                      f"{record.dataset}/{record.setting}/{record.split}; re-running its job",)
    return record, ()


def current_split_sha256(job: Job, options: RunOptions, splits: SplitReader | None = None) -> str | None:
    """The sha256 of the job's split manifest as built now (None when it cannot be read: the
    job then fails on it with the manifest's own error). `splits`: as for `job_data`."""
    try:
        return (splits or SplitReader(options.splits)).manifest(job.split_id).sha256
    except NdbenchError:
        return None


def check_scores(job: Job, scores: np.ndarray, image_ids: list[str]) -> np.ndarray:
    """The scores, unless the method returned other than one finite score per test image."""
    if scores.shape != (len(image_ids),):
        raise MethodFailure(f"{job.method} returned scores of shape {scores.shape} for "
                            f"{len(image_ids)} test images; no record written")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise MethodFailure(f"{job.method} returned {len(bad)} NaN or infinite scores of {len(scores)} "
                            f"(first for image {image_ids[bad[0]]!r}); no record written")
    return scores


def run_job(job: Job, options: RunOptions, progress: Progress | None = None, cpus: int | None = None,
            splits: SplitReader | None = None) -> JobResult:
    """Run one job unless its record exists (or `force`) or another run holds its lock;
    write the record atomically. `cpus`: the CPUs reserved for the job (sets the DataLoader
    workers' default); `splits`: the run's reader of indexes and manifests (default: the job's own)."""
    splits = splits or SplitReader(options.splits)
    detector = build_detector(job, options)
    path = job_record_path(job, options, detector)
    split_sha256 = current_split_sha256(job, options, splits)
    skipped, notes = _recorded(job, options, path, split_sha256)
    if skipped is not None:
        skipped.notes = remove_stale_lock(path)
        return skipped
    attempt = try_lock(path)
    notes += attempt.notes
    if attempt.lock is None:
        return JobResult(job, RUNNING_ELSEWHERE, error=attempt.holder, notes=notes)
    try:
        skipped, _ = _recorded(job, options, path, split_sha256)  # finished by another run since the check above
        if skipped is not None:
            skipped.notes = notes
            return skipped
        result = _run_locked(job, options, detector, path, progress, cpus, splits)
    finally:
        attempt.lock.release()
    result.notes = notes + result.notes
    return result


def recorded_result(job: Job, options: RunOptions, splits: SplitReader | None = None) -> JobResult | None:
    """The job's skipped result when `run_job` would skip it now (see `_recorded`), else None;
    as `run_job` does, it removes a stale lock left beside the finished record."""
    if options.force:
        return None
    path = job_record_path(job, options)
    skipped = _recorded(job, options, path, current_split_sha256(job, options, splits))[0]
    if skipped is not None:
        skipped.notes = remove_stale_lock(path)
    return skipped


def _recorded(job: Job, options: RunOptions, path: Path,
              split_sha256: str | None) -> tuple[JobResult | None, tuple[str, ...]]:
    """The job as skipped when its record at `path` is finished (see `finished_record`) and
    `force` is off, else None; and the notes on a damaged or outdated record. Raises NewerRecord
    when a newer ndbench wrote the record, `force` or not: running the job would overwrite it."""
    try:
        if options.force:
            refuse_newer(path)
        record, notes = (None, ()) if options.force else finished_record(path, split_sha256)
    except NewerRecord as exc:
        raise NewerRecord(f"{exc.problem}: not run over it", "run the job with that ndbench, or pass another --out") \
            from None
    return (None if record is None else JobResult(job, SKIPPED, path, record.metrics["auroc"])), notes


def _run_locked(job: Job, options: RunOptions, detector, path: Path, progress: Progress | None,
                cpus: int | None, splits: SplitReader) -> JobResult:
    device = resolve_device(options.device)
    runtime = JobRuntime.open(options.caching, device, cpus)
    detector.use_runtime(runtime)
    manifest, train, test = job_data(job, detector, options, splits)
    seed_everything(job.seed)
    start = time.perf_counter()
    detector.fit(train, device=device, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = np.asarray(detector.score(test, device=device, progress=progress), dtype=np.float64)
    infer_seconds = time.perf_counter() - start
    scores = check_scores(job, scores, test.image_ids)
    metrics = novelty_metrics(test.labels, scores)

    record = Record(
        method=job.method,
        config_hash=job_hash(job, detector),
        config=asdict(detector.config),
        dataset=job.dataset,
        setting=job.setting,
        split=job.split,
        split_sha256=manifest.sha256,
        normal_classes=list(manifest.normal_classes),
        seed=job.seed,
        metrics=metrics,
        counts={**manifest.counts(), "train_items": len(train)},
        train_seconds=train_seconds,
        inference_images_per_s=len(test) / max(infer_seconds, 1e-9),
        device=describe_device(device),
        versions=versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        extra={**detector.record_extra(), "cost": job_cost(detector, runtime)},
        preset=preset_chain(job),
        multi_class_weighting=weighting(job),
    )
    from .models import model_path, save_model

    if options.save_models:
        save_model(model_path(path), detector, record, test.labels, scores)
    else:
        # A model an earlier run saved beside this record was fitted on another build of the
        # split (or another fit): with the new record beside it, its threshold would pass as this one's.
        _remove_file(model_path(path))
    write_record(path, record, test.image_ids, test.labels, scores)
    return JobResult(job, DONE, path, metrics["auroc"])


def _remove_file(path: Path) -> None:
    """Delete the file at `path` if there is one; a failure is a write failure."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from exc


def safe_run_job(job: Job, options: RunOptions, progress: Progress | None = None,
                 cpus: int | None = None, splits: SplitReader | None = None) -> JobResult:
    """`run_job` that turns a failure into a failed result, so other jobs go on; a crash is
    tried again up to `options.retries` times. A write failure (disk full, read-only folder)
    is raised: every later job would hit it too."""
    tries = 0
    while True:
        tries += 1
        try:
            return run_job(job, options, progress, cpus, splits)
        except WriteFailure:
            raise
        except NdbenchError as exc:
            return JobResult(job, FAILED, error=str(exc), user_error=True)
        except Exception as exc:  # noqa: BLE001 - one job's crash must not lose the others
            if tries > options.retries:
                note = f" (tried {tries} times)" if tries > 1 else ""
                return JobResult(job, FAILED, error=f"{type(exc).__name__}: {exc}{note}")


def print_notes(result: JobResult, progress: Progress | None, console: Console | None) -> None:
    """Print a job result's warning lines above the progress display (or on `console`)."""
    target = progress.console if progress is not None else console or stderr_console()
    for note in result.notes:
        target.print(note, markup=False, soft_wrap=True)


def interrupted_after(exc: Interrupted, results: Iterable[JobResult], total: int) -> Interrupted:
    """`exc` with how many of `total` jobs had finished (their records exist) among `results`."""
    exc.finished = sum(r.status in (DONE, SKIPPED) for r in results)
    exc.total = total
    return exc


def job_progress(console) -> Progress:
    """The progress display of a run: the job bar plus each method's fit/score bars."""
    return QuietProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
