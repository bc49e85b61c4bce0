"""What the report shows, read from a results root: the records (unreadable files skipped
with a warning), and per dataset and setting the tables of `tables.py`, the jobs missing
from the grid (the methods and seeds run, on every split of the setting), each split's
stored test scores, and each run's metadata."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datasets_builders.errors import NdbenchError
from datasets_builders.sources import DATASETS

from . import tables
from .paper import PAPER_DATASETS
from .plots import SplitScores
from .records import NotARecord, Record, read_record_and_scores
from .reporting import class_names_under
from .tables import (
    AVG,
    SETTING_ORDER,
    STD_SUFFIX,
    leaderboard,
    method_order,
    per_class_table,
    row_label,
    select_records,
    summary_table,
)

Warn = Callable[[str], None]
ScoreArrays = tuple[np.ndarray, np.ndarray]  # a run's test (labels, scores), 1 = novel


@dataclass
class Missing:
    """Jobs of a block's grid (methods x splits x seeds) without a record."""

    by_method: dict[str, list[tuple[str, list[int]]]]  # method -> [(split title, seeds)]
    seeds: list[int]

    @property
    def count(self) -> int:
        return sum(len(seeds) for entries in self.by_method.values() for _, seeds in entries)


@dataclass
class Block:
    """Everything the page shows for one (dataset, setting)."""

    dataset: str
    setting: str
    records: list[Record]  # as the tables keep them (one config per method: see tables.select_records)
    table: pd.DataFrame
    methods: list[str]
    titles: dict[object, str]  # table row -> "3 · digit-3"
    missing: Missing
    runs: pd.DataFrame  # one row per run: its metadata
    common: dict[str, str]  # metadata equal in every run of the block
    configs: list[tuple[str, str, dict]]  # (method, config hash, config)
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.dataset}_{self.setting}"

    @property
    def columns(self) -> dict[str, str]:
        """Method -> its measured column in the per-class table."""
        return measured_columns(self.table, self.methods)

    def measured(self) -> pd.DataFrame:
        """The per-class table's measured values (AVG row included), one column per method."""
        frame = self.table[[self.columns[m] for m in self.methods]].astype(float)
        frame.columns = list(self.methods)
        return frame


def measured_columns(table: pd.DataFrame, methods) -> dict[str, str]:
    """Method -> the column of a results table holding its measured values: its name, or the
    longer name the tables give it (`<method> (preset ...)`) when they mark a preset other
    than the paper's. Methods without a column are left out."""
    found = {}
    for method in methods:
        if method in table.columns:
            found[method] = method
            continue
        marked = [c for c in table.columns if str(c).startswith(f"{method} (") and "(paper T" not in str(c)
                  and not str(c).endswith(STD_SUFFIX)]
        if marked:
            found[method] = marked[0]
    return found


@dataclass
class Results:
    """The readable records under a results root, arranged as the page shows them."""

    out: Path
    records: list[Record]
    paths: dict[int, Path]  # id(record) -> its record file
    scores: dict[int, ScoreArrays]  # id(record) -> its test labels and scores, for the records the figures draw
    blocks: list[Block]
    leaderboard: pd.DataFrame
    paper_summaries: dict[str, pd.DataFrame]  # setting -> summary table beside the paper's (datasets it has)
    names: dict[str, dict[int, str]]  # dataset -> class id -> name
    skipped: list[str]  # unreadable record files, with the reason


def read_record_files(out: Path, on_unreadable: Callable[[Path, str], None],
                      on_other: Callable[[Path, str], None] | None = None,
                      scores: dict[Path, ScoreArrays] | None = None) -> list[tuple[Path, Record]]:
    """Every whole record under `<out>/runs` with its path, in path order. A file that
    `records.read_record` refuses (bad JSON, missing fields, a changed scores file) is passed to
    `on_unreadable` with the reason and left out, so a partly damaged results folder still reads;
    a JSON file not named like a record (a user's notes) is no record: it goes to `on_other`.
    Given `scores`, each record's test labels and scores go there by record path, as the
    check of its scores file read them."""
    runs = Path(out) / "runs"
    found: list[tuple[Path, Record]] = []
    for path in sorted(runs.rglob("*.json")) if runs.is_dir() else []:
        try:
            record, (labels, values) = read_record_and_scores(path)
            found.append((path, record))
            if scores is not None:
                scores[path] = np.asarray(labels, dtype=np.int64), np.asarray(values, dtype=np.float64)
        except NotARecord as exc:
            if on_other is not None:
                on_other(path, exc.problem)
        except NdbenchError as exc:
            on_unreadable(path, exc.problem)
    return found


