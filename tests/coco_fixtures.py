"""A tiny COCO tree in the real format: instances JSON files plus JPEG images.

Hand-counted content (category ids are non-contiguous, as in COCO: 1 person, 3 car, 90
toothbrush):

train  9: person x2                    -> classes (1,)
train 25: person, car (crowd)          -> (1, 3)
train 30: toothbrush (crowd only)      -> (90,)
train 71: no annotation                -> ()
val   42: car                          -> (3,)
val   73: person, toothbrush           -> (1, 90)
val   74: no annotation                -> ()   novel in every split
val  139: person (crowd only)          -> (1,)
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "indoor", "id": 90, "name": "toothbrush"},
]
# image id -> list of (category id, iscrowd)
TRAIN_OBJECTS: dict[int, list[tuple[int, int]]] = {
    9: [(1, 0), (1, 0)],
    25: [(1, 0), (3, 1)],
    30: [(90, 1)],
    71: [],
}
VAL_OBJECTS: dict[int, list[tuple[int, int]]] = {
    42: [(3, 0)],
    73: [(1, 0), (90, 0)],
    74: [],
    139: [(1, 1)],
}
EXPECTED_TRAIN = {"9": (1,), "25": (1, 3), "30": (90,), "71": ()}
EXPECTED_TEST = {"42": (3,), "73": (1, 90), "74": (), "139": (1,)}


def coco_file_name(split: str, year: str, image_id: int) -> str:
    """The file name COCO uses: `COCO_val2014_000000000042.jpg` (2014), `000000000042.jpg` (2017)."""
    if year == "2014":
        return f"COCO_{split}{year}_{image_id:012d}.jpg"
    return f"{image_id:012d}.jpg"


def _instances(split: str, year: str, objects: dict[int, list[tuple[int, int]]], first_ann_id: int):
    images, annotations = [], []
    ann_id = first_ann_id
    for image_id, objs in objects.items():
        images.append(
            {
                "license": 1,
                "file_name": coco_file_name(split, year, image_id),
                "coco_url": f"http://images.cocodataset.org/{split}{year}/x.jpg",
                "height": 16,
                "width": 20,
                "date_captured": "2013-11-14 16:28:13",
                "id": image_id,
            }
        )
        for category_id, iscrowd in objs:
            if iscrowd:
                segmentation: object = {"counts": [0, 12, 4, 12, 292], "size": [16, 20]}
            else:
                segmentation = [[2.0, 2.0, 10.0, 2.0, 10.0, 9.0, 2.0, 9.0]]
            annotations.append(
                {
                    "segmentation": segmentation,
                    "area": 56.0,
                    "iscrowd": iscrowd,
                    "image_id": image_id,
                    "bbox": [2.0, 2.0, 8.0, 7.0],
                    "category_id": category_id,
                    "id": ann_id,
                }
            )
            ann_id += 1
    return {
        "info": {"description": "ndbench test fixture", "year": int(year)},
        "licenses": [{"url": "http://creativecommons.org/", "id": 1, "name": "CC"}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }


def write_coco_tree(base: Path, year: str = "2014") -> Path:
    """Write the tiny COCO tree under `base/coco` and return that root."""
    root = Path(base) / "coco"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, objects, first_ann_id in (
        ("train", TRAIN_OBJECTS, 1000),
        ("val", VAL_OBJECTS, 2000),
    ):
        data = _instances(split, year, objects, first_ann_id)
        (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
        image_dir = root / f"{split}{year}"
        image_dir.mkdir(exist_ok=True)
        for image in data["images"]:
            Image.new("RGB", (20, 16), (image["id"] % 256, 90, 40)).save(
                image_dir / image["file_name"], format="JPEG"
            )
    return root
