"""The paper's reference numbers (Salehi et al., ACCV 2024), read from the packaged CSVs.

AUROC in percent, as printed. Per-class tables: 6 (VOC uni-class), 11 (VOC multi-class,
per abnormal class) and 9 (COCO uni-class, per category id); summaries: 4 (uni-class) and
2 (multi-class, all-vs-one). `benchmark/paper_tables/README.md` says where each number
comes from and where the paper disagrees with itself. VOC rows use the paper's class
order (ndbench's default `--class-order paper`).
"""

from __future__ import annotations

import io
from importlib import resources

import pandas as pd

from datasets_builders.errors import NdbenchError

# ndbench method -> the paper's column name; None where the paper has no comparable number
# (MKD alone is in Table 3 only, for CIFAR-10 with ViT-S16, which ndbench does not tabulate).
PAPER_METHODS: dict[str, str | None] = {
    "knn": None,
    "defend": "DEFEND+MKD",
    "mkd": None,
    "transformaly": "Transformaly",
    "kdad": "KDAD",
    "msad": "MSAD",
    "rdad": "RDAD",
    "dsvdd": "DSVDD",
}

# ndbench dataset -> the paper's row name in the summary tables.
PAPER_DATASETS: dict[str, str] = {
    "voc": "Pascal VOC",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fmnist": "FMNIST",
    "coco": "COCO",
}
# Table 4 prints COCO as "COCO Detection".
_ROW_ALIASES = {"COCO Detection": "COCO"}

# (dataset, setting) -> (table number, file, index column)
_PER_CLASS = {
    ("voc", "uni-class"): (6, "table6_voc_uni_class.csv", "normal_class"),
    ("voc", "multi-class"): (11, "table11_voc_multi_class.csv", "abnormal_class"),
    ("coco", "uni-class"): (9, "table9_coco_uni_class.csv", "coco_category_id"),
}
# setting -> (table number, file)
_SUMMARY = {
    "uni-class": (4, "table4_uni_class_one_vs_all.csv"),
    "multi-class": (2, "table2_multi_class_all_vs_one.csv"),
}


def _read(file: str) -> pd.DataFrame:
    text = resources.files("benchmark").joinpath("paper_tables", file).read_text(encoding="utf-8")
    return pd.read_csv(io.StringIO(text), dtype=str)


def paper_method(method: str) -> str | None:
    """The paper's column name for an ndbench method, or None when the paper has none."""
    return PAPER_METHODS.get(method)


def paper_column(method: str, table: int) -> str:
    """The label of a paper column beside a measured one, e.g. `defend (paper T6)`."""
    return f"{method} (paper T{table})"


def per_class_table_number(dataset: str, setting: str) -> int | None:
    """The paper table with per-class numbers for (dataset, setting), or None."""
    spec = _PER_CLASS.get((dataset, setting))
    return spec[0] if spec else None


def summary_table_number(setting: str) -> int:
    """The paper's summary table for a setting: 4 (uni-class) or 2 (multi-class)."""
    return _summary_spec(setting)[0]


def _per_class_spec(dataset: str, setting: str) -> tuple[int, str, str]:
    spec = _PER_CLASS.get((dataset, setting))
    if spec is None:
        have = ", ".join(f"{d} {s}" for d, s in _PER_CLASS)
        raise NdbenchError(
            f"the paper has no per-class table for {dataset} {setting}", f"it has {have}"
        )
    return spec


def _summary_spec(setting: str) -> tuple[int, str]:
    if setting not in _SUMMARY:
        raise NdbenchError(
            f"the paper has no summary table for setting {setting!r}",
            f"use one of {', '.join(_SUMMARY)}",
        )
    return _SUMMARY[setting]


def _split_avg(dataset: str, setting: str) -> tuple[pd.DataFrame, pd.Series | None]:
    _, file, index_column = _per_class_spec(dataset, setting)
    raw = _read(file).set_index(index_column)
    is_avg = raw.index == "AVG"
    avg = raw[is_avg].iloc[0].astype(float) if is_avg.any() else None
    values = raw[~is_avg].astype(float)
    values.index = pd.Index([int(i) for i in values.index], name=index_column)
    values.columns.name = None
    return values, avg


def paper_per_class(dataset: str, setting: str) -> pd.DataFrame:
    """Per-class AUROC (%) of a paper table: index = class id, columns = paper method names.

    VOC uni-class is Table 6, VOC multi-class Table 11 (index = the abnormal class), COCO
    uni-class Table 9 (index = COCO category id). The printed AVG row is not included.
    """
    return _split_avg(dataset, setting)[0]


def paper_per_class_avg(dataset: str, setting: str) -> pd.Series:
    """The paper's average per method: its printed AVG row, or the mean over its classes
    where the table prints none (Table 9)."""
    values, avg = _split_avg(dataset, setting)
    return avg if avg is not None else values.mean()


def paper_summary(setting: str) -> pd.DataFrame:
    """Mean AUROC (%) per dataset of Table 4 (uni-class) or 2 (multi-class):
    index = ndbench dataset name, columns = paper method names."""
    _, file = _summary_spec(setting)
    raw = _read(file).set_index("dataset")
    by_paper_name = {paper: ours for ours, paper in PAPER_DATASETS.items()}
    names = [by_paper_name[_ROW_ALIASES.get(row, row)] for row in raw.index]
    values = raw.astype(float)
    values.index = pd.Index(names, name="dataset")
    values.columns.name = None
    return values
