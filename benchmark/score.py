"""ndbench score: run a saved detector on one's own images.

Images pass through the detector's own `transform()` and are scored in the given order with
the detector's batch size, exactly as the run scored its test images, so a run's test images
get the scores its record holds. The result is a CSV (`image`, `score`, and with a threshold
`label`, with maps `map`), one row per image in the order given.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from datasets_builders.atomic import atomic_write_bytes, encode_text, replace_together, replaced_file
from datasets_builders.errors import NdbenchError
from datasets_builders.loading import open_rgb
from methods.base import resolve_device
from methods.registry import available, get_class

from .maps import TILE, overlay
from .models import SavedModel, load_model

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NORMAL, NOVEL = "normal", "novel"
# Names of this process's standard output: an --output naming one prints the CSV there.
STDOUT_NAMES = ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


@dataclass(frozen=True)
class ScoreRequest:
    """What to score, with which model, and what to write."""

    model: Path
    images: tuple[Path, ...]  # files or folders, in the order given
    output: Path | None = None  # None: the CSV goes to stdout
    maps: Path | None = None  # folder for one heat-map overlay PNG per image
    threshold: bool = False  # label each image with the model's stored threshold
    device: str = "auto"
    alpha: float = 0.5  # heat-map opacity in the overlays


def is_stdout(path: Path) -> bool:
    """Whether `path` names this process's standard output, e.g. `--output /dev/stdout`."""
    return os.path.abspath(path) in STDOUT_NAMES


