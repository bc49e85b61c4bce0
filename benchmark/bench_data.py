"""`ndbench bench`'s data figures: what the image store and the feature cache save.

- Run level: the embedded uni-class `knn` jobs, run in this process three times (caches off,
  cold, warm) with random weights saved to a file (so the features are cacheable; only the
  shapes matter for speed). Goals are read from the records' counters: decodes and frozen
  passes per distinct image; and the wall-time speed-ups, measured back to back. The same for
  a few `mkd` jobs (its untuned teacher's passes are cached; its student trains in every job).
- Loader: a generated tree of VOC-sized JPEGs decoded and resized to 224 px by DataLoaders
  with 0, 1 and N workers, and read back from the image store; `defend`'s multi-crop views cut
  from them with 0 and N workers.

Everything is written under a throw-away folder (`work`), the store included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Subset

from datasets_builders.array_store import ArrayStore
from datasets_builders.image_store import ImageStore, Normalise, ResizeDecode, StagedTransform
from datasets_builders.index import DatasetIndex, IndexRow
from datasets_builders.loading import ManifestDataset, load_split
from datasets_builders.splits import Manifest
from methods.backbones import create_backbone
from methods.multicrop import MultiCropSpec, MultiCropViews
from methods.runtime import CacheSettings, default_workers

from .bench import BenchRow
from .executors import run_local
from .interrupts import Interrupted
from .records import load_records
from .runner import Job, RunOptions, build_detector, expand_jobs, prepare

# Goals (counted, except the speed-ups, which are wall-time ratios taken back to back).
MAX_PER_DISTINCT = 1.05
MIN_SPEEDUP_COLD = 2.5
MIN_SPEEDUP_WARM = 10.0
MIN_STORE_OVER_DECODE = 5.0
MODES = ("off", "cold", "warm")
# Images whose `defend` views the loader section cuts (~16 ms each on one core at 224 px).
VIEWS_IMAGES = 256
# The mkd run-level figures on a CPU: two uni-class jobs whose students train 1 epoch. The
# counted teacher passes and decodes do not depend on epochs or on how many jobs share the
# store; time does: the 10 jobs x 3 modes at 1 epoch took 6 min 15 s of a 9 min 19 s bench on
# 2 idle cores (off / cold / warm 176 / 108 / 90 s). CUDA and --full run all 10 at the preset.
MKD_CPU_CLASSES = (0, 1)
MKD_CPU_OVERRIDES = {"epochs": 1}


def _random_weights(backbone: str, path: Path) -> Path:
    torch.manual_seed(0)
    save_file(create_backbone(backbone, weights="none", num_classes=0).state_dict(), path)
    return path


@dataclass
class RunLevel:
    """One method's jobs run with the caches off, cold and warm: wall seconds and summed
    counters per mode, and the distinct images of the jobs."""

    method: str
    jobs: int
    distinct: int
    seconds: dict[str, float]
    costs: dict[str, dict[str, int]]

    def speedup(self, mode: str) -> float:
        return self.seconds["off"] / self.seconds[mode]

    def per_distinct(self, mode: str, name: str) -> float:
        return self.costs[mode][name] / self.distinct


def run_level(method: str, work: Path, device: str, report: Callable[[str], None] = print,
              classes: list[int] | None = None, overrides: dict | None = None, workers: int | None = None,
              splits_root: Path | None = None) -> RunLevel:
    """Run `method`'s embedded uni-class jobs (`classes`: default all) with the caches off, cold
    and warm, in this process, from random weights saved to a file (cacheable; only the shapes
    matter for speed). Splits are built under `work` unless `splits_root` holds them; the store
    is `work`/store."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    splits = Path(splits_root) if splits_root is not None else work / "splits"
    overrides = dict(overrides or {})
    probe = RunOptions(out=work / "off", splits_root=splits, device=device)
    job = Job(method, "embedded", "uni-class", "0", 0, tuple(overrides.items()))
    backbone = build_detector(job, probe).config.backbone
    weights = _random_weights(backbone, work / "weights.safetensors")
    seconds, costs, distinct, jobs = {}, {}, 0, []
    for mode in MODES:
        caching = CacheSettings(enabled=mode != "off", workers=workers, root=work / "store")
        options = RunOptions(out=work / mode, splits_root=splits, device=device, weights=str(weights),
                             progress=False, caching=caching)
        jobs = expand_jobs([method], settings=["uni-class"], classes=classes, seeds=[0], options=options,
                           overrides=overrides)
        if mode == "off":
            prepare(jobs, options)
            distinct = _distinct_images(jobs, options)
        report(f"{method}, {len(jobs)} uni-class jobs, caches {mode}")
        start = time.perf_counter()
        try:
            results = run_local(jobs, options)
        except Interrupted as exc:
            raise exc.discard() from None
        seconds[mode] = time.perf_counter() - start
        failed = [r.error for r in results if r.status != "done"]
        if failed:
            raise RuntimeError(f"a {method} job failed during the bench: {failed[0]}")
        records = load_records(options.out)
        costs[mode] = {name: sum(r.extra["cost"][name] for r in records) for name in ("decodes", "frozen_passes")}
    return RunLevel(method, len(jobs), distinct, seconds, costs)


