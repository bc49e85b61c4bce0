"""Which builder reads which dataset, and where its files are expected by default."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NdbenchError
from .index import DatasetIndex

DATASETS = ("voc", "coco", "cifar10", "cifar100", "mnist", "fmnist", "embedded")
ROOT_FIX = "pass the folder holding the {d} files with --root; the README shows the layout"


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
    root = (Path(root) if root is not None else default_root(dataset)).resolve()
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

        return build_voc_index(root, year=year or 2012, class_order=class_order)
    if dataset == "coco":
        from .coco import build_coco_index

        return build_coco_index(root, year=str(year or 2014), dataset="coco")
    if dataset in ("cifar10", "cifar100"):
        from .single_object import build_cifar_index

        return build_cifar_index(root, variant=dataset)
    from .single_object import build_mnist_index

    return build_mnist_index(root, variant=dataset)
