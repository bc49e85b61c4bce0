"""VOC builder: index rows, class orders, list/mask/XML precedence, split rules, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex
from datasets_builders.splits import NOVEL, all_vs_one_split, uni_class_split
from datasets_builders.voc import (
    ALPHABETICAL_CLASSES,
    PAPER_CLASSES,
    build_voc_index,
    class_ids,
    class_names,
)
from tests.voc_fixtures import voc_palette, write_list, write_mask, write_voc_tree


def rows_of(index: DatasetIndex) -> list[tuple[str, str, str, tuple[int, ...]]]:
    return [(r.image_id, r.path, r.subset, r.classes) for r in index.rows]


def expected_rows(spec: list[tuple[str, str, tuple[int, ...]]]):
    return [(i, f"JPEGImages/{i}.jpg", subset, classes) for i, subset, classes in spec]


# Hand-counted from tests/voc_fixtures.py (paper order: 0 aeroplane, 1 person, 3 dog,
# 6 bottle, 12 cow, 14 car, 15 cat, 17 bus, 19 sheep).
PAPER_2012 = expected_rows([
    ("2008_000001", "train", (1, 3)),
    ("2008_000002", "train", (15,)),  # the XML's difficult dog is not in the mask
    ("2008_000003", "train", (14, 17)),
    ("2008_000004", "train", ()),  # mask holds only 0/255
    ("2008_000005", "train", (1,)),
    ("2008_000006", "train", (0,)),
    ("2008_000010", "test", (3,)),
    ("2008_000011", "test", (1, 15)),  # difficult person counts
    ("2008_000012", "test", (14,)),  # only a difficult car; its mask is empty
    ("2008_000013", "test", (12, 19)),
    ("2008_000014", "test", (1,)),  # person parts (head, foot) are not objects
])  # fmt: skip
# Alphabetical: 0 aeroplane, 4 bottle, 5 bus, 6 car, 7 cat, 9 cow, 11 dog, 14 person, 16 sheep.
ALPHABETICAL_2012 = expected_rows([
    ("2008_000001", "train", (11, 14)),
    ("2008_000002", "train", (7,)),
    ("2008_000003", "train", (5, 6)),
    ("2008_000004", "train", ()),
    ("2008_000005", "train", (14,)),
    ("2008_000006", "train", (0,)),
    ("2008_000010", "test", (11,)),
    ("2008_000011", "test", (7, 14)),
    ("2008_000012", "test", (6,)),
    ("2008_000013", "test", (9, 16)),
    ("2008_000014", "test", (14,)),
])  # fmt: skip


@pytest.fixture
def voc2012(tmp_path: Path) -> Path:
    return write_voc_tree(tmp_path)


# --- class orders ------------------------------------------------------------------------


def test_class_orders():
    assert PAPER_CLASSES[:4] == ("aeroplane", "person", "tvmonitor", "dog")
    assert PAPER_CLASSES[14] == "car" and PAPER_CLASSES[19] == "sheep"
    assert sorted(PAPER_CLASSES) == list(ALPHABETICAL_CLASSES)
    assert len(set(PAPER_CLASSES)) == 20
    assert class_ids("paper")["pottedplant"] == 18
    assert class_ids("alphabetical")["pottedplant"] == 15
    assert class_ids("alphabetical")["tvmonitor"] == 19
    assert class_names("alphabetical") == ALPHABETICAL_CLASSES
    with pytest.raises(NdbenchError, match="unknown VOC class order 'size'"):
        class_ids("size")


# --- VOC2012 -----------------------------------------------------------------------------


def test_voc2012_rows_paper_order(voc2012: Path):
    index = build_voc_index(voc2012.parent.parent)
    assert index.dataset == "voc" and index.storage == "files"
    assert index.root == voc2012.resolve()
    assert rows_of(index) == PAPER_2012
    assert index.class_names[1] == "person" and index.class_names[19] == "sheep"
    assert "2008_000099" not in {r.image_id for r in index.rows}  # in no list


def test_voc2012_rows_alphabetical_order(voc2012: Path):
    index = build_voc_index(voc2012.parent.parent, class_order="alphabetical")
    assert rows_of(index) == ALPHABETICAL_2012
    assert index.class_names[1] == "bicycle" and index.class_names[19] == "tvmonitor"


def test_three_root_forms_give_the_same_index(voc2012: Path):
    by_base = build_voc_index(voc2012.parent.parent)
    by_devkit = build_voc_index(voc2012.parent)
    by_year = build_voc_index(voc2012)
    assert by_base.csv_text() == by_devkit.csv_text() == by_year.csv_text()
    assert by_base.root == by_devkit.root == by_year.root == voc2012.resolve()
    assert by_base.source_sha256 == by_year.source_sha256


def test_mask_wins_over_xml_and_xml_used_without_masks(tmp_path: Path):
    folder = write_voc_tree(tmp_path, masks=False)
    rows = {r.image_id: r.classes for r in build_voc_index(folder).subset("train")}
    # Without SegmentationClassAug the XML counts: 2008_000002's difficult dog (3) and
    # 2008_000004's bottle (6) appear.
    assert rows == {
        "2008_000001": (1, 3),
        "2008_000002": (3, 15),
        "2008_000003": (14, 17),
        "2008_000004": (6,),
        "2008_000005": (1,),
        "2008_000006": (0,),
    }


def test_mask_read_as_raw_palette_indices(voc2012: Path):
    # A different palette must not change the classes: the indices are what counts.
    mask_path = voc2012 / "SegmentationClassAug" / "2008_000001.png"
    with Image.open(mask_path) as image:
        indices = np.array(image)
    shuffled = Image.fromarray(indices)
    shuffled.putpalette(list(reversed(voc_palette())))
    shuffled.save(mask_path)
    assert build_voc_index(voc2012).row("2008_000001").classes == (1, 3)


def test_grayscale_masks_accepted(voc2012: Path):
    mask_path = voc2012 / "SegmentationClassAug" / "2008_000003.png"
    with Image.open(mask_path) as image:
        Image.fromarray(np.array(image), mode="L").save(mask_path)
    assert build_voc_index(voc2012).row("2008_000003").classes == (14, 17)


def test_train_txt_fallback(tmp_path: Path):
    folder = write_voc_tree(tmp_path, trainaug_name=None)
    assert rows_of(build_voc_index(folder)) == expected_rows([
        ("2008_000001", "train", (1, 3)),
        ("2008_000002", "train", (15,)),
        ("2008_000003", "train", (14, 17)),
        ("2008_000010", "test", (3,)),
        ("2008_000011", "test", (1, 15)),
        ("2008_000012", "test", (14,)),
        ("2008_000013", "test", (12, 19)),
        ("2008_000014", "test", (1,)),
    ])  # fmt: skip


def test_train_aug_list_name_and_deeplab_line_format(tmp_path: Path):
    folder = write_voc_tree(tmp_path, trainaug_name=None)
    (folder / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "/JPEGImages/2008_000005.jpg /SegmentationClassAug/2008_000005.png\n"
        "/JPEGImages/2008_000006.jpg /SegmentationClassAug/2008_000006.png\n",
        encoding="utf-8",
    )
    train = [(r.image_id, r.classes) for r in build_voc_index(folder).subset("train")]
    assert train == [("2008_000005", (1,)), ("2008_000006", (0,))]


def test_build_is_deterministic_and_sha_tracks_annotations(voc2012: Path):
    first, second = build_voc_index(voc2012), build_voc_index(voc2012)
    assert first.csv_text() == second.csv_text()
    assert first.source_sha256 == second.source_sha256
    assert len(first.source_sha256) == 64
    # Changing a test XML (not the classes) or a train mask changes the source sha.
    xml = voc2012 / "Annotations" / "2008_000010.xml"
    xml.write_text(xml.read_text().replace("Unspecified", "Left"))
    after_xml = build_voc_index(voc2012)
    assert after_xml.csv_text() == first.csv_text()
    assert after_xml.source_sha256 != first.source_sha256
    write_mask(voc2012 / "SegmentationClassAug" / "2008_000005.png", ("person", "person"))
    after_mask = build_voc_index(voc2012).source_sha256
    assert after_mask != after_xml.source_sha256
    # An unlisted image's files are not part of it.
    write_mask(voc2012 / "SegmentationClassAug" / "2008_000099.png", ("sofa",))
    assert build_voc_index(voc2012).source_sha256 == after_mask


def test_index_round_trip(voc2012: Path, tmp_path: Path):
    index = build_voc_index(voc2012)
    index.write(tmp_path / "out")
    again = DatasetIndex.read(tmp_path / "out")
    assert rows_of(again) == PAPER_2012
    assert again.source_sha256 == index.source_sha256


# --- through the split rules ---------------------------------------------------------------


def test_uni_class_splits(voc2012: Path):
    index = build_voc_index(voc2012)
    person = uni_class_split(index, 1)
    assert person.train == ["2008_000001", "2008_000005"]
    assert person.test == [
        ("2008_000010", 1),
        ("2008_000011", 0),
        ("2008_000012", 1),
        ("2008_000013", 1),
        ("2008_000014", 0),
    ]
    dog = uni_class_split(index, 3)
    assert dog.train == ["2008_000001"]  # not 2008_000002: its mask has no dog
    assert dog.test == [
        ("2008_000010", 0),
        ("2008_000011", 1),
        ("2008_000012", 1),
        ("2008_000013", 1),
        ("2008_000014", 1),
    ]
    assert dog.split_id == "voc/uni-class/3"


def test_all_vs_one_splits(voc2012: Path):
    index = build_voc_index(voc2012)
    no_person = all_vs_one_split(index, 1)
    # 2008_000005 holds only a person; 2008_000004 holds nothing.
    assert no_person.train == ["2008_000001", "2008_000002", "2008_000003", "2008_000006"]
    assert no_person.test == [
        ("2008_000010", 0),
        ("2008_000011", 0),
        ("2008_000012", 0),
        ("2008_000013", 0),
        ("2008_000014", 1),
    ]
    no_car = all_vs_one_split(index, 14)
    assert no_car.train == [
        "2008_000001",
        "2008_000002",
        "2008_000003",
        "2008_000005",
        "2008_000006",
    ]
    assert [image_id for image_id, label in no_car.test if label == NOVEL] == ["2008_000012"]
    assert no_car.split_id == "voc/multi-class/except-14"


def test_alphabetical_split_uses_alphabetical_ids(tmp_path: Path):
    index = build_voc_index(write_voc_tree(tmp_path), class_order="alphabetical")
    person = uni_class_split(index, 14)
    assert person.train == ["2008_000001", "2008_000005"]
    assert [label for _, label in person.test] == [1, 0, 1, 1, 0]


# --- VOC2007 -----------------------------------------------------------------------------


def test_voc2007_rows(tmp_path: Path):
    write_voc_tree(tmp_path, voc2007=True)
    paper = build_voc_index(tmp_path, year=2007)
    assert paper.root == (tmp_path / "VOCdevkit" / "VOC2007").resolve()
    assert rows_of(paper) == expected_rows([
        ("000005", "train", (4, 8)),  # chair, difficult diningtable
        ("000007", "train", (14,)),
        ("000009", "train", (1, 11)),  # horse, difficult person
        ("000001", "test", (1, 3)),
        ("000002", "test", (9,)),
    ])  # fmt: skip
    alphabetical = build_voc_index(tmp_path / "VOCdevkit", year=2007, class_order="alphabetical")
    assert rows_of(alphabetical) == expected_rows([
        ("000005", "train", (8, 10)),
        ("000007", "train", (6,)),
        ("000009", "train", (12, 14)),
        ("000001", "test", (11, 14)),
        ("000002", "test", (18,)),
    ])  # fmt: skip
    person = uni_class_split(paper, 1)
    assert person.train == ["000009"]
    assert person.test == [("000001", 0), ("000002", 1)]


# --- bad input ---------------------------------------------------------------------------


def raises(folder: Path, *words: str, **kwargs) -> str:
    with pytest.raises(NdbenchError) as info:
        build_voc_index(folder, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def test_missing_voc_folder(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(empty, "no VOC2012 folder", str(empty / "VOCdevkit" / "VOC2012"))


def test_missing_year_folder(voc2012: Path):
    raises(voc2012.parent.parent, "no VOC2007 folder", "found VOC2012", year=2007)
    raises(voc2012, "no VOC2007 folder", year=2007)


def test_unsupported_year_and_class_order(voc2012: Path):
    raises(voc2012, "unsupported VOC year 2010", year=2010)
    raises(voc2012, "unknown VOC class order 'size'", class_order="size")


def test_unknown_class_name(voc2012: Path):
    xml = voc2012 / "Annotations" / "2008_000013.xml"
    xml.write_text(xml.read_text().replace("<name>sheep</name>", "<name>lamb</name>"))
    raises(voc2012, str(xml), "'lamb'")


def test_malformed_xml(voc2012: Path):
    xml = voc2012 / "Annotations" / "2008_000011.xml"
    xml.write_text(xml.read_text().replace("</annotation>", ""))
    raises(voc2012, str(xml), "malformed XML")


def test_malformed_train_xml_without_masks(tmp_path: Path):
    folder = write_voc_tree(tmp_path, masks=False)
    xml = folder / "Annotations" / "2008_000004.xml"
    xml.write_text("<annotation><object><name>bottle</name></object>")
    raises(folder, str(xml), "malformed XML")


def test_missing_test_xml(voc2012: Path):
    xml = voc2012 / "Annotations" / "2008_000012.xml"
    xml.unlink()
    raises(voc2012, str(xml), "does not exist")
    xml.mkdir()
    raises(voc2012, str(xml), "is a folder, not a file")


def test_missing_val_list(voc2012: Path):
    val = voc2012 / "ImageSets" / "Segmentation" / "val.txt"
    val.unlink()
    raises(voc2012, str(val), "missing")


def test_missing_2007_test_list(tmp_path: Path):
    write_voc_tree(tmp_path, voc2007=True)
    test_list = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    test_list.unlink()
    raises(tmp_path, str(test_list), "is missing", "VOCtest_06-Nov-2007.tar", year=2007)


def test_missing_annotations_folder(voc2012: Path):
    shutil.rmtree(voc2012 / "Annotations")
    raises(voc2012, str(voc2012 / "Annotations"), "folder")


def test_missing_mask(voc2012: Path):
    mask = voc2012 / "SegmentationClassAug" / "2008_000006.png"
    mask.unlink()
    raises(voc2012, str(mask), "missing")


def test_rgb_mask_refused(voc2012: Path):
    mask = voc2012 / "SegmentationClassAug" / "2008_000001.png"
    with Image.open(mask) as image:
        image.convert("RGB").save(mask)
    raises(voc2012, str(mask), "mode RGB")


def test_mask_value_out_of_range(voc2012: Path):
    mask = voc2012 / "SegmentationClassAug" / "2008_000003.png"
    write_mask(mask, ("car",), extra_values=(21,))
    raises(voc2012, str(mask), "[21]")


def test_corrupt_mask(voc2012: Path):
    mask = voc2012 / "SegmentationClassAug" / "2008_000002.png"
    mask.write_bytes(b"not a png")
    raises(voc2012, str(mask), "cannot read")


def test_missing_image(voc2012: Path):
    image = voc2012 / "JPEGImages" / "2008_000014.jpg"
    image.unlink()
    raises(voc2012, str(image), "missing")


def test_image_in_train_and_test(voc2012: Path):
    write_list(
        voc2012 / "ImageSets" / "Segmentation" / "trainaug.txt",
        ["2008_000001", "2008_000002", "2008_000013"],
    )
    raises(voc2012, "'2008_000013'", "trainaug.txt", "val.txt")


def test_duplicate_and_empty_lists(voc2012: Path):
    trainaug = voc2012 / "ImageSets" / "Segmentation" / "trainaug.txt"
    write_list(trainaug, ["2008_000001", "2008_000001"])
    raises(voc2012, str(trainaug), "twice")
    trainaug.write_text("\n")
    raises(voc2012, str(trainaug), "empty")


def test_a_list_saved_with_a_byte_order_mark_reads_as_without(voc2012: Path):
    val = voc2012 / "ImageSets" / "Segmentation" / "val.txt"
    plain = rows_of(build_voc_index(voc2012.parent.parent))
    val.write_bytes(b"\xef\xbb\xbf" + val.read_bytes())  # a Windows editor's UTF-8 BOM
    assert rows_of(build_voc_index(voc2012.parent.parent)) == plain


def test_annotations_saved_with_a_byte_order_mark_read_as_without(voc2012: Path):
    plain = rows_of(build_voc_index(voc2012.parent.parent))
    xmls = sorted((voc2012 / "Annotations").glob("*.xml"))
    assert xmls
    for xml in xmls:
        xml.write_bytes(b"\xef\xbb\xbf" + xml.read_bytes())
    assert rows_of(build_voc_index(voc2012.parent.parent)) == plain


def test_a_web_page_saved_as_a_list_is_named_as_such(voc2012: Path):
    trainaug = voc2012 / "ImageSets" / "Segmentation" / "trainaug.txt"
    trainaug.write_text("\n<!DOCTYPE html>\n<html><head><meta charset='utf-8'></head></html>\n")
    message = raises(voc2012, str(trainaug), "HTML or XML page, not a list of image ids")
    assert "twice" not in message


def test_a_zero_filled_list_is_named_as_no_text(voc2012: Path):
    val = voc2012 / "ImageSets" / "Segmentation" / "val.txt"
    val.write_bytes(bytes(2048))
    message = raises(voc2012, str(val), "not a text file", "NUL")
    assert "\x00" not in message


# --- run on a VOC built from its own --root ------------------------------------------------

TINY_KNN = ["--set", "backbone=ndbench_vit_embedded", "--set", "img_size=64", "--weights", "none", "--device", "cpu"]


def test_run_forms_missing_splits_from_the_built_index_not_the_default_root(tmp_path: Path, monkeypatch, capsys):
    from benchmark.cli import main
    from benchmark.records import load_records
    from datasets_builders.splits import protocol_classes, protocol_splits

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NDBENCH_DATA", raising=False)
    write_voc_tree(tmp_path / "mine")
    out = Path("res")
    dog = class_ids()["dog"]
    build = ["build-splits", "voc", "--root", "mine", "--out", str(out / "splits")]
    assert main([*build, "--setting", "uni-class", "--classes", str(dog)]) == 0
    index_json = (out / "splits" / "voc" / "index.json").read_bytes()
    # Another VOC tree at the default root data/voc: one more aeroplane in the test images.
    other = write_voc_tree(tmp_path / "data" / "voc")
    xml = other / "Annotations" / "2008_000010.xml"
    xml.write_text(xml.read_text().replace(
        "</annotation>", "<object><name>aeroplane</name><difficult>0</difficult><bndbox><xmin>1</xmin>"
        "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>"))
    capsys.readouterr()
    run = ["run", "--dataset", "voc", "--method", "knn", "--out", str(out), *TINY_KNN]
    assert main(run) == 0, capsys.readouterr().err
    assert (out / "splits" / "voc" / "index.json").read_bytes() == index_json
    index = DatasetIndex.read(out / "splits" / "voc")
    assert sorted(int(r.split) for r in load_records(out)) == protocol_classes(index)
    assert main([*run, "--classes", str(dog)]) == 0 and "0 jobs ran, 1 skipped" in capsys.readouterr().err
    # Without any tree at the default root, the missing splits are formed all the same.
    shutil.rmtree(tmp_path / "data")
    assert main([*run, "--setting", "multi-class"]) == 0, capsys.readouterr().err
    formed = protocol_splits(index, ["multi-class"])[0]  # except-15 (person) has no novel test image
    assert sorted(r.split for r in load_records(out) if r.setting == "multi-class") == sorted(
        m.name for m in formed) != []
    assert (out / "splits" / "voc" / "index.json").read_bytes() == index_json