def knn_run_level(work: Path, device: str, report: Callable[[str], None] = print, classes: list[int] | None = None,
                  overrides: dict | None = None, workers: int | None = None,
                  splits_root: Path | None = None) -> list[BenchRow]:
    """Wall time and counts of the embedded uni-class knn jobs with the caches off, cold and warm
    (`classes`: default all; splits built under `work` unless `splits_root` holds them)."""
    got = run_level("knn", work, device, report, classes, overrides, workers, splits_root)
    n, distinct = got.jobs, got.distinct
    cold, warm = got.speedup("cold"), got.speedup("warm")
    decodes, frozen = got.per_distinct("cold", "decodes"), got.per_distinct("cold", "frozen_passes")
    warm_work = got.costs["warm"]["decodes"] + got.costs["warm"]["frozen_passes"]
    return [
        *(BenchRow(f"knn x {n} jobs, caches {mode}", got.seconds[mode], "s") for mode in MODES),
        BenchRow("knn run speed-up with caches, cold", cold, "x", f">= {MIN_SPEEDUP_COLD}", cold >= MIN_SPEEDUP_COLD),
        BenchRow("knn run speed-up with caches, warm", warm, "x", f">= {MIN_SPEEDUP_WARM}", warm >= MIN_SPEEDUP_WARM),
        BenchRow("distinct images in the run", distinct, "images"),
        BenchRow("decodes per distinct image, caches off", got.per_distinct("off", "decodes"), "decodes"),
        BenchRow("decodes per distinct image, caches cold", decodes, "decodes", f"<= {MAX_PER_DISTINCT}",
                 decodes <= MAX_PER_DISTINCT),
        BenchRow("knn frozen passes per distinct image, caches cold", frozen, "passes", f"<= {MAX_PER_DISTINCT}",
                 frozen <= MAX_PER_DISTINCT),
        BenchRow("decodes + frozen passes, caches warm", warm_work, "count", "0", warm_work == 0),
    ]


def mkd_run_level(work: Path, device: str, report: Callable[[str], None] = print, classes: list[int] | None = None,
                  overrides: dict | None = None, workers: int | None = None,
                  splits_root: Path | None = None, full: bool = False) -> list[BenchRow]:
    """Wall time and counts of the embedded uni-class mkd jobs with the caches off, cold and
    warm: `classes` (default all) at `overrides`, or on a CPU unless `full` `MKD_CPU_CLASSES` at
    `MKD_CPU_OVERRIDES`. The untuned teacher's passes are what the caches save; the student's
    training, paid by every job, bounds the speed-up, so it has no goal (the counts do)."""
    if not full and not device.startswith("cuda"):
        classes = list(MKD_CPU_CLASSES) if classes is None else classes
        overrides = dict(MKD_CPU_OVERRIDES) if overrides is None else overrides
    got = run_level("mkd", work, device, report, classes, overrides, workers, splits_root)
    n = got.jobs
    if overrides and "epochs" in overrides:
        n = f"{got.jobs} ({overrides['epochs']}-epoch)"
    frozen = got.per_distinct("cold", "frozen_passes")
    warm_work = got.costs["warm"]["decodes"] + got.costs["warm"]["frozen_passes"]
    return [
        *(BenchRow(f"mkd x {n} jobs, caches {mode}", got.seconds[mode], "s") for mode in MODES),
        BenchRow("mkd run speed-up with caches, cold", got.speedup("cold"), "x"),
        BenchRow("mkd run speed-up with caches, warm", got.speedup("warm"), "x"),
        BenchRow("mkd teacher passes per distinct image, caches off", got.per_distinct("off", "frozen_passes"),
                 "passes"),
        BenchRow("mkd teacher passes per distinct image, caches cold", frozen, "passes", f"<= {MAX_PER_DISTINCT}",
                 frozen <= MAX_PER_DISTINCT),
        BenchRow("mkd decodes + teacher passes, caches warm", warm_work, "count", "0", warm_work == 0),
    ]


