"""Result tables built from run records, as Markdown and CSV.

- per-class (the layout of the paper's appendix Tables 6, 9 and 11): one row per split
  (uni-class: the normal class; all-vs-one `except-k`: the abnormal class k; any other
  multi-class split under its own name), one column per method, last row AVG; where the
  split manifests are given (`manifest_splits`), every split of the setting has its row,
  recorded or not, so that AVG coverage counts against all of them;
- summary (like paper Tables 4 and 2): one row per dataset, cell = the per-class AVG;
- leaderboard: one row per method, one column per (dataset, setting), plus the overall mean.

Values are percent. With several seeds a cell is the mean over seeds and the frame carries
a `<method>_std` column (sample standard deviation, ddof=1) that `to_markdown` renders as
"mean ± std". Where one method has records of several configs for a (dataset, setting), only
the config covering the most splits counts (then the one with the most jobs (split, seed), the
newest by `created` among equals), so a trial `--set` run on a few classes, with however many
seeds, does not replace a complete run; the dropped ones are
reported as notes (logged, and in `DataFrame.attrs["notes"]`).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datasets_builders.atomic import atomic_write_text
from datasets_builders.errors import NdbenchError
from datasets_builders.sources import DATASETS
from datasets_builders.splits import ALL_VS_ONE_NAME, NORMAL_SET_NAME, SETTINGS, UNI_CLASS_NAME

from . import paper as paper_ref
from .metrics import METRICS
from .records import Record

PREFERRED_METHODS = ("knn", "defend", "mkd", "transformaly", "kdad", "msad", "rdad", "dsvdd")
SETTING_ORDER = ("uni-class", "multi-class")
AVG = "AVG"
STD_SUFFIX = "_std"
NAN_TEXT = "–"
DEFAULT_TABLES_DIR = Path("results/tables")
METRIC_LABELS = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-in",
    "aupr_out": "AUPR-out",
    "fpr95": "FPR@95TPR",
}
_INDEX_NAMES = {"uni-class": "normal_class", "multi-class": "abnormal_class"}
_CSV_DECIMALS = 4

log = logging.getLogger(__name__)

Row = int | str


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods in the fixed table order: knn, defend, mkd, transformaly, kdad, msad, rdad,
    dsvdd, then any others alphabetically."""
    unique = set(methods)
    known = [m for m in PREFERRED_METHODS if m in unique]
    return known + sorted(unique - set(PREFERRED_METHODS))


def _ordered(items: Iterable[str], preferred: Iterable[str]) -> list[str]:
    unique = set(items)
    first = [x for x in preferred if x in unique]
    return first + sorted(unique - set(first))


def _row_key(row: Row) -> tuple:
    return (0, row, "") if isinstance(row, int) else (1, 0, row)


def row_label(split: str, setting: str) -> Row:
    """The per-class row of a split: the class id for uni-class splits and all-vs-one
    `except-k` splits (the abnormal class k), else the split's own name."""
    if setting == "uni-class" and split.isdigit():
        return int(split)
    if setting == "multi-class" and split.startswith("except-") and split[7:].isdigit():
        return int(split[7:])
    return split


def manifest_splits(splits_root: Path) -> dict[tuple[str, str], list[str]]:
    """The split names of each (dataset, setting) with manifests under `splits_root`
    (`<dataset>/<setting>/<name>.json`); files whose name is not a split name of their
    setting are left out."""
    patterns = {"uni-class": (UNI_CLASS_NAME,), "multi-class": (ALL_VS_ONE_NAME, NORMAL_SET_NAME)}
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    for setting in SETTINGS:
        for path in sorted(Path(splits_root).glob(f"*/{setting}/*.json")):
            if path.is_file() and any(p.fullmatch(path.stem) for p in patterns[setting]):
                found[(path.parent.parent.name, setting)].append(path.stem)
    return dict(found)


