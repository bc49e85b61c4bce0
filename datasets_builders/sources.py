"""Which builder reads which dataset, and where its files are expected by default."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import NdbenchError
from .index import DatasetIndex

DATASETS = ("voc", "coco", "cifar10", "cifar100", "mnist", "fmnist", "embedded")
ROOT_FIX = "pass the folder holding the {d} files with --root; the README shows the layout"
# Beside an index: what it was built from (a built-in dataset's root and options, or a
# custom dataset's files), so that hints can name the command that builds it again.
RECIPE_FILE = "source.json"
BUILT_IN = "built-in"  # the recipe's "kind" for a built-in dataset
# The release read when --year is not given, for the datasets that have several.
DEFAULT_YEAR = {"voc": 2012, "coco": 2014}
DEFAULT_CLASS_ORDER = "paper"  # VOC's class ids when --class-order is not given


def default_root(dataset: str) -> Path:
    """`$NDBENCH_DATA/<dataset>` when NDBENCH_DATA is set, else `data/<dataset>`."""
    base = os.environ.get("NDBENCH_DATA")
    return Path(base) / dataset if base else Path("data") / dataset


def check_dataset(dataset: str, splits_root: Path | None = None) -> str:
    """Return the dataset name, or raise one clear error if ndbench does not know it.

    With `splits_root`, a dataset whose index was built there (a COCO-format dataset built
    with `build-splits coco-format --name NAME`) is known too."""
    if dataset in DATASETS:
        return dataset
    if splits_root is not None and (Path(splits_root) / dataset / "index.json").is_file():
        return dataset
    where = f" and no index {Path(splits_root) / dataset / 'index.json'}" if splits_root is not None else ""
    raise NdbenchError(
        f"unknown dataset {dataset!r}{where}",
        f"use one of {', '.join(DATASETS)}, or build your own COCO-format data with "
        "`ndbench build-splits coco-format --name NAME --train-annotations A.json --test-annotations B.json` "
        "(README, 'Your own data')",
    )


def is_builtin(dataset: str) -> bool:
    """Whether ndbench can build this dataset's index itself (a built-in dataset)."""
    return dataset in DATASETS


def source_root(dataset: str, root: Path | None = None) -> Path:
    """The absolute folder a built-in dataset's files are read from: `root`, else the default
    root (`default_root`). Not the embedded dataset's, whose scenes are generated."""
    return (Path(root) if root is not None else default_root(dataset)).resolve()


