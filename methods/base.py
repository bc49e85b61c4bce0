"""What every detector shares: config handling, input transform, devices, progress, save/load.

A detector follows scikit-learn's shape: every hyper-parameter lives in its `Config`
dataclass (defaults = the paper's, each citing its source), `fit(train)` then
`score(images)` (higher = more novel). Datasets yield `(image, label, image_id)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import DataLoader, Dataset

from datasets_builders.atomic import atomic_open
from datasets_builders.errors import NdbenchError
from datasets_builders.image_store import Normalise, ResizeDecode, StagedTransform
from datasets_builders.loading import decodes_files

from .cost import CostModel
from .runtime import JobRuntime

# The preset name that stands for "the recipe behind the paper's numbers" of every method.
PAPER_PRESET = "paper"


@runtime_checkable
class Detector(Protocol):
    """The method contract (docs/ARCHITECTURE.md, "The method contract")."""

    name: ClassVar[str]
    config: Any

    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None: ...

    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray: ...

    def save(self, path: Path) -> None: ...


def write_payload(path: Path, payload: dict) -> None:
    """Write a detector's payload (see `BaseDetector.payload`) to `path`, atomically."""
    with atomic_open(path) as handle:
        torch.save(payload, handle)


def config_hash(config: Any) -> str:
    """Short content hash of a config dataclass (the job key's method part)."""
    text = json.dumps(asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def build_config(config_cls: type, base: Any | None, overrides: dict) -> Any:
    """`base` (or the defaults) with `overrides` applied; unknown names raise one clear error."""
    names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise NdbenchError(
            f"{config_cls.__qualname__} has no option {unknown[0]!r}",
            f"options are: {', '.join(sorted(names))}",
        )
    try:
        hints = typing.get_type_hints(config_cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved: nothing to check against
        hints = {}
    overrides = dict(overrides)
    for name, value in overrides.items():
        if name in hints and not _fits(value, hints[name]) and _fits("", hints[name]) \
                and isinstance(value, int | float):
            # A text option given a number-looking value (fault_split=1, weights=123): its text.
            overrides[name] = value = json.dumps(value)
        if name in hints and not _fits(value, hints[name]):
            raise NdbenchError(
                f"{config_cls.__qualname__} option {name!r} takes {_describe_type(hints[name])}, not {value!r}",
                _list_fix(name, value, hints[name]) or f"give {name} a value of that type",
            )
    config = base if base is not None else config_cls()
    coerced = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(config, **coerced)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (as parsed from NAME=VALUE) fits the type annotation `hint`; types it
    cannot judge fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint in (int, float, bool, str):
        if isinstance(value, bool):
            return hint is bool
        return isinstance(value, int | float) if hint is float else isinstance(value, hint)
    if hint is tuple or origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(item, args[0]) for item in value)
        return not args or (len(args) == len(value) and all(map(_fits, value, args)))
    return True


def _tuple_hint(hint: Any) -> Any | None:
    """The tuple type `hint` is or holds in a union (None when it takes no tuple)."""
    if hint is tuple or typing.get_origin(hint) is tuple:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(filter(None, map(_tuple_hint, typing.get_args(hint))), None)
    return None


def _example(hint: Any) -> list | None:
    """A list that fits the tuple type `hint`, to show in a fix (None unless its items are numbers)."""
    samples = {float: 0.5, int: 1}
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0], args[0])
    items = [samples.get(arg) for arg in args]
    return items if items and None not in items else None


def _list_fix(name: str, value: Any, hint: Any) -> str | None:
    """For text given to an option that takes a list (e.g. mean=0.5,0.5,0.5): how to write it
    as a JSON list, from the text's own comma-separated items where they fit; None otherwise."""
    if not isinstance(value, str) or _tuple_hint(hint) is None:
        return None
    items = []
    for part in value.split(","):
        try:
            items.append(json.loads(part))
        except json.JSONDecodeError:
            items.append(part.strip())
    if _fits(items, hint):
        return f"write {name} as a JSON list: {name}={json.dumps(items, separators=(',', ':'))}"
    example = _example(_tuple_hint(hint))
    if example is None:
        return f"write {name} as a JSON list"
    return f"write {name} as a JSON list, e.g. {name}={json.dumps(example, separators=(',', ':'))}"