def select_records(records: Iterable[Record]) -> tuple[list[Record], list[str]]:
    """Keep, per (dataset, setting, method), only the config covering the most splits (then
    with the most jobs, then the newest) and, per job (split, seed), only its newest record.
    Returns the kept records and notes on what was dropped."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for record in records:
        groups[(record.dataset, record.setting, record.method)].append(record)
    kept: list[Record] = []
    notes: list[str] = []
    for (dataset, setting, method), group in sorted(groups.items()):
        newest: dict[str, str] = {}
        jobs: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for record in group:
            newest[record.config_hash] = max(newest.get(record.config_hash, ""), record.created)
            jobs[record.config_hash].add((record.split, record.seed))
        if len(newest) > 1:
            covered = {h: len({split for split, _ in done}) for h, done in jobs.items()}
            keep = max(newest, key=lambda h: (covered[h], len(jobs[h]), newest[h], h))
            dropped = [r for r in group if r.config_hash != keep]
            others = ", ".join(sorted(set(newest) - {keep}))
            notes.append(
                f"{method} on {dataset} {setting}: kept config {keep} ({covered[keep]} splits, {len(jobs[keep])} "
                f"jobs; the most splits, then jobs, then the newest); ignored {len(dropped)} record(s) of config "
                f"{others} (tabulate a trial config apart with its own --out)"
            )
            group = [r for r in group if r.config_hash == keep]
        by_job: dict[tuple[str, int], Record] = {}
        for record in sorted(group, key=lambda r: r.created):
            by_job[(record.split, record.seed)] = record
        if len(by_job) < len(group):
            notes.append(
                f"{method} on {dataset} {setting}: {len(group) - len(by_job)} duplicate "
                "record(s) of the same split and seed; kept the newest"
            )
        kept += [by_job[job] for job in sorted(by_job)]
    return kept, notes


def user_preset(record: Record) -> str:
    """The part of a record's preset chain chosen with `--preset` (embedded layers dropped)."""
    return "+".join(p for p in record.preset.split("+") if p and not p.startswith("embedded"))


def measured_label(method: str, records: list[Record], notes: list[str]) -> str:
    """The measured column's name beside a paper column: the method name when its records
    used the preset behind the paper's numbers, else `<method> (preset <name>)` and a note."""
    from methods.registry import get_class

    try:
        expected = get_class(method).paper_preset or ""
    except NdbenchError:  # a method this installation does not know: nothing to compare
        return method
    used = sorted({user_preset(r) for r in records})
    if used == [expected]:
        return method
    shown = "+".join(p or "defaults" for p in used)
    notes.append(
        f"{method}: measured with preset {shown}; the paper's numbers came from "
        f"{expected or 'the defaults'} (`ndbench run --method {method} --preset paper`; see docs/FIDELITY.md)"
    )
    return f"{method} (preset {shown})"


def _check_metric(metric: str, paper: bool) -> None:
    if metric not in METRICS:
        raise NdbenchError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    if paper and metric != "auroc":
        raise NdbenchError(
            f"the paper reports AUROC only, not {metric}", "drop --paper or use AUROC"
        )


def _value(record: Record, metric: str) -> float:
    if metric not in record.metrics:
        raise NdbenchError(
            f"record {record.split_id} of {record.method} has no metric {metric!r}",
            "re-run it with --force to write a current record",
        )
    return 100.0 * float(record.metrics[metric])


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


@dataclass
class _Block:
    """The per-seed values of one (dataset, setting) and what the tables derive from them."""

    setting: str
    rows: list[Row]
    methods: list[str]
    mean: dict[tuple[Row, str], float]
    std: dict[tuple[Row, str], float]
    avg_mean: dict[str, float]
    avg_std: dict[str, float]
    seeded: set[str]  # methods with several seeds somewhere in the block
    notes: list[str] = field(default_factory=list)

    def class_rows(self) -> list[Row]:
        """The rows AVG averages: class-id rows where there are any, else all rows."""
        return [r for r in self.rows if isinstance(r, int)] or list(self.rows)


