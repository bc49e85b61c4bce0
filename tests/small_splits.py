"""A small embedded configuration shared by the runner, maps and bench tests."""

from __future__ import annotations

import json
from pathlib import Path

from datasets_builders.embedded import EmbeddedConfig

SMALL = EmbeddedConfig(n_train_scenes=400, n_test_scenes=300, n_pretrain_images=1500)


def fresh_out(splits: Path | tuple, tmp_path: Path) -> Path:
    """A results root sharing the small splits (records start empty)."""
    splits = splits[0] if isinstance(splits, tuple) else splits
    mine = tmp_path / "results"
    mine.mkdir(parents=True)
    (mine / "splits").symlink_to(splits, target_is_directory=True)
    return mine


def save_random_vit(path: Path, classes: tuple[str, ...], arch: str = "ndbench_vit_embedded") -> Path:
    """Random `arch` weights (seed 0) with a head over `classes`, recorded in the file's
    metadata as the pre-training records it; returns `path`."""
    import timm
    import torch
    from safetensors.torch import save_file

    import methods.embedded_archs  # noqa: F401 - registers the embedded ViT with timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=len(classes))
    save_file(model.state_dict(), str(path), metadata={"classes": json.dumps(classes)})
    return path
