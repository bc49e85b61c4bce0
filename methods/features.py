"""Frozen-feature cache: the outputs of frozen networks, computed once per machine and read by
every later job, method and run that needs them.

A cached output is keyed by what it depends on (`FrozenPart` + the images' `ImageKey`):
the weights (sha256 of the weights file, or the timm hub name and tag; random weights are
never cached), the part of the network and what is read out of it, the compute precision
(bf16 autocast on CUDA, float32 on the CPU), the input images (index sha256, decode
signature, normalisation) and the stored precision. A change to any of them makes a new
key, so nothing stale is read.

How a method uses it: build a `FrozenPart` for each frozen computation, then

    table = runtime.features.get_or_compute(part, images, compute, loader=self.loader)
    rows = table.rows(items)            # dict name -> tensor [len(items), ...]

`compute(x)` maps a batch of input tensors to a dict of named outputs [B, ...] (several
outputs per pass are fine: targets and attention, or one map per tapped layer). Rows of a
dataset's items that are stored are read back; the others are computed in batches drawn by
`loader` and stored. Without a store (caching off, random weights, a dataset without an
image key) or past the size budget, computed rows are kept in memory for the job instead, or,
past `memory_limit` bytes, not at all (`get_or_compute` returns None and the method computes
per batch, as before).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from timm.models import get_pretrained_cfg
from torch import Tensor
from torch.utils.data import Dataset, Subset

from datasets_builders.array_store import ArrayStore, Entry, Field, content_key
from datasets_builders.atomic import atomic_write_text
from datasets_builders.counts import Counts
from datasets_builders.embedded import cache_root
from datasets_builders.image_store import ImageKey
from datasets_builders.loading import IndexedImages

FEATURES_KIND = "features"
# Bump when a change to ndbench alters cached outputs for unchanged keys.
FEATURES_VERSION = "1"


@dataclass(frozen=True)
class FrozenPart:
    """What a frozen output depends on, besides its input images."""

    weights: str  # `weights_identity`: "sha256:<hex>" of a weights file or "hub:<timm name.tag>"
    part: str  # the network part and read-out, e.g. "vit_base_patch16_224.augreg_in21k/pooled"
    precision: str  # `compute_precision`: "fp32" (CPU) or "bf16-autocast" (CUDA)


def compute_precision(device: torch.device) -> str:
    """How a frozen network computes on `device` (ndbench autocasts to bf16 on CUDA)."""
    return "bf16-autocast" if device.type == "cuda" else "fp32"


def weights_identity(backbone: str, weights: str | Path | None) -> str | None:
    """The content identity of resolved weights: the sha256 of a weights file, the timm hub
    name with its pretrained tag, or None for random weights or a weights file that is not
    there (their outputs are never cached)."""
    if weights is None or weights == "none":
        return None
    if weights == "hub":
        cfg = get_pretrained_cfg(backbone, allow_unregistered=True)
        source = "" if cfg is None else (cfg.hf_hub_id or cfg.url or "")
        tag = "" if cfg is None else (cfg.tag or "")
        return f"hub:{backbone.split('.')[0]}.{tag}:{source}"
    if not Path(weights).is_file():
        # A saved model holds its fitted backbone, so scoring it must not need the file it
        # started from; a run without the file fails where the backbone is built, in one line.
        return None
    return f"sha256:{file_sha256(Path(weights))}"


def planned_weights_identity(backbone: str, weights: str | Path | None) -> str | None:
    """`weights_identity` without side effects, for a dry run: embedded weights are the shipped
    file when it fits, else the cached one; when neither exists yet they get a placeholder
    identity (nothing is stored under it)."""
    from .pretrain import default_recipe, default_weights_path
    from .weight_sources import EMBEDDED_WEIGHTS

    if weights == EMBEDDED_WEIGHTS:
        from datasets_builders.embedded import EmbeddedConfig

        from .shipped_weights import shipped_file

        data, recipe = EmbeddedConfig(), default_recipe(backbone)
        shipped = shipped_file(backbone, data, recipe)
        if shipped is not None:
            return weights_identity(backbone, shipped)
        path = default_weights_path(backbone, data, recipe)
        return weights_identity(backbone, path) if path.is_file() else f"untrained:{path}"
    if weights not in (None, "none", "hub") and not Path(weights).is_file():
        return f"missing:{weights}"
    return weights_identity(backbone, weights)


def frozen_weights_identity(backbone: str, weights: str | Path | None, *, plan: bool = False) -> str | None:
    """The identity feature-cache keys use for a config's (backbone, weights): of the weights a
    run resolves to, or with `plan` (a dry run) of those it would resolve to, without
    pre-training missing embedded weights."""
    if plan:
        return planned_weights_identity(backbone, weights)
    from .pretrain import resolve_weights

    return weights_identity(backbone, resolve_weights(backbone, weights))


def file_sha256(path: Path) -> str:
    """sha256 of a file's contents, remembered under the cache root by (path, inode, size,
    mtime, ctime) so a large weights file is hashed once, not once per job."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = json.dumps([str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    memo = cache_root() / "weights-sha256" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:32]}.txt"
    try:
        return memo.read_text(encoding="utf-8").strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        atomic_write_text(memo, value + "\n")
    except Exception:  # noqa: BLE001 - the memo is an optimisation; an unwritable cache must not fail the job
        pass
    return value


