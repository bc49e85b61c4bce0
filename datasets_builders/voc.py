"""PASCAL VOC (2012 or 2007) -> dataset index.

Follows the paper's released code (docs/FIDELITY.md, "Datasets and splits"):
- VOC2012: train = the `trainaug` segmentation list (falls back to `Segmentation/train.txt`),
  classes from the `SegmentationClassAug` masks when that folder exists, else from the XML;
  test = `Segmentation/val.txt`, classes from the XML (every object, difficult or not).
- VOC2007: train = `Main/trainval.txt`, test = `Main/test.txt`, classes from the XML.
Class ids follow the paper's order by default, or the standard alphabetical one.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image

from .errors import NdbenchError, not_a_file
from .index import DatasetIndex, IndexRow, sha256_of_files

# The standard VOC order; a mask pixel value v in 1..20 is class ALPHABETICAL_CLASSES[v - 1].
ALPHABETICAL_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# The order of the authors' released code, which the paper's per-class tables use.
PAPER_CLASSES: tuple[str, ...] = (
    "aeroplane", "person", "tvmonitor", "dog", "chair", "bird", "bottle", "boat",
    "diningtable", "train", "motorbike", "horse", "cow", "bicycle", "car", "cat", "sofa",
    "bus", "pottedplant", "sheep",
)  # fmt: skip
CLASS_ORDERS = ("paper", "alphabetical")
YEARS = (2007, 2012)
# Segmentation masks: 0 is background, 255 the "void" border; neither is a class.
MASK_IGNORED = frozenset({0, 255})
TRAINAUG_LISTS = ("trainaug.txt", "train_aug.txt")
PROGRESS_THRESHOLD = 2000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def class_names(class_order: str = "paper") -> tuple[str, ...]:
    """The 20 VOC class names, position = class id, in the given order."""
    if class_order == "paper":
        return PAPER_CLASSES
    if class_order == "alphabetical":
        return ALPHABETICAL_CLASSES
    raise NdbenchError(
        f"unknown VOC class order {class_order!r}", f"use one of {', '.join(CLASS_ORDERS)}"
    )


def class_ids(class_order: str = "paper") -> dict[str, int]:
    """Map each VOC class name to its id in the given order."""
    return {name: i for i, name in enumerate(class_names(class_order))}


def resolve_voc_folder(root: Path, year: int = 2012) -> Path:
    """The `VOC<year>` folder for `root`, which may be the folder holding `VOCdevkit/`,
    `VOCdevkit/` itself, or the `VOC<year>` folder itself."""
    root = Path(root)
    name = f"VOC{year}"
    if not root.is_dir():
        raise NdbenchError(
            f"VOC root {root} is not a folder",
            f"pass the folder holding VOCdevkit/ (expected {root / 'VOCdevkit' / name})",
        )
    if root.name == name:
        return root
    for candidate in (root / "VOCdevkit" / name, root / name):
        if candidate.is_dir():
            return candidate
    # A year folder under another name (e.g. renamed by the user), unless it is another year's.
    looks_like_year_folder = (root / "ImageSets").is_dir() and (root / "JPEGImages").is_dir()
    if looks_like_year_folder and not re.fullmatch(r"VOC\d{4}", root.name, re.IGNORECASE):
        return root
    others = {
        p.name
        for base in (root, root / "VOCdevkit")
        if base.is_dir()
        for p in base.iterdir()
        if p.is_dir() and re.fullmatch(r"VOC\d{4}", p.name)
    }
    if re.fullmatch(r"VOC\d{4}", root.name):
        others.add(root.name)
    found = f"; found {', '.join(sorted(others))} instead" if others else ""
    expected = root / "VOCdevkit" / name
    if re.fullmatch(r"VOC\d{4}", root.name) and (root.parent / name).is_dir():
        expected = root.parent / name
    raise NdbenchError(
        f"no {name} folder at {root}{found}",
        f"pass the folder holding VOCdevkit/, VOCdevkit/ itself or VOCdevkit/{name} itself "
        f"(expected {expected})",
    )


def read_image_list(path: Path) -> list[str]:
    """Image ids of a VOC ImageSets list, in file order.

    Lines are `<id>`, `<id> <flag>` (Main class lists) or `/JPEGImages/<id>.jpg
    /SegmentationClassAug/<id>.png` (the DeepLab trainaug list); the id is the first field's stem.
    """
    path = Path(path)
    if not path.is_file():
        raise NdbenchError(f"VOC image list {path} {not_a_file(path)}", f"expected the file {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a list saved with a BOM
    except PermissionError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise NdbenchError(
            f"cannot read VOC image list {path}: {exc}", "re-extract the VOC archive"
        ) from exc
    if any("\x00" in line for line in lines):  # a zero-filled or binary file, not a damaged line
        raise NdbenchError(f"VOC image list {path} is not a text file (it holds NUL bytes)",
                           "re-extract the VOC archive")
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("<"):  # e.g. a download that saved a web page under the list's name
        raise NdbenchError(f"VOC image list {path} is an HTML or XML page, not a list of image ids",
                           "download the list again (its lines are image ids)")
    ids: list[str] = []
    seen: set[str] = set()
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        token = fields[0]
        image_id = PurePosixPath(token).stem if token.lower().endswith(IMAGE_EXTENSIONS) else token
        if image_id in seen:
            raise NdbenchError(
                f"VOC image list {path} lists {image_id!r} twice", "remove the duplicate line"
            )
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise NdbenchError(f"VOC image list {path} is empty", "re-extract the VOC archive")
    return ids


def read_xml_classes(path: Path) -> set[str]:
    """Names of every `<object>` in one VOC annotation XML (difficult or not, parts ignored)."""
    path = Path(path)
    if not path.is_file():
        raise NdbenchError(f"VOC annotation {path} {not_a_file(path)}", f"expected the file {path}")
    try:
        tree = ET.parse(path)
    except PermissionError:
        raise
    except (ET.ParseError, OSError, ValueError, LookupError) as exc:  # LookupError: unknown encoding
        raise NdbenchError(
            f"VOC annotation {path} is malformed XML ({exc})", "re-extract the VOC archive"
        ) from exc
    annotation = tree.getroot()
    if annotation.tag != "annotation":
        raise NdbenchError(
            f"VOC annotation {path} has root <{annotation.tag}>, not <annotation>",
            "re-extract the VOC archive",
        )
    names: set[str] = set()
    # Only direct children: person <part> elements (head, hand, foot) carry <name> too.
    for obj in annotation.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in ALPHABETICAL_CLASSES:
            raise NdbenchError(
                f"VOC annotation {path} has an object named {name!r}, not a VOC class",
                f"VOC class names are {', '.join(ALPHABETICAL_CLASSES)}",
            )
        names.add(name)
    return names


def read_mask_classes(path: Path) -> set[str]:
    """Names of the classes present in one VOC segmentation mask (class-index PNG)."""
    path = Path(path)
    if not path.is_file():
        raise NdbenchError(
            f"VOC segmentation mask {path} is missing",
            "every image of the train list needs its mask in SegmentationClassAug/",
        )
    try:
        with Image.open(path) as image:
            # Palette ("P") masks hold class indices; converting them would yield colours.
            if image.mode not in ("P", "L"):
                raise NdbenchError(
                    f"VOC segmentation mask {path} has mode {image.mode}, not class indices",
                    "use the palette (P) or grayscale (L) class-index PNGs of SegmentationClassAug",
                )
            colors = image.getcolors(maxcolors=256)
    except NdbenchError:
        raise
    # Decoding damaged bytes raises OSError, SyntaxError (PNG chunks), ValueError, struct
    # errors, DecompressionBombError...: all mean the same to the user.
    except Exception as exc:  # noqa: BLE001
        raise NdbenchError(
            f"cannot read VOC segmentation mask {path} ({exc})", "re-extract the mask archive"
        ) from exc
    values = {value for _, value in colors or []} - MASK_IGNORED
    bad = sorted(v for v in values if not 1 <= v <= len(ALPHABETICAL_CLASSES))
    if bad:
        raise NdbenchError(
            f"VOC segmentation mask {path} holds pixel values {bad}, not VOC classes",
            "mask values must be 0 (background), 1..20 (classes) or 255 (void)",
        )
    return {ALPHABETICAL_CLASSES[v - 1] for v in values}


def _split_lists(folder: Path, year: int) -> tuple[Path, Path]:
    """The (train, test) ImageSets lists of one VOC year folder."""
    if year == 2007:
        main = folder / "ImageSets" / "Main"
        return main / "trainval.txt", main / "test.txt"
    seg = folder / "ImageSets" / "Segmentation"
    for name in TRAINAUG_LISTS:
        if (seg / name).is_file():
            return seg / name, seg / "val.txt"
    return seg / "train.txt", seg / "val.txt"


def _require_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise NdbenchError(f"VOC {what} folder {path} is missing", f"expected the folder {path}")


def _read_all(
    paths: Sequence[Path], reader: Callable[[Path], set[str]], progress: bool | None, what: str
) -> list[set[str]]:
    """`reader` over `paths`, results in order; the first failing path (in order) raises."""
    show = len(paths) > PROGRESS_THRESHOLD if progress is None else progress
    # PNG decoding releases the GIL, so threads help on the 10k trainaug masks.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results: Iterable[set[str]] = pool.map(reader, paths)
        if show:
            from rich.progress import track

            results = track(
                results, description=f"reading VOC {what}", total=len(paths), transient=True
            )
        return list(results)


def build_voc_index(
    root: Path,
    *,
    year: int = 2012,
    class_order: str = "paper",
    progress: bool | None = None,
) -> DatasetIndex:
    """Read a VOC2012 (default) or VOC2007 tree into the dataset index (`voc`, image files).

    `root` is the folder holding `VOCdevkit/`, `VOCdevkit/` or the `VOC<year>` folder; the
    index root is the `VOC<year>` folder. `progress=None` shows a bar only for large trees.
    """
    ids_of = class_ids(class_order)
    if year not in YEARS:
        raise NdbenchError(
            f"unsupported VOC year {year}", f"use one of {', '.join(map(str, YEARS))}"
        )
    folder = resolve_voc_folder(Path(root), year)
    for sub in ("ImageSets", "Annotations", "JPEGImages"):
        _require_folder(folder / sub, sub)
    train_list, test_list = _split_lists(folder, year)
    if year == 2007 and train_list.is_file() and not test_list.exists():
        raise NdbenchError(
            f"VOC2007 test list {test_list} is missing",
            "VOC2007's test images come in their own archive (VOCtest_06-Nov-2007.tar); extract it beside "
            "the trainval one, into the same VOCdevkit",
        )
    train_ids, test_ids = sorted(read_image_list(train_list)), sorted(read_image_list(test_list))

    shared = sorted(set(train_ids) & set(test_ids))
    if shared:
        raise NdbenchError(
            f"VOC image {shared[0]!r} is listed for training ({train_list}) and testing "
            f"({test_list}){f' with {len(shared) - 1} more' if len(shared) > 1 else ''}",
            "train and test lists must not overlap; re-extract the lists",
        )
    for image_id in (*train_ids, *test_ids):
        image = folder / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise NdbenchError(
                f"VOC image {image} is missing (listed in {train_list.name} or {test_list.name})",
                "re-extract JPEGImages from the VOC archive",
            )

    mask_folder = folder / "SegmentationClassAug"
    if year == 2012 and mask_folder.is_dir():
        train_sources = [mask_folder / f"{i}.png" for i in train_ids]
        train_reader = read_mask_classes
    else:
        train_sources = [folder / "Annotations" / f"{i}.xml" for i in train_ids]
        train_reader = read_xml_classes
    test_sources = [folder / "Annotations" / f"{i}.xml" for i in test_ids]
    train_names = _read_all(train_sources, train_reader, progress, "train annotations")
    test_names = _read_all(test_sources, read_xml_classes, progress, "test annotations")

    rows = [
        IndexRow(
            image_id=image_id,
            path=f"JPEGImages/{image_id}.jpg",
            subset=subset,
            classes=tuple(sorted(ids_of[n] for n in names)),
        )
        for subset, image_ids, all_names in (
            ("train", train_ids, train_names),
            ("test", test_ids, test_names),
        )
        for image_id, names in zip(image_ids, all_names, strict=True)
    ]
    return DatasetIndex(
        dataset="voc",
        root=folder.resolve(),
        rows=rows,
        class_names=dict(enumerate(class_names(class_order))),
        source_sha256=sha256_of_files([train_list, test_list, *train_sources, *test_sources]),
        storage="files",
    )
