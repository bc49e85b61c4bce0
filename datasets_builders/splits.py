"""Split rules (docs/ARCHITECTURE.md, "Datasets and splits"): dataset index -> split manifests.

- uni-class (one-vs-all): normal class c. Train = train images holding c (other objects may
  appear too). Test = all test images, label 0 if c is present, else 1.
- multi-class: normal set N. Train = train images holding at least one class of N
  (each image once). Test: label 0 if the image holds a class of N, 1 if it holds none.
  All-vs-one (`except-<k>`) is N = every class but k; any other N is `normal-a-b-c`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import BUILDER_VERSION
from .atomic import atomic_write_text
from .errors import NdbenchError
from .index import DatasetIndex, build_index_fix

SETTINGS = ("uni-class", "multi-class")
NORMAL, NOVEL = 0, 1
# Paper Table 5: the four CIFAR-10 half-vs-half normal sets.
HALF_VS_HALF_CIFAR10 = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 2, 4, 6, 8), (1, 3, 5, 7, 9))
DEDUP_NOTE = (
    "multi-class training set de-duplicated: each image appears once, however many normal "
    "classes it holds (the paper's released code repeats it once per normal class)"
)


# The split names the builders write: uni-class `<k>`; multi-class all-vs-one `except-<k>` and
# a chosen normal set `normal-<a>-<b>...`.
UNI_CLASS_NAME = re.compile(r"\d+")
ALL_VS_ONE_NAME = re.compile(r"except-\d+")
NORMAL_SET_NAME = re.compile(r"normal-\d+(-\d+)*")


def _missing_fix(path: Path) -> str:
    """The hint that builds a missing manifest; a chosen normal set (`normal-1-3`) is built
    only on request (`--setting multi-class --normal 1,3`)."""
    options = ""
    if path.parent.name == "multi-class" and NORMAL_SET_NAME.fullmatch(path.stem):
        options = " --setting multi-class --normal " + ",".join(path.stem.split("-")[1:])
    return build_index_fix(path.parent.parent, "to build it", options=options)


def _rebuild_fix(path: Path) -> str:
    """The hint that rebuilds a damaged manifest: its dataset's build command (a built-in
    dataset's as it was built, a custom dataset's own)."""
    return build_index_fix(path.parent.parent)  # <splits root>/<dataset>/<setting>/<name>.json


@dataclass
class Manifest:
    """One split: which train images are normal, which test images are normal (0) / novel (1)."""

    dataset: str
    setting: str
    name: str
    normal_classes: list[int]
    index_sha256: str
    train: list[str]
    test: list[tuple[str, int]]
    notes: list[str] = field(default_factory=list)
    builder_version: str = BUILDER_VERSION

    @property
    def split_id(self) -> str:
        """Stable id, e.g. `voc/uni-class/14` or `coco/multi-class/except-1`."""
        return f"{self.dataset}/{self.setting}/{self.name}"

    @property
    def short_id(self) -> str:
        """The id without the dataset: `uni-class/14`."""
        return f"{self.setting}/{self.name}"

    def counts(self) -> dict[str, int]:
        """#train, #test normal and #test novel."""
        novel = sum(label for _, label in self.test)
        return {"train": len(self.train), "test_normal": len(self.test) - novel, "test_novel": novel}

    def _body(self) -> dict:
        return {
            "dataset": self.dataset,
            "setting": self.setting,
            "name": self.name,
            "split_id": self.split_id,
            "normal_classes": list(self.normal_classes),
            "builder_version": self.builder_version,
            "index_sha256": self.index_sha256,
            "notes": list(self.notes),
            "train": list(self.train),
            "test": [[image_id, int(label)] for image_id, label in self.test],
        }

    @property
    def sha256(self) -> str:
        """sha256 of the manifest's canonical JSON body (everything but the sha itself)."""
        canonical = json.dumps(self._body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def to_json(self) -> str:
        """The manifest file's text; identical inputs give identical bytes."""
        body = self._body()
        body["sha256"] = self.sha256
        return json.dumps(body, indent=1) + "\n"

    def path_in(self, out: Path) -> Path:
        """Where this manifest lives under an output root."""
        return Path(out) / self.dataset / self.setting / f"{self.name}.json"

    def write(self, out: Path) -> Path:
        """Write the manifest atomically under `out`; returns its path."""
        path = self.path_in(out)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read a manifest file and check its sha256."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise NdbenchError(f"no split manifest at {path}", _missing_fix(path)) from exc
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # Recursion: nesting too deep
            raise NdbenchError(f"split manifest {path} is not valid JSON", _rebuild_fix(path)) from exc
        try:
            manifest = cls(
                dataset=data["dataset"],
                setting=data["setting"],
                name=data["name"],
                normal_classes=list(data["normal_classes"]),
                index_sha256=data["index_sha256"],
                train=list(data["train"]),
                test=[(image_id, int(label)) for image_id, label in data["test"]],
                notes=list(data.get("notes", [])),
                builder_version=data["builder_version"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise NdbenchError(f"split manifest {path} is incomplete or edited ({exc!r})", _rebuild_fix(path)) from exc
        if manifest.sha256 != data.get("sha256"):
            raise NdbenchError(f"split manifest {path} was modified (sha256 mismatch)", _rebuild_fix(path))
        return manifest


def _check_classes(index: DatasetIndex, classes: Iterable[int]) -> None:
    known = set(index.class_names)
    for c in classes:
        if c not in known:
            raise NdbenchError(
                f"unknown class id {c} for {index.dataset}",
                f"use {describe_ids(sorted(known))}",
            )


def describe_ids(ids: list[int]) -> str:
    """The class ids a user may give, in words: `ids 0..9` when they run without a gap, else
    `one of 1,3,7,10` (a long list shortened to its ends and count)."""
    ids = sorted(ids)
    if len(ids) > 2 and ids[-1] - ids[0] == len(ids) - 1:
        return f"ids {ids[0]}..{ids[-1]}"
    if len(ids) > 12:
        return f"one of {ids[0]}..{ids[-1]} ({len(ids)} ids, not every one between; see index.json)"
    return "one of " + ",".join(map(str, ids))


class DegenerateSplit(NdbenchError):
    """A split the index cannot form: no normal training image, or no normal or no novel test image."""


# What a split lacks when it cannot form (a key of `Manifest.counts`): the problem and its fix.
LACKS = {
    "train": ("has no normal training image", "choose normal classes that occur in the training images"),
    "test_novel": ("has no novel test image",
                   "leave at least one class that occurs in the test images out of the normal set"),
    "test_normal": ("has no normal test image", "choose normal classes that occur in the test images"),
}


def _finish(manifest: Manifest, lacks: dict[str, tuple[str, str]] = LACKS) -> Manifest:
    """The manifest, when it has normal training images and normal and novel test images; else
    DegenerateSplit with what `lacks` says of the missing images."""
    counts = manifest.counts()
    for count in ("train", "test_novel", "test_normal"):
        if counts[count] == 0:
            problem, fix = lacks[count]
            raise DegenerateSplit(f"split {manifest.split_id} {problem}", fix)
    overlap = set(manifest.train) & {image_id for image_id, _ in manifest.test}
    assert not overlap, f"{manifest.split_id}: train and test share {sorted(overlap)[:5]}"
    return manifest


def uni_class_split(index: DatasetIndex, normal_class: int) -> Manifest:
    """One-vs-all: images holding `normal_class` are normal."""
    _check_classes(index, [normal_class])
    return _split(index, "uni-class", str(normal_class), [normal_class])


def multi_class_split(index: DatasetIndex, normal_classes: Iterable[int], name: str | None = None) -> Manifest:
    """Images holding any class of `normal_classes` are normal; named `normal-a-b` by default."""
    normal = sorted(set(normal_classes))
    _check_classes(index, normal)
    if not normal:
        raise NdbenchError("the normal set is empty", "give at least one class with --normal")
    return _split(index, "multi-class", name or "normal-" + "-".join(map(str, normal)), normal)


def all_vs_one_split(index: DatasetIndex, abnormal_class: int) -> Manifest:
    """All-vs-one: every class but `abnormal_class` is normal; named `except-<k>`."""
    _check_classes(index, [abnormal_class])
    normal = [c for c in index.class_ids() if c != abnormal_class]
    other = f"a class other than {abnormal_class} ({index.class_names[abnormal_class]})"
    # Its normal set is fixed by the class, so what it lacks is said of the images.
    fix = f"class {abnormal_class} forms no all-vs-one split here; its uni-class split may form (--setting uni-class)"
    lacks = {
        "train": (f"has no normal training image: no training image holds {other}", fix),
        "test_novel": (f"has no novel test image: every test image holds {other}", fix),
        "test_normal": (f"has no normal test image: no test image holds {other}", fix),
    }
    return _split(index, "multi-class", f"except-{abnormal_class}", normal, lacks)


def _split(index: DatasetIndex, setting: str, name: str, normal: list[int],
           lacks: dict[str, tuple[str, str]] = LACKS) -> Manifest:
    normal_set = set(normal)
    train = [r.image_id for r in index.subset("train") if normal_set.intersection(r.classes)]
    test = [
        (r.image_id, NORMAL if normal_set.intersection(r.classes) else NOVEL)
        for r in index.subset("test")
    ]
    notes = [DEDUP_NOTE] if setting == "multi-class" and len(normal) > 1 else []
    manifest = Manifest(
        dataset=index.dataset,
        setting=setting,
        name=name,
        normal_classes=normal,
        index_sha256=index.sha256,
        train=train,
        test=test,
        notes=notes,
    )
    return _finish(manifest, lacks)


def protocol_classes(index: DatasetIndex) -> list[int]:
    """Classes the paper's protocol covers: those present in both train and test images
    (every class, on the real datasets; a class absent from a subset cannot form a split)."""
    present = [set().union(*(r.classes for r in index.subset(s))) for s in ("train", "test")]
    return [c for c in index.class_ids() if c in present[0] and c in present[1]]


def protocol_splits(
    index: DatasetIndex, settings: Iterable[str] = SETTINGS, classes: Iterable[int] | None = None
) -> tuple[list[Manifest], list[DegenerateSplit]]:
    """The uni-class and all-vs-one splits of `classes` (default: the paper's protocol classes)
    in `settings`, plus CIFAR-10's four half-vs-half sets of paper Table 5 in multi-class; the
    splits the index cannot form are left out and returned apart, with the reason."""
    settings = list(settings)
    classes = protocol_classes(index) if classes is None else list(classes)
    makers: list[Callable[[], Manifest]] = []
    if "uni-class" in settings:
        makers += [functools.partial(uni_class_split, index, c) for c in classes]
    if "multi-class" in settings:
        makers += [functools.partial(all_vs_one_split, index, c) for c in classes]
        if index.dataset == "cifar10":
            makers += [functools.partial(multi_class_split, index, s) for s in HALF_VS_HALF_CIFAR10]
    manifests: list[Manifest] = []
    skipped: list[DegenerateSplit] = []
    for make in makers:
        try:
            manifests.append(make())
        except DegenerateSplit as exc:
            skipped.append(exc)
    return manifests, skipped


def paper_protocol(index: DatasetIndex, settings: Iterable[str] = SETTINGS) -> list[Manifest]:
    """Every split of the paper's protocol: all uni-class and all all-vs-one splits
    (plus, for CIFAR-10 multi-class, the four half-vs-half sets of paper Table 5); raises
    when one cannot be formed."""
    manifests, skipped = protocol_splits(index, settings)
    if skipped:
        raise skipped[0]
    return manifests


def parse_class_list(text: str, option: str = "class list", what: str = "class ids") -> list[int]:
    """Parse `1,3,5` into integers (repeats dropped, order kept); one clear error naming
    `option` for anything else."""
    fix = f"give {what} separated by commas, e.g. {option + ' ' if option.startswith('--') else ''}1,3,5"
    try:
        ids = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as exc:
        raise NdbenchError(f"cannot read {option} {text!r}", fix) from exc
    if not ids:
        raise NdbenchError(f"empty {option}", fix)
    return list(dict.fromkeys(ids))
