"""COCO instances JSON (train + val) -> dataset index.

Rules (docs/ARCHITECTURE.md, "Datasets and splits"): class ids are the COCO category ids and names come from
the JSON. Every train image is a train row (classes = its annotations' category ids, crowd
annotations included, no area filter; an image without annotations has no classes). Every
val image is a test row; one without annotations has no classes, so it is novel in every
split. The image id is the integer COCO id written as a string.

`index_from_instances` applies these rules to any pair of instances files and image folders;
`build_coco_index` points it at the official layout, `coco_format` at a user's own export.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pycocotools.coco import COCO

from .errors import NdbenchError, not_a_folder
from .index import DatasetIndex, IndexRow, sha256_of_files

REQUIRED_KEYS = ("images", "annotations", "categories")
# An instances file from this size up gets a line before it is read: COCO's train file (~330 MB)
# takes tens of seconds to parse and check, which would otherwise pass in silence.
ANNOUNCED_BYTES = 50_000_000


@dataclass(frozen=True)
class CocoSubset:
    """One instances file and where its images are.

    `images` is the folder each `file_name` is relative to; `folder` is that folder written
    relative to the index root, the prefix of every row path."""

    annotations: Path
    images: Path
    folder: str


def build_coco_index(root: Path, *, year: str = "2014", dataset: str = "coco", console=None) -> DatasetIndex:
    """Read `annotations/instances_{train,val}<year>.json` and the images under
    `train<year>/` and `val<year>/` into a `DatasetIndex` (val images form the test subset);
    a large file is announced on `console` (a rich Console) before it is read."""
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
    subsets = {
        subset: CocoSubset(ann_dir / f"instances_{split}{year}.json", root / f"{split}{year}", f"{split}{year}")
        for subset, split in (("train", "train"), ("test", "val"))
    }
    for part in subsets.values():
        if not part.annotations.is_file():
            raise NdbenchError(
                f"{dataset}: missing annotation file {part.annotations}",
                f"put the COCO instances JSON files there{year_hint}",
            )
    return index_from_instances(subsets, root=root, dataset=dataset, console=console)


def index_from_instances(
    subsets: dict[str, CocoSubset],
    *,
    root: Path,
    dataset: str,
    image_id: Callable[[str, int], str] | None = None,
    console=None,
) -> DatasetIndex:
    """The index of a train and a test instances file (keys "train" and "test" of `subsets`).

    `image_id(subset, coco_id)` names each row; by default the COCO id itself, which then
    must not occur in both files (the official files never share an image). Each file of
    `ANNOUNCED_BYTES` or more is announced on `console` (a rich Console) before it is read."""
    cocos: dict[str, COCO] = {}
    for subset, part in subsets.items():
        _announce(part.annotations, dataset, console)
        cocos[subset] = _load(part.annotations, dataset)
        _check_file_names(cocos[subset], part, subset, dataset)
    json_paths = {subset: part.annotations for subset, part in subsets.items()}
    class_names = _merge_categories(cocos, json_paths, dataset)

    rows: list[IndexRow] = []
    seen: dict[int, Path] = {}
    for subset, coco in cocos.items():
        part = subsets[subset]
        _check_annotations(coco, part.annotations, class_names, dataset)
        images = coco.dataset["images"]
        for image in images:
            coco_id = image["id"]
            if image_id is None:
                if coco_id in seen:
                    raise NdbenchError(
                        f"{dataset}: image id {coco_id} is listed in both {seen[coco_id]} and "
                        f"{part.annotations}",
                        "use the official COCO train/val annotation files, which never share an image",
                    )
                seen[coco_id] = part.annotations
            name = str(coco_id) if image_id is None else image_id(subset, coco_id)
            classes = tuple(sorted({ann["category_id"] for ann in coco.imgToAnns[coco_id]}))
            path = PurePosixPath(part.folder, image["file_name"]).as_posix()
            rows.append(IndexRow(name, path, subset, classes))
        _check_files_exist(part.images, [image["file_name"] for image in images], part.annotations, dataset)

    return DatasetIndex(
        dataset=dataset,
        root=root,
        rows=rows,
        class_names=class_names,
        source_sha256=sha256_of_files(json_paths.values()),
        storage="files",
    )


def _announce(path: Path, dataset: str, console) -> None:
    """One line on `console` before a large instances file is read (nothing for a small one)."""
    try:
        size = path.stat().st_size
    except OSError:  # _load names the problem
        return
    if console is not None and size >= ANNOUNCED_BYTES:
        console.print(f"{dataset}: reading {path} ({size / 1e6:.0f} MB) and checking its images",
                      soft_wrap=True, markup=False, highlight=False)


def _year_hint(year: str, dataset: str) -> str:
    if dataset != "coco":
        return ""
    return f"; this looked for the {year} release, pass --year 2014 or --year 2017 to match yours"


def _load(path: Path, dataset: str) -> COCO:
    """Parse one instances JSON (UTF-8, with or without a byte-order mark) into a pycocotools
    `COCO`, turning format problems into NdbenchError."""
    fix = "re-download or regenerate this file; it must be a COCO instances JSON"
    if dataset == "embedded":  # ndbench generated it: the whole scene folder is made again
        fix = f"delete {path.parent.parent} and run the same command again to regenerate the embedded scenes"
    try:
        # Not COCO(path): it opens the file in the locale's encoding and refuses a BOM, which
        # Windows tools and some exporters write.
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        with path.open("rb") as handle:
            start = handle.read(2)
        if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # e.g. Notepad's "Unicode"
            raise NdbenchError(f"{dataset}: {path} is saved as UTF-16", "save it as UTF-8, as JSON must be") from exc
        raise NdbenchError(f"{dataset}: {path} is not valid JSON ({exc})", fix) from exc
    except json.JSONDecodeError as exc:
        raise NdbenchError(f"{dataset}: {path} is not valid JSON ({exc})", fix) from exc
    if not isinstance(data, dict):
        raise NdbenchError(f"{dataset}: {path} does not hold a JSON object", fix)
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
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
    _check_ids_and_categories(coco, path, dataset)
    return coco


def _check_ids_and_categories(coco: COCO, path: Path, dataset: str) -> None:
    """What exports get wrong: an id listed twice, no categories, a negative category id, a
    blank category name, two categories with one name. Category names lose surrounding
    whitespace here ("cat " is "cat")."""
    if not coco.dataset["categories"]:
        raise NdbenchError(
            f"{dataset}: {path} has an empty 'categories' list",
            "export the file with its categories (each an id and a name)",
        )
    for category in coco.dataset["categories"]:
        if category["id"] < 0:  # class ids name splits and table rows; averages skip other rows
            raise NdbenchError(
                f"{dataset}: category {category['name']!r} in {path} has the negative id {category['id']}",
                "renumber the categories with ids 0 or above (the same in both files)",
            )
    for key, what in (("images", "image"), ("categories", "category")):
        seen: set[int] = set()
        for entry in coco.dataset[key]:
            if entry["id"] in seen:
                raise NdbenchError(
                    f"{dataset}: {path} lists {what} id {entry['id']} twice",
                    f"give every entry of '{key}' its own id",
                )
            seen.add(entry["id"])
    named: dict[str, tuple[int, str]] = {}  # name -> (id, spelling in the file)
    for category in coco.dataset["categories"]:
        spelling = category["name"]
        name = spelling.strip()
        if not name:
            raise NdbenchError(
                f"{dataset}: category {category['id']} in {path} has the blank name {spelling!r}",
                "name every category in the JSON (the same in both files)",
            )
        twin, twin_spelling = named.setdefault(name, (category["id"], spelling))
        if twin != category["id"]:
            spelled = f" (spelled {twin_spelling!r} and {spelling!r})" if twin_spelling != spelling else ""
            raise NdbenchError(
                f"{dataset}: categories {twin} and {category['id']} in {path} are both named {name!r}{spelled}",
                "rename one of them in the JSON (the same in both files): tables and reports tell classes "
                "apart by name",
            )
        category["name"] = name  # also the name pycocotools indexed: it holds this very dict


def _check_file_names(coco: COCO, part: CocoSubset, subset: str, dataset: str) -> None:
    """Every `file_name` leads down from the subset's image folder: no leading '/', no '..'.

    An index row's path is the image folder's path under the index root followed by
    `file_name`, so one that climbs out of its folder could name a file outside the root (the
    root is that very folder when train and test share it)."""
    folder = os.path.abspath(part.images)
    for image in coco.dataset["images"]:
        name = PurePosixPath(image["file_name"])
        if not (name.is_absolute() or ".." in name.parts):
            continue
        target = os.path.normpath(os.path.join(folder, name))
        problem = f"{dataset}: image {image['id']} in {part.annotations} has file_name {image['file_name']!r}, "
        if os.path.commonpath([folder, target]) == folder:
            plain = os.path.relpath(target, folder)
            raise NdbenchError(
                f"{problem}which must lead down from its image folder {folder} without '..' or a leading '/'",
                f"write it as {plain!r}" if plain != "." else "name an image file in that folder",
            )
        raise NdbenchError(
            f"{problem}which leads to {target}, outside its image folder {folder}",
            _fix(dataset, "use the official COCO annotation files",
                 f"pass a folder that holds every image of {part.annotations.name} as --{subset}-images and "
                 "write each file_name relative to it; sub-folders are fine"),
        )


def _merge_categories(
    cocos: dict[str, COCO], json_paths: dict[str, Path], dataset: str
) -> dict[int, str]:
    """Union of both files' categories; the same id must carry the same name in both, and
    the same name the same id."""
    names: dict[int, str] = {}
    ids: dict[str, int] = {}
    origin: dict[int, Path] = {}
    fix = (
        "use train and val annotation files from the same COCO release" if dataset == "coco"
        else "export both files with one category list"
    )
    for subset, coco in cocos.items():
        for category in coco.dataset["categories"]:
            cid, name = category["id"], category["name"]
            if cid in names and names[cid] != name:
                raise NdbenchError(
                    f"{dataset}: category id {cid} is {names[cid]!r} in {origin[cid]} but "
                    f"{name!r} in {json_paths[subset]}",
                    fix,
                )
            if name in ids and ids[name] != cid:
                raise NdbenchError(
                    f"{dataset}: category {name!r} has id {ids[name]} in {origin[ids[name]]} but "
                    f"id {cid} in {json_paths[subset]}",
                    fix,
                )
            names.setdefault(cid, name)
            ids.setdefault(name, cid)
            origin.setdefault(cid, json_paths[subset])
    return names


def _fix(dataset: str, for_coco: str,
         for_export: str = "fix the export: every annotation names a listed image and a defined category") -> str:
    """The hint for COCO itself (`for_coco`) or for a user's COCO-format export."""
    return for_coco if dataset == "coco" else for_export


