"""Fixtures for the MSAD and RDAD tests: tiny CNN settings and a toy normal/novel image set
(normal = one bright square on dark noise; novel = bright horizontal stripes, or full-range
noise: the texture change a random-weight encoder's features show best)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from methods.backbones import create_backbone

# ndbench's ResNet-10-style CNN (channels 32/64/128/256) with random weights at 32 px: layer1-3
# maps of 8x8, 4x4 and 2x2, a 256-d pooled feature.
TINY_CNN = "ndbench_resnet_embedded"
TINY_SIZE = 32
TINY_CONFIG = dict(backbone=TINY_CNN, weights="none", img_size=TINY_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)


def toy_image(kind: str, generator: torch.Generator, size: int = TINY_SIZE) -> torch.Tensor:
    """A [3, size, size] image normalised with mean/std 0.5: dark noise with a bright square
    (side 8-13 px), with bright stripes every 4th row, or uniform noise over the full range."""
    x = torch.rand(3, size, size, generator=generator) * 0.2
    if kind == "noise":
        x = torch.rand(3, size, size, generator=generator)
    elif kind == "square":
        side = int(torch.randint(8, 14, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        x[:, top:top + side, left:left + side] = 0.9
    elif kind == "stripes":
        phase = int(torch.randint(0, 4, (1,), generator=generator))
        x[:, phase::4] = 0.9
    return (x - 0.5) / 0.5


class ToyDataset(Dataset):
    """(image, label, id) items; label 0 = square (normal), 1 = `novel_kind` (novel)."""

    def __init__(self, normal: int, novel: int, seed: int, novel_kind: str = "stripes"):
        g = torch.Generator().manual_seed(seed)
        kinds = ["square"] * normal + [novel_kind] * novel
        self.images = [toy_image(kind, g) for kind in kinds]
        self.labels = [0] * normal + [1] * novel
        self.image_ids = [f"toy/{i}" for i in range(len(kinds))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int):
        return self.images[item], self.labels[item], self.image_ids[item]


def tiny_weights(path: Path, seed: int = 0) -> Path:
    """A random-weight TINY_CNN saved as a local weights file (a fixed 'pre-trained' model)."""
    torch.manual_seed(seed)
    model = create_backbone(TINY_CNN, weights="none", num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
