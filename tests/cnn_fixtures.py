"""Toy data for the CNN baselines' tests (kdad, dsvdd): 32 px images in [0, 1] on dark noise,
holding one bright square, bright horizontal stripes or bright vertical stripes."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

SIZE = 32


def toy_image(kind: str, generator: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """A [3, size, size] image in [0, 1]: dark noise with a bright "square" of random size and
    place, or bright "stripes" (horizontal, every 4th row) or "columns" (vertical), random phase."""
    x = torch.rand(3, size, size, generator=generator) * 0.2
    if kind == "square":
        side = int(torch.randint(size // 4, size // 2, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        x[:, top:top + side, left:left + side] = 0.9
    elif kind == "stripes":
        phase = int(torch.randint(0, 4, (1,), generator=generator))
        x[:, phase::4] = 0.9
    elif kind == "columns":
        phase = int(torch.randint(0, 4, (1,), generator=generator))
        x[:, :, phase::4] = 0.9
    else:
        raise ValueError(f"unknown toy image kind {kind!r}")
    return x


class ToyImages(Dataset):
    """(image, label, id) items: `normal` images of `normal_kind` (label 0), then `novel` images
    of `novel_kind` (label 1)."""

    def __init__(self, normal: int, novel: int, seed: int, size: int = SIZE, normal_kind: str = "square",
                 novel_kind: str = "stripes"):
        g = torch.Generator().manual_seed(seed)
        kinds = [normal_kind] * normal + [novel_kind] * novel
        self.images = [toy_image(kind, g, size) for kind in kinds]
        self.labels = [0] * normal + [1] * novel
        self.image_ids = [f"toy/{i}" for i in range(len(kinds))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int):
        return self.images[item], self.labels[item], self.image_ids[item]


def stripes_vs_columns() -> tuple[ToyImages, ToyImages]:
    """(train, test): horizontal stripes are normal, vertical stripes novel (same pixel
    statistics, other structure); 32 normal train images, 16 + 16 test images."""
    kinds = dict(normal_kind="stripes", novel_kind="columns")
    return ToyImages(32, 0, seed=1, **kinds), ToyImages(16, 16, seed=2, **kinds)
