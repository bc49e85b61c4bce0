"""`ndbench oracle` on damaged inputs: the scenes folder named in the splits' index gone
(absolute or relative), incomplete or holding a damaged image, and stray JSON files among the
split manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from small_splits import save_random_vit

import methods.embedded_archs  # noqa: F401 - registers the embedded ViT with timm
from benchmark.cli import main

VIT = "ndbench_vit_embedded"
CLASSES = (*(f"digit-{d}" for d in range(10)), "background")


@pytest.fixture(scope="module")
def random_vit(tmp_path_factory) -> Path:
    """Random ndbench ViT weights with a head over CLASSES recorded in the file's metadata."""
    return save_random_vit(tmp_path_factory.mktemp("vit") / "vit.safetensors", CLASSES)


def copy_splits(splits_root: Path, tmp_path: Path) -> Path:
    """A copy of the small embedded splits that a test may change."""
    shutil.copytree(splits_root / "embedded", tmp_path / "splits" / "embedded")
    return tmp_path / "splits"


def set_scenes_root(splits: Path, root: str) -> None:
    meta_path = splits / "embedded" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["root"] = root
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")


def oracle(splits: Path, weights: Path) -> int:
    return main(["oracle", "--splits", str(splits), "--weights", str(weights), "--device", "cpu"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ndbench: error: ")
    return err[0]


def test_a_missing_scenes_folder_is_one_line_naming_it_and_the_rebuild(random_vit, splits_root, tmp_path, capsys):
    splits = copy_splits(splits_root, tmp_path)
    gone = tmp_path / "cacheX" / "embedded-0123456789abcdef"
    set_scenes_root(splits, str(gone))
    assert oracle(splits, random_vit) == 2
    line = one_error_line(capsys)
    assert f"{gone} named in {splits / 'embedded' / 'index.json'} is missing" in line
    assert f"`ndbench build-splits embedded --out {splits}`" in line


def test_a_relative_scenes_folder_is_named_as_relative(random_vit, splits_root, tmp_path, capsys, monkeypatch):
    splits = copy_splits(splits_root, tmp_path)
    set_scenes_root(splits, "cacheX/embedded-0123456789abcdef")
    monkeypatch.chdir(tmp_path)  # another folder than the one the splits were built from
    assert oracle(splits, random_vit) == 2
    line = one_error_line(capsys)
    assert "cacheX/embedded-0123456789abcdef (a relative path, read from the current folder)" in line
    assert "build-splits embedded" in line


def test_an_incomplete_or_damaged_scenes_folder_is_one_line(random_vit, splits_root, tmp_path, capsys):
    splits = copy_splits(splits_root, tmp_path)
    scenes = Path(json.loads((splits / "embedded" / "index.json").read_text())["root"])
    copy = tmp_path / "scenes"
    shutil.copytree(scenes, copy)
    set_scenes_root(splits, str(copy))
    next((copy / "val").glob("*.png")).write_bytes(b"not a png")
    assert oracle(splits, random_vit) == 2
    line = one_error_line(capsys)
    assert f"cannot read the embedded scenes under {copy}" in line and f"delete {copy}, then run" in line
    (copy / "annotations" / "instances_val.json").unlink()
    assert oracle(splits, random_vit) == 2
    assert f"{copy} named in" in (line := one_error_line(capsys)) and "is incomplete" in line


def test_stray_json_files_among_the_splits_are_skipped_with_a_warning(random_vit, splits_root, tmp_path, capsys):
    splits = copy_splits(splits_root, tmp_path)
    for setting, name, copy in [("uni-class", "0", "0-copy"), ("multi-class", "except-0", "normal-1-3"),
                                ("multi-class", "except-0", "except-x")]:
        shutil.copy(splits / "embedded" / setting / f"{name}.json", splits / "embedded" / setting / f"{copy}.json")
    assert oracle(splits, random_vit) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("ndbench: warning: ") and "skipped" in w for w in warnings)
    assert {Path(w.split()[2]).name for w in warnings} == {"0-copy.json", "normal-1-3.json", "except-x.json"}
    rows = [line for line in captured.out.splitlines() if line.startswith(("| uni-class", "| multi-class"))]
    assert len(rows) == 4 and all(len(row.split("|")) == 2 + 2 + 10 + 1 for row in rows)


@pytest.mark.parametrize("given", ["results root", "embedded folder"])
def test_splits_given_as_the_results_root_or_the_embedded_folder_names_the_splits_root(
        random_vit, splits_root, tmp_path, capsys, given):
    splits = copy_splits(splits_root, tmp_path)  # tmp_path/splits/embedded, as <out>/splits/embedded
    wrong = tmp_path if given == "results root" else splits / "embedded"
    assert oracle(wrong, random_vit) == 2
    line = one_error_line(capsys)
    assert f"pass --splits {splits} " in line and "build-splits" not in line  # not a build in the wrong place
