"""`ndbench maps`: anomaly-map grids (paper Fig. 3) for a method with `anomaly_map`.

The method is fitted on a split's training images; then `n` test images (half normal, half
novel, drawn with the seed) are shown as image | heat-map overlay, each titled with its label
and novelty score. One colour scale for the whole grid, so images can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset

from datasets_builders.atomic import atomic_write_bytes
from datasets_builders.errors import NdbenchError
from datasets_builders.splits import ALL_VS_ONE_NAME, NORMAL_SET_NAME, NOVEL, UNI_CLASS_NAME
from methods.base import resolve_device
from methods.registry import available, get_class

from .runner import Job, RunOptions, build_detector, job_data, job_hash, seed_everything

TILE = 160  # pixels per shown image side
CAPTION = 16  # pixels of caption above each pair
MAX_IMAGES = 128  # a grid past this is tens of megabytes and no longer readable as one figure
# The heat scale (low -> high): matplotlib's "turbo", a jet-like rainbow (dark blue, cyan,
# yellow, dark red) whose lightness changes smoothly, so equal steps look equal.
HEAT_COLORMAP = "turbo"


@dataclass(frozen=True)
class MapsRequest:
    """Which method, split and images to draw."""

    method: str
    dataset: str
    split: str  # "<setting>/<name>", e.g. uni-class/3
    n: int = 16
    seed: int = 0
    alpha: float = 0.5  # heat-map opacity in the overlay
    preset: str = ""  # as run's --preset takes it ("" = the method's defaults)
    overrides: tuple[tuple[str, object], ...] = ()  # the method's --set options, as a job holds them

    def job(self) -> Job:
        """The run job whose fit the grid shows."""
        setting, name = parse_split(self.split)
        return Job(self.method, self.dataset, setting, name, self.seed, self.overrides, self.preset)


# The split names the builders write, per setting.
SPLIT_NAMES = {"uni-class": (UNI_CLASS_NAME,), "multi-class": (ALL_VS_ONE_NAME, NORMAL_SET_NAME)}


def parse_split(text: str) -> tuple[str, str]:
    """`uni-class/3` -> ("uni-class", "3"); one clear error otherwise. The name comes back as
    the builders write it: `uni-class/03` -> "3", `multi-class/normal-3-1-3` -> "normal-1-3"."""
    setting, sep, name = text.partition("/")
    if not sep or not name or setting not in SPLIT_NAMES:
        raise NdbenchError(f"cannot read --split {text!r}", "write it as SETTING/NAME, e.g. uni-class/3")
    if not any(pattern.fullmatch(name) for pattern in SPLIT_NAMES[setting]):
        raise NdbenchError(f"no split is named {text!r}",
                           "use uni-class/<class id>, multi-class/except-<class id> or "
                           "multi-class/normal-<id>-<id>..., e.g. uni-class/3")
    return setting, _canonical_name(name)


def _canonical_name(name: str) -> str:
    """A split name as the builders write it: ids without leading zeros, a normal set's ids
    sorted and each once (the manifest of `--normal 3,1` is `normal-1-3`)."""
    prefix = next((p for p in ("except-", "normal-") if name.startswith(p)), "")
    ids = [int(part) for part in name.removeprefix(prefix).split("-")]
    if prefix == "normal-":
        ids = sorted(set(ids))
    return prefix + "-".join(map(str, ids))


def check_image_count(n: int) -> None:
    """Refuse a number of grid images outside 1..MAX_IMAGES."""
    if n < 1:
        raise NdbenchError(f"--n {n} is too small", "ask for at least one image")
    if n > MAX_IMAGES:
        raise NdbenchError(f"--n {n} is too many for one grid", f"ask for at most {MAX_IMAGES} images")


def pick_images(labels: np.ndarray, n: int, seed: int) -> list[int]:
    """Positions of up to `n` test images, half normal and half novel where both exist,
    drawn with `seed`; normal ones first."""
    check_image_count(n)
    rng = np.random.default_rng(seed)
    novel = np.flatnonzero(labels == NOVEL)
    normal = np.flatnonzero(labels != NOVEL)
    n_normal = min(len(normal), max(n - len(novel), n // 2))
    n_novel = min(len(novel), n - n_normal)
    chosen = [rng.choice(normal, n_normal, replace=False), rng.choice(novel, n_novel, replace=False)]
    return [int(i) for part in chosen for i in np.sort(part)]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> RGB uint8 along the HEAT_COLORMAP scale."""
    return colormaps[HEAT_COLORMAP](np.clip(values, 0, 1), bytes=True)[..., :3]