def _block(
    records: list[Record], dataset: str, setting: str, metric: str, splits: Iterable[str] = ()
) -> _Block:
    per_seed: dict[tuple[Row, str], dict[int, float]] = defaultdict(dict)
    for record in records:
        per_seed[(row_label(record.split, setting), record.method)][record.seed] = _value(
            record, metric
        )
    rows = sorted(
        {row for row, _ in per_seed} | {row_label(s, setting) for s in splits}, key=_row_key
    )
    methods = method_order(m for _, m in per_seed)
    mean = {key: float(np.mean(list(v.values()))) for key, v in per_seed.items()}
    std = {key: _std(list(v.values())) for key, v in per_seed.items()}
    seeded = {m for (_, m), v in per_seed.items() if len(v) > 1}
    block = _Block(setting, rows, methods, mean, std, {}, {}, seeded)
    class_rows = block.class_rows()
    left_out = [str(r) for r in rows if r not in class_rows]
    if left_out:
        chosen = all(NORMAL_SET_NAME.fullmatch(r) for r in left_out)
        block.notes.append(
            f"{dataset} {setting}: AVG is over the class rows only; it leaves out {', '.join(left_out)} "
            + ("(runs on their own --normal class list)" if chosen else "(splits that are not one class)")
        )
    for method in methods:
        covered = [r for r in class_rows if (r, method) in mean]
        block.avg_mean[method] = (
            float(np.mean([mean[(r, method)] for r in covered])) if covered else math.nan
        )
        if covered and len(covered) < len(class_rows):
            block.notes.append(
                f"{method} on {dataset} {setting}: AVG covers {len(covered)} of "
                f"{len(class_rows)} rows"
            )
        # AVG std: spread over seeds of each seed's class average, when every seed has
        # every row the method has (otherwise the seed averages are not comparable).
        seeds = sorted({s for r in covered for s in per_seed[(r, method)]})
        complete = all(set(per_seed[(r, method)]) == set(seeds) for r in covered)
        block.avg_std[method] = (
            _std([float(np.mean([per_seed[(r, method)][s] for r in covered])) for s in seeds])
            if covered and complete
            else math.nan
        )
    return block


def _paper_per_class_ok(records: list[Record], dataset: str, notes: list[str]) -> bool:
    orders = {str(r.extra.get("class_order", "paper")) for r in records}
    if dataset == "voc" and orders != {"paper"}:
        notes.append(
            f"voc records use class order {', '.join(sorted(orders - {'paper'}))}, not the "
            "paper's; paper per-class columns left out (build with --class-order paper)"
        )
        return False
    return True


def _per_class_frame(
    records: Iterable[Record],
    dataset: str,
    setting: str,
    metric: str,
    class_names: dict[int, str] | None,
    paper: bool,
    splits: Iterable[str] = (),
) -> tuple[pd.DataFrame, list[str]]:
    _check_metric(metric, paper)
    records = list(records)
    chosen, notes = select_records(
        r for r in records if r.dataset == dataset and r.setting == setting
    )
    if not chosen:
        have = sorted({f"{r.dataset} {r.setting}" for r in records})
        raise NdbenchError(
            f"no run records for {dataset} {setting}",
            f"records exist for: {', '.join(have)}" if have else "run `ndbench run --method knn` first",
        )
    block = _block(chosen, dataset, setting, metric, splits)
    notes += block.notes
    table = paper_ref.per_class_table_number(dataset, setting) if paper else None
    if table is not None and not _paper_per_class_ok(chosen, dataset, notes):
        table = None
    if table is not None:
        paper_values = paper_ref.paper_per_class(dataset, setting)
        paper_avg = paper_ref.paper_per_class_avg(dataset, setting)
    index = block.rows + [AVG]
    columns: dict[str, list] = {}
    if class_names is not None:
        columns["name"] = [
            class_names.get(r, "") if isinstance(r, int) else "" for r in block.rows
        ] + [""]
    for method in block.methods:
        name = paper_ref.paper_method(method)
        key = method
        if table is not None and name in paper_values.columns:
            key = measured_label(method, [r for r in chosen if r.method == method], notes)
        columns[key] = [block.mean.get((r, method), math.nan) for r in block.rows] + [
            block.avg_mean[method]
        ]
        if method in block.seeded:
            columns[key + STD_SUFFIX] = [
                block.std.get((r, method), math.nan) for r in block.rows
            ] + [block.avg_std[method]]
        if table is not None and name in paper_values.columns:
            columns[paper_ref.paper_column(method, table)] = [
                float(paper_values.at[r, name])
                if isinstance(r, int) and r in paper_values.index
                else math.nan
                for r in block.rows
            ] + [float(paper_avg[name])]
    frame = pd.DataFrame(columns, index=pd.Index(index, dtype=object))
    frame.index.name = _INDEX_NAMES.get(setting, "split")
    return frame, notes