_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _as_numpy(value: Tensor, dtype: torch.dtype | None) -> np.ndarray:
    value = value.detach()
    if value.is_floating_point():
        value = value.to(dtype or torch.float16)
    if value.dtype not in _NUMPY and value.is_floating_point():
        raise ValueError(f"cannot cache {value.dtype} outputs; use float16 or float32")
    return value.cpu().numpy()


class FeatureTable:
    """The frozen outputs of one dataset's items: row i = item i. Rows live in the feature
    cache's shards (memory-mapped) or, when they were not stored, in memory."""

    def __init__(self, n: int, entry: Entry | None, positions: np.ndarray | None, stored: np.ndarray,
                 memory: dict[str, np.ndarray], memory_rows: np.ndarray):
        self.n = n
        self.entry = entry
        self.positions = positions
        self.stored = stored  # per item: read from the entry
        self.memory = memory  # name -> array [number of items not stored, ...]
        self.memory_rows = memory_rows  # per item: its row in `memory` (-1 when stored)

    def __len__(self) -> int:
        return self.n

    def rows(self, items: np.ndarray | Tensor | Iterable[int]) -> dict[str, Tensor]:
        """The outputs of `items`, by name: tensors [len(items), ...] on the CPU."""
        items = np.asarray(items.cpu() if isinstance(items, Tensor) else list(items), dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        from_store = self.stored[items]
        if from_store.any():
            records, ok = self.entry.read(self.positions[items[from_store]], check=False)  # checked on open
            if not ok.all():
                raise RuntimeError(f"feature cache entry {self.entry.folder} lost rows while in use")
            for name in records.dtype.names:
                out[name] = np.empty((len(items), *records.dtype[name].shape), dtype=records.dtype[name].base)
                out[name][from_store] = records[name]
        if (~from_store).any():
            rows = self.memory_rows[items[~from_store]]
            for name, array in self.memory.items():
                if name not in out:
                    out[name] = np.empty((len(items), *array.shape[1:]), dtype=array.dtype)
                out[name][~from_store] = array[rows]
        return {name: torch.from_numpy(value) for name, value in out.items()}

    def all(self) -> dict[str, Tensor]:
        """Every row, in item order."""
        return self.rows(np.arange(self.n))


class FeatureCache:
    """Get frozen outputs from the store, or compute (and store) them; counts both in `counts`."""

    def __init__(self, store: ArrayStore | None, counts: Counts):
        self.store = store
        self.counts = counts

    def _entry_for(self, part: FrozenPart | None, images: Dataset,
                   dtype: torch.dtype | Mapping[str, torch.dtype]) -> tuple[Entry | None, np.ndarray | None]:
        key = getattr(images, "image_key", None)
        if part is None or key is None or self.store is None:
            return None, None
        return feature_entry(self.store, part, key, dtype), images.positions

    def get_or_compute(
        self,
        part: FrozenPart | None,
        images: Dataset,
        compute: Callable[[Tensor], Mapping[str, Tensor]],
        *,
        loader: Callable[[Dataset], Iterable],
        dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float16,
        memory_limit: float | None = None,
        progress: Progress | None = None,
        description: str = "frozen features",
    ) -> FeatureTable | None:
        """The outputs of `compute` for every item of `images` (see the module docstring).

        `part` None means "do not cache" (e.g. random weights). `loader(dataset)` must batch
        `(input tensor, item number)` pairs (a detector's `loader`). `dtype` is the stored
        precision of floating outputs (one for all, or per name). Returns None when the
        outputs are not stored and would take more than `memory_limit` bytes in memory."""
        n = len(images)
        entry, positions = self._entry_for(part, images, dtype)
        stored = np.zeros(n, dtype=bool)
        opened_with = None if entry is None else entry.schema()
        if opened_with is not None and n:
            _, stored = entry.read(positions)  # checks every row once (crc); bad rows come back False
        self.counts.add("frozen_reads", int(stored.sum()))
        missing = np.flatnonzero(~stored)
        listed = positions if positions is not None else getattr(images, "positions", None)
        twins, sources = _repeats(listed, missing)  # an image listed twice is computed once
        if len(twins):
            missing = np.setdiff1d(missing, twins)
        chunks: dict[str, list[np.ndarray]] = {}
        memory_rows = np.full(n, -1, dtype=np.int64)
        if len(missing):
            batches = loader(Subset(IndexedImages(images), missing.tolist()))
            from .base import tracked  # here, not at the top: base imports this module

            kept = 0
            for x, items in tracked(batches, progress, description):
                outputs = compute(x)
                self.counts.add("frozen_passes", len(x))
                arrays = {name: _as_numpy(value, dtype.get(name) if isinstance(dtype, Mapping) else dtype)
                          for name, value in outputs.items()}
                items = items.numpy()
                done = np.zeros(len(items), dtype=bool)
                if entry is not None:
                    fields = tuple(Field(name, a.dtype.str, a.shape[1:]) for name, a in arrays.items())
                    schema = entry.ensure_schema(fields)
                    records = np.zeros(len(items), dtype=schema.record_dtype)
                    for name, a in arrays.items():
                        records[name] = a
                    done = entry.write(positions[items], records)
                    stored[items[done]] = True
                keep = ~done
                if keep.any():
                    if memory_limit is not None:
                        per_row = sum(a[0].nbytes for a in arrays.values())
                        if (kept + int(keep.sum())) * per_row > memory_limit:
                            return None
                    for name, a in arrays.items():
                        chunks.setdefault(name, []).append(a[keep])
                    memory_rows[items[keep]] = np.arange(kept, kept + int(keep.sum()))
                    kept += int(keep.sum())
        if opened_with is not None and entry.schema() != opened_with and stored.any():
            # The outputs changed shape under the same key, so the entry was emptied: once more.
            return self.get_or_compute(part, images, compute, loader=loader, dtype=dtype, memory_limit=memory_limit,
                                       progress=progress, description=description)
        if len(twins):
            stored[twins], memory_rows[twins] = stored[sources], memory_rows[sources]
        memory = {name: np.concatenate(parts) for name, parts in chunks.items()}
        return FeatureTable(n, entry, positions, stored, memory, memory_rows)


def _repeats(listed: np.ndarray | None, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(those of `items` whose image, by index position in `listed`, an earlier one of `items`
    shows as well, and that earlier item for each): a training set that lists an image once per
    normal class it holds."""
    if listed is None or len(items) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(listed[items], return_index=True, return_inverse=True)
    sources = items[first][inverse.reshape(-1)]
    repeated = sources != items
    return items[repeated], sources[repeated]


def feature_entry(store: ArrayStore, part: FrozenPart, key: ImageKey,
                  dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float16) -> Entry:
    """The store entry holding the outputs of `part` on the images of `key`, stored in `dtype`."""
    stored_as = str(dtype) if isinstance(dtype, torch.dtype) else sorted((k, str(v)) for k, v in dtype.items())
    name = content_key(FEATURES_KIND, FEATURES_VERSION, part.weights, part.part, part.precision,
                       key.index_sha256, key.signature, key.finish, stored_as)
    return store.entry(FEATURES_KIND, name, key.n_index_rows, description=f"{part.part} ({part.precision})")
