"""Damaged entries of the on-disk store: a `schema.json` or a shard that is not what the store
wrote is recomputed after one warning line, in the feature cache, the image store and a run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from defend_fixtures import TINY_VIT
from safetensors.torch import save_file
from small_splits import fresh_out
from torch.utils.data import DataLoader

from benchmark.cli import main
from datasets_builders.array_store import ArrayStore
from datasets_builders.counts import Counts
from datasets_builders.image_store import IMAGES_KIND, ImageStore, Normalise, ResizeDecode, StagedTransform
from datasets_builders.loading import ManifestDataset, load_split
from methods.backbones import create_backbone
from methods.features import FEATURES_KIND, FeatureCache, FrozenPart

N = 12


def images(splits_root: Path, store: ImageStore | None = None, counts: Counts | None = None) -> ManifestDataset:
    index, manifest = load_split(splits_root, "embedded/uni-class/3")
    transform = StagedTransform(ResizeDecode(32), Normalise((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    return ManifestDataset(index, manifest, "test", transform=transform, store=store, counts=counts).take(N)


def read_all(data: ManifestDataset) -> torch.Tensor:
    return torch.stack([data[i][0] for i in range(len(data))])


def features(store: ArrayStore, data: ManifestDataset, counts: Counts) -> torch.Tensor:
    table = FeatureCache(store, counts).get_or_compute(
        FrozenPart("sha256:abc", "mean", "fp32"), data, lambda x: {"m": x.mean(dim=(2, 3))},
        loader=lambda d: DataLoader(d, batch_size=5), dtype=torch.float32)
    return table.all()["m"]


def entry_file(store: ArrayStore, kind: str, name: str) -> Path:
    (path,) = (store.root / kind).rglob(name)
    return path


def replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


SCHEMA_DAMAGE: dict[str, Callable[[Path], None]] = {
    "json-list": lambda p: p.write_text("[1,2]\n"),
    "not-json": lambda p: p.write_text("{not json"),
    "empty": lambda p: p.write_text(""),
    "fields-not-a-list": lambda p: p.write_text('{"version": 1, "fields": "x", "rows_per_shard": 4}'),
    "field-name-a-number": lambda p: p.write_text('{"version": 1, "fields": [[1, "<f4", [3]]], "rows_per_shard": 4}'),
    "shape-of-strings": lambda p: p.write_text('{"version": 1, "fields": [["m", "<f4", ["3"]]], "rows_per_shard": 4}'),
    "field-not-a-list": lambda p: p.write_text('{"version": 1, "fields": [{"m": 3}], "rows_per_shard": 4}'),
    "rows-a-string": lambda p: p.write_text('{"version": 1, "fields": [["m", "<f4", [3]]], "rows_per_shard": "4"}'),
    "rows-zero": lambda p: p.write_text('{"version": 1, "fields": [["m", "<f4", [3]]], "rows_per_shard": 0}'),
    "unknown-dtype": lambda p: p.write_text('{"version": 1, "fields": [["m", "nonsense", [3]]], "rows_per_shard": 4}'),
    "object-dtype": lambda p: p.write_text('{"version": 1, "fields": [["m", "|O", [3]]], "rows_per_shard": 4}'),
    "a-folder": replace_with_folder,
}


def warnings_with(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


@pytest.mark.parametrize("damage", SCHEMA_DAMAGE.values(), ids=SCHEMA_DAMAGE.keys())
def test_a_damaged_feature_schema_is_recomputed_after_one_warning(splits_root, tmp_path, caplog, damage):
    store, data = ArrayStore(tmp_path / "store"), images(splits_root)
    expected = features(store, data, Counts())
    damage(entry_file(store, FEATURES_KIND, "schema.json"))
    counts = Counts()
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        assert torch.equal(features(store, data, counts), expected)
    assert counts.get("frozen_passes") == N
    assert len(warnings_with(caplog, "")) == 1 and warnings_with(caplog, "damaged schema.json")
    again = Counts()  # stored anew
    assert torch.equal(features(store, data, again), expected)
    assert (again.get("frozen_passes"), again.get("frozen_reads")) == (0, N)


@pytest.mark.parametrize("damage", [SCHEMA_DAMAGE["json-list"], SCHEMA_DAMAGE["field-name-a-number"],
                                    SCHEMA_DAMAGE["a-folder"]], ids=["json-list", "field-name-a-number", "a-folder"])
def test_a_damaged_image_schema_is_recomputed_after_one_warning(splits_root, tmp_path, caplog, damage):
    store = ImageStore(ArrayStore(tmp_path / "store"))
    plain = read_all(images(splits_root))
    read_all(images(splits_root, store))
    damage(entry_file(store.store, IMAGES_KIND, "schema.json"))
    counts = Counts()
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        assert torch.equal(read_all(images(splits_root, store, counts)), plain)
    assert counts.get("decodes") == N
    assert len(warnings_with(caplog, "")) == 1 and warnings_with(caplog, "damaged schema.json")
    again = Counts()
    assert torch.equal(read_all(images(splits_root, store, again)), plain) and again.get("decodes") == 0


@pytest.mark.parametrize("kind", [FEATURES_KIND, IMAGES_KIND])
def test_a_shard_replaced_by_a_folder_is_recomputed_after_one_warning(splits_root, tmp_path, caplog, kind):
    store = ArrayStore(tmp_path / "store")

    def compute(counts: Counts) -> torch.Tensor:
        data = images(splits_root, ImageStore(store), counts)
        return features(store, data, counts) if kind == FEATURES_KIND else read_all(data)

    expected = compute(Counts())
    replace_with_folder(entry_file(store, kind, "shard-00000.bin"))
    counts = Counts()
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        assert torch.equal(compute(counts), expected)
    assert counts.get("frozen_passes" if kind == FEATURES_KIND else "decodes") == N
    assert len(warnings_with(caplog, "")) == 1 and warnings_with(caplog, "size or header check")
    assert entry_file(store, kind, "shard-00000.bin").is_file()


@pytest.mark.parametrize("damage", ["schema", "shard"])
def test_a_run_over_a_damaged_feature_entry_recomputes_it(splits_root, tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(create_backbone(TINY_VIT, weights="none", num_classes=0).state_dict(), weights)
    out = fresh_out(splits_root, tmp_path)
    args = ["run", "--method", "knn", "--set", f"backbone={TINY_VIT}", "--set", "img_size=32", "--weights",
            str(weights), "--classes", "0", "--device", "cpu", "--out", str(out), "--force"]
    assert main(args) == 0
    scores = np.loadtxt(next(out.rglob("*.scores.csv")), delimiter=",", skiprows=1, usecols=2)
    store = ArrayStore(tmp_path / "cache" / "store")
    if damage == "schema":
        entry_file(store, FEATURES_KIND, "schema.json").write_text("[1,2]\n")
    else:
        replace_with_folder(entry_file(store, FEATURES_KIND, "shard-00000.bin"))
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        assert main(args) == 0
    assert len(warnings_with(caplog, "ndbench: cache")) == 1
    np.testing.assert_array_equal(np.loadtxt(next(out.rglob("*.scores.csv")), delimiter=",", skiprows=1,
                                             usecols=2), scores)
