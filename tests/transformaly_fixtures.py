"""Fixtures for the Transformaly tests: a tiny depth-4 timm ViT registered by name (so two
blocks, 2 and 3, are scored); the toy normal/novel set is DEFEND's (`defend_fixtures`)."""

from __future__ import annotations

from defend_fixtures import ToyDataset  # noqa: F401  (re-exported for the Transformaly tests)
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer

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
