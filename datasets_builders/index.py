"""The dataset index: one row per image (id, path, subset, classes present).

Every builder turns its source format into a `DatasetIndex`; split rules only ever read the
index. On disk it is `index.csv` (the rows) plus `index.json` (class names, the sha256 of the
source annotations, the image root and how images are stored), both beside the manifests, with
`source.json` (what the index was built from) for the hints that name its build command.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import BUILDER_VERSION
from .atomic import atomic_write_files
from .errors import NdbenchError

SUBSETS = ("train", "test")
# How images are stored: "files" (path relative to the root), or an array set read by
# `datasets_builders.single_object` (the path is "<subset>/<n>").
STORAGE_KINDS = ("files", "cifar10", "cifar100", "mnist", "fmnist")
DEFAULT_SPLITS = Path("results/splits")  # build-splits' --out when not given


@dataclass(frozen=True)
class IndexRow:
    """One image: its source id, path under the dataset root, subset and sorted class ids."""

    image_id: str
    path: str
    subset: str
    classes: tuple[int, ...]


_DIGIT_RUNS = re.compile(r"(\d+)")
_INTEGER = re.compile(r"-?\d+")


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded integers numerically ("train/10" after "train/9")."""
    if text.isdecimal():  # COCO's and CIFAR's ids: the key the split below gives, sooner
        return ("", int(text), "")
    return tuple(int(part) if part.isdigit() else part for part in _DIGIT_RUNS.split(text))


@dataclass
class DatasetIndex:
    """All images of one dataset with the classes each holds, plus class names and provenance."""

    dataset: str
    root: Path
    rows: list[IndexRow]
    class_names: dict[int, str]
    source_sha256: str
    storage: str = "files"
    builder_version: str = BUILDER_VERSION
    _by_id: dict[str, IndexRow] = field(default_factory=dict, init=False, repr=False)
    _position: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _sha256: str = field(default="", init=False, repr=False, compare=False)
    folder: Path | None = field(default=None, init=False, repr=False, compare=False)  # set by `read`

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_KINDS:
            raise ValueError(f"unknown storage kind {self.storage!r}")
        self.rows = sorted(self.rows, key=lambda r: (SUBSETS.index(r.subset), natural_key(r.image_id)))
        self._by_id = {}
        self._position = {row.image_id: i for i, row in enumerate(self.rows)}
        for row in self.rows:
            if row.image_id in self._by_id:
                raise NdbenchError(
                    f"{self.dataset}: image id {row.image_id!r} appears twice in the source",
                    "check the source annotations for duplicate entries",
                )
            self._by_id[row.image_id] = row

    def row(self, image_id: str) -> IndexRow:
        """The row of one image id."""
        return self._by_id[image_id]

    def position(self, image_id: str) -> int:
        """The image's row number in the index (stable for a given `sha256`)."""
        return self._position[image_id]

    def subset(self, name: str) -> list[IndexRow]:
        """Rows of one subset ("train" or "test"), in index order."""
        return [r for r in self.rows if r.subset == name]

    def class_ids(self) -> list[int]:
        """All class ids of the dataset (those with a name), ascending."""
        return sorted(self.class_names)

    def observed_classes(self, image_ids: Iterable[str]) -> set[int]:
        """The set of class ids present in the given images."""
        found: set[int] = set()
        for image_id in image_ids:
            found.update(self._by_id[image_id].classes)
        return found

    # --- serialisation -------------------------------------------------------------------
    def csv_text(self) -> str:
        """The rows as CSV text (classes space-separated), the bytes `sha256` is taken of."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image_id", "path", "subset", "classes"])
        for r in self.rows:
            writer.writerow([r.image_id, r.path, r.subset, " ".join(map(str, r.classes))])
        return buffer.getvalue()

    @property
    def sha256(self) -> str:
        """sha256 of `index.csv`: manifests carry it to pin the index they came from."""
        if not self._sha256:  # rows are fixed after construction, so it is computed once
            self._sha256 = hashlib.sha256(self.csv_text().encode("utf-8")).hexdigest()
        return self._sha256

    @property
    def content_sha256(self) -> str:
        """sha256 of the index, of the source files it was read from (CIFAR's and MNIST's
        pixels, VOC's and COCO's annotations), of the dataset's name and of its image root:
        what stored images and cached features of its images are keyed by, so that new source
        files under the same names make new keys, and so do the same annotations over the
        images of another folder."""
        text = f"{self.sha256}\n{self.source_sha256}\n{self.dataset}\n{self.root}"
        return hashlib.sha256(text.encode()).hexdigest()

    def meta(self) -> dict:
        """What `index.json` holds."""
        return {
            "dataset": self.dataset,
            "root": str(self.root),
            "storage": self.storage,
            "builder_version": self.builder_version,
            "source_sha256": self.source_sha256,
            "index_sha256": self.sha256,
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())},
        }

    def files(self, folder: Path) -> dict[Path, str]:
        """The index's files in `folder` (`index.csv`, `index.json`) and their text."""
        folder = Path(folder)
        return {folder / "index.csv": self.csv_text(), folder / "index.json": json.dumps(self.meta(), indent=1) + "\n"}

    def write(self, folder: Path) -> None:
        """Write `index.csv` and `index.json` into `folder` atomically."""
        atomic_write_files(self.files(folder))

    @classmethod
    def read(cls, folder: Path) -> DatasetIndex:
        """Read an index written by `write`; a missing, damaged or inconsistent index file is
        one NdbenchError naming the file and the command that rebuilds it."""
        folder = Path(folder)
        csv_path, meta_path = folder / "index.csv", folder / "index.json"
        for p in (csv_path, meta_path):
            if not p.is_file():
                raise NdbenchError(f"no dataset index at {p}", build_index_fix(folder, "first"))
        meta = _read_meta(meta_path)
        rows = _read_rows(csv_path, meta["class_names"])
        try:
            index = cls(
                dataset=meta["dataset"],
                root=Path(meta["root"]),
                rows=rows,
                class_names=meta["class_names"],
                source_sha256=meta["source_sha256"],
                storage=meta["storage"],
                builder_version=meta["builder_version"],
            )
        except (NdbenchError, ValueError) as exc:
            problem = exc.problem if isinstance(exc, NdbenchError) else str(exc)
            raise _damaged(meta_path, problem) from exc
        if index.sha256 != meta["index_sha256"]:
            raise _damaged(csv_path, f"its rows do not match the index_sha256 in {meta_path.name} "
                                     "(one of the two was edited or replaced)")
        index.folder = folder
        return index