def _describe_type(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is None else str(hint)


class BaseDetector(ABC):
    """Shared plumbing; subclasses set `Config`, `description`, `paper` and the model code."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type]
    # Named overrides (paper defaults stay the defaults). "embedded" applies on the embedded
    # offline dataset; "embedded/<setting>" is layered on top of it for that setting. The
    # embedded multi-class splits hold ~6x the training images of the uni-class ones (~2,800 vs
    # ~470), so their layer cuts epochs to keep the images seen per job close to the uni-class
    # preset's. Other names (e.g. "original", "paper") are chosen with the run option --preset.
    presets: ClassVar[dict[str, dict]] = {}
    # The preset whose recipe produced the paper's numbers for this method (None: the defaults).
    # `--preset paper` resolves to it for every method; tables mark other presets.
    paper_preset: ClassVar[str | None] = None
    # The manifest parts whose images the runner serves from the decoded-image store (with a
    # `StagedTransform`). A method whose views of a part are random crops of the *original*
    # image (not of the resized input) leaves that part out, so its dataset yields the
    # original decode path; a `transform()` that is not a `StagedTransform` bypasses the store
    # altogether (e.g. msad's resize + centre crop) unless the method opts in with one.
    store_parts: ClassVar[frozenset[str]] = frozenset({"train", "test"})

    def __init__(self, config: Any | None = None, **overrides: Any):
        self.config = build_config(self.Config, config, overrides)
        self.fitted = False
        self._runtime: JobRuntime | None = None
        # What the run record keeps besides the metrics (losses, cache use, passes per image).
        self.extra: dict[str, Any] = {}

    # --- run-time services -----------------------------------------------------------------
    @property
    def runtime(self) -> JobRuntime:
        """The job's stores, counters and loading settings (on their own: in memory, no workers)."""
        if self._runtime is None:
            self._runtime = JobRuntime.in_memory()
        return self._runtime

    def record_extra(self) -> dict[str, Any]:
        """What the run record stores besides the metrics (a copy of `extra`)."""
        return dict(self.extra)

    def use_runtime(self, runtime: JobRuntime) -> None:
        """Use a job's runtime (the runner calls this before `fit`)."""
        self._runtime = runtime

    def cost_model(self, device: torch.device, split_id: str = "") -> CostModel | None:
        """The forward passes this method makes per image on split `split_id` (frozen parts with
        their cache keys, trained passes), for ndbench run --dry-run and the record's counts;
        None when the method declares none (then only decodes are counted and predicted)."""
        return None

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise one NdbenchError when a config's values do not fit together: by default, an
        `img_size` that its ViT `backbone` cannot cut into whole patches."""
        backbone, img_size = getattr(config, "backbone", None), getattr(config, "img_size", None)
        if isinstance(backbone, str) and isinstance(img_size, int):
            from .backbones import check_img_size

            check_img_size(backbone, img_size, cls.name)

    @classmethod
    def preset_names(cls) -> list[str]:
        """The presets `--preset` accepts for this method ("paper" always)."""
        return sorted({*cls.presets, PAPER_PRESET})

    @classmethod
    def preset_labels(cls) -> list[str]:
        """`preset_names` as `ndbench methods` lists them: "paper" with what it stands for when
        that is not a preset of its own ("paper (= defaults)", "paper (= released_voc)")."""
        return [f"{name} (= {cls.paper_alias()})" if name == PAPER_PRESET and cls.paper_alias() else name
                for name in cls.preset_names()]

    @classmethod
    def paper_alias(cls) -> str | None:
        """What "paper" stands for, when not only itself: "defaults", another preset's name (the
        one it resolves to, or one with the same values as a preset "paper"), else None."""
        if cls.paper_preset is None:
            return "defaults"
        if cls.paper_preset != PAPER_PRESET:
            return cls.paper_preset
        recipe = cls.presets.get(PAPER_PRESET)
        return next((name for name in sorted(cls.presets) if name != PAPER_PRESET and cls.presets[name] == recipe),
                    None)

    @classmethod
    def resolve_preset(cls, name: str) -> str | None:
        """The preset a user-given name stands for: "paper" is this method's `paper_preset`
        (None = its defaults); other names must be presets of this method."""
        if name == PAPER_PRESET:
            return cls.paper_preset
        if name not in cls.presets:
            raise NdbenchError(
                f"method {cls.name!r} has no preset {name!r}",
                f"use --preset with one of: {', '.join(cls.preset_names())}",
            )
        return name

    @classmethod
    def with_preset(cls, preset: str | None, **overrides: Any) -> BaseDetector:
        """Build with a preset chain under explicit overrides. The chain is "+"-joined; each
        path-like element such as "embedded/multi-class" applies "embedded", then
        "embedded/multi-class" (each if defined)."""
        values: dict[str, Any] = {}
        for element in (preset or "").split("+"):
            parts = element.split("/") if element else []
            for depth in range(1, len(parts) + 1):
                values.update(cls.presets.get("/".join(parts[:depth]), {}))
        values.update(overrides)
        return cls(**values)

    # --- input ---------------------------------------------------------------------------
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The input mean and std: the config's, or (when it leaves them None) those of the
        backbone's pretrained config in timm, so they always match the weights."""
        c = self.config
        if c.mean is not None and c.std is not None:
            return tuple(c.mean), tuple(c.std)
        from .backbones import pretrained_normalisation

        mean, std = pretrained_normalisation(c.backbone)
        return tuple(c.mean or mean), tuple(c.std or std)

    def transform(self) -> Callable:
        """PIL image -> normalised tensor at the method's input size: Resize((s, s)), ToTensor,
        Normalize, staged so that the resized uint8 pixels can be kept in the image store."""
        mean, std = self.normalisation()
        return StagedTransform(ResizeDecode(self.config.img_size, "bilinear", antialias=True), Normalise(mean, std))

    def loader(self, data: Dataset, *, shuffle: bool = False, batch_size: int | None = None,
               seed: int = 0, drop_last: bool = False) -> DataLoader:
        """A DataLoader over `data` with the method's batch size and a seeded shuffle; it decodes
        in the runtime's worker processes when `data` still has image files to decode (in-memory
        and stored images load in this process), into pinned memory on CUDA."""
        generator = torch.Generator().manual_seed(seed)
        workers = self.runtime.workers if self.runtime.workers and decodes_files(data) else 0
        return DataLoader(
            data,
            batch_size=batch_size or self.config.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.runtime.pin_memory,
            drop_last=drop_last,
        )

    # --- training data -------------------------------------------------------------------
    def fewest_train_images(self) -> int:
        """The fewest training images `fit` learns from (1 unless a method needs more)."""
        return 1

    def check_train_images(self, train: Dataset) -> None:
        """Raise one NdbenchError when `train` holds fewer images than `fit` can learn from."""
        count, fewest = len(train), self.fewest_train_images()
        if count == 0:
            raise NdbenchError(f"{self.name} got no training images", "check the split's train part")
        if count < fewest:
            raise NdbenchError(
                f"{self.name} needs at least {fewest} training images, got {count}",
                f"run it on splits with {fewest} or more; ndbench build-splits coco-format --min-train-images "
                f"{fewest} gives no split to classes with fewer",
            )

    # --- persistence ---------------------------------------------------------------------
    @abstractmethod
    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None:
        """Learn what normal looks like from the training images (all normal)."""

    @abstractmethod
    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """Novelty score per image, higher = more novel."""

    @abstractmethod
    def state(self) -> dict:
        """Everything `load` needs besides the config (tensors / arrays)."""

    @abstractmethod
    def set_state(self, state: dict) -> None:
        """Restore what `state()` returned."""

    def payload(self, metadata: dict | None = None) -> dict:
        """What `save` writes: `metadata` (plain values) under its own keys, then the method,
        config and fitted state."""
        if not self.fitted:
            raise NdbenchError(f"{self.name} is not fitted", "call fit() before save()")
        return {**(metadata or {}), "method": self.name, "config": asdict(self.config), "state": self.state()}

    def save(self, path: Path, metadata: dict | None = None) -> None:
        """Save config and fitted state to one file, atomically; `metadata` (plain values)
        is stored beside them under its own keys."""
        write_payload(Path(path), self.payload(metadata))

    @classmethod
    def load(cls, path: Path) -> BaseDetector:
        """Load a detector saved with `save`."""
        return cls.from_saved(torch.load(Path(path), map_location="cpu", weights_only=False), path)

    @classmethod
    def from_saved(cls, payload: dict, source: Path | str) -> BaseDetector:
        """The fitted detector held by what `save` wrote (already read from the file `source`)."""
        if payload.get("method") != cls.name:
            raise NdbenchError(
                f"{source} holds a {payload.get('method')!r} model, not {cls.name!r}",
                f"load it with the {payload.get('method')} method",
            )
        detector = cls(**payload["config"])
        detector.set_state(payload["state"])
        detector.fitted = True
        return detector


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cpu`, `cuda` and `cuda:<n>` as named. Any
    other name (torch's `mps`, `meta`, ... which ndbench does not run on), CUDA without CUDA
    and a CUDA device number this machine lacks raise one line."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    number = re.fullmatch(r"cuda(?::(\d+))?", device)
    if number is None:
        raise NdbenchError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise NdbenchError(f"--device {device} was asked for but CUDA is not available", "use --device cpu or auto")
    if number[1] is not None and int(number[1]) >= torch.cuda.device_count():
        raise NdbenchError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                           f"use --device cuda, or cuda:N with N below {torch.cuda.device_count()}")
    return torch.device(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fused_adam(device: torch.device) -> dict[str, bool]:
    """Keyword arguments that give torch's Adam/AdamW its fused kernel on `device` where torch
    has one (CUDA; CPU since torch 2.4): the same update in one kernel per step instead of a
    loop over the parameters (3.3 vs 11 ms a step for the embedded ViT student on one CPU thread)."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if device.type == "cuda" or device.type == "cpu" and (major, minor) >= (2, 4):
        return {"fused": True}
    return {}


def tracked(items: Iterable, progress: Progress | None, description: str, total: int | None = None) -> Iterator:
    """Iterate `items`, advancing a rich progress task when a Progress is given."""
    if progress is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    task = progress.add_task(description, total=total)
    try:
        for item in items:
            yield item
            progress.advance(task)
    finally:
        progress.remove_task(task)