@dataclass(frozen=True)
class BuiltinSource:
    """What a built-in dataset's index was built from: its root and the options that change
    the index (the release year of VOC and COCO, VOC's class order), as recorded beside it."""

    dataset: str
    root: Path
    year: int | None = None  # voc and coco
    class_order: str | None = None  # voc

    @classmethod
    def of_build(cls, index: DatasetIndex, root: Path | None, *, year: int | None = None,
                 class_order: str = DEFAULT_CLASS_ORDER) -> BuiltinSource:
        """The source of an index `build_index` just built from these arguments."""
        dataset = index.dataset
        return cls(
            dataset=dataset,
            root=Path(index.root) if dataset == "embedded" else source_root(dataset, root),
            year=(year or DEFAULT_YEAR[dataset]) if dataset in DEFAULT_YEAR else None,
            class_order=class_order if dataset == "voc" else None,
        )

    def command(self) -> str:
        """The build-splits command line (without --out) that builds this index again, naming
        only what differs from the defaults where it runs. The embedded dataset's command
        takes no --root: its scenes are generated again when their folder is gone."""
        parts = ["ndbench", "build-splits", self.dataset]
        if self.dataset != "embedded" and not self._default_root():
            parts += ["--root", shlex.quote(str(self.root))]
        if self.year is not None and self.year != DEFAULT_YEAR.get(self.dataset):
            parts += ["--year", str(self.year)]
        if self.class_order is not None and self.class_order != DEFAULT_CLASS_ORDER:
            parts += ["--class-order", shlex.quote(self.class_order)]
        return " ".join(parts)

    def _default_root(self) -> bool:
        try:
            return self.root == source_root(self.dataset)
        except OSError:  # no current folder to resolve the default against
            return False

    def file(self, folder: Path) -> dict[Path, str]:
        """The recipe file beside the index in `folder`, and its text."""
        recipe = {"kind": BUILT_IN, "dataset": self.dataset, "root": str(self.root), "year": self.year,
                  "class_order": self.class_order}
        return {Path(folder) / RECIPE_FILE: json.dumps(recipe, indent=1) + "\n"}

    @classmethod
    def read(cls, folder: Path) -> BuiltinSource | None:
        """The source recorded beside the index in `folder`; None when there is no readable
        record of a built-in dataset named as the folder (an index built before ndbench
        recorded it, or an edited record)."""
        folder = Path(folder)
        try:
            recipe = json.loads((folder / RECIPE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            return None
        if not isinstance(recipe, dict) or recipe.get("kind") != BUILT_IN or recipe.get("dataset") != folder.name:
            return None
        root, year, class_order = recipe.get("root"), recipe.get("year"), recipe.get("class_order")
        if (not isinstance(root, str) or not root
                or not (year is None or (isinstance(year, int) and not isinstance(year, bool)))
                or not (class_order is None or isinstance(class_order, str))):
            return None
        return cls(folder.name, Path(root), year, class_order)


def builtin_build_command(folder: Path) -> str:
    """The build-splits command line (without --out) that builds the built-in dataset's index
    in `folder` again as it was built, or with the defaults when that is not recorded."""
    source = BuiltinSource.read(folder)
    return source.command() if source is not None else f"ndbench build-splits {Path(folder).name}"


def build_index(
    dataset: str,
    root: Path | None = None,
    *,
    year: int | None = None,
    class_order: str = "paper",
    embedded_config=None,
    console=None,
) -> DatasetIndex:
    """Read a dataset's source annotations into a `DatasetIndex`.

    `year` applies to VOC (2012 default, or 2007) and COCO (2014 default, or 2017);
    `class_order` to VOC. The embedded dataset is generated (or reused from its cache)
    and read back through the COCO builder.
    """
    check_dataset(dataset)
    if dataset == "embedded":
        from .embedded import EmbeddedConfig, ensure_embedded

        config = embedded_config or EmbeddedConfig()
        # Absolute, so index.json still finds the scenes from another working directory.
        scene_root = (ensure_embedded(config, console=console) if root is None else Path(root)).resolve()
        if scene_root.exists() and not scene_root.is_dir():
            raise NdbenchError(f"embedded root {scene_root} is a file, not a folder", ROOT_FIX.format(d=dataset))
        from .coco import build_coco_index

        return build_coco_index(scene_root, year="", dataset="embedded")
    # Absolute, so index.json still finds the images from another working directory.
    root = source_root(dataset, root)
    if root.exists() and not root.is_dir():
        raise NdbenchError(f"{dataset} root {root} is a file, not a folder", ROOT_FIX.format(d=dataset))
    if not root.exists():
        raise NdbenchError(
            f"{dataset} root {root} does not exist",
            f"get the files with `ndbench download {dataset}`, or build the splits from where they are "
            f"with `ndbench build-splits {dataset} --root DIR`, or set NDBENCH_DATA to the folder holding "
            f"{dataset}/",
        )
    if dataset == "voc":
        from .voc import build_voc_index

        return build_voc_index(root, year=year or DEFAULT_YEAR["voc"], class_order=class_order)
    if dataset == "coco":
        from .coco import build_coco_index

        return build_coco_index(root, year=str(year or DEFAULT_YEAR["coco"]), dataset="coco", console=console)
    if dataset in ("cifar10", "cifar100"):
        from .single_object import build_cifar_index

        return build_cifar_index(root, variant=dataset)
    from .single_object import build_mnist_index

    return build_mnist_index(root, variant=dataset)
