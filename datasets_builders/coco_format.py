"""Any COCO-format dataset (a train and a test instances JSON) as a multi-object benchmark.

The rows follow the `coco` rules (`coco.index_from_instances`): class ids are the file's
category ids and names come from the file, crowd annotations count, an image with no
annotation has no class (novel in every split). What differs from the official COCO files:

- the two files come from anywhere, each with its own image folder (by default the folder
  holding the JSON); `file_name` may hold sub-folders and is read relative to that folder;
- exports often number the images of each file from 1, so image ids are namespaced per
  subset (`train/<id>`, `test/<id>`) instead of refused when both files use the same id;
- a symbolic link in an image folder must lead inside that folder, as `file_name` must;
- "the same image in train and test" is detected by its file: the same path on disk after
  resolving symbolic links and `..` (a copy under another name is not detected);
- the dataset is named by the user, and how it was built is recorded beside its index
  (`source.json`) so that other commands can name the build command when splits are missing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .coco import CocoSubset, index_from_instances
from .errors import NdbenchError, not_a_file, not_a_folder
from .index import DatasetIndex, IndexRow
from .sources import DATASETS, RECIPE_FILE
from .splits import protocol_classes

COCO_FORMAT = "coco-format"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class CocoFormatSource:
    """Where a user's COCO-format dataset lies, and the name it is benchmarked under."""

    name: str
    train_annotations: Path
    test_annotations: Path
    train_images: Path | None = None  # default: the folder holding train_annotations
    test_images: Path | None = None  # default: the folder holding test_annotations

    def image_folder(self, subset: str) -> Path:
        """The folder the `file_name` entries of one subset's JSON are relative to."""
        annotations, images = (
            (self.train_annotations, self.train_images)
            if subset == "train"
            else (self.test_annotations, self.test_images)
        )
        return Path(images) if images is not None else Path(annotations).parent

    def command(self) -> str:
        """The build-splits command line that builds this dataset, its paths quoted for a
        POSIX shell (a path with spaces or quotes is one argument)."""
        options = {
            "--name": self.name,
            "--train-annotations": self.train_annotations,
            "--test-annotations": self.test_annotations,
            "--train-images": self.train_images,
            "--test-images": self.test_images,
        }
        given = [f"{option} {shlex.quote(str(value))}" for option, value in options.items() if value is not None]
        return " ".join([f"ndbench build-splits {COCO_FORMAT}", *given])


