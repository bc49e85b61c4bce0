"""Damaged inputs end as one line naming the file and the fix, exit code 2, no traceback:

1. a dataset index (index.json / index.csv) that is unreadable, malformed or inconsistent;
2. a file where a folder is expected and a folder where a file is expected.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from cli_checks import one_line_error
from coco_fixtures import write_coco_tree
from coco_format_fixtures import write_coco_format

from benchmark.cli import main
from datasets_builders.atomic import atomic_write_files
from datasets_builders.coco_format import CocoFormatSource, recipe_file
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, IndexRow


def tiny_index(folder: Path, dataset: str = "embedded") -> Path:
    """Write a four-image index with classes 0..2 into `folder`; returns the folder."""
    rows = [
        IndexRow("1", "train/1.png", "train", (0,)),
        IndexRow("2", "train/2.png", "train", (0, 1)),
        IndexRow("3", "val/3.png", "test", (2,)),
        IndexRow("4", "val/4.png", "test", ()),
    ]
    index = DatasetIndex(dataset, folder / "scenes", rows, {0: "zero", 1: "one", 2: "two"}, "0" * 64)
    index.write(folder)
    return folder


def edit_meta(change):
    """A damage that loads index.json, applies `change` to the dict and writes it back."""

    def damage(folder: Path) -> None:
        meta = json.loads((folder / "index.json").read_text())
        change(meta)
        (folder / "index.json").write_text(json.dumps(meta))

    return damage


def edit_csv_line(number: int, text: str):
    """A damage that replaces line `number` (1 = the header) of index.csv with `text`."""

    def damage(folder: Path) -> None:
        lines = (folder / "index.csv").read_text().splitlines()
        lines[number - 1] = text
        (folder / "index.csv").write_text("\n".join(lines) + "\n")

    return damage


def write(name: str, content: str | bytes):
    """A damage that replaces one index file with `content`."""

    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return damage


DAMAGES = {
    "json not json": ("index.json", write("index.json", "{bad"), "not readable JSON"),
    "json empty": ("index.json", write("index.json", ""), "not readable JSON"),
    "json a list": ("index.json", write("index.json", "[1, 2]"), "JSON object"),
    "json binary": ("index.json", write("index.json", b"\xff\xfe\x00"), "not readable JSON"),
    "json key missing": ("index.json", edit_meta(lambda m: m.pop("root")), "'root' is missing"),
    "json wrong type": ("index.json", edit_meta(lambda m: m.update(class_names=["a"])), "'class_names' is list"),
    "json bad class id": ("index.json", edit_meta(lambda m: m.update(class_names={"x": "a"})), "class_names entry"),
    "json no classes": ("index.json", edit_meta(lambda m: m.update(class_names={})), "class_names is empty"),
    "json bad storage": ("index.json", edit_meta(lambda m: m.update(storage="zip")), "storage kind"),
    "json other index": ("index.csv", edit_meta(lambda m: m.update(index_sha256="0" * 64)), "do not match"),
    "csv garbage": ("index.csv", write("index.csv", "garbage\n"), "header"),
    "csv empty": ("index.csv", write("index.csv", ""), "empty"),
    "csv binary": ("index.csv", write("index.csv", b"\xff\xfe\x00"), "not readable CSV"),
    "csv column missing": ("index.csv", edit_csv_line(1, "image_id,path,subset"), "header"),
    "csv short row": ("index.csv", edit_csv_line(3, "2,train/2.png,train"), "line 3 has 3 fields"),
    "csv class not int": ("index.csv", edit_csv_line(2, "1,train/1.png,train,x"), "class id 'x'"),
    "csv unknown class": ("index.csv", edit_csv_line(2, "1,train/1.png,train,7"), "class id '7'"),
    "csv class spelled otherwise": ("index.csv", edit_csv_line(2, "1,train/1.png,train,01"), "class id '01'"),
    "csv bad subset": ("index.csv", edit_csv_line(2, "1,train/1.png,val,0"), "subset 'val'"),
    "csv id twice": ("index.csv", edit_csv_line(3, "1,train/2.png,train,0 1"), "'1' appears twice"),
    "csv edited class": ("index.csv", edit_csv_line(2, "1,train/1.png,train,2"), "do not match"),
    "csv row dropped": ("index.csv", edit_csv_line(5, ""), "do not match"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_index_names_its_file_and_the_rebuild(tmp_path, case):
    folder = tiny_index(tmp_path / "splits" / "embedded")
    name, damage, needle = DAMAGES[case]
    damage(folder)
    with pytest.raises(NdbenchError) as info:
        DatasetIndex.read(folder)
    assert f"dataset index {folder / name} is damaged" in info.value.problem
    assert needle in info.value.problem
    assert info.value.fix == f"rebuild it with `ndbench build-splits embedded --out {tmp_path / 'splits'}`"


def test_an_intact_index_reads_back_equal(tmp_path):
    folder = tiny_index(tmp_path / "embedded")
    index = DatasetIndex.read(folder)
    assert [r.classes for r in index.rows] == [(0,), (0, 1), (2,), ()]
    assert index.class_names == {0: "zero", 1: "one", 2: "two"}


def test_a_damaged_custom_index_names_its_build_command(tmp_path):
    folder = tiny_index(tmp_path / "splits" / "mylab", dataset="mylab")
    source = CocoFormatSource("mylab", tmp_path / "train.json", tmp_path / "test.json")
    atomic_write_files(recipe_file(folder, source, min_train_images=0))
    (folder / "index.json").write_text("{bad")
    with pytest.raises(NdbenchError) as info:
        DatasetIndex.read(folder)
    assert "build-splits coco-format --name mylab" in info.value.fix
    assert f"--out {tmp_path / 'splits'}" in info.value.fix


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("index.json", "{bad", "not readable JSON"), ("index.csv", "garbage", "header")],
)
def test_run_on_a_damaged_index_is_one_line(splits_root, tmp_path, capsys, name, content, needle):
    out = tmp_path / "results"
    shutil.copytree(splits_root / "embedded", out / "splits" / "embedded")
    assert (out / "splits" / "embedded" / "source.json").is_file()  # its scenes' root: not named in the hint
    (out / "splits" / "embedded" / name).write_text(content)
    code = main(["run", "--method", "knn", "--classes", "0", "--out", str(out), "--dry-run"])
    one_line_error(code, capsys.readouterr().err, str(out / "splits" / "embedded" / name), needle,
                   f"ndbench build-splits embedded --out {out / 'splits'}")


# --- a file where a folder is expected, a folder where a file is expected -----------------
def coco_format_args(paths: dict[str, Path], out: Path, **override: Path) -> list[str]:
    """build-splits coco-format arguments for `paths`, with some options overridden."""
    options = {
        "train-annotations": paths["train_annotations"],
        "test-annotations": paths["test_annotations"],
        "train-images": paths["images"],
        "test-images": paths["images"],
    }
    options.update({key.replace("_", "-"): value for key, value in override.items()})
    args = ["build-splits", "coco-format", "--name", "mylab", "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return args


@pytest.mark.parametrize(
    ("option", "wrong", "needle"),
    [
        ("train_images", "a_file", "train image folder {path} is a file, not a folder"),
        ("test_images", "a_file", "test image folder {path} is a file, not a folder"),
        ("train_images", "nowhere", "train image folder {path} does not exist"),
        ("train_annotations", "a_folder", "train annotation file {path} is a folder, not a file"),
        ("test_annotations", "a_folder", "test annotation file {path} is a folder, not a file"),
        ("test_annotations", "nowhere", "test annotation file {path} does not exist"),
    ],
)
def test_coco_format_says_file_or_folder(tmp_path, capsys, option, wrong, needle):
    paths = write_coco_format(tmp_path / "export")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    path = (tmp_path / wrong).resolve()
    out = tmp_path / "splits"
    code = main(coco_format_args(paths, out, **{option: path}))
    line = one_line_error(code, capsys.readouterr().err, needle.format(path=path), f"--{option.replace('_', '-')}")
    assert "does not exist" not in line or wrong == "nowhere"
    assert not out.exists()


@pytest.mark.parametrize("dataset", ["voc", "coco", "cifar10", "embedded"])
def test_a_file_as_root_is_not_a_folder(tmp_path, capsys, dataset):
    (tmp_path / "a_file").write_text("x")
    code = main(["build-splits", dataset, "--root", str(tmp_path / "a_file"), "--out", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, f"{tmp_path / 'a_file'} is a file, not a folder", "--root")


def test_a_coco_image_folder_that_is_a_file(tmp_path, capsys):
    root = write_coco_tree(tmp_path)
    shutil.rmtree(root / "val2014")
    (root / "val2014").write_text("x")
    code = main(["build-splits", "coco", "--root", str(root), "--out", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, f"image folder {root / 'val2014'}", "is a file, not a folder")


@pytest.mark.parametrize("text", ["0", "7", "123456", "007", "٣٤", "train/10", "2008_000123", "a1b22", "", "x"])
def test_natural_keys_order_embedded_integers(text):
    from datasets_builders.index import natural_key

    parts = re.split(r"(\d+)", text)
    assert natural_key(text) == tuple(int(part) if part.isdigit() else part for part in parts)
    assert sorted(["train/10", "train/9", "train/100"], key=natural_key) == ["train/9", "train/10", "train/100"]
