"""Training data kept in memory for a job: images decoded once (and frozen-network outputs
cached once) instead of every epoch.

Shared by the training detectors (defend/mkd, transformaly, kdad).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datasets_builders.loading import IndexedImages, fetch_items

from .base import BaseDetector, tracked
from .features import FeatureTable

# ndbench choice: cached images and unit-length targets lose < 1e-3 (under 1/8 of an 8-bit grey
# level for images) in half precision, and take half the memory.
CACHE_DTYPE = torch.float16


class TrainImages:
    """The training images with their positions, decoded once per job and kept in memory
    (float16, on the GPU when they fit there) when they fit in `budget` bytes; else read
    through a DataLoader each epoch."""

    def __init__(self, dataset: Dataset, detector: BaseDetector, images: Tensor | None):
        self.dataset = dataset
        self.detector = detector
        self.images = images

    @classmethod
    def load(cls, dataset: Dataset, detector: BaseDetector, *, device: torch.device, budget: float,
             progress: Progress | None) -> TrainImages:
        """Decode `dataset` once into memory, unless it exceeds `budget` bytes."""
        images, store = None, None
        loader = detector.loader(IndexedImages(dataset), batch_size=64)
        for x, idx in tracked(loader, progress, f"{detector.name}: loading training images"):
            if images is None:  # the size from the first batch: no extra decode to probe it
                size = len(dataset) * x[0].numel() * CACHE_DTYPE.itemsize
                if size > budget:
                    return cls(dataset, detector, None)
                store = cache_device(size, device)
                images = torch.empty((len(dataset), *x.shape[1:]), dtype=CACHE_DTYPE, device=store)
            images[idx.to(store)] = x.to(store, CACHE_DTYPE)
        return cls(dataset, detector, images)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, *, device: torch.device, generator: torch.Generator | None = None,
                progress: Progress | None = None, description: str = "") -> Iterator[tuple[Tensor, Tensor]]:
        """(images [B, C, H, W] float32 on `device`, positions [B]) in a shuffled order drawn
        from `generator`, or in dataset order without one."""
        n = len(self.dataset)
        if self.images is None:
            loader = self.detector.loader(IndexedImages(self.dataset), batch_size=batch_size,
                                          shuffle=generator is not None,
                                          seed=draw_seed(generator) if generator is not None else 0)
            for x, idx in tracked(loader, progress, description):
                yield x.to(device), idx
            return
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        chunks = order.split(batch_size)
        for idx in tracked(chunks, progress, description, total=len(chunks)):
            yield self.images[idx.to(self.images.device)].to(device, torch.float32), idx


class HeldInputs(Dataset):
    """The distinct images of a training set (a repeated image once) as training sees them:
    from the job's in-memory copy `images` when there is one, else read from `dataset` (and
    rounded to `round_to` as the in-memory copy is). Carries the dataset's `image_key` and
    index `positions`, so a frozen network's outputs on them can live in the feature cache;
    `rows[i]` is training item i's row here."""

    def __init__(self, dataset: Dataset, images: Tensor | None, round_to: torch.dtype | None = None):
        self.dataset = dataset
        self.images = images
        self.round_to = round_to
        key = getattr(dataset, "image_key", None)
        positions = getattr(dataset, "positions", None) if key is not None else None
        if positions is None:
            self.items, self.rows, self.positions = np.arange(len(dataset)), np.arange(len(dataset)), None
        else:
            unique, first, self.rows = np.unique(np.asarray(positions), return_index=True, return_inverse=True)
            self.items, self.positions = first, unique
        self.image_key = key

    @classmethod
    def of(cls, data: TrainImages) -> HeldInputs:
        """The images of a `TrainImages`, held in float16."""
        return cls(data.dataset, data.images, CACHE_DTYPE)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> tuple[Tensor]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[tuple[Tensor]]:
        items = self.items[list(rows)]
        if self.images is not None:
            x = self.images[torch.from_numpy(items).to(self.images.device)]
        else:
            x = torch.stack([got[0] for got in fetch_items(self.dataset, items.tolist())])
            x = x if self.round_to is None else x.to(self.round_to)
        return [(image.float(),) for image in x]

    def loader(self, data: Dataset, batch_size: int) -> DataLoader:
        """Batches of `data` (a view of this set) in order, in this process: the images are in
        memory (possibly on the GPU) or decoded by the dataset itself."""
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0,
                          generator=torch.Generator().manual_seed(0))  # seeded: no draw from the global RNG


class TableRows:
    """Rows of a feature table (see `methods.features`) for training batches: all of them
    moved to the GPU once when they fit there (`cache_device`), else read per batch from the
    table (memory-mapped shards or memory) on the CPU."""

    def __init__(self, table: FeatureTable, device: torch.device):
        self.table = table
        self.resident: dict[str, Tensor] | None = None
        if device.type == "cuda" and len(table):
            size = sum(value.nbytes for value in table.rows([0]).values()) * len(table)
            if cache_device(size, device).type == "cuda":
                self.resident = {name: value.to(device) for name, value in table.all().items()}

    def rows(self, items: Tensor | np.ndarray) -> dict[str, Tensor]:
        """The rows of `items` by name (on the GPU when resident, else on the CPU)."""
        if self.resident is None:
            return self.table.rows(items)
        index = torch.as_tensor(items, device=next(iter(self.resident.values())).device)
        return {name: value[index] for name, value in self.resident.items()}


@contextmanager
def seeded_torch_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's global RNG (and `device`'s, on CUDA) seeded with `seed` inside the block, as it
    was before the block afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def draw_seed(generator: torch.Generator) -> int:
    """A seed for a DataLoader shuffle, drawn from `generator`."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def cache_device(size: int, device: torch.device) -> torch.device:
    """Keep the cache on the GPU when it takes at most a quarter of the free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size <= free / 4:
            return device
    return torch.device("cpu")