def collect_images(paths: list[Path] | tuple[Path, ...]) -> list[Path]:
    """The image files named: files as given, folders as the image files directly inside
    them, sorted by name, hidden ones (named with a leading dot) left out. A missing path or a
    folder without images is an error."""
    if not paths:
        raise NdbenchError("no images given", "name image files or folders after the options")
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            # Hidden files are the system's, not images: macOS writes "._x.jpg" beside x.jpg on
            # foreign disks, and a stray ".DS_Store" or ".x.jpg.swp" sits in many folders.
            inside = sorted(p for p in path.iterdir()
                            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise NdbenchError(f"folder {path} holds no image files",
                                   f"give a folder with {', '.join(IMAGE_SUFFIXES[:3])}... files")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise NdbenchError(f"no image file or folder at {path}", "check the path")
    return found


def open_image(path: Path) -> PIL.Image.Image:
    """An image file as RGB, as the dataset loaders open it; one clear error when unreadable."""
    return open_rgb(path, "pass image files PIL can open (PNG, JPEG, ...)")


class ImageFiles(Dataset):
    """Image files as `(tensor, 0, name)` items through a detector's transform."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.image_ids = [str(p) for p in self.paths]
        self.labels = np.zeros(len(self.paths), dtype=np.int64)  # unknown; detectors ignore them

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, str]:
        return self.transform(self.image(item)), 0, self.image_ids[item]

    def image(self, item: int) -> PIL.Image.Image:
        """The item's image as RGB, before the transform."""
        return open_image(self.paths[item])


@dataclass
class ScoreResult:
    """The rows of the scores CSV and where the maps went."""

    images: list[str]
    scores: np.ndarray
    labels: list[str] | None  # "normal"/"novel" with a threshold
    maps: list[Path] | None

    def csv_text(self) -> str:
        """The CSV: image, score (full precision), then label and map where present."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = ["image", "score"] + (["label"] if self.labels is not None else [])
        writer.writerow(header + (["map"] if self.maps is not None else []))
        for i, (image, score) in enumerate(zip(self.images, self.scores, strict=True)):
            row = [image, repr(float(score))]
            row += [self.labels[i]] if self.labels is not None else []
            row += [str(self.maps[i])] if self.maps is not None else []
            writer.writerow(row)
        return buffer.getvalue()


def check_request(saved: SavedModel, request: ScoreRequest) -> None:
    """Refuse what the model cannot do before any scoring."""
    if request.threshold and saved.threshold is None:
        raise NdbenchError(f"{saved.path} stores no threshold", "drop --threshold or save the model again")
    if request.maps is not None and not hasattr(saved.detector, "anomaly_map"):
        with_maps = [m for m in available() if hasattr(get_class(m), "anomaly_map")]
        raise NdbenchError(f"method {saved.detector.name!r} has no anomaly maps",
                           f"drop --maps, or score with a model of {', '.join(with_maps)}")


@dataclass(frozen=True)
class Scoring:
    """A validated request: the loaded model, the image files and the device."""

    request: ScoreRequest
    saved: SavedModel
    paths: list[Path]
    device: torch.device


def prepare_scoring(request: ScoreRequest) -> Scoring:
    """Check everything before any work: the images exist and are readable, the model file
    is a current ndbench model of a known method, and it can do what is asked."""
    paths = collect_images(request.images)
    saved = load_model(request.model)
    check_request(saved, request)
    device = resolve_device(request.device)
    check_no_overwrite(request, paths)
    for path in paths:
        open_image(path)
    return Scoring(request, saved, paths, device)


def check_no_overwrite(request: ScoreRequest, paths: list[Path]) -> None:
    """Refuse an --output or a map file that would replace one of the inputs, the model or
    another output of this call, or that is not a regular file (a FIFO, a device, a socket)."""
    inputs = {path.resolve(): path for path in [*paths, Path(request.model)]}
    maps = map_targets(Path(request.maps), paths) if request.maps is not None else []
    mapped = {target.resolve(): image for target, image in zip(maps, paths, strict=True)} if maps else {}
    if request.output is not None:
        output = Path(request.output)
        if output.resolve() in inputs:
            raise NdbenchError(f"--output {output} is one of the inputs; writing it would replace that file",
                               "write the CSV to another file")
        if output.resolve() in mapped:
            raise NdbenchError(f"--output {output} is also the heat map of {mapped[output.resolve()]} under --maps",
                               "write the CSV outside the --maps folder or under another name")
        replaced_file(output)
    for target in maps:
        if target.resolve() in inputs:
            raise NdbenchError(f"--maps {request.maps} would overwrite the input image {inputs[target.resolve()]}",
                               "write the maps to another folder")
        replaced_file(target)


def run_scoring(scoring: Scoring, progress=None) -> ScoreResult:
    """Score the images with the saved detector, write the maps and (when `output` is set)
    the CSV; return the rows. The maps and the CSV appear together at the end: an error or
    interrupt before leaves every output as it was (files in the maps folder before kept)."""
    request, saved = scoring.request, scoring.saved
    detector = saved.detector
    data = ImageFiles(scoring.paths, detector.transform())
    scores = np.asarray(detector.score(data, device=scoring.device, progress=progress), dtype=np.float64)
    labels = None
    if request.threshold:
        labels = [NOVEL if s >= saved.threshold else NORMAL for s in scores]
    maps = map_targets(Path(request.maps), scoring.paths) if request.maps is not None else None
    result = ScoreResult([str(p) for p in scoring.paths], scores, labels, maps)
    with StagedFiles() as staged:
        if maps is not None:
            stage_maps(detector, data, maps, request.alpha, staged)
        if request.output is not None:
            staged.add(Path(request.output), encode_text(result.csv_text()))
        staged.commit()
    return result


def score_images(request: ScoreRequest, progress=None) -> ScoreResult:
    """`prepare_scoring`, then `run_scoring`."""
    return run_scoring(prepare_scoring(request), progress)


class StagedFiles:
    """Files written under temporary names beside their targets, then put in place together by
    `commit`. Until then no target changes; leaving the block uncommitted removes the temporary
    files and the folders made for them (only while empty: nothing else is removed)."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []
        self.made: set[Path] = set()

    def add(self, target: Path, data: bytes) -> None:
        """Stage `data` to replace `target` (written through a symlink at `target`)."""
        final = replaced_file(target)
        self.made.update(place for place in (final.parent, *final.parent.parents) if not place.exists())
        self.staged.append((final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp"), final))
        atomic_write_bytes(self.staged[-1][0], data)

    def commit(self) -> None:
        """Put every staged file in place as one step (all of them or, interrupted, none)."""
        replace_together(self.staged)
        self.staged, self.made = [], set()

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        for place in sorted(self.made, key=lambda place: len(place.parts), reverse=True):  # deepest first
            with contextlib.suppress(OSError):
                place.rmdir()


def stage_maps(detector, data: ImageFiles, targets: list[Path], alpha: float, staged: StagedFiles) -> None:
    """Stage one heat-map overlay PNG per image at `targets` (one per image of `data`), on one
    colour scale for all the images scored together."""
    heats = []
    with torch.no_grad():
        for x, _, _ in detector.loader(data):
            heats.append(detector.anomaly_map(x).float().cpu())
    heat = torch.cat(heats).numpy()
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / max(high - low, 1e-12)
    for i, target in enumerate(targets):
        image = data.image(i)
        shown = overlay(image, scaled[i], alpha, size=_shown_size(image.size))
        buffer = io.BytesIO()
        shown.save(buffer, format="PNG")
        staged.add(target, buffer.getvalue())


def map_targets(folder: Path, paths: list[Path]) -> list[Path]:
    """The overlay file of each image under `folder`: `<stem>.png`, or `<stem>-2.png`, `-3`,
    ... when an earlier image of the call took the name."""
    targets: list[Path] = []
    for path in paths:
        targets.append(_unique(folder / f"{path.stem}.png", targets))
    return targets


def _shown_size(size: tuple[int, int]) -> tuple[int, int]:
    """The image's own size, enlarged by a whole factor when its short side is under TILE."""
    factor = max(1, -(-TILE // max(1, min(size))))
    return size[0] * factor, size[1] * factor


def _unique(path: Path, taken: list[Path]) -> Path:
    """`path`, or `<stem>-2.png`, `-3`, ... when an earlier image of this call took the name."""
    candidate, n = path, 1
    while candidate in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
