"""Printing what a run produced: per-class tables on the terminal and files, job outcomes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .console import stdout_console

if TYPE_CHECKING:
    from .runner import SplitReader


def class_names_under(out: Path, splits: SplitReader | None = None) -> dict[str, dict[int, str]]:
    """Class names of every dataset whose index lies under `<out>/splits` (read by `splits`,
    a run's reader, when it reads that folder)."""
    from datasets_builders.index import DatasetIndex

    root = Path(out) / "splits"
    read = splits.index if splits is not None and splits.root == root else lambda name: DatasetIndex.read(root / name)
    return {meta.parent.name: read(meta.parent.name).class_names for meta in sorted(root.glob("*/index.json"))}


def show_tables(records, dataset: str, settings: list[str], paper: bool, class_names: dict[str, dict[int, str]],
                splits: dict[tuple[str, str], list[str]] | None = None) -> None:
    """Print the per-class tables of `records` on `dataset` (their notes are logged when the
    table files are written), with `class_names` by dataset (`class_names_under`) and, given
    `splits` (`tables.manifest_splits`), a row for each split whose manifest is built."""
    from .tables import per_class_table, to_markdown

    console = stdout_console()
    for setting in settings:
        chosen = [r for r in records if r.dataset == dataset and r.setting == setting]
        if not chosen:
            continue
        table = per_class_table(chosen, dataset, setting, class_names=class_names.get(dataset), paper=paper,
                                warn=False, splits=(splits or {}).get((dataset, setting), ()))
        console.print(f"\n[bold]{dataset} {setting}: AUROC (%)[/bold]")
        console.print(to_markdown(table), markup=False)


def print_tables(out: Path, records, dataset: str, settings: list[str], paper: bool,
                 splits: SplitReader | None = None) -> list[Path]:
    """Write every table under <out>/tables from every readable record under <out>/runs, so
    that a run of a few jobs never narrows the tables of the runs before it, and print the
    per-class tables of `dataset` and `settings` as written (nothing when `records`, the run's
    own, is empty). `splits`: the run's reader of the indexes and manifests, when it has one."""
    from .records import load_records
    from .tables import manifest_splits, write_tables

    if not records:
        return []
    # Damaged records are left out quietly here: `ndbench table` reports them.
    ours = splits is not None and splits.root == Path(out) / "splits"
    everything = load_records(out, on_skip=lambda exc: None, manifest=splits.manifest if ours else None) or records
    names, built = class_names_under(out, splits), manifest_splits(Path(out) / "splits")
    show_tables(everything, dataset, settings, paper, names, built)
    return write_tables(everything, Path(out) / "tables", paper=paper, class_names=names, splits=built)


def report_results(results, console) -> int:
    """Print failed jobs and those another run holds; exit code 0 when none failed (jobs
    running elsewhere are not failures), 2 when only user errors failed, else 1 (a crash, a
    method that returned NaN scores, a Ray worker that died)."""
    from .runner import DONE, FAILED, RUNNING_ELSEWHERE, SKIPPED

    failed = [r for r in results if r.status == FAILED]
    elsewhere = [r for r in results if r.status == RUNNING_ELSEWHERE]
    done = sum(r.status == DONE for r in results)
    skipped = sum(r.status == SKIPPED for r in results)
    summary = f"{done} jobs ran, {skipped} skipped (record exists; --force re-runs), {len(failed)} failed"
    if elsewhere:
        summary += f", {len(elsewhere)} running elsewhere"
    console.print(summary, soft_wrap=True)
    for r in elsewhere:
        print(f"ndbench: job {r.job.describe()} is running elsewhere ({r.error}); its record appears when that run "
              "finishes (if that run is dead, delete its .lock file beside the record)", file=sys.stderr)
    for r in failed:
        print(f"ndbench: job {r.job.describe()} failed: {r.error}", file=sys.stderr)
    if failed and all(r.user_error for r in failed):
        return 2
    return 1 if failed else 0