def _check_annotations(
    coco: COCO, json_path: Path, class_names: dict[int, str], dataset: str
) -> None:
    """Every annotation names a known category and a listed image."""
    image_ids = {image["id"] for image in coco.dataset["images"]}
    for ann in coco.dataset["annotations"]:
        category = ann.get("category_id")
        # 3.0 == 3 and True == 1 would pass the lookup and write "3.0" / "True" into the index.
        if not isinstance(category, int) or isinstance(category, bool) or category not in class_names:
            raise NdbenchError(
                f"{dataset}: annotation {ann.get('id')} in {json_path} has category id "
                f"{ann.get('category_id')!r}, which no 'categories' entry defines",
                _fix(dataset, "fix the file or use the official COCO annotations"),
            )
        if ann["image_id"] not in image_ids:
            raise NdbenchError(
                f"{dataset}: annotation {ann.get('id')} in {json_path} refers to image id "
                f"{ann['image_id']!r}, which its 'images' list does not hold",
                _fix(dataset, "fix the file or use the official COCO annotations"),
            )


def _check_files_exist(image_dir: Path, file_names: list[str], json_path: Path, dataset: str) -> None:
    """Every image the JSON lists must be on disk under `image_dir`."""
    if not image_dir.is_dir():
        raise NdbenchError(
            f"{dataset}: image folder {image_dir} (for {json_path.name}) {not_a_folder(image_dir)}",
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
            _fix(dataset, "download the complete image folder (or fix --root / --year)",
                 "put every image the file lists there (or fix --train-images / --test-images)"),
        )
