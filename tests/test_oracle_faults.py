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


# --- weights of another architecture than --arch -------------------------------------------------
def oracle_on(weights: Path, tmp_path: Path, *arch: str) -> int:
    """The oracle with `weights` (and `--arch`, when given) on an empty splits root: a weights
    check that passes ends at the missing index."""
    return main(["oracle", "--splits", str(tmp_path / "splits"), "--weights", str(weights), "--device", "cpu",
                 *(["--arch", arch[0]] if arch else [])])


def drop_tensor(path: Path, key: str) -> Path:
    """Rewrite the safetensors file at `path` without tensor `key` (metadata kept); returns it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if name != key}
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_cnn_weights_for_the_vit_are_one_line_naming_both(tmp_path, capsys):
    cnn = save_random_vit(tmp_path / "cnn.safetensors", CLASSES, arch="ndbench_resnet_embedded")
    assert oracle_on(cnn, tmp_path) == 2
    line = one_error_line(capsys)
    assert line == (f"ndbench: error: --weights {cnn} holds ndbench_resnet_embedded weights, not the "
                    "ndbench_vit_embedded weights --arch asks for (the oracle reads a ViT's patch tokens and "
                    "ndbench_resnet_embedded is not a ViT: pass --weights embedded for ndbench_vit_embedded's own)")
    # Named from what `ndbench pretrain` recorded beside it when its tensors tell nothing.
    drop_tensor(cnn, "conv1.weight")
    (tmp_path / "cnn.json").write_text(json.dumps({"arch": "ndbench_resnet_embedded", "heldout_accuracy": 0.5}))
    assert oracle_on(cnn, tmp_path) == 2
    assert "holds ndbench_resnet_embedded weights, not the ndbench_vit_embedded" in one_error_line(capsys)


def test_vit_weights_for_another_vit_name_the_arch_they_fit(random_vit, tmp_path, capsys):
    assert oracle_on(random_vit, tmp_path, "vit_tiny_patch16_224") == 2
    line = one_error_line(capsys)
    assert f"--weights {random_vit} holds ndbench_vit_embedded weights, not the vit_tiny_patch16_224" in line
    assert "pass --arch ndbench_vit_embedded to read them as what they are, or the file " \
           "`ndbench pretrain --arch vit_tiny_patch16_224` writes" in line
    # As hinted: the weights pass and the oracle goes on (to the missing splits here).
    assert oracle_on(random_vit, tmp_path, "ndbench_vit_embedded") == 2
    assert "no dataset index" in one_error_line(capsys)


def test_weights_of_no_known_architecture_say_they_do_not_fit(random_vit, tmp_path, capsys):
    partial = tmp_path / "partial.safetensors"
    partial.write_bytes(random_vit.read_bytes())
    drop_tensor(partial, "blocks.5.mlp.fc2.bias")
    assert oracle_on(partial, tmp_path) == 2
    line = one_error_line(capsys)
    assert f"--weights {partial} does not hold the ndbench_vit_embedded weights --arch asks for" in line
    assert "Traceback" not in line and "pass --weights embedded" in line
