"""COCO builder: index rows, split membership, 2017 layout and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets_builders.coco import build_coco_index
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, sha256_of_files
from datasets_builders.splits import all_vs_one_split, paper_protocol, uni_class_split
from tests.coco_fixtures import EXPECTED_TEST, EXPECTED_TRAIN, write_coco_tree


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return write_coco_tree(tmp_path)


def _ann(root: Path, split: str, year: str = "2014") -> Path:
    return root / "annotations" / f"instances_{split}{year}.json"


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_index_rows_match_hand_counts(coco_root: Path) -> None:
    index = build_coco_index(coco_root)
    assert index.dataset == "coco"
    assert index.storage == "files"
    assert index.class_names == {1: "person", 3: "car", 90: "toothbrush"}
    assert [(r.image_id, r.classes) for r in index.subset("train")] == list(EXPECTED_TRAIN.items())
    assert [(r.image_id, r.classes) for r in index.subset("test")] == list(EXPECTED_TEST.items())
    assert index.row("25").path == "train2014/COCO_train2014_000000000025.jpg"
    assert index.row("74").path == "val2014/COCO_val2014_000000000074.jpg"
    assert index.source_sha256 == sha256_of_files([_ann(coco_root, "train"), _ann(coco_root, "val")])


def test_crowd_annotations_count(coco_root: Path) -> None:
    index = build_coco_index(coco_root)
    assert index.row("30").classes == (90,)  # only a crowd toothbrush
    assert index.row("139").classes == (1,)  # only a crowd person
    assert index.row("25").classes == (1, 3)  # car is crowd


def test_index_round_trips_through_disk(coco_root: Path, tmp_path: Path) -> None:
    index = build_coco_index(coco_root)
    index.write(tmp_path / "out")
    again = DatasetIndex.read(tmp_path / "out")
    assert again.rows == index.rows
    assert again.class_names == index.class_names


def test_uni_class_splits(coco_root: Path) -> None:
    index = build_coco_index(coco_root)
    car = uni_class_split(index, 3)
    assert car.train == ["25"]
    assert car.test == [("42", 0), ("73", 1), ("74", 1), ("139", 1)]
    brush = uni_class_split(index, 90)
    assert brush.train == ["30"]
    assert brush.test == [("42", 1), ("73", 0), ("74", 1), ("139", 1)]


def test_all_vs_one_split(coco_root: Path) -> None:
    index = build_coco_index(coco_root)
    manifest = all_vs_one_split(index, 3)
    assert manifest.split_id == "coco/multi-class/except-3"
    assert manifest.normal_classes == [1, 90]
    assert manifest.train == ["9", "25", "30"]  # 71 has no annotation: never a normal image
    assert manifest.test == [("42", 1), ("73", 0), ("74", 1), ("139", 0)]


def test_empty_image_novel_in_every_split(coco_root: Path) -> None:
    index = build_coco_index(coco_root)
    manifests = paper_protocol(index)
    assert len(manifests) == 6  # 3 uni-class + 3 all-vs-one
    for manifest in manifests:
        assert dict(manifest.test)["74"] == 1
        assert "71" not in manifest.train


def test_2017_layout(tmp_path: Path) -> None:
    root = write_coco_tree(tmp_path, year="2017")
    index = build_coco_index(root, year="2017")
    assert index.row("42").path == "val2017/000000000042.jpg"
    assert index.row("9").path == "train2017/000000000009.jpg"
    assert [(r.image_id, r.classes) for r in index.subset("train")] == list(EXPECTED_TRAIN.items())
    assert [(r.image_id, r.classes) for r in index.subset("test")] == list(EXPECTED_TEST.items())


def test_wrong_year_names_expected_file_and_year_option(tmp_path: Path) -> None:
    root = write_coco_tree(tmp_path, year="2017")
    with pytest.raises(NdbenchError) as info:
        build_coco_index(root, year="2014")
    assert "instances_train2014.json" in str(info.value)
    assert "--year" in str(info.value)


def test_missing_annotations_folder(tmp_path: Path) -> None:
    (tmp_path / "coco").mkdir()
    with pytest.raises(NdbenchError) as info:
        build_coco_index(tmp_path / "coco")
    assert str(tmp_path / "coco" / "annotations") in str(info.value)
    assert "--year" in str(info.value)


def test_missing_val_file(coco_root: Path) -> None:
    _ann(coco_root, "val").unlink()
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(_ann(coco_root, "val")) in str(info.value)


def test_malformed_json(coco_root: Path) -> None:
    path = _ann(coco_root, "train")
    path.write_text(path.read_text()[:-20])
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(path) in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_json_not_an_object(coco_root: Path) -> None:
    path = _ann(coco_root, "val")
    path.write_text("[1, 2]")
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_missing_key(coco_root: Path, key: str) -> None:
    path = _ann(coco_root, "val")
    _edit(path, lambda data: data.pop(key))
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(path) in str(info.value)
    assert f"'{key}'" in str(info.value)


def test_unknown_category_id(coco_root: Path) -> None:
    path = _ann(coco_root, "train")
    _edit(path, lambda data: data["annotations"][0].update(category_id=5))
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(path) in str(info.value)
    assert "category id 5" in str(info.value)


def test_conflicting_category_names(coco_root: Path) -> None:
    path = _ann(coco_root, "val")
    _edit(path, lambda data: data["categories"][1].update(name="truck"))
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(path) in str(info.value)
    assert "'car'" in str(info.value) and "'truck'" in str(info.value)


def test_missing_images_on_disk(coco_root: Path) -> None:
    (coco_root / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    (coco_root / "val2014" / "COCO_val2014_000000000139.jpg").unlink()
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    message = str(info.value)
    assert str(_ann(coco_root, "val")) in message
    assert "2 image(s)" in message
    assert "COCO_val2014_000000000073.jpg" in message


def test_missing_image_folder(coco_root: Path) -> None:
    for path in (coco_root / "train2014").iterdir():
        path.unlink()
    (coco_root / "train2014").rmdir()
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    assert str(coco_root / "train2014") in str(info.value)


def test_image_in_both_train_and_val(coco_root: Path) -> None:
    def add_image(data: dict) -> None:
        data["images"].append(dict(data["images"][0], id=9))

    _edit(_ann(coco_root, "val"), add_image)
    with pytest.raises(NdbenchError) as info:
        build_coco_index(coco_root)
    message = str(info.value)
    assert "image id 9" in message
    assert str(_ann(coco_root, "train")) in message and str(_ann(coco_root, "val")) in message
