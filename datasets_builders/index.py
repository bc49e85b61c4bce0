"""The dataset index: one row per image (id, path, subset, classes present).

Every builder turns its source format into a `DatasetIndex`; split rules only ever read the
index. On disk it is `index.csv` (the rows) plus `index.json` (class names, the sha256 of the
source annotations, the image root and how images are stored), both beside the manifests.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import BUILDER_VERSION
from .atomic import atomic_write_text
from .errors import NdbenchError

SUBSETS = ("train", "test")
# How images are stored: "files" (path relative to the root), or an array set read by
# `datasets_builders.single_object` (the path is "<subset>/<n>").
STORAGE_KINDS = ("files", "cifar10", "cifar100", "mnist", "fmnist")


@dataclass(frozen=True)
class IndexRow:
    """One image: its source id, path under the dataset root, subset and sorted class ids."""

    image_id: str
    path: str
    subset: str
    classes: tuple[int, ...]


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded integers numerically ("train/10" after "train/9")."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


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

    def write(self, folder: Path) -> None:
        """Write `index.csv` and `index.json` into `folder` atomically."""
        folder = Path(folder)
        atomic_write_text(folder / "index.csv", self.csv_text())
        atomic_write_text(folder / "index.json", json.dumps(self.meta(), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> DatasetIndex:
        """Read an index written by `write`."""
        folder = Path(folder)
        csv_path, meta_path = folder / "index.csv", folder / "index.json"
        for p in (csv_path, meta_path):
            if not p.is_file():
                raise NdbenchError(
                    f"no dataset index at {p}",
                    f"run `ndbench build-splits {folder.name} --out {folder.parent}` first",
                )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = [
                IndexRow(
                    rec["image_id"],
                    rec["path"],
                    rec["subset"],
                    tuple(int(c) for c in rec["classes"].split()),
                )
                for rec in csv.DictReader(handle)
            ]
        return cls(
            dataset=meta["dataset"],
            root=Path(meta["root"]),
            rows=rows,
            class_names={int(k): v for k, v in meta["class_names"].items()},
            source_sha256=meta["source_sha256"],
            storage=meta["storage"],
            builder_version=meta["builder_version"],
        )


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
