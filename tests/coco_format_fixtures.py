"""A small COCO-format dataset as labs export their own data: two instances files, images in
sub-folders of one image folder, non-contiguous category ids and both files numbering their
images from 1.

Hand-counted content (category ids 2 "cat", 5 "dog", 9 "bird", 11 "fish"):
- train: images 1..12 in `images/train/<a|b>/`; cat in 1-6, dog in 4-9 (image 9's dog is a
  crowd annotation), bird in 10-11, image 12 has no annotation, fish only in image 3;
- test: images 1..8 in `images/test/`; cat in 1-3, dog in 3-5, bird in 6, fish in 7, image 8
  has no annotation.
So cat, dog and bird occur in train and test; fish is in one training image only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = {2: "cat", 5: "dog", 9: "bird", 11: "fish"}
# image id -> [(category id, iscrowd)]
TRAIN = {
    1: [(2, 0)], 2: [(2, 0)], 3: [(2, 0), (11, 0)], 4: [(2, 0), (5, 0)], 5: [(2, 0), (5, 0)],
    6: [(2, 0), (5, 0)], 7: [(5, 0)], 8: [(5, 0)], 9: [(5, 1)], 10: [(9, 0)], 11: [(9, 0)], 12: [],
}  # fmt: skip
TEST = {1: [(2, 0)], 2: [(2, 0)], 3: [(2, 0), (5, 0)], 4: [(5, 0)], 5: [(5, 0)], 6: [(9, 0)], 7: [(11, 0)], 8: []}
SIDE = 24


def instances(objects: dict[int, list[tuple[int, int]]], file_name, categories=CATEGORIES) -> dict:
    """A COCO instances dict; `file_name(image_id)` gives each image's path in its folder."""
    images, annotations = [], []
    for image_id, objs in objects.items():
        images.append({"id": image_id, "file_name": file_name(image_id), "width": SIDE, "height": SIDE})
        for category_id, iscrowd in objs:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "iscrowd": iscrowd, "bbox": [2.0, 2.0, 10.0, 10.0], "area": 100.0,
                "segmentation": [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]],
            })  # fmt: skip
    return {
        "info": {"description": "ndbench coco-format test data"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "animal"} for cid, name in categories.items()],
    }


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def write_coco_format(base: Path) -> dict[str, Path]:
    """Write the dataset under `base`: `train.json`, `test.json` and `images/`; returns the
    paths (keys train_annotations, test_annotations, images)."""
    base = Path(base)
    images = base / "images"

    def train_name(i: int) -> str:
        return f"train/{'a' if i % 2 else 'b'}/img_{i:03d}.jpg"

    def test_name(i: int) -> str:
        return f"test/img_{i:03d}.jpg"

    for i in TRAIN:
        _image(images / train_name(i), seed=i)
    for i in TEST:
        _image(images / test_name(i), seed=100 + i)
    paths = {"train_annotations": base / "train.json", "test_annotations": base / "test.json", "images": images}
    paths["train_annotations"].write_text(json.dumps(instances(TRAIN, train_name)), encoding="utf-8")
    paths["test_annotations"].write_text(json.dumps(instances(TEST, test_name)), encoding="utf-8")
    return paths