def gather(out: Path, warn: Warn | None = None) -> Results:
    """Read every record under `<out>/runs` (unreadable files skipped with a warning) and
    build the tables of each dataset and setting; an error when no record is readable."""
    out = Path(out)
    warn = warn or (lambda message: None)
    skipped: list[str] = []

    def unreadable(path: Path, reason: str) -> None:
        skipped.append(f"{path}: {reason}")
        warn(f"skipped unreadable record {path} ({reason})")

    scores: dict[Path, ScoreArrays] = {}
    found = read_record_files(out, unreadable, lambda path, problem: warn(f"{problem}; ignored"), scores)
    if not found:
        raise NdbenchError(f"no readable records under {out / 'runs'}",
                           "run `ndbench run --method METHOD` (or `ndbench demo`) first")
    records = [record for _, record in found]
    names = _class_names(out, warn)
    splits = tables.manifest_splits(out / "splits")
    notes: list[str] = []
    with _collect_table_notes(notes):
        blocks = [_block(records, dataset, setting, names.get(dataset), splits.get((dataset, setting), ()))
                  for dataset, setting in _pairs(records)]
        board = _leaderboard(records, splits)
        summaries = paper_summaries(records)
    for note in dict.fromkeys(notes):
        warn(f"note: {note}")
    paths = {id(r): p for p, r in found}
    drawn = {id(r): scores[paths[id(r)]] for block in blocks for r in drawn_records(block).values()}
    return Results(out, records, paths, drawn, blocks, board, summaries, names, skipped)


@contextmanager
def _collect_table_notes(sink: list[str]) -> Iterator[None]:
    """Gather the notes the table functions log (each table logs them again) into `sink`
    instead of printing them; the page lists them where they apply."""
    logger = logging.getLogger(tables.__name__)

    def collect(entry: logging.LogRecord) -> bool:
        sink.append(entry.getMessage())
        return False

    logger.addFilter(collect)
    try:
        yield
    finally:
        logger.removeFilter(collect)


def _class_names(out: Path, warn: Warn) -> dict[str, dict[int, str]]:
    try:
        return class_names_under(out)
    except (NdbenchError, OSError, ValueError) as exc:
        warn(f"class names unavailable ({exc}); the report shows class ids")
        return {}


def _pairs(records: list[Record]) -> list[tuple[str, str]]:
    """(dataset, setting) pairs in the tables' order: datasets as listed, then others."""
    def rank(pair: tuple[str, str]) -> tuple:
        dataset, setting = pair
        d = DATASETS.index(dataset) if dataset in DATASETS else len(DATASETS)
        s = SETTING_ORDER.index(setting) if setting in SETTING_ORDER else len(SETTING_ORDER)
        return d, dataset, s, setting

    return sorted({(r.dataset, r.setting) for r in records}, key=rank)


def split_title(row, names: dict[int, str] | None) -> str:
    """A split's label in figures: "3 · digit-3" for a class row with a name, else the row."""
    if isinstance(row, int) and names and row in names:
        return f"{row} · {names[row]}"
    return str(row)


def _block(records: list[Record], dataset: str, setting: str, names: dict[int, str] | None,
           splits: Iterable[str] = ()) -> Block:
    """The tables and figures of one (dataset, setting); `splits`: every split it has (rows
    without a record show as missing)."""
    table = per_class_table(records, dataset, setting, class_names=names, paper=True, splits=splits)
    kept, _ = select_records(r for r in records if r.dataset == dataset and r.setting == setting)
    methods = method_order(r.method for r in kept)
    rows = [row for row in table.index if row != AVG]
    titles = {row: split_title(row, names) for row in rows}
    runs, common = runs_frame(kept, titles, setting)
    return Block(dataset, setting, kept, table, methods, titles, missing_jobs(kept, titles, setting), runs, common,
                 configs(kept), notes=list(table.attrs.get("notes", [])))


def missing_jobs(records: list[Record], titles: dict[object, str], setting: str) -> Missing:
    """Jobs of the grid (every method and seed seen in these records, on every split of
    `titles`: the table's rows) that have no record."""
    have = {(r.method, row_label(r.split, setting), r.seed) for r in records}
    seeds = sorted({r.seed for r in records})
    by_method: dict[str, list[tuple[str, list[int]]]] = {}
    for method in method_order(r.method for r in records):
        entries = []
        for row, title in titles.items():
            absent = [s for s in seeds if (method, row, s) not in have]
            if absent:
                entries.append((title, absent))
        if entries:
            by_method[method] = entries
    return Missing(by_method, seeds)


def drawn_records(block: Block) -> dict[tuple[object, str], Record]:
    """(table row, method) -> the record whose scores the figures draw: the one with the lowest seed."""
    chosen: dict[tuple[object, str], Record] = {}
    for record in sorted(block.records, key=lambda r: r.seed, reverse=True):
        chosen[(row_label(record.split, block.setting), record.method)] = record
    return chosen