def _report(frame: pd.DataFrame, notes: list[str], warn: bool = True) -> pd.DataFrame:
    for note in notes if warn else ():
        log.warning(note)
    frame.attrs["notes"] = list(notes)
    return frame


def per_class_table(
    records: Iterable[Record],
    dataset: str,
    setting: str,
    metric: str = "auroc",
    class_names: dict[int, str] | None = None,
    paper: bool = False,
    warn: bool = True,
    splits: Iterable[str] = (),
) -> pd.DataFrame:
    """Per-class table of one (dataset, setting): rows = class (uni-class: the normal class;
    all-vs-one: the abnormal class; other splits by name), last row AVG (mean over the
    class rows; a note names the rows it leaves out); columns = an optional `name`, then
    per method its mean over seeds in percent, `<method>_std` where it has several seeds,
    and with `paper=True` the paper's number as `<method> (paper T<n>)` where the paper has
    a per-class table. `splits`
    (the setting's split names, see `manifest_splits`) adds a row for each split without
    records, empty where a method has none. Its notes (in `attrs["notes"]`) are also
    logged unless `warn` is False."""
    frame, notes = _per_class_frame(records, dataset, setting, metric, class_names, paper, splits)
    return _report(frame, notes, warn)


def _blocks(
    records: Iterable[Record],
    metric: str,
    splits: Mapping[tuple[str, str], Iterable[str]] | None = None,
) -> tuple[dict[tuple[str, str], _Block], list[str]]:
    chosen, notes = select_records(records)
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in chosen:
        groups[(record.dataset, record.setting)].append(record)
    blocks = {}
    for dataset in _ordered((d for d, _ in groups), DATASETS):
        for setting in _ordered((s for d, s in groups if d == dataset), SETTING_ORDER):
            block = _block(
                groups[(dataset, setting)], dataset, setting, metric,
                (splits or {}).get((dataset, setting), ()),
            )
            blocks[(dataset, setting)] = block
            notes += block.notes
    return blocks, notes