def check_name(name: str | None) -> str:
    """A dataset name usable as a folder under the splits root, not a built-in dataset's."""
    if not name:
        raise NdbenchError(f"{COCO_FORMAT} needs a dataset name", "pass --name NAME, e.g. --name mylab")
    if not NAME_PATTERN.fullmatch(name):
        raise NdbenchError(
            f"dataset name {name!r} is not a plain folder name",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    if name in DATASETS or name == COCO_FORMAT:
        raise NdbenchError(
            f"dataset name {name!r} is a built-in dataset", "choose another --name for your data"
        )
    return name


def build_coco_format_index(source: CocoFormatSource, console=None) -> DatasetIndex:
    """Validate a COCO-format train/test pair and read it into a `DatasetIndex` named
    `source.name`, rooted at the deepest folder holding both image folders (a large file is
    announced on `console`, a rich Console, before it is read)."""
    check_name(source.name)
    annotations = {"train": Path(source.train_annotations), "test": Path(source.test_annotations)}
    for subset, path in annotations.items():
        if not path.is_file():
            raise NdbenchError(
                f"{source.name}: {subset} annotation file {path} {not_a_file(path)}",
                f"pass the COCO instances JSON with --{subset}-annotations",
            )
    if annotations["train"].resolve() == annotations["test"].resolve():
        raise NdbenchError(
            f"{source.name}: the train and test annotations are the same file ({annotations['train']})",
            "export the training and the test images as two separate COCO files",
        )
    folders = {subset: source.image_folder(subset).resolve() for subset in annotations}
    for subset, folder in folders.items():
        if not folder.is_dir():
            raise NdbenchError(
                f"{source.name}: {subset} image folder {folder} {not_a_folder(folder)}",
                f"pass the folder the file_name entries are relative to with --{subset}-images",
            )
    root = Path(os.path.commonpath([str(folders["train"]), str(folders["test"])]))
    subsets = {
        subset: CocoSubset(annotations[subset], folders[subset], folders[subset].relative_to(root).as_posix())
        for subset in annotations
    }
    index = index_from_instances(
        subsets, root=root, dataset=source.name, image_id=lambda subset, coco_id: f"{subset}/{coco_id}",
        console=console,
    )
    _check_real_paths(index, source.name, annotations, folders)
    return index


def _check_real_paths(index: DatasetIndex, name: str, annotations: dict[str, Path], folders: dict[str, Path]) -> None:
    """Each image file lies inside its subset's image folder also where symbolic links lead
    (as a `file_name` must), and appears once: not twice in one file, never in both train and
    test (train ∩ test = ∅). Files are compared by their real path on disk."""
    first: dict[str, dict[str, IndexRow]] = {"train": {}, "test": {}}
    for subset in ("train", "test"):
        folder = str(folders[subset])  # resolved: a link to the folder itself is fine
        for row in index.subset(subset):
            real = os.path.realpath(index.root / row.path)
            if os.path.commonpath([folder, real]) != folder:
                file_name = os.path.relpath(index.root / row.path, folder)
                raise NdbenchError(
                    f"{name}: image {_coco_id(row)} in {annotations[subset]} has file_name {file_name!r}, which "
                    f"leads through a symbolic link to {real}, outside its image folder {folder}",
                    f"pass a folder that holds every image of {annotations[subset].name} as --{subset}-images, "
                    "or put copies of the linked files in the image folder",
                )
            twin = first[subset].get(real)
            if twin is not None:
                raise NdbenchError(
                    f"{name}: {annotations[subset]} lists the image file {index.root / row.path} twice "
                    f"(images {_coco_id(twin)} and {_coco_id(row)})",
                    "keep one entry per image file (merge their annotations)",
                )
            first[subset][real] = row
            twin = first["train"].get(real) if subset == "test" else None
            if twin is not None:
                alias = f" (as {index.root / row.path})" if twin.path != row.path else ""
                raise NdbenchError(
                    f"{name}: image file {index.root / twin.path} is listed for training ({annotations['train']}, "
                    f"image {_coco_id(twin)}) and testing{alias} ({annotations['test']}, image {_coco_id(row)})",
                    "train and test must not share an image; remove it from one of the two files",
                )


def _coco_id(row: IndexRow) -> str:
    return row.image_id.partition("/")[2]


def train_image_counts(index: DatasetIndex) -> Counter[int]:
    """How many training images hold each class."""
    return Counter(c for row in index.subset("train") for c in row.classes)


def protocol_classes_with_min_train(index: DatasetIndex, min_train_images: int) -> tuple[list[int], list[int]]:
    """(classes that get splits, classes skipped as too rare): the paper's protocol classes
    (present in train and test) split by whether at least `min_train_images` training
    images hold them."""
    if min_train_images < 0:
        raise NdbenchError(f"--min-train-images {min_train_images} is negative", "give 0 or more")
    counts = train_image_counts(index)
    kept, rare = [], []
    for c in protocol_classes(index):
        (kept if counts[c] >= min_train_images else rare).append(c)
    return kept, rare


def recipe_file(folder: Path, source: CocoFormatSource, min_train_images: int) -> dict[Path, str]:
    """The file, beside the index, that records how the dataset was built, and its text."""
    recipe = {
        "kind": COCO_FORMAT,
        "name": source.name,
        "train_annotations": str(Path(source.train_annotations).resolve()),
        "test_annotations": str(Path(source.test_annotations).resolve()),
        "train_images": None if source.train_images is None else str(Path(source.train_images).resolve()),
        "test_images": None if source.test_images is None else str(Path(source.test_images).resolve()),
        "min_train_images": min_train_images,
    }
    return {Path(folder) / RECIPE_FILE: json.dumps(recipe, indent=1) + "\n"}


def build_command_for(folder: Path, name: str) -> str:
    """The command that (re)builds a custom dataset's splits, from its recorded recipe when
    there is one, else a template."""
    try:
        recipe = json.loads((Path(folder) / RECIPE_FILE).read_text(encoding="utf-8"))
        source = CocoFormatSource(
            name=recipe["name"],
            train_annotations=Path(recipe["train_annotations"]),
            test_annotations=Path(recipe["test_annotations"]),
            train_images=None if recipe["train_images"] is None else Path(recipe["train_images"]),
            test_images=None if recipe["test_images"] is None else Path(recipe["test_images"]),
        )
        return source.command()
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"ndbench build-splits {COCO_FORMAT} --name {name} --train-annotations TRAIN.json "
            "--test-annotations TEST.json"
        )
