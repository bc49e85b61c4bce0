"""A small embedded configuration shared by the runner, maps and bench tests."""

from __future__ import annotations

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