def _distinct_images(jobs: list[Job], options: RunOptions) -> int:
    ids: set[str] = set()
    for job in jobs:
        _, manifest = load_split(options.splits, job.split_id)
        ids.update(manifest.train)
        ids.update(image_id for image_id, _ in manifest.test)
    return len(ids)


# --- loader ---------------------------------------------------------------------------------
def jpeg_tree(folder: Path, n: int, size: tuple[int, int] = (500, 375),
              seed: int = 0) -> tuple[DatasetIndex, Manifest]:
    """`n` generated JPEGs of `size` (VOC's typical 500 x 375) under `folder`: their index and a
    split whose test part holds them all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.is_file():
            # Smooth colour fields with noise: JPEG sizes like photographs (~40-80 KB), not like noise.
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            base = PIL.Image.fromarray(coarse).resize(size, PIL.Image.BICUBIC)
            noisy = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
            PIL.Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        rows.append(IndexRow(f"{i:05d}", path.name, "test", (0,)))
    index = DatasetIndex("bench-jpeg", folder, rows, {0: "object"}, source_sha256="generated")
    manifest = Manifest("bench-jpeg", "uni-class", "0", [0], index.sha256, train=[],
                        test=[(row.image_id, 0) for row in rows])
    return index, manifest


def defend_views_speed(data: ManifestDataset, workers: int, n_images: int,
                       report: Callable[[str], None] = print) -> list[BenchRow]:
    """Images/s of cutting `defend`'s multi-crop views (the released 2 x 224 + 4 x 96 px) from
    the first `n_images` of `data`'s original files, with 0 and `workers` DataLoader workers (on
    a GPU its dense phase cuts them in `--workers` processes)."""
    views = Subset(MultiCropViews(data, MultiCropSpec(), (0.5,) * 3, (0.5,) * 3, seed=0), range(n_images))
    rows, speeds = [], {}
    for count in sorted({0, workers}):
        report(f"cutting defend's views of {n_images} JPEGs, {count} workers")
        speeds[count] = _images_per_second(views, count, 32)
        rows.append(BenchRow(f"defend multi-crop views, {count} workers", speeds[count], "images/s"))
    if workers > 0:
        rows.append(BenchRow(f"defend views, {workers} / 0 workers", speeds[workers] / speeds[0], "x"))
    return rows


def _images_per_second(data: Dataset, workers: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in DataLoader(data, batch_size=batch_size, num_workers=workers):
        pass
    return len(data) / (time.perf_counter() - start)


def loader_speed(work: Path, report: Callable[[str], None] = print, n_images: int = 1000, img_size: int = 224,
                 workers: int | None = None, batch_size: int = 32) -> list[BenchRow]:
    """Images/s of decoding + resizing VOC-sized JPEGs with 0, 1 and `workers` DataLoader workers,
    and of reading them back from the image store (in the main process)."""
    workers = default_workers() if workers is None else workers
    report(f"generating {n_images} JPEGs")
    index, manifest = jpeg_tree(Path(work) / "jpegs", n_images)
    transform = StagedTransform(ResizeDecode(img_size), Normalise(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    data = ManifestDataset(index, manifest, "test", transform=transform)
    rows, speeds = [], {}
    for count in sorted({0, 1, workers}):
        report(f"decoding {n_images} JPEGs to {img_size} px, {count} workers")
        speeds[count] = _images_per_second(data, count, batch_size)
        rows.append(BenchRow(f"decode + resize, {count} workers", speeds[count], "images/s"))
    rows += defend_views_speed(data, workers, min(n_images, VIEWS_IMAGES), report)
    stored = ManifestDataset(index, manifest, "test", transform=transform,
                             store=ImageStore(ArrayStore(Path(work) / "store")))
    report("filling the image store")
    _images_per_second(stored, 0, batch_size)
    report("reading the image store")
    speed = _images_per_second(stored, 0, batch_size)
    ratio = speed / speeds[1]
    rows += [BenchRow("read from the image store, 0 workers", speed, "images/s"),
             BenchRow("image store / decoding with 1 worker", ratio, "x", f">= {MIN_STORE_OVER_DECODE}",
                      ratio >= MIN_STORE_OVER_DECODE)]
    return rows

