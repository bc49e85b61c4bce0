"""Fixtures for the Transformaly tests: a tiny depth-4 timm ViT registered by name (so two
blocks, 2 and 3, are scored) and a toy normal/novel image set (normal = a bright square,
novel = bright horizontal stripes)."""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

DEPTH4_VIT = "ndbench_test_vit_depth4"
DEPTH4_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)

default_cfgs = generate_default_cfgs(
    {DEPTH4_VIT: {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "num_classes": 0,
                  "url": "", "hf_hub_id": ""}}
)


@register_model
def ndbench_test_vit_depth4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """32 px, patch 8 (4x4 patches + CLS = 17 tokens), width 32, depth 4, 2 heads: tests only."""
    return build_model_with_cfg(VisionTransformer, DEPTH4_VIT, False, **{**DEPTH4_KWARGS, **kwargs})


# Detector options for the tiny ViT (random weights, no dropout so steps are deterministic).
TINY = dict(backbone=DEPTH4_VIT, weights="none", img_size=32, batch_size=16, student_dropout=0.0)


def toy_image(kind: str, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """A normalised [3, size, size] image: dark noise with a bright square or bright stripes."""
    x = torch.rand(3, size, size, generator=generator) * 0.2
    if kind == "square":
        side = int(torch.randint(8, 14, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        x[:, top:top + side, left:left + side] = 0.9
    else:
        phase = int(torch.randint(0, 4, (1,), generator=generator))
        x[:, phase::4] = 0.9
    return (x - 0.5) / 0.5


class ToyDataset(Dataset):
    """(image, label, id) items; label 0 = square (normal), 1 = stripes (novel)."""

    def __init__(self, normal: int, novel: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        kinds = ["square"] * normal + ["stripes"] * novel
        self.images = [toy_image(kind, g) for kind in kinds]
        self.labels = [0] * normal + [1] * novel
        self.image_ids = [f"toy/{i}" for i in range(len(kinds))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int):
        return self.images[item], self.labels[item], self.image_ids[item]
