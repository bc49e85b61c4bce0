"""The split rules hold on any annotation set: random COCO-like and VOC-like trees (0-6 objects
per image, random classes, crowd and difficult flags, VOC masks that disagree with the XML)
are written in the real formats, read by the builders and split; every split must follow the
rules of datasets_builders/splits.py, and the manifests' bytes must not depend on the order of
the entries in the input files."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from voc_fixtures import ALPHABETICAL, Obj, write_list, write_mask, xml_text

from datasets_builders.coco import build_coco_index
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex
from datasets_builders.splits import NORMAL, NOVEL, Manifest, all_vs_one_split, multi_class_split, uni_class_split
from datasets_builders.voc import build_voc_index, class_ids

# Deterministic examples (CI gives the same ones every time), no example database on disk.
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None)

Truth = dict[str, tuple[str, frozenset[int]]]  # image id -> (subset, classes it holds)


# --- the rules, stated independently of the builders --------------------------------------------
def check_split(build: Callable[[], Manifest], truth: Truth, setting: str, normal: set[int]) -> Manifest | None:
    """Build one split and check it against the rules; None when the rules say it cannot exist."""
    holders = {i for i, (subset, classes) in truth.items() if subset == "train" and classes & normal}
    test_labels = {i: NORMAL if classes & normal else NOVEL for i, (subset, classes) in truth.items()
                   if subset == "test"}
    impossible = not holders or NORMAL not in test_labels.values() or NOVEL not in test_labels.values()
    try:
        manifest = build()
    except NdbenchError:
        assert impossible, f"{setting} {sorted(normal)} refused although it has normal train, normal and novel test"
        return None
    assert not impossible, f"{setting} {sorted(normal)} built without normal train or both test labels"
    test_ids = [image_id for image_id, _ in manifest.test]
    assert not set(manifest.train) & set(test_ids)  # train and test are disjoint
    assert dict(manifest.test) == test_labels  # label 1 exactly when the image holds no normal class
    assert len(test_ids) == len(set(test_ids))
    assert set(manifest.train) == holders  # uni-class: the train images holding the class
    assert len(manifest.train) == len(set(manifest.train))  # multi-class: each image once
    assert manifest.setting == setting and set(manifest.normal_classes) == normal
    return manifest


def check_all_splits(index: DatasetIndex, truth: Truth, chosen_normal: set[int]) -> list[str]:
    """Every uni-class, all-vs-one and the chosen custom split; their manifest texts."""
    assert {row.image_id: (row.subset, frozenset(row.classes)) for row in index.rows} == truth
    texts = []
    for c in index.class_ids():
        others = set(index.class_ids()) - {c}
        for manifest in (
            check_split(lambda c=c: uni_class_split(index, c), truth, "uni-class", {c}),
            check_split(lambda c=c: all_vs_one_split(index, c), truth, "multi-class", others),
        ):
            texts.append(manifest.to_json() if manifest else "refused")
    if chosen_normal:
        manifest = check_split(lambda: multi_class_split(index, chosen_normal), truth, "multi-class", chosen_normal)
        texts.append(manifest.to_json() if manifest else "refused")
    return texts


# --- COCO ------------------------------------------------------------------------------------------
@st.composite
def coco_sets(draw):
    """Categories, images (train/val) with 0-6 annotations each (crowd or not), a normal set."""
    category_ids = draw(st.lists(st.integers(1, 90), min_size=2, max_size=5, unique=True))
    n_images = draw(st.integers(2, 14))
    image_ids = draw(st.lists(st.integers(1, 10**6), min_size=n_images, max_size=n_images, unique=True))
    images = []
    for image_id in image_ids:
        subset = draw(st.sampled_from(["train", "val"]))
        objects = draw(st.lists(st.tuples(st.sampled_from(category_ids), st.booleans()), max_size=6))
        images.append((image_id, subset, objects))
    normal = draw(st.sets(st.sampled_from(category_ids), max_size=len(category_ids)))
    return category_ids, images, normal


def write_coco(root: Path, category_ids, images, order: Callable[[list], list]) -> Path:
    """The tree in the real format, every list in the files written in `order`."""
    (root / "annotations").mkdir(parents=True)
    ann_id = 0
    for subset in ("train", "val"):
        entries, annotations = [], []
        for image_id, image_subset, objects in images:
            if image_subset != subset:
                continue
            file_name = f"COCO_{subset}2014_{image_id:012d}.jpg"
            entries.append({"id": image_id, "file_name": file_name, "height": 8, "width": 8})
            (root / f"{subset}2014").mkdir(exist_ok=True)
            (root / f"{subset}2014" / file_name).touch()  # the builder only checks presence
            for category_id, crowd in objects:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                    "iscrowd": int(crowd), "area": 4.0, "bbox": [1, 1, 2, 2],
                                    "segmentation": [[1, 1, 3, 1, 3, 3]]})
        (root / f"{subset}2014").mkdir(exist_ok=True)
        categories = [{"id": c, "name": f"class-{c}", "supercategory": "x"} for c in category_ids]
        data = {"images": order(entries), "annotations": order(annotations), "categories": order(categories)}
        (root / "annotations" / f"instances_{subset}2014.json").write_text(json.dumps(data))
    return root


@PROPERTY
@given(coco_sets(), st.randoms(use_true_random=False))
def test_coco_split_rules_hold_and_manifests_ignore_entry_order(coco, rng):
    category_ids, images, normal = coco
    truth = {str(image_id): ("train" if subset == "train" else "test", frozenset(c for c, _ in objects))
             for image_id, subset, objects in images}
    with tempfile.TemporaryDirectory() as folder:
        texts = []
        for name, order in (("given", list), ("shuffled", lambda items: rng.sample(items, len(items)))):
            index = build_coco_index(write_coco(Path(folder) / name, category_ids, images, order))
            texts.append(check_all_splits(index, truth, normal))
        assert texts[0] == texts[1]


# --- VOC -------------------------------------------------------------------------------------------
@st.composite
def voc_sets(draw):
    """Train and val images with 0-6 XML objects (difficult or not) of a few classes; train
    masks that may disagree with the XML; masks present or not; a normal set."""
    names = draw(st.lists(st.sampled_from(ALPHABETICAL), min_size=2, max_size=4, unique=True))
    objects = st.lists(st.builds(Obj, st.sampled_from(names), st.integers(0, 1)), max_size=6)
    n_train, n_val = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    train = {}
    for k in range(n_train):
        xml = draw(objects)
        agree = draw(st.booleans())
        mask = tuple(sorted({o.name for o in xml})) if agree else tuple(draw(st.sets(st.sampled_from(names))))
        train[f"2008_{k:06d}"] = (xml, mask)
    val = {f"2009_{k:06d}": draw(objects) for k in range(n_val)}
    with_masks = draw(st.booleans())
    ids = class_ids("paper")
    normal = draw(st.sets(st.sampled_from(sorted(ids[n] for n in names))))
    return train, val, with_masks, normal


def write_voc(base: Path, train, val, with_masks: bool, order: Callable[[list], list]) -> Path:
    """`<base>/VOCdevkit/VOC2012`; list lines, XML objects and mask blocks written in `order`."""
    folder = base / "VOCdevkit" / "VOC2012"
    (folder / "Annotations").mkdir(parents=True)
    (folder / "JPEGImages").mkdir()
    every = {**{i: xml for i, (xml, _) in train.items()}, **val}
    for image_id, xml in every.items():
        (folder / "Annotations" / f"{image_id}.xml").write_text(xml_text("VOC2012", image_id, tuple(order(list(xml)))))
        (folder / "JPEGImages" / f"{image_id}.jpg").touch()  # the builder only checks presence
    if with_masks:
        for image_id, (_, mask) in train.items():
            write_mask(folder / "SegmentationClassAug" / f"{image_id}.png", tuple(order(list(mask))))
    seg = folder / "ImageSets" / "Segmentation"
    write_list(seg / "trainaug.txt", order(list(train)))
    write_list(seg / "val.txt", order(list(val)))
    return base


@PROPERTY
@given(voc_sets(), st.randoms(use_true_random=False))
def test_voc_split_rules_hold_and_manifests_ignore_entry_order(voc, rng):
    train, val, with_masks, normal = voc
    ids = class_ids("paper")
    truth: Truth = {i: ("train", frozenset(ids[n] for n in (mask if with_masks else {o.name for o in xml})))
                    for i, (xml, mask) in train.items()}
    truth |= {i: ("test", frozenset(ids[o.name] for o in xml)) for i, xml in val.items()}  # difficult too
    with tempfile.TemporaryDirectory() as folder:
        texts = []
        for name, order in (("given", list), ("shuffled", lambda items: rng.sample(items, len(items)))):
            index = build_voc_index(write_voc(Path(folder) / name, train, val, with_masks, order), progress=False)
            texts.append(check_all_splits(index, truth, normal))
        assert texts[0] == texts[1]
