"""`ndbench demo`: the embedded offline benchmark, end to end."""

from __future__ import annotations

import time
from pathlib import Path

from datasets_builders.embedded import N_CLASSES
from methods.registry import available

from .console import stderr_console, stdout_console
from .executors import execute
from .parallel import early_workers, jobs_at_once
from .records import load_records_at
from .report import build_report
from .reporting import print_tables, report_results
from .runner import RunOptions, SplitReader, expand_jobs

# Methods of the default demo: the sanity baseline, the paper's method with and without its
# dense tuning, and the paper's strongest competitor. Measured on 2 idle cores, cold, with the
# shipped backbones and two one-thread jobs side by side (`--parallel auto`): per uni-class
# split (fit) knn ~0.9-1.4 s, mkd ~6.4-10.2 s, defend ~16.3-26.8 s, transformaly ~5.9-9.0 s;
# 3 min 29 s to 7 min 13 s in all (the machine's speed varies by day and hour), ~17-29 s of it
# before the first job.
DEMO_METHODS = ("knn", "mkd", "defend", "transformaly")
SETTINGS_DEFAULT = ("uni-class",)
SETTINGS_FULL = ("uni-class", "multi-class")


def demo_methods(full: bool) -> list[str]:
    """The demo's methods: the quick set, or every registered method with --full."""
    names = available()
    return names if full else [m for m in DEMO_METHODS if m in names]


def run_demo(*, full: bool, out: Path, device: str, force: bool, parallel: int | None = None) -> int:
    """Run the demo (`parallel` jobs at once; None: `auto_parallel`); print and write per-class
    tables, write the HTML report; return the exit code."""
    start = time.perf_counter()
    options = RunOptions(out=out, device=device, force=force)
    settings = list(SETTINGS_FULL if full else SETTINGS_DEFAULT)
    methods = demo_methods(full)
    # One job per method, setting and class (the embedded dataset has a split per class): on a
    # first run the workers start before the jobs are expanded, which generates the scenes.
    at_once = jobs_at_once(parallel, device, len(methods) * len(settings) * N_CLASSES)
    with early_workers(at_once, options, "embedded") as pool:
        splits = SplitReader(options.splits)  # the run's reader: each index and manifest is read once
        jobs = expand_jobs(methods, dataset="embedded", settings=settings, classes=None, seeds=[0],
                           options=options, splits=splits)
        results = execute(jobs, options, "local", console=stderr_console(), parallel=at_once, pool=pool,
                          splits=splits)
    records = load_records_at([r.record for r in results if r.record is not None])
    paths = print_tables(out, records, "embedded", settings, paper=False, splits=splits)
    code = report_results(results, stderr_console())
    page = build_report(out, warn=lambda message: stderr_console().print(f"warning: {message}")) if records else None
    minutes = (time.perf_counter() - start) / 60
    folders = ", ".join(sorted({str(p.parent) for p in paths}))
    stdout_console().print(f"demo finished in {minutes:.1f} min; tables: {folders}", soft_wrap=True)
    if page is not None:
        stdout_console().print(f"report ({page.seconds:.1f} s): {page.path.resolve().as_uri()}", soft_wrap=True)
    return code
