"""COCO instances JSON (train + val) -> dataset index.

Rules (DESIGN.md "Dataset index"): class ids are the COCO category ids and names come from
the JSON. Every train image is a train row (classes = its annotations' category ids, crowd
annotations included, no area filter; an image without annotations has no classes). Every
val image is a test row; one without annotations has no classes, so it is novel in every
split. The image id is the integer COCO id written as a string.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

from pycocotools.coco import COCO

from .errors import NdbenchError
from .index import DatasetIndex, IndexRow, sha256_of_files

REQUIRED_KEYS = ("images", "annotations", "categories")


def build_coco_index(root: Path, *, year: str = "2014", dataset: str = "coco") -> DatasetIndex:
    """Read `annotations/instances_{train,val}<year>.json` and the images under
    `train<year>/` and `val<year>/` into a `DatasetIndex` (val images form the test subset)."""
    root = Path(root)
    year = str(year)
    ann_dir = root / "annotations"
    year_hint = _year_hint(year, dataset)
    if not ann_dir.is_dir():
        raise NdbenchError(
            f"{dataset}: no annotations folder at {ann_dir}",
            f"the {dataset} root must hold annotations/, train{year}/ and val{year}/; give it with "
            f"`ndbench build-splits {dataset} --root DIR`{year_hint}",
        )
    json_paths = {
        "train": ann_dir / f"instances_train{year}.json",
        "test": ann_dir / f"instances_val{year}.json",
    }
    for path in json_paths.values():
        if not path.is_file():
            raise NdbenchError(
                f"{dataset}: missing annotation file {path}",
                f"put the COCO instances JSON files there{year_hint}",
            )

    cocos = {subset: _load(path, dataset) for subset, path in json_paths.items()}
    class_names = _merge_categories(cocos, json_paths, dataset)

    rows: list[IndexRow] = []
    seen: dict[int, Path] = {}
    for subset, coco in cocos.items():
        json_path = json_paths[subset]
        folder = f"{'train' if subset == 'train' else 'val'}{year}"
        _check_annotations(coco, json_path, class_names, dataset)
        images = coco.dataset["images"]
        for image in images:
            image_id = image["id"]
            if image_id in seen:
                raise NdbenchError(
                    f"{dataset}: image id {image_id} is listed in both {seen[image_id]} and "
                    f"{json_path}",
                    "use the official COCO train/val annotation files, which never share an image",
                )
            seen[image_id] = json_path
            classes = tuple(sorted({ann["category_id"] for ann in coco.imgToAnns[image_id]}))
            rows.append(IndexRow(str(image_id), f"{folder}/{image['file_name']}", subset, classes))
        _check_files_exist(root, folder, [image["file_name"] for image in images], json_path, dataset)

    return DatasetIndex(
        dataset=dataset,
        root=root,
        rows=rows,
        class_names=class_names,
        source_sha256=sha256_of_files(json_paths.values()),
        storage="files",
    )


def _year_hint(year: str, dataset: str) -> str:
    if dataset != "coco":
        return ""
    return f"; this looked for the {year} release, pass --year 2014 or --year 2017 to match yours"


def _load(path: Path, dataset: str) -> COCO:
    """Parse one instances JSON with pycocotools, turning format problems into NdbenchError."""
    fix = "re-download or regenerate this file; it must be a COCO instances JSON"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NdbenchError(f"{dataset}: {path} is not valid JSON ({exc})", fix) from exc
    except AssertionError as exc:
        raise NdbenchError(f"{dataset}: {path} does not hold a JSON object", fix) from exc
    except (KeyError, TypeError) as exc:
        raise NdbenchError(f"{dataset}: {path} has a malformed entry ({exc!r})", fix) from exc
    for key in REQUIRED_KEYS:
        if not isinstance(coco.dataset.get(key), list):
            raise NdbenchError(f"{dataset}: {path} has no '{key}' list", fix)
    try:
        for image in coco.dataset["images"]:
            if not isinstance(image["id"], int) or isinstance(image["id"], bool):
                raise TypeError(f"image id {image['id']!r} is not an integer")
            if not isinstance(image["file_name"], str) or not image["file_name"]:
                raise TypeError(f"image {image['id']} has no file_name")
        for category in coco.dataset["categories"]:
            if not isinstance(category["id"], int) or not isinstance(category["name"], str):
                raise TypeError(f"category {category!r} needs an integer id and a name")
    except (KeyError, TypeError) as exc:
        raise NdbenchError(f"{dataset}: {path} has a malformed entry ({exc})", fix) from exc
    return coco


def _merge_categories(
    cocos: dict[str, COCO], json_paths: dict[str, Path], dataset: str
) -> dict[int, str]:
    """Union of both files' categories; the same id must carry the same name in both."""
    names: dict[int, str] = {}
    origin: dict[int, Path] = {}
    for subset, coco in cocos.items():
        for category in coco.dataset["categories"]:
            cid, name = category["id"], category["name"]
            if cid in names and names[cid] != name:
                raise NdbenchError(
                    f"{dataset}: category id {cid} is {names[cid]!r} in {origin[cid]} but "
                    f"{name!r} in {json_paths[subset]}",
                    "use train and val annotation files from the same COCO release",
                )
            names.setdefault(cid, name)
            origin.setdefault(cid, json_paths[subset])
    return names


def _check_annotations(
    coco: COCO, json_path: Path, class_names: dict[int, str], dataset: str
) -> None:
    """Every annotation names a known category and a listed image."""
    image_ids = {image["id"] for image in coco.dataset["images"]}
    for ann in coco.dataset["annotations"]:
        if ann.get("category_id") not in class_names:
            raise NdbenchError(
                f"{dataset}: annotation {ann.get('id')} in {json_path} has category id "
                f"{ann.get('category_id')!r}, which no 'categories' entry defines",
                "fix the file or use the official COCO annotations",
            )
        if ann["image_id"] not in image_ids:
            raise NdbenchError(
                f"{dataset}: annotation {ann.get('id')} in {json_path} refers to image id "
                f"{ann['image_id']!r}, which its 'images' list does not hold",
                "fix the file or use the official COCO annotations",
            )


def _check_files_exist(
    root: Path, folder: str, file_names: list[str], json_path: Path, dataset: str
) -> None:
    """Every image the JSON lists must be on disk under `root/folder`."""
    image_dir = root / folder
    if not image_dir.is_dir():
        raise NdbenchError(
            f"{dataset}: image folder {image_dir} (for {json_path.name}) does not exist",
            f"put the images of {json_path.name} there",
        )
    # One directory listing instead of a stat per image (COCO train holds ~83k files).
    present = set(os.listdir(image_dir))
    missing = [
        name
        for name in file_names
        if not (name in present if "/" not in name else (image_dir / name).is_file())
    ]
    if missing:
        raise NdbenchError(
            f"{dataset}: {len(missing)} image(s) listed in {json_path} are missing under "
            f"{image_dir}, the first is {missing[0]}",
            "download the complete image folder (or fix --root / --year)",
        )