def _summary_frame(
    records: Iterable[Record],
    setting: str,
    metric: str,
    paper: bool,
    splits: Mapping[tuple[str, str], Iterable[str]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    _check_metric(metric, paper)
    records = [r for r in records if r.setting == setting]
    if not records:
        raise NdbenchError(f"no run records for setting {setting}", "run `ndbench run --method knn` first")
    blocks, notes = _blocks(records, metric, splits)
    datasets = [d for d, _ in blocks]
    methods = method_order(m for b in blocks.values() for m in b.methods)
    table = paper_ref.summary_table_number(setting) if paper else None
    paper_values = paper_ref.paper_summary(setting) if paper else None
    columns: dict[str, list[float]] = {}
    for method in methods:
        name = paper_ref.paper_method(method)
        key = method
        if table is not None and name in paper_values.columns:
            key = measured_label(method, [r for r in records if r.method == method], notes)
        columns[key] = [blocks[(d, setting)].avg_mean.get(method, math.nan) for d in datasets]
        stds = [blocks[(d, setting)].avg_std.get(method, math.nan) for d in datasets]
        if any(method in blocks[(d, setting)].seeded for d in datasets):
            columns[key + STD_SUFFIX] = stds
        if table is not None and name in paper_values.columns:
            columns[paper_ref.paper_column(method, table)] = [
                float(paper_values.at[d, name]) if d in paper_values.index else math.nan
                for d in datasets
            ]
    frame = pd.DataFrame(columns, index=pd.Index(datasets, name="dataset", dtype=object))
    return frame, notes


def summary_table(
    records: Iterable[Record], setting: str, metric: str = "auroc", paper: bool = False,
    splits: Mapping[tuple[str, str], Iterable[str]] | None = None,
) -> pd.DataFrame:
    """Per-dataset table of one setting (like paper Tables 4 and 2): rows = datasets,
    columns = methods, cell = the per-class table's AVG in percent (`<method>_std` where
    there are several seeds); with `paper=True` the paper's Table 4 (uni-class) or 2
    (multi-class) number beside each method it has. `splits` as in `write_tables`."""
    frame, notes = _summary_frame(records, setting, metric, paper, splits)
    return _report(frame, notes)


def _leaderboard_frame(
    records: Iterable[Record],
    metric: str,
    splits: Mapping[tuple[str, str], Iterable[str]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    _check_metric(metric, False)
    blocks, notes = _blocks(records, metric, splits)
    if not blocks:
        raise NdbenchError("no run records to rank", "run `ndbench run --method knn` first")
    methods = method_order(m for b in blocks.values() for m in b.methods)
    columns = {
        f"{d} {s}": [blocks[(d, s)].avg_mean.get(m, math.nan) for m in methods]
        for d, s in blocks
    }
    frame = pd.DataFrame(columns, index=pd.Index(methods, name="method", dtype=object))
    frame["mean"] = frame.mean(axis=1, skipna=True)
    rank = {m: i for i, m in enumerate(methods)}
    order = sorted(methods, key=lambda m: (-frame.at[m, "mean"], rank[m]))
    return frame.loc[order], notes


def leaderboard(records: Iterable[Record], metric: str = "auroc",
                splits: Mapping[tuple[str, str], Iterable[str]] | None = None) -> pd.DataFrame:
    """Rows = methods, columns = `<dataset> <setting>` (the per-class AVG, percent) plus
    `mean` over the columns the method has, sorted by `mean`, best first. `splits` (see
    `manifest_splits`): every split of each (dataset, setting), so that AVG coverage counts
    against all of them, as the table files do."""
    frame, notes = _leaderboard_frame(records, metric, splits)
    return _report(frame, notes)


def _cell(value, std, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NAN_TEXT
    text = f"{value:.{decimals}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std:.{decimals}f}"
    return text


def display_frame(df: pd.DataFrame, decimals: int = 1) -> tuple[pd.DataFrame, list[str]]:
    """The table as text cells (index as the first column): numbers with `decimals`
    decimals, "mean ± std" where a `<column>_std` holds a value, "–" for missing values;
    with each shown column's alignment ("right" for numbers, else "left")."""
    std_columns = {
        c for c in df.columns if c.endswith(STD_SUFFIX) and c[: -len(STD_SUFFIX)] in df.columns
    }
    shown = df.reset_index()
    out = pd.DataFrame(index=shown.index)
    align = []
    for column in shown.columns:
        if column in std_columns:
            continue
        values = shown[column]
        if column != df.index.name and pd.api.types.is_numeric_dtype(values):
            stds = shown[column + STD_SUFFIX] if column + STD_SUFFIX in std_columns else None
            out[column] = [
                _cell(v, None if stds is None else stds.iloc[i], decimals)
                for i, v in enumerate(values)
            ]
            align.append("right")
        else:
            out[column] = ["" if pd.isna(v) else str(v) for v in values]
            align.append("left")
    return out, align


# Characters that would end a Markdown table row or cell; they read as spaces in Markdown.
_MARKDOWN_BREAKS = str.maketrans(dict.fromkeys("\n\r\t\v\f\x1c\x1d\x1e\x85\u2028\u2029", " "))


def markdown_text(text: str) -> str:
    """`text` as one pipe-table cell: `|` escaped as `\\|`, line breaks and tabs as spaces."""
    return text.translate(_MARKDOWN_BREAKS).replace("|", "\\|")


def to_markdown(df: pd.DataFrame, decimals: int = 1) -> str:
    """A GitHub pipe table: numbers with `decimals` decimals, "mean ± std" where a
    `<column>_std` holds a value, "–" for missing values; names holding `|` or line breaks
    are escaped (see `markdown_text`) so that every row stays one table row."""
    out, align = display_frame(df, decimals)
    out = out.apply(lambda column: column.map(markdown_text))
    out.columns = [markdown_text(str(c)) for c in out.columns]
    text = out.to_markdown(index=False, tablefmt="pipe", disable_numparse=True, colalign=align)
    return text + "\n"


def to_csv(df: pd.DataFrame) -> str:
    """CSV text of a table: plain numbers (rounded to 4 decimals), empty where missing."""
    return df.round(_CSV_DECIMALS).to_csv(lineterminator="\n")


def _markdown_file(title: str, frame: pd.DataFrame, notes: list[str]) -> str:
    text = f"{title}\n\n{to_markdown(frame)}"
    if notes:
        text += "\nNotes:\n\n" + "".join(f"- {note}\n" for note in notes)
    return text


def write_tables(
    records: Iterable[Record],
    out_dir: Path = DEFAULT_TABLES_DIR,
    paper: bool = False,
    class_names: dict[str, dict[int, str]] | None = None,
    metric: str = "auroc",
    splits: Mapping[tuple[str, str], Iterable[str]] | None = None,
) -> list[Path]:
    """Write `per_class_<dataset>_<setting>`, `summary_<setting>` and `leaderboard`, each
    as `.md` and `.csv`, under `out_dir` (atomically), and remove such tables an earlier
    call wrote for a (dataset, setting) with no record now; `splits` (see `manifest_splits`)
    gives each per-class table a row for every split of its (dataset, setting). Returns
    the written paths."""
    _check_metric(metric, paper)
    records = list(records)
    if not records:
        raise NdbenchError("no run records to tabulate", "run `ndbench run --method knn` first")
    out_dir = Path(out_dir)
    label = f"{METRIC_LABELS[metric]} (%)"
    seeds_note = "mean ± std over seeds where there are several"
    blocks, _ = _blocks(records, metric, splits)
    written: list[Path] = []
    all_notes: list[str] = []

    def emit(stem: str, title: str, frame: pd.DataFrame, notes: list[str]) -> None:
        md, csv = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        atomic_write_text(md, _markdown_file(title, frame, notes))
        atomic_write_text(csv, to_csv(frame))
        written.extend([md, csv])
        all_notes.extend(n for n in notes if n not in all_notes)

    for dataset, setting in blocks:
        names = (class_names or {}).get(dataset)
        frame, notes = _per_class_frame(
            records, dataset, setting, metric, names, paper, (splits or {}).get((dataset, setting), ())
        )
        rows = "normal class" if setting == "uni-class" else "abnormal class (all-vs-one)"
        title = f"# {dataset} {setting}: {label} per {rows}; AVG = mean over them; {seeds_note}"
        emit(f"per_class_{dataset}_{setting}", title, frame, notes)
    for setting in _ordered({s for _, s in blocks}, SETTING_ORDER):
        frame, notes = _summary_frame(records, setting, metric, paper, splits)
        emit(f"summary_{setting}", f"# {setting}: mean {label} per dataset; {seeds_note}",
             frame, notes)
    frame, notes = _leaderboard_frame(records, metric, splits)
    emit("leaderboard", f"# Leaderboard: mean {label} per dataset and setting", frame, notes)
    # Tables of a (dataset, setting) no record is left for would contradict the leaderboard.
    for stale in sorted({*out_dir.glob("per_class_*.*"), *out_dir.glob("summary_*.*")} - set(written)):
        if stale.suffix in (".md", ".csv") and stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)
    for note in all_notes:
        log.warning(note)
    return written