def overlay(image: Image.Image, heat: np.ndarray, alpha: float,
            size: tuple[int, int] = (TILE, TILE)) -> Image.Image:
    """The image blended with the heat colours of `heat` (values in [0, 1], any size), at
    `size` (width, height) pixels."""
    base = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    colours = Image.fromarray(heat_colours(heat)).resize(size, Image.Resampling.BILINEAR)
    return Image.blend(base, colours, alpha)


def compose_grid(pairs: list[tuple[Image.Image, Image.Image, str]], columns: int = 2) -> Image.Image:
    """Pairs (image, overlay, caption) laid out `columns` pairs per row, captions on top."""
    rows = -(-len(pairs) // columns)
    width, height = columns * 2 * TILE, rows * (TILE + CAPTION)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, heat, caption) in enumerate(pairs):
        x, y = (i % columns) * 2 * TILE, (i // columns) * (TILE + CAPTION)
        draw.text((x + 4, y + 2), caption, fill="black")
        grid.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (x, y + CAPTION))
        grid.paste(heat, (x + TILE, y + CAPTION))
    return grid


def maps_path(out: Path, request: MapsRequest, options: RunOptions | None = None) -> Path:
    """Where the grid goes: named by method, split and seed, and, when --preset or --set
    change the config, by its hash (as the run's records are), so grids of two configs sit side
    by side."""
    setting, name = parse_split(request.split)
    stem = f"{request.method}__{request.dataset}__{setting}__{name}__seed{request.seed}"
    if request.preset or request.overrides:
        options = options or RunOptions(out=Path(out))
        job = request.job()
        stem += f"__{job_hash(job, build_detector(job, options))}"
    return Path(out) / "maps" / f"{stem}.png"


def draw_maps(request: MapsRequest, options: RunOptions, progress=None) -> Path:
    """Fit the method on the split, draw the anomaly-map grid, write it; return its path."""
    job = request.job()
    detector = build_detector(job, options)
    if not hasattr(detector, "anomaly_map"):
        with_maps = [m for m in available() if hasattr(get_class(m), "anomaly_map")]
        raise NdbenchError(f"method {request.method!r} has no anomaly maps", f"use one of {', '.join(with_maps)}")
    path = maps_path(options.out, request, options)
    device = resolve_device(options.device)
    _, train, test = job_data(job, detector, options)
    seed_everything(request.seed)
    detector.fit(train, device=device, progress=progress)
    chosen = pick_images(test.labels, request.n, request.seed)
    batch = torch.stack([test[i][0] for i in chosen])
    with torch.no_grad():
        heat = detector.anomaly_map(batch).numpy()
    scores = drawn_scores(detector, test, chosen, device)
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / max(high - low, 1e-12)
    pairs = []
    for k, i in enumerate(chosen):
        kind = "novel" if test.labels[i] == NOVEL else "normal"
        image = test.image(i)
        pairs.append((image, overlay(image, scaled[k], request.alpha), f"{kind}  score {scores[k]:.4f}"))
    grid = compose_grid(pairs)
    atomic_write_bytes(path, _png_bytes(grid))
    return path


def drawn_scores(detector, test: Dataset, chosen: list[int], device: torch.device) -> np.ndarray:
    """The novelty scores of the drawn test images as the method scores them in a run (for
    `rdad` the maximum of its smoothed map, not the map's mean)."""
    return np.asarray(detector.score(Subset(test, list(chosen)), device=device), dtype=np.float64)


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
