"""`ndbench bench`: speed figures measured in one run on the current device.

Speed goals are checked here, as ratios of throughputs taken back to back in one process on
one device, rather than by timed unit tests (flaky on shared machines). The models are
randomly initialised: only their shape matters for speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from methods import defend_model as dm
from methods.backbones import ViTFeatures, create_backbone
from methods.base import autocast
from methods.defend import DefendDetector
from methods.registry import get_class
from methods.transformaly import TransformalyDetector

# The paper's ablation backbone, ViT-S/16 at 224 px (paper sec. 4.3); random weights (speed only).
BENCH_ARCH = "vit_small_patch16_224"
# The paper's main backbone shape, for the DEFEND vs Transformaly comparison (paper Table 10).
PAPER_ARCH = "vit_base_patch16_224"


@dataclass(frozen=True)
class BenchConfig:
    """What `ndbench bench` measures on."""

    arch: str = BENCH_ARCH
    img_size: int = 224
    batch_size: int = 32  # the paper's MKD batch size
    steps: int = 5  # timed steps per measurement (after `warmup` untimed ones)
    warmup: int = 1
    mask_ratio: float = 0.5  # the paper's MKD mask ratio
    count_images: int = 8  # training images of the small fit that counts teacher passes


# What `ndbench bench` runs with when --batch-size / --steps are not given: the GPU-sized
# configuration (BenchConfig's defaults) on CUDA or with --full; on a CPU a smaller one meant to
# keep the whole bench within 5 minutes on 2 idle cores (4 min 7 s measured with an empty cache,
# 2.7 GB; 5 min 28 s on a slower machine of the same kind), so within 10 on one twice as slow.
# Measured on 2 idle cores: batch 32 / 5 steps took 23 min and 11 GB with every section; the ViT-B/16
# scoring comparison and the baselines' training figures alone took 7 min 42 s and 12.9 GB at
# batch 8 (msad's fit: 4.7 GB at batch 16), so on a CPU they run on request (--compare,
# --baselines) or with --full. The MKD step's speed-up from token dropping needs batch 16 to
# show (1.71x at 16, 1.62x at 8: a step's fixed costs weigh more in small batches); the MKD
# and defend rows at batch 16 take ~1 min.
CPU_BENCH = {"batch_size": 16, "steps": 3}
CPU_SKIPS = ("compare", "baselines")


def bench_config(device: torch.device, full: bool = False, **given) -> BenchConfig:
    """The bench configuration for `device`: `given` values (those not None) over the defaults
    of the device (`CPU_BENCH` on a CPU unless `full`)."""
    sized = {} if full or device.type == "cuda" else CPU_BENCH
    return BenchConfig(**{**sized, **{k: v for k, v in given.items() if v is not None}})


def section_enabled(name: str, given: bool | None, device: torch.device, full: bool) -> bool:
    """Whether the bench runs section `name`: as `given`, else on unless it is one of
    `CPU_SKIPS` on a CPU without `full`."""
    if given is not None:
        return given
    return full or device.type == "cuda" or name not in CPU_SKIPS


@dataclass(frozen=True)
class BenchRow:
    """One measured figure, with the goal it is checked against (if any)."""

    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None


class _RandomImages(Dataset):
    """Fixed random images (image, label, id) for scoring and the counting fit."""

    def __init__(self, n: int, img_size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, img_size, img_size, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        return self.images[item], 0, item


def _vit(config: BenchConfig, device: torch.device, **kwargs) -> ViTFeatures:
    model = create_backbone(config.arch, weights="none", num_classes=0, img_size=config.img_size, **kwargs)
    return ViTFeatures(model).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step: Callable[[], None], images_per_step: int, config: BenchConfig,
                      device: torch.device) -> float:
    """Throughput of `step` (which processes `images_per_step` images) after warm-up."""
    for _ in range(config.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(config.steps):
        step()
    _sync(device)
    return images_per_step * config.steps / (time.perf_counter() - start)


def mkd_step_throughput(config: BenchConfig, device: torch.device, mask_ratio: float) -> float:
    """Images/s of one MKD student training step (forward on the kept tokens, loss against
    teacher targets, backward, AdamW) at `mask_ratio` (0 = every token)."""
    generator = torch.Generator().manual_seed(0)
    student = _vit(config, device, drop_path_rate=0.1).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.05)
    n, dim, b = student.num_patches, student.embed_dim, config.batch_size
    x = torch.randn(b, 3, config.img_size, config.img_size, generator=generator).to(device)
    targets = torch.nn.functional.normalize(torch.randn(1, b, n, dim, generator=generator), dim=-1).to(device)
    attention = torch.softmax(torch.randn(b, n, generator=generator), dim=-1)
    guidance = "none" if mask_ratio == 0 else "teacher"
    keep = dm.num_kept(n, mask_ratio)

    def step() -> None:
        keep_idx = dm.keep_indices(attention, n, keep, guidance, generator)
        with autocast(device):
            feats = dm.student_features(student, x, keep_idx, "last")
        loss = dm.patch_errors(dm.gather_patches(targets, keep_idx.to(device)), feats, True).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return images_per_second(step, b, config, device)


def _untrained_defend(config: BenchConfig, device: torch.device) -> DefendDetector:
    detector = DefendDetector(backbone=config.arch, weights="none", img_size=config.img_size,
                              batch_size=config.batch_size, num_prototypes=5)
    detector.teacher = detector._new_teacher("none").to(device).eval()
    detector.student = detector._new_student().to(device).eval()
    detector.fitted = True
    return detector


def defend_scoring_throughput(config: BenchConfig, device: torch.device) -> float:
    """Images/s of `defend` scoring (teacher + student pass, no masking), data in memory."""
    detector = _untrained_defend(config, device)
    images = _RandomImages(config.batch_size, config.img_size)
    return images_per_second(lambda: detector.score(images, device=device), len(images), config, device)


def teacher_passes_per_image(config: BenchConfig, device: torch.device) -> float:
    """Teacher forward passes per training image during MKD, read from a small `defend` fit
    (1 dense epoch, 2 MKD epochs): 1 when the targets are computed once per job."""
    detector = DefendDetector(backbone=config.arch, weights="none", img_size=config.img_size,
                              batch_size=4, dense_batch_size=4, num_prototypes=5, dense_epochs=1, epochs=2)
    detector.fit(_RandomImages(config.count_images, config.img_size), device=device)
    return float(detector.record_extra()["teacher_passes_per_image"])


def _fitted(detector, config: BenchConfig, device: torch.device, img_size: int):
    """`detector` fitted on a few random images (one epoch): enough state to time scoring."""
    detector.fit(_RandomImages(max(config.count_images, 8), img_size), device=device)
    return detector


def scoring_throughput(detector, config: BenchConfig, device: torch.device, img_size: int) -> float:
    """Images/s of `detector.score` on `batch_size` random images held in memory."""
    images = _RandomImages(config.batch_size, img_size, seed=1)
    return images_per_second(lambda: detector.score(images, device=device), len(images), config, device)


# What the DEFEND vs Transformaly comparison builds: defend with the paper's backbone shape,
# and Transformaly in its two presets. Random weights: only the shapes matter for speed.
PAPER_DEFEND = {"backbone": PAPER_ARCH, "img_size": 224}
TRANSFORMALY_CASES: tuple[tuple[str, str | None, dict], ...] = (
    ("fair 224 px", None, {"backbone": PAPER_ARCH}),  # the paper's fair setting (ViT-B/16, 224)
    ("original 384 px", "original", {}),  # Transformaly's own ViT-B/16 at 384
)


def paper_comparison(config: BenchConfig, device: torch.device, report: Callable[[str], None] = print,
                     defend_options: dict | None = None,
                     cases: tuple[tuple[str, str | None, dict], ...] = TRANSFORMALY_CASES) -> list[BenchRow]:
    """Inference images/s of `defend` and of `transformaly` in each of `cases` (label, preset,
    overrides), measured back to back (paper Table 10: DEFEND+MKD 164 vs Transformaly 100
    images/s on CIFAR-10, 1.64x)."""
    small = {"weights": "none", "batch_size": config.batch_size, "epochs": 1}
    options = {**PAPER_DEFEND, **(defend_options or {})}
    defend = DefendDetector(**small, **options, num_prototypes=5, dense_epochs=1, dense_batch_size=4)
    report(f"defend scoring at {defend.config.img_size} px")
    size = defend.config.img_size
    base = scoring_throughput(_fitted(defend, config, device, size), config, device, size)
    rows = [BenchRow(f"defend scoring, {size} px", base, "images/s")]
    for label, preset, overrides in cases:
        report(f"transformaly scoring, {label}")
        detector = TransformalyDetector.with_preset(preset, **small, **overrides)
        size = detector.config.img_size
        speed = scoring_throughput(_fitted(detector, config, device, size), config, device, size)
        rows.append(BenchRow(f"transformaly scoring, {label}", speed, "images/s"))
        rows.append(BenchRow(f"defend / transformaly ({label})", base / speed, "x", "paper: 1.64"))
    return rows


# The baselines whose training speed the bench reports, each at its paper shapes
# (backbone, input size) with random weights, at the bench's batch size so rows compare.
# EPOCH_FIELDS and BATCH_FIELDS name the config fields that count epochs and set batch sizes
# where they are not `epochs` and `batch_size` (dsvdd trains in two phases).
BASELINES: tuple[tuple[str, dict], ...] = (
    ("transformaly", {}),
    ("kdad", {}),
    ("msad", {}),
    ("rdad", {}),
    ("dsvdd", {}),
)
EPOCH_FIELDS = {"dsvdd": ("ae_epochs", "epochs")}
BATCH_FIELDS = {"dsvdd": ("ae_batch_size", "batch_size")}


def training_throughput(method: str, overrides: dict, config: BenchConfig, device: torch.device,
                        extra_epochs: int = 2, clock: Callable[[], float] = time.perf_counter) -> tuple[float, int]:
    """Training images/s of `method` and its input size: `fit` on one batch of random images
    with 1 and with 1 + `extra_epochs` epochs, so fixed costs (feature caches, PCA, centres)
    cancel and only the epochs are timed. NaN when the extra epochs took no measurable time."""
    cls = get_class(method)
    timings = []
    for epochs in (1, 1 + extra_epochs):
        values = {"weights": "none", **dict.fromkeys(BATCH_FIELDS.get(method, ("batch_size",)), config.batch_size),
                  **dict.fromkeys(EPOCH_FIELDS.get(method, ("epochs",)), epochs), **overrides}
        if "weights" not in cls.Config.__dataclass_fields__:  # a from-scratch model (dsvdd)
            del values["weights"]
        detector = cls(**values)
        size = detector.config.img_size
        images = _RandomImages(config.batch_size, size, seed=2)
        torch.manual_seed(0)
        _sync(device)
        start = clock()
        detector.fit(images, device=device)
        _sync(device)
        timings.append(clock() - start)
    extra_seconds = timings[1] - timings[0]
    per_second = config.batch_size * extra_epochs / extra_seconds if extra_seconds > 0 else float("nan")
    return per_second, size


def baseline_training(config: BenchConfig, device: torch.device, report: Callable[[str], None] = print,
                      baselines: tuple[tuple[str, dict], ...] = BASELINES) -> list[BenchRow]:
    """Training images/s of each baseline, measured back to back on one device."""
    rows = []
    for method, overrides in baselines:
        report(f"{method} training")
        speed, size = training_throughput(method, overrides, config, device)
        rows.append(BenchRow(f"{method} training, {size} px", speed, "images/s"))
    return rows


def run_bench(config: BenchConfig, device: torch.device, report: Callable[[str], None] = print) -> list[BenchRow]:
    """Every measurement, in one process on one device; `report` hears what runs next."""
    torch.manual_seed(0)
    report(f"MKD step, {config.mask_ratio:.0%} of tokens dropped")
    masked = mkd_step_throughput(config, device, config.mask_ratio)
    report("MKD step, no tokens dropped")
    full = mkd_step_throughput(config, device, 0.0)
    report("defend scoring")
    scoring = defend_scoring_throughput(config, device)
    report("teacher passes per training image (a small defend fit)")
    passes = teacher_passes_per_image(config, device)
    ratio = masked / full
    return [
        BenchRow(f"MKD train step, {config.mask_ratio:.0%} tokens dropped", masked, "images/s"),
        BenchRow("MKD train step, no tokens dropped", full, "images/s"),
        BenchRow("MKD speed-up from token dropping", ratio, "x", ">= 1.7", ratio >= 1.7),
        BenchRow("defend scoring", scoring, "images/s"),
        BenchRow("teacher passes per training image in MKD", passes, "passes", "1 per job", abs(passes - 1) < 1e-9),
    ]