# index.json: key -> the type its value must have.
_META_TYPES = {
    "dataset": str,
    "root": str,
    "storage": str,
    "builder_version": str,
    "source_sha256": str,
    "index_sha256": str,
    "class_names": dict,
}
_CSV_COLUMNS = ["image_id", "path", "subset", "classes"]


def build_command(folder: Path, options: str = "", *, default_out: bool = True) -> str:
    """The build-splits command line that (re)builds the index in `folder`, `options` added:
    a built-in dataset's with the root and options it was built with, a custom one's from its
    files, as recorded beside the index (else with the defaults, or a template). `--out` names
    the folder's parent; with `default_out` False, not when that is the default splits root."""
    from .coco_format import build_command_for  # these modules import this one
    from .sources import builtin_build_command, is_builtin

    folder = Path(folder)
    command = builtin_build_command(folder) if is_builtin(folder.name) else build_command_for(folder, folder.name)
    if default_out or folder.parent != DEFAULT_SPLITS:
        command += f" --out {shlex.quote(str(folder.parent))}"
    return command + options


def index_build_command(index: DatasetIndex) -> str:
    """The build-splits command line that rebuilds `index` and its splits where it was read
    from (`build_command`), or with the defaults for an index not read from a folder."""
    if index.folder is None:
        return f"ndbench build-splits {index.dataset}"
    return build_command(index.folder, default_out=False)


def build_index_fix(folder: Path, when: str = "", options: str = "") -> str:
    """The hint that (re)builds the index in `folder` (a built-in dataset's or a custom one's),
    `options` added to its command."""
    command = f"`{build_command(folder, options)}`"
    return f"run {command} {when}" if when else f"rebuild it with {command}"


def _damaged(path: Path, what: str) -> NdbenchError:
    """The error for an index file that exists but cannot be used."""
    return NdbenchError(f"dataset index {path} is damaged: {what}", build_index_fix(path.parent))


def _read_meta(path: Path) -> dict:
    """`index.json` as a dict with checked types; class names keyed by int."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: too deep
        raise _damaged(path, f"not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise _damaged(path, f"a JSON object was expected, found {type(meta).__name__}")
    for key, kind in _META_TYPES.items():
        if key not in meta:
            raise _damaged(path, f"the key {key!r} is missing")
        if not isinstance(meta[key], kind):
            raise _damaged(path, f"{key!r} is {type(meta[key]).__name__}, not {kind.__name__}")
    names: dict[int, str] = {}
    for key, name in meta["class_names"].items():
        if not _INTEGER.fullmatch(key) or not isinstance(name, str):
            raise _damaged(path, f"class_names entry {key!r}: {name!r} is not an integer id and a name")
        names[int(key)] = name
    if not names:
        raise _damaged(path, "class_names is empty")
    return {**meta, "class_names": names}


def _read_rows(path: Path, class_names: dict[int, str]) -> list[IndexRow]:
    """The rows of `index.csv`, each checked against the columns, subsets and class ids."""
    rows: list[IndexRow] = []
    seen: set[str] = set()
    # Class ids as `write` spells them; any other spelling would not give the recorded sha256.
    known = {str(c): c for c in class_names}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise _damaged(path, "the file is empty")
            if header != _CSV_COLUMNS:
                raise _damaged(path, f"its header is {','.join(header)!r}, not {','.join(_CSV_COLUMNS)!r}")
            for record in reader:
                if not record:
                    continue  # a blank line, as csv.DictReader skips it
                line = reader.line_num
                if len(record) != len(_CSV_COLUMNS):
                    raise _damaged(path, f"line {line} has {len(record)} fields, not {len(_CSV_COLUMNS)}")
                image_id, image_path, subset, classes = record
                if subset not in SUBSETS:
                    raise _damaged(path, f"line {line}: subset {subset!r} is not one of {', '.join(SUBSETS)}")
                if image_id in seen:
                    raise _damaged(path, f"line {line}: image id {image_id!r} appears twice")
                seen.add(image_id)
                try:
                    ids = tuple(known[text] for text in classes.split())
                except KeyError as exc:
                    problem = f"line {line}: class id {exc.args[0]!r} is not a class of index.json"
                    raise _damaged(path, problem) from None
                rows.append(IndexRow(image_id, image_path, subset, ids))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _damaged(path, f"not readable CSV ({exc})") from exc
    return rows


def sha256_of_files(paths: Iterable[Path]) -> str:
    """One sha256 over the contents of several files (in the given order) and their names."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
