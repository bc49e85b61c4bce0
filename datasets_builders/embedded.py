"""The offline multi-object dataset: scenes of real handwritten digits, written in COCO format.

Digits come from scikit-learn's bundled `load_digits` (1,797 real 8x8 digits, classes 0-9),
so nothing is downloaded. The digit *instances* are split, stratified by class, into three
disjoint pools: one for train scenes, one for test scenes, one for the object-centric
pre-training set, so no instance is seen in two roles.

The pre-training pool is broader than the scenes, as ImageNet-21k is broader than VOC: its
handwritten digits are deformed (affine, elastic, stroke width), and letters and digits
rendered from matplotlib's fonts join them, all in the digits' own 8x8 form (see
`datasets_builders.glyphs`), at object-centric and at scene sizes.

A scene is an RGB image (64x64 by default) on a textured, tinted background with one
dominant digit and, in 40 % of scenes, a few smaller digits of other classes (60/28/9/3 % of
scenes hold 1/2/3/4 classes, roughly the shape of Pascal VOC), sometimes with a second
instance of a class already present. Scenes are written as `annotations/instances_train.json`,
`annotations/instances_val.json` (category id = digit value, name `digit-<d>`) plus PNG files
under `train/` and `val/`, and read back by the ordinary COCO builder. `SHA256SUMS`, written
last, holds each file's sha256: a folder that is reused is checked against it.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .atomic import atomic_write_bytes, atomic_write_text
from .errors import NdbenchError, WriteFailure
from .glyphs import DIGITS, FONT_FILES, LETTERS, GlyphAugment, augment_bitmap, block_counts, digit_bitmap, font_bitmap

# Bump when the generator's output changes for an unchanged config (it keys the cache).
# 2: the broader pre-training pool (scenes unchanged, byte for byte).
GENERATOR_VERSION = "2"
N_CLASSES = 10
POOLS = ("train", "test", "pretrain")
# Independent random streams, so that e.g. the number of pre-training images does not
# change the scenes.
_STREAM_POOLS, _STREAM_TRAIN, _STREAM_TEST, _STREAM_PRETRAIN, _STREAM_INSTANCES = range(5)
PRETRAIN_SOURCES = ("handwritten digits", "font digits", "font letters")
_REQUIRED_FILES = ("annotations/instances_train.json", "annotations/instances_val.json", "pools.json")


@dataclass(frozen=True)
class EmbeddedConfig:
    """Everything that fixes the generated data; its hash names the cache folder."""

    seed: int = 0
    image_size: int = 64
    n_train_scenes: int = 3000
    n_test_scenes: int = 1000
    n_pretrain_images: int = 30000
    # Share of each class's digit instances given to train scenes, test scenes, pre-training.
    pool_fractions: tuple[float, float, float] = (0.4, 0.2, 0.4)
    # Share of scenes holding exactly 1, 2, 3, 4 classes.
    classes_per_image: tuple[float, ...] = (0.60, 0.28, 0.09, 0.03)
    # Share of scenes that get one extra (small) instance of a class they already hold.
    repeat_fraction: float = 0.10
    # Glyph heights as fractions of the image size: 30-44 px and 14-24 px at 64x64.
    dominant_height: tuple[float, float] = (30 / 64, 44 / 64)
    small_height: tuple[float, float] = (14 / 64, 24 / 64)
    # Most any two objects' boxes may overlap: intersection / area of the smaller box.
    max_overlap: float = 0.2
    # Pre-training images: one glyph each. Object-centric ones hold a large glyph (42-54 px
    # at 64x64), centre jittered by up to `pretrain_jitter` of the image size; a share
    # `pretrain_scene_sized` is drawn at the scenes' sizes (14-44 px) anywhere in the image.
    pretrain_height: tuple[float, float] = (42 / 64, 54 / 64)
    pretrain_jitter: float = 0.06
    pretrain_scene_sized: float = 0.4
    # Shares of the pool's images by source (PRETRAIN_SOURCES): handwritten digits of the
    # pre-training instances, digits and letters from matplotlib's fonts.
    pretrain_sources: tuple[float, float, float] = (0.5, 0.2, 0.3)
    # Font digits share the handwritten digits' classes (True) or get ten classes of their own.
    pretrain_font_digits_merged: bool = True
    # Share of glyphs deformed by `pretrain_augment` (the others are drawn as the scenes draw).
    pretrain_augmented: float = 0.8
    pretrain_augment: GlyphAugment = GlyphAugment()

    def __post_init__(self) -> None:
        problems = []
        if self.image_size < 32:
            problems.append("image_size must be at least 32")
        if min(self.n_train_scenes, self.n_test_scenes, self.n_pretrain_images) < N_CLASSES:
            problems.append(f"scene and image counts must be at least {N_CLASSES}")
        if len(self.pool_fractions) != 3 or min(self.pool_fractions) <= 0:
            problems.append("pool_fractions needs three positive shares")
        elif abs(sum(self.pool_fractions) - 1) > 1e-6:
            problems.append("pool_fractions must sum to 1")
        probs = self.classes_per_image
        if not 1 <= len(probs) <= N_CLASSES or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            problems.append(f"classes_per_image needs 1..{N_CLASSES} shares summing to 1")
        if not 0 <= self.repeat_fraction <= 1:
            problems.append("repeat_fraction must lie in [0, 1]")
        sources = self.pretrain_sources
        if len(sources) != len(PRETRAIN_SOURCES) or min(sources) < 0 or abs(sum(sources) - 1) > 1e-6:
            problems.append(f"pretrain_sources needs {len(PRETRAIN_SOURCES)} shares summing to 1")
        if not (0 <= self.pretrain_scene_sized <= 1 and 0 <= self.pretrain_augmented <= 1):
            problems.append("pretrain_scene_sized and pretrain_augmented must lie in [0, 1]")
        if problems:
            raise NdbenchError(f"bad embedded dataset config: {'; '.join(problems)}",
                               "fix the EmbeddedConfig values")


@dataclass(frozen=True)
class _Glyph:
    """One rendered digit: alpha (frame) and its tight box inside the frame."""

    alpha: np.ndarray  # (h, w) float32 in [0, 1]
    top: int
    left: int
    height: int
    width: int


# --- cache -----------------------------------------------------------------------------------
def cache_root() -> Path:
    """ndbench's cache folder: `$NDBENCH_CACHE`, else `~/.cache/ndbench`."""
    base = os.environ.get("NDBENCH_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "ndbench"


def cache_dir(config: EmbeddedConfig) -> Path:
    """`cache_root()` / `embedded-<hash of config + generator>`."""
    base_path = cache_root()
    key = json.dumps({"config": asdict(config), "generator": GENERATOR_VERSION}, sort_keys=True)
    return base_path / f"embedded-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def ensure_embedded(config: EmbeddedConfig | None = None, console=None) -> Path:
    """The COCO-format scene root for `config`, generated first if its cache folder is absent.

    A folder already there is used only when its files are byte for byte what the generator
    wrote (`CHECKSUMS`); else one NdbenchError names the file that differs. Prints a summary
    table (to `console`, a rich Console; stderr when None) when it generates.
    """
    config = config or EmbeddedConfig()
    root = cache_dir(config)
    if root.exists():
        _check_reused(config, root, console)
        _remove_abandoned(root)  # a generation killed while another finished left its folder
        return root
    with _fresh_generation(config, root) as tmp:
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process finished first; its copy is identical, keep it.
            if not root.exists():
                raise
            _check_reused(config, root, console)
            return root
    print_scene_summary(scene_statistics(root), console, where=root)
    return root


@contextmanager
def _fresh_generation(config: EmbeddedConfig, root: Path) -> Iterator[Path]:
    """A temporary folder beside `root` holding a whole generation of `config` (its checksum
    list written last); removed on leaving unless it was moved away meanwhile."""
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(root)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    except OSError as exc:
        raise NdbenchError(
            f"cannot create the embedded dataset cache under {root.parent}: {exc.strerror or exc}",
            "set NDBENCH_CACHE to a writable folder",
        ) from exc
    try:
        try:
            _write_scenes(config, tmp)
        except OSError as exc:  # PIL's own write errors name no file
            raise WriteFailure(
                f"cannot write the embedded dataset under {root.parent}: {exc.strerror or exc}",
                "free disk space there or set NDBENCH_CACHE to a folder with room (it takes ~35 MB), "
                "then run the same command again",
            ) from exc
        os.chmod(tmp, 0o755)
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# A generation's temporary folder untouched this long was left by a killed process (one
# takes seconds, writing files all along); a newer one may belong to a live run.
ABANDONED_AFTER_S = 15 * 60


def _remove_abandoned(root: Path) -> None:
    """Remove the temporary folders that killed generations of `root` left beside it."""
    for tmp in root.parent.glob(f".{root.name}.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _check_complete(root: Path) -> None:
    missing = [name for name in _REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise NdbenchError(f"embedded dataset cache {root} is incomplete (no {missing[0]})", _regenerate_fix(root))


def _regenerate_fix(root: Path) -> str:
    """The fix for a scene folder that is not what the generator wrote."""
    return f"delete {root} and run the same command again to regenerate it"


# --- checksums of the generated files ---------------------------------------------------------
# Written last into a generation, in `sha256sum`'s format (`sha256sum -c` reads it).
CHECKSUMS = "SHA256SUMS"
_CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  (\S+)")


def scene_files(config: EmbeddedConfig) -> list[str]:
    """The files a generation of `config` writes (its checksum list aside), relative to its
    folder, sorted."""
    n_train, n_test = config.n_train_scenes, config.n_test_scenes
    return sorted([*_REQUIRED_FILES, *(f"train/{i:06d}.png" for i in range(1, n_train + 1)),
                   *(f"val/{i:06d}.png" for i in range(n_train + 1, n_train + n_test + 1))])


def _file_sha256(path: Path) -> str | None:
    """sha256 of the file's bytes; None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _changed_files(root: Path, listed: dict[str, str]) -> list[str]:
    """The files of `root` whose sha256 is not the `listed` one (missing ones included)."""
    return [name for name, digest in listed.items() if _file_sha256(root / name) != digest]


def _checksum_text(root: Path, names: list[str]) -> str:
    """The text of `CHECKSUMS`: the sha256 of each of `names` in `root` as it is on disk."""
    return "".join(f"{hashlib.sha256((root / name).read_bytes()).hexdigest()}  {name}\n" for name in names)


def _read_checksums(root: Path, config: EmbeddedConfig | None) -> dict[str, str] | None:
    """The checksum list of `root` (file name -> sha256); None when there is none (a folder
    written before ndbench recorded one). One NdbenchError when it is damaged, or (given the
    `config` that generated it) when it does not name exactly the files the config writes."""
    path = root / CHECKSUMS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise NdbenchError(f"cannot read {path}: {exc}", _regenerate_fix(root)) from exc
    matches = [_CHECKSUM_LINE.fullmatch(line) for line in text.splitlines()]
    listed = {m[2]: m[1] for m in matches if m}
    # A list that names other files (or fewer) would leave some unchecked: it is damaged too.
    if None in matches or len(listed) != len(matches) or config and sorted(listed) != scene_files(config):
        raise NdbenchError(f"{path} is damaged: it does not list the generated files with their sha256",
                           _regenerate_fix(root))
    return listed


def _check_reused(config: EmbeddedConfig, root: Path, console=None) -> None:
    """Refuse, in one NdbenchError naming a file, a scene folder that is not byte for byte
    what the generator wrote: checked against its checksum list; a folder without one (made
    by an earlier ndbench) is checked once against a fresh generation, then given one."""
    _check_complete(root)
    listed = _read_checksums(root, config)
    if listed is not None:
        _refuse_changed(root, _changed_files(root, listed))
        return
    from rich.console import Console

    (console or Console(stderr=True)).print(
        f"embedded dataset cache {root} holds no {CHECKSUMS} (an earlier ndbench made it): checking its "
        "files against a fresh generation, once", soft_wrap=True, markup=False, highlight=False)
    names = scene_files(config)
    with _fresh_generation(config, root) as fresh:
        _refuse_changed(root, [name for name in names if not _same_content(root / name, fresh / name)])
    # A read-only cache stays without a list: it was checked now and is checked again next time.
    with contextlib.suppress(WriteFailure):
        atomic_write_text(root / CHECKSUMS, _checksum_text(root, names))


def check_generated_scenes(root: Path) -> None:
    """Refuse, in one NdbenchError naming a file, a scene folder that ndbench generated into its
    cache and whose files no longer match its checksum list (`ensure_embedded` checks a folder
    when it hands it out; this checks one an index was built from earlier). A folder outside
    the cache (a user's copy, given with --root) and one from before the list are not checked."""
    if root.parent.resolve() != cache_root().resolve() or not root.name.startswith("embedded-"):
        return
    listed = _read_checksums(root, None) if root.is_dir() else None
    if listed is not None:
        _refuse_changed(root, _changed_files(root, listed))


def _same_content(path: Path, reference: Path) -> bool:
    """Whether `path` holds what `reference` holds: the same bytes, or for PNGs the same pixels
    (another zlib may have encoded them otherwise)."""
    try:
        if path.read_bytes() == reference.read_bytes():
            return True
        if path.suffix != ".png":
            return False
        with Image.open(path) as image, Image.open(reference) as expected:
            return (image.mode, image.size) == (expected.mode, expected.size) and image.tobytes() == expected.tobytes()
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _refuse_changed(root: Path, changed: list[str]) -> None:
    """One NdbenchError naming the first of the `changed` files of `root`, if any."""
    if not changed:
        return
    first = changed[0]
    state = "is missing" if not (root / first).is_file() else "differs from what ndbench generated"
    more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
    raise NdbenchError(
        f"embedded dataset cache {root} was changed: {first} {state}{more}",
        f"{_regenerate_fix(root)}; for scenes changed on purpose, build splits from a copy of the folder "
        "with `ndbench build-splits embedded --root COPY`",
    )


@dataclass(frozen=True)
class PretrainSet:
    """The object-centric pre-training pool: one glyph per image."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64, indices into class_names
    boxes: np.ndarray  # (N, 4) int64: the glyph's tight box, x, y, w, h
    digit_index: np.ndarray  # (N,) int64: the `load_digits` instance, -1 for font glyphs
    class_names: tuple[str, ...]


def load_pretrain_set(config: EmbeddedConfig | None = None, console=None) -> PretrainSet:
    """The pre-training pool of `config`, cached as `pretrain.npz` in the dataset's cache folder."""
    config = config or EmbeddedConfig()
    root = ensure_embedded(config, console=console)
    path = root / "pretrain.npz"
    if not path.is_file():
        pool = render_pretrain_set(config, console=console)
        buffer = io.BytesIO()
        np.savez(buffer, images=pool.images, labels=pool.labels, boxes=pool.boxes,
                 digit_index=pool.digit_index, class_names=np.array(pool.class_names))
        atomic_write_bytes(path, buffer.getvalue())
        return pool
    try:
        with np.load(path) as data:
            return PretrainSet(data["images"], data["labels"], data["boxes"], data["digit_index"],
                               tuple(str(name) for name in data["class_names"]))
    # A truncated or bit-flipped npz fails in zipfile (no archive, a bad CRC) or at its end (EOFError).
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise NdbenchError(f"cannot read {path}: {exc}", f"delete {path} to regenerate it") from exc


# --- digit pools and scene plans ------------------------------------------------------------
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def digit_pools(config: EmbeddedConfig, targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Disjoint pools of `load_digits` instance indices ("train", "test", "pretrain"),
    stratified by class."""
    if targets is None:
        targets = _load_digits()[1]
    rng = np.random.default_rng([config.seed, _STREAM_POOLS])
    pools: dict[str, list[np.ndarray]] = {name: [] for name in POOLS}
    for c in range(N_CLASSES):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_train = round(config.pool_fractions[0] * len(members))
        n_test = round(config.pool_fractions[1] * len(members))
        parts = np.split(members, [n_train, n_train + n_test])
        for name, part in zip(POOLS, parts, strict=True):
            if len(part) == 0:
                raise NdbenchError(
                    f"pool {name!r} gets no digit of class {c}", "raise its pool_fractions share"
                )
            pools[name].append(part)
    return {name: np.sort(np.concatenate(parts)) for name, parts in pools.items()}


def _quota(shares: tuple[float, ...], n: int) -> np.ndarray:
    """Integer counts summing to `n`, proportional to `shares` (largest remainder)."""
    raw = np.asarray(shares, dtype=np.float64) * n
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def plan_scene_classes(config: EmbeddedConfig, n_scenes: int, rng: np.random.Generator) -> list[list[int]]:
    """Class of each object per scene: the dominant digit first, then smaller ones.

    Every class is dominant in n_scenes/10 scenes (so each uni-class train set holds at least
    that many images); the number of classes per scene follows `classes_per_image` exactly;
    `repeat_fraction` of the scenes end with an extra instance of one of their classes.
    """
    n_classes = np.repeat(
        np.arange(1, len(config.classes_per_image) + 1), _quota(config.classes_per_image, n_scenes)
    )
    rng.shuffle(n_classes)
    dominant = rng.permutation(np.resize(np.arange(N_CLASSES), n_scenes))
    plans = []
    for first, k in zip(dominant.tolist(), n_classes.tolist(), strict=True):
        others = [c for c in range(N_CLASSES) if c != first]
        plans.append([first, *rng.choice(others, size=k - 1, replace=False).tolist()])
    n_repeat = round(config.repeat_fraction * n_scenes)
    for i in sorted(rng.choice(n_scenes, size=n_repeat, replace=False).tolist()):
        plans[i].append(int(rng.choice(plans[i])))
    return plans


# --- rendering ---------------------------------------------------------------------------------
def _upsample(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bicubic resize of a 2-D float array."""
    image = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _random_colour(rng: np.random.Generator, value: tuple[float, float]) -> np.ndarray:
    hue, sat = rng.random(), rng.uniform(0.25, 0.9)
    return np.array(colorsys.hsv_to_rgb(hue, sat, rng.uniform(*value)), dtype=np.float32)


def _background(rng: np.random.Generator, size: int, dark: bool) -> np.ndarray:
    """Tinted smooth noise: a base colour, two octaves of luminance texture, colour drift."""
    base = _random_colour(rng, (0.12, 0.38) if dark else (0.62, 0.88))
    texture = 0.22 * (_upsample(rng.random((4, 4)), size, size) - 0.5)
    texture += 0.12 * (_upsample(rng.random((12, 12)), size, size) - 0.5)
    drift = np.stack([_upsample(rng.random((3, 3)), size, size) for _ in range(3)], axis=-1)
    image = base + texture[..., None] + 0.12 * (drift - 0.5)
    image += 0.012 * rng.standard_normal(image.shape, dtype=np.float32)
    return image


def _glyph(digit: np.ndarray, height: int, rng: np.random.Generator) -> _Glyph:
    """Upsample an 8x8 digit to `height` px (width jittered) and sharpen it into an alpha mask."""
    width = max(4, round(height * rng.uniform(0.85, 1.1)))
    alpha = np.clip((_upsample(digit, width, height) - 0.25) / 0.5, 0.0, 1.0)
    rows = np.flatnonzero((alpha > 0.5).any(axis=1))
    cols = np.flatnonzero((alpha > 0.5).any(axis=0))
    return _Glyph(alpha, int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1),
                  int(cols[-1] - cols[0] + 1))


def _place(
    rng: np.random.Generator, glyph: _Glyph, boxes: list[tuple[int, int, int, int]], size: int,
    max_overlap: float, n_candidates: int = 64,
) -> tuple[int, int] | None:
    """Top-left (x, y) for the glyph's tight box, inside the image and overlapping every box in
    `boxes` (x, y, w, h) by at most `max_overlap` of the smaller area; None if no try fits."""
    w, h = glyph.width, glyph.height
    xs = rng.integers(0, size - w + 1, size=n_candidates)
    ys = rng.integers(0, size - h + 1, size=n_candidates)
    ok = np.ones(n_candidates, dtype=bool)
    for bx, by, bw, bh in boxes:
        ix = np.clip(np.minimum(xs + w, bx + bw) - np.maximum(xs, bx), 0, None)
        iy = np.clip(np.minimum(ys + h, by + bh) - np.maximum(ys, by), 0, None)
        ok &= ix * iy <= max_overlap * min(w * h, bw * bh)
    hits = np.flatnonzero(ok)
    return (int(xs[hits[0]]), int(ys[hits[0]])) if len(hits) else None


def _paste(image: np.ndarray, glyph: _Glyph, x: int, y: int, colour: np.ndarray) -> int:
    """Composite the glyph (tight box at x, y) over the image; returns its stroke pixel count."""
    size = image.shape[0]
    fy, fx = y - glyph.top, x - glyph.left  # the frame may stick out of the image
    gh, gw = glyph.alpha.shape
    y0, y1, x0, x1 = max(fy, 0), min(fy + gh, size), max(fx, 0), min(fx + gw, size)
    alpha = glyph.alpha[y0 - fy : y1 - fy, x0 - fx : x1 - fx, None]
    region = image[y0:y1, x0:x1]
    region *= 1.0 - alpha
    region += alpha * colour
    return int((alpha > 0.5).sum())


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _heights(rng: np.random.Generator, span: tuple[float, float], size: int) -> int:
    return int(round(rng.uniform(*span) * size))


def render_scene(
    config: EmbeddedConfig, plan: list[int], digits: np.ndarray, by_class: list[np.ndarray],
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[dict]]:
    """One scene: uint8 (H, W, 3) image and its objects (class, digit index, bbox, area).

    `by_class[c]` holds the indices of the digits of class c that the scene may use.
    """
    size = config.image_size
    chosen = [int(rng.choice(by_class[c])) for c in plan]
    dark = bool(rng.random() < 0.5)
    image = _background(rng, size, dark)
    for _ in range(200):
        glyphs, boxes = [], []
        for k, index in enumerate(chosen):
            span = config.dominant_height if k == 0 else config.small_height
            glyph = _glyph(digits[index], _heights(rng, span, size), rng)
            spot = _place(rng, glyph, boxes, size, config.max_overlap)
            if spot is None:
                break
            glyphs.append(glyph)
            boxes.append((spot[0], spot[1], glyph.width, glyph.height))
        if len(glyphs) == len(chosen):
            break
    else:  # pragma: no cover - the default sizes always fit within a few tries
        raise RuntimeError(f"could not place {len(chosen)} digits in a {size}px scene")
    objects = []
    for c, index, glyph, box in zip(plan, chosen, glyphs, boxes, strict=True):
        colour = _random_colour(rng, (0.75, 1.0) if dark else (0.02, 0.3))
        area = _paste(image, glyph, box[0], box[1], colour)
        objects.append({"category_id": c, "digit_index": index, "bbox": list(box), "area": area})
    return _to_uint8(image), objects


def pretrain_class_names(config: EmbeddedConfig) -> tuple[str, ...]:
    """The pre-training pool's classes, in label order: the ten digits first (so a classifier's
    first ten outputs are the scenes' categories), then font digits when they are not merged,
    then letters (case-sensitive)."""
    names = [f"digit-{d}" for d in DIGITS]
    _, font_digits, letters = config.pretrain_sources
    if font_digits > 0 and not config.pretrain_font_digits_merged:
        names += [f"font-digit-{d}" for d in DIGITS]
    if letters > 0:
        names += [f"letter-{c}" for c in LETTERS]
    return tuple(names)


def _object_image(
    config: EmbeddedConfig, grid: np.ndarray, rng: np.random.Generator, scene_sized: bool
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One glyph (an 8x8 grid) drawn as the scenes draw digits, on a scene background: large
    and centred, or at a scene size anywhere. Returns the uint8 image and the glyph's box."""
    size = config.image_size
    dark = bool(rng.random() < 0.5)
    image = _background(rng, size, dark)
    if scene_sized:
        span = (config.small_height[0], config.dominant_height[1])
        glyph = _glyph(grid, _heights(rng, span, size), rng)
        x, y = int(rng.integers(0, size - glyph.width + 1)), int(rng.integers(0, size - glyph.height + 1))
    else:
        glyph = _glyph(grid, _heights(rng, config.pretrain_height, size), rng)
        jitter = config.pretrain_jitter * size
        cx, cy = size / 2 + rng.uniform(-jitter, jitter, size=2)
        x = int(np.clip(round(cx - glyph.width / 2), 0, size - glyph.width))
        y = int(np.clip(round(cy - glyph.height / 2), 0, size - glyph.height))
    _paste(image, glyph, x, y, _random_colour(rng, (0.75, 1.0) if dark else (0.02, 0.3)))
    return _to_uint8(image), (x, y, glyph.width, glyph.height)


def _visible_grid(bitmap: np.ndarray) -> np.ndarray:
    """The 8x8 block counts of a bitmap, thickened until some block is mostly ink (a
    hairline glyph would otherwise vanish when the scene renderer sharpens it)."""
    grid = block_counts(bitmap)
    while grid.max() < 0.75:
        bitmap = ndimage.binary_dilation(bitmap)
        grid = block_counts(bitmap)
    return grid


def render_pretrain_set(config: EmbeddedConfig, console=None) -> PretrainSet:
    """Render the pre-training pool: `n_pretrain_images` glyphs, sources in the shares of
    `pretrain_sources`, classes balanced within each source; handwritten digits come only
    from the pre-training instances."""
    from rich.console import Console
    from rich.progress import Progress

    digits, targets = _load_digits()
    pool = digit_pools(config, targets)["pretrain"]
    by_class = [pool[targets[pool] == c] for c in range(N_CLASSES)]
    names = pretrain_class_names(config)
    rng = np.random.default_rng([config.seed, _STREAM_PRETRAIN])
    n, size = config.n_pretrain_images, config.image_size
    sources = rng.permutation(np.repeat(np.arange(len(PRETRAIN_SOURCES)), _quota(config.pretrain_sources, n)))
    font_digit_offset = 0 if config.pretrain_font_digits_merged else N_CLASSES
    chars = {0: DIGITS, 1: DIGITS, 2: LETTERS}
    draws = {k: rng.permutation(np.resize(np.arange(len(chars[k])), int((sources == k).sum()))) for k in chars}
    seen = dict.fromkeys(chars, 0)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    boxes = np.empty((n, 4), dtype=np.int64)
    digit_index = np.full(n, -1, dtype=np.int64)
    console = console or Console(stderr=True)
    plain = not console.is_terminal or console.is_dumb_terminal
    if plain:  # rich draws no bar there, only a blank line at the end
        console.print(f"rendering the pre-training pool ({n} images)", highlight=False)
    with Progress(console=console, transient=True, disable=plain) as progress:
        task = progress.add_task("rendering the pre-training pool", total=n)
        for i, source in enumerate(sources.tolist()):
            k = int(draws[source][seen[source]])
            seen[source] += 1
            augmented = bool(rng.random() < config.pretrain_augmented)
            if source == 0:
                digit_index[i] = rng.choice(by_class[k])
                labels[i] = k
                grid = digits[digit_index[i]]
                bitmap = digit_bitmap(grid) if augmented else None
            else:
                font = FONT_FILES[int(rng.integers(len(FONT_FILES)))]
                bitmap = font_bitmap(font, chars[source][k])
                labels[i] = names.index(f"letter-{LETTERS[k]}") if source == 2 else k + font_digit_offset
            if bitmap is not None:
                if augmented:
                    bitmap = augment_bitmap(bitmap, config.pretrain_augment, rng)
                grid = _visible_grid(bitmap)
            scene_sized = bool(rng.random() < config.pretrain_scene_sized)
            images[i], boxes[i] = _object_image(config, grid, rng, scene_sized)
            progress.advance(task)
    return PretrainSet(images, labels, boxes, digit_index, names)


def render_instances(config: EmbeddedConfig, pool_name: str, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every digit instance of pool `pool_name` ("train", "test", "pretrain") drawn `copies`
    times object-centric, as the pre-training pool draws an undeformed handwritten digit.
    Returns images (N, H, W, 3) uint8 and labels int64."""
    if pool_name not in POOLS:
        raise NdbenchError(f"unknown digit pool {pool_name!r}", f"use one of {', '.join(POOLS)}")
    digits, targets = _load_digits()
    indices = np.repeat(digit_pools(config, targets)[pool_name], copies)
    rng = np.random.default_rng([config.seed, _STREAM_INSTANCES, POOLS.index(pool_name)])
    images = np.stack([_object_image(config, digits[i], rng, scene_sized=False)[0] for i in indices.tolist()])
    return images, targets[indices]


# --- writing COCO ------------------------------------------------------------------------------
def generator_fingerprint(config: EmbeddedConfig, n_images: int = 48, n_scenes: int = 8) -> str:
    """sha256 of a small sample of what the generator makes from `config`: the digit pools, the
    first pre-training images of a pool of `n_images` and `n_scenes` training scenes (pixels
    and objects). Any change to what the generator draws changes it, even without a new
    GENERATOR_VERSION, which is how shipped weights know they are stale."""
    digest = hashlib.sha256()
    digits, targets = _load_digits()
    for name, indices in sorted(digit_pools(config, targets).items()):
        digest.update(name.encode() + np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    small = render_pretrain_set(replace(config, n_pretrain_images=n_images))
    for array in (small.images, small.labels, small.boxes, small.digit_index):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(small.class_names).encode())
    pool = digit_pools(config, targets)["train"]
    by_class = [pool[targets[pool] == c] for c in range(N_CLASSES)]
    rng = np.random.default_rng([config.seed, _STREAM_TRAIN])
    for plan in plan_scene_classes(config, n_scenes, rng):
        pixels, objects = render_scene(config, plan, digits, by_class, rng)
        digest.update(pixels.tobytes() + json.dumps(objects, sort_keys=True, default=int).encode())
    return digest.hexdigest()


def _write_scenes(config: EmbeddedConfig, root: Path) -> None:
    """Render every scene into `root` in COCO layout, plus `pools.json`, then their checksum
    list (`CHECKSUMS`)."""
    digits, targets = _load_digits()
    pools = digit_pools(config, targets)
    categories = [{"id": c, "name": f"digit-{c}", "supercategory": "digit"} for c in range(N_CLASSES)]
    (root / "annotations").mkdir()
    next_image_id, next_ann_id = 1, 1
    for split, pool_name, n_scenes, stream in (
        ("train", "train", config.n_train_scenes, _STREAM_TRAIN),
        ("val", "test", config.n_test_scenes, _STREAM_TEST),
    ):
        rng = np.random.default_rng([config.seed, stream])
        pool = pools[pool_name]
        by_class = [pool[targets[pool] == c] for c in range(N_CLASSES)]
        (root / split).mkdir()
        images, annotations = [], []
        for plan in plan_scene_classes(config, n_scenes, rng):
            pixels, objects = render_scene(config, plan, digits, by_class, rng)
            file_name = f"{next_image_id:06d}.png"
            Image.fromarray(pixels).save(root / split / file_name, format="PNG", compress_level=1)
            images.append({"id": next_image_id, "file_name": file_name,
                           "width": config.image_size, "height": config.image_size})
            for obj in objects:
                x, y, w, h = obj["bbox"]
                annotations.append({
                    "id": next_ann_id, "image_id": next_image_id,
                    "category_id": obj["category_id"], "bbox": [x, y, w, h],
                    "area": obj["area"], "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    "digit_index": obj["digit_index"],
                })
                next_ann_id += 1
            next_image_id += 1
        data = {
            "info": {
                "description": f"ndbench embedded digit scenes ({split})",
                "generator_version": GENERATOR_VERSION,
                "digit_source": "sklearn.datasets.load_digits",
                "digit_pool": pool_name,
                "config": asdict(config),
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8"
        )
    (root / "pools.json").write_text(
        json.dumps({name: pool.tolist() for name, pool in pools.items()}) + "\n", encoding="utf-8"
    )
    (root / CHECKSUMS).write_text(_checksum_text(root, scene_files(config)), encoding="utf-8")


# --- statistics --------------------------------------------------------------------------------
def scene_statistics(root: Path) -> dict:
    """Per subset ("train", "test"): image count, images by number of classes, images and
    objects per class, and images holding a repeated instance of a class."""
    stats = {}
    for subset, split in (("train", "train"), ("test", "val")):
        data = json.loads((Path(root) / "annotations" / f"instances_{split}.json").read_text())
        per_image: dict[int, list[int]] = {image["id"]: [] for image in data["images"]}
        for ann in data["annotations"]:
            per_image[ann["image_id"]].append(ann["category_id"])
        stats[subset] = {
            "images": len(per_image),
            "classes_per_image": dict(sorted(Counter(len(set(v)) for v in per_image.values()).items())),
            "images_per_class": dict(sorted(Counter(c for v in per_image.values() for c in set(v)).items())),
            "objects_per_class": dict(sorted(Counter(ann["category_id"] for ann in data["annotations"]).items())),
            "images_with_repeat": sum(len(v) > len(set(v)) for v in per_image.values()),
        }
    return stats


def print_scene_summary(stats: dict, console=None, where: Path | None = None) -> None:
    """Print the statistics of `scene_statistics` as two rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    title = "embedded dataset"
    if where is not None:
        console.print(f"{title} written to {where}")
    shape = Table(title=f"{title}: classes per image")
    shape.add_column("classes")
    for subset in stats:
        shape.add_column(f"{subset} images", justify="right")
    for k in sorted({k for s in stats.values() for k in s["classes_per_image"]}):
        shape.add_row(str(k), *(
            f"{s['classes_per_image'].get(k, 0)} ({100 * s['classes_per_image'].get(k, 0) / s['images']:.0f} %)"
            for s in stats.values()
        ))
    shape.add_row("repeated instance", *(str(s["images_with_repeat"]) for s in stats.values()))
    per_class = Table(title=f"{title}: per class")
    per_class.add_column("class")
    for subset in stats:
        per_class.add_column(f"{subset} images", justify="right")
        per_class.add_column(f"{subset} objects", justify="right")
    for c in range(N_CLASSES):
        cells = []
        for s in stats.values():
            cells += [str(s["images_per_class"].get(c, 0)), str(s["objects_per_class"].get(c, 0))]
        per_class.add_row(f"{c} digit-{c}", *cells)
    console.print(shape)
    console.print(per_class)