def split_scores(block: Block, scores: dict[int, ScoreArrays]) -> list[SplitScores]:
    """Per split (table row order): each method's test labels and scores (`scores`: by
    id(record)), from its record with the lowest seed."""
    chosen = drawn_records(block)
    panels = []
    for row, title in block.titles.items():
        panel = SplitScores(title)
        for method in block.methods:
            record = chosen.get((row, method))
            if record is not None:
                panel.scores[method] = scores[id(record)]
        panels.append(panel)
    return panels


def paper_summaries(records: list[Record]) -> dict[str, pd.DataFrame]:
    """Per setting, the summary table (paper Table 4 / 2 layout) with the paper's numbers
    beside, over the datasets the paper reports; settings with none of them are left out."""
    found = {}
    for setting in SETTING_ORDER:
        chosen = [r for r in records if r.setting == setting and r.dataset in PAPER_DATASETS]
        if chosen:
            found[setting] = summary_table(chosen, setting, paper=True)
    return found


def _leaderboard(records: list[Record], splits: dict[tuple[str, str], list[str]]) -> pd.DataFrame:
    """The leaderboard with `<column>_std` (over seeds, from the summary tables) beside each
    (dataset, setting) column where there are several seeds; `splits` as `manifest_splits`
    gives them."""
    board = leaderboard(records, splits=splits)
    summaries = {s: summary_table(records, s, splits=splits) for s in {r.setting for r in records}}
    columns = {}
    for column in board.columns:
        columns[column] = board[column]
        dataset, _, setting = str(column).partition(" ")
        summary = summaries.get(setting)
        if summary is None or dataset not in summary.index:
            continue
        stds = {m: summary.at[dataset, m + STD_SUFFIX] for m in board.index if m + STD_SUFFIX in summary.columns}
        if any(not math.isnan(v) for v in stds.values()):
            columns[column + STD_SUFFIX] = pd.Series({m: stds.get(m, math.nan) for m in board.index})
    frame = pd.DataFrame(columns, index=board.index)
    frame.attrs["notes"] = board.attrs.get("notes", [])
    return frame


def runs_frame(records: list[Record], titles: dict[object, str], setting: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per run (method, split, seed order) with its metadata; fields equal in every
    run are returned apart (name -> value) instead of as columns."""
    rank = {m: i for i, m in enumerate(method_order(r.method for r in records))}
    position = {row: i for i, row in enumerate(titles)}

    def order(r: Record) -> tuple:
        return rank[r.method], position.get(row_label(r.split, setting), len(position)), r.split, r.seed

    rows = []
    for r in sorted(records, key=order):
        row = {
            "method": r.method,
            "split": titles.get(row_label(r.split, setting), r.split),
            "seed": r.seed,
            "config": r.config_hash,
            "train s": round(r.train_seconds, 1),
            "score s": round(_test_images(r) / r.inference_images_per_s, 1) if r.inference_images_per_s else None,
            "score img/s": round(r.inference_images_per_s, 1),
            "train imgs": r.counts.get("train"),
            "test normal / novel": f"{r.counts.get('test_normal')} / {r.counts.get('test_novel')}",
            "preset": r.preset or "(method defaults)",
            "multi-class weighting": r.multi_class_weighting or "–",
            "device": r.device,
            "versions": ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())),
            "split sha256": r.split_sha256[:12],
            "created": r.created,
        }
        cost = r.extra.get("cost") if isinstance(r.extra, dict) else None
        for name, value in sorted(cost.items()) if isinstance(cost, dict) else []:
            row[f"cost: {name}"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    common = {}
    for column in ("preset", "multi-class weighting", "device", "versions"):
        values = frame[column].astype(str).unique()
        if len(values) == 1:
            common[column] = str(values[0])
            frame = frame.drop(columns=column)
    return frame, common


def _test_images(record: Record) -> int:
    return int(record.counts.get("test_normal", 0)) + int(record.counts.get("test_novel", 0))


def configs(records: list[Record]) -> list[tuple[str, str, dict]]:
    """(method, config hash, full config) once per config, in table order."""
    rank = {m: i for i, m in enumerate(method_order(r.method for r in records))}
    found = {(r.method, r.config_hash): r.config for r in records}
    return [(m, h, found[(m, h)]) for m, h in sorted(found, key=lambda k: (rank[k[0]], k[1]))]

def map_caption(stem: str, names: dict[str, dict[int, str]]) -> str:
    """`defend__embedded__uni-class__3__seed0` -> "defend · embedded uni-class 3 · digit-3 · seed 0";
    a config hash after the seed (a grid of a --preset or --set config) is named last."""
    parts = stem.split("__")
    if len(parts) not in (5, 6):
        return stem
    method, dataset, setting, split, seed = parts[:5]
    row = row_label(split, setting)
    title = split_title(row, names.get(dataset))
    kind = "normal class" if setting == "uni-class" else "abnormal class"
    config = f" · config {parts[5]}" if len(parts) == 6 else ""
    return f"{method} · {dataset} {setting}, {kind} {title} · {seed.replace('seed', 'seed ')}{config}"
