"""`ndbench report`: one self-contained HTML page of everything under a results root.

The page (`<out>/report/index.html`, figures beside it in `img/`) holds the leaderboard (and
summaries beside the paper's Tables 4 and 2 for the datasets it reports), and per dataset and
setting: the per-class table with the paper's numbers beside (the tables of `tables.py`), an
AUROC heat map, ROC curves and normal-vs-novel score histograms per split (from the
`*.scores.csv` beside each record), what was not run, and each run's metadata; then the
anomaly-map grids under `<out>/maps/`. It needs no network and no JavaScript.

Records from an interrupted run make a page too: jobs without a record in the grid of what
exists (methods x splits x seeds of a dataset and setting) are listed, and a record file
that cannot be read is skipped with one warning naming it.

Figures are drawn into a staging folder and put in place together with the page at the end,
so an interrupted or failed report leaves the earlier page and its figures whole. A list of
the figures beside them (`img/.ndbench-figures.json`) lets the next report remove the ones it
no longer shows, and only those: other files in `img/` are never touched. Two reports into
one folder take turns (a lock file in it): the second waits for the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from datasets_builders.atomic import atomic_write_bytes, atomic_write_files, write_error
from datasets_builders.errors import WriteFailure
from methods.base import tracked

from . import plots
from .locks import folder_lock
from .models import ndbench_version
from .report_data import Block, Results, ScoreArrays, Warn, gather, map_caption, split_scores
from .report_html import MapGrid, PageFigure, render_page
from .tables import AVG

ROC_PANELS_PER_FIGURE = 20  # 4 rows of 5
HIST_SPLITS_PER_FIGURE = 10
IMAGE_DIR = "img"
MANIFEST = ".ndbench-figures.json"  # in IMAGE_DIR: the figures the page beside it shows
STAGING_PREFIX = ".ndbench-staging-"  # in IMAGE_DIR: a report's figures until they are put in place
LOCK = ".ndbench-report.lock"  # in the report folder while a report writes it
# How long a report waits for another one writing the same folder (a report takes seconds to a minute).
LOCK_WAIT_S = 600.0
# The figures a report wrote before there was a manifest (directly in IMAGE_DIR, and its maps/).
LEGACY_FIGURE = re.compile(r"(heatmap_.+|(roc|hist)_.+_\d+|maps/[^/]+(__[^/]+){3}__seed\d+)\.png")


@dataclass
class ReportResult:
    """What `build_report` wrote."""

    path: Path
    records: int  # the runs the page shows (the tables' records)
    ignored: int  # readable records the tables leave out (another config of a method, an older duplicate)
    skipped: list[str]
    missing: int
    figures: int
    bytes: int
    seconds: float


def build_report(out: Path, report_dir: Path | None = None, warn: Warn | None = None,
                 progress: Progress | None = None) -> ReportResult:
    """Write the HTML report of the records under `<out>/runs` to `report_dir` (default
    `<out>/report`); return where it went and what it holds. Waits while another report
    writes the same folder."""
    start = time.perf_counter()
    warn = warn or (lambda message: None)
    results = gather(out, warn)
    report_dir = Path(report_dir) if report_dir is not None else results.out / "report"
    with folder_lock(report_dir / LOCK, what=f"a report into {report_dir}", wait_s=LOCK_WAIT_S, note=warn):
        return _write_report(results, report_dir, warn, progress, start)


def _write_report(results: Results, report_dir: Path, warn: Warn, progress: Progress | None,
                  start: float) -> ReportResult:
    blocks = results.blocks
    colours = plots.method_colours({r.method for r in results.records})
    writer = _ImageWriter(report_dir / IMAGE_DIR, warn)
    writer.clear_stale_staging()
    index = report_dir / "index.html"
    try:
        limit = plots.heatmap_limit(np.concatenate([b.measured().to_numpy().ravel() for b in blocks]))
        figures = {block.key: _block_figures(block, results.scores, colours, limit, writer)
                   for block in tracked(blocks, progress, "report: figures")}
        if writer.missing_glyphs:
            shown = "".join(sorted(writer.missing_glyphs)[:12])
            warn(f"the figures' font cannot draw {len(writer.missing_glyphs)} character(s) of the names ({shown}); "
                 "figures show them as boxes, the page's tables in full")
        maps = _copy_maps(results.out / "maps", writer, results.names, warn)
        page = render_page(
            title=f"ndbench report: {results.out}",
            generated=datetime.now(UTC).isoformat(timespec="seconds"),
            version=ndbench_version(),
            out=results.out,
            leaderboard=results.leaderboard,
            paper_summaries=results.paper_summaries,
            blocks=blocks,
            figures=figures,
            colours=colours,
            maps=maps,
            skipped=results.skipped,
            ignored=len(results.records) - sum(len(b.records) for b in blocks),
        )
        writer.publish(index, escape_undecoded(page))
    finally:
        writer.discard()
    size = index.stat().st_size + sum(p.stat().st_size for p in writer.written)
    shown = sum(len(b.records) for b in blocks)
    return ReportResult(index, shown, len(results.records) - shown, results.skipped,
                        sum(b.missing.count for b in blocks), len(writer.written), size, time.perf_counter() - start)


def escape_undecoded(text: str) -> str:
    """`text` with the bytes of file names that are not UTF-8 (a Latin-1 "r\\xe9sultats") shown as
    `\\xNN`, so a page naming such a folder is still valid UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _block_figures(block: Block, scores: dict[int, ScoreArrays], colours: dict[str, str], limit: float,
                   writer: _ImageWriter) -> list[PageFigure]:
    name = f"{block.dataset} {block.setting}"
    rows = "normal class" if block.setting == "uni-class" else "abnormal class (all-vs-one)"
    figures = []
    measured = block.measured()
    values = measured.loc[list(block.titles)]
    values.index = [block.titles[r] for r in block.titles]
    average = measured.loc[AVG]
    src = writer.write(f"heatmap_{block.key}.png", plots.heatmap_figure(values, limit, average))
    figures.append(PageFigure(src, f"AUROC heat map, {name}",
                              f"AUROC (%) per method and {rows}, AVG last; one colour scale for every heat map "
                              f"(white = 50 %, chance); grey = not run."))
    panels = split_scores(block, scores)
    seeds = sorted({r.seed for r in block.records})
    seed_note = f" Seed {seeds[0]} shown where a split has several seeds." if len(seeds) > 1 else ""
    chunks = _chunks(panels, ROC_PANELS_PER_FIGURE)
    for k, part in enumerate(chunks):
        src = writer.write(f"roc_{block.key}_{k + 1}.png", plots.roc_figure(part, block.methods, colours))
        figures.append(PageFigure(src, f"ROC curves, {name}, part {k + 1}",
                                  f"ROC curves per split ({rows}; novel = positive), one colour per method, dashed = "
                                  f"chance.{seed_note}" + _part(k, len(chunks)), open=k == 0))
    chunks = _chunks(panels, HIST_SPLITS_PER_FIGURE)
    for k, part in enumerate(chunks):
        src = writer.write(f"hist_{block.key}_{k + 1}.png", plots.histogram_figure(part, block.methods, colours))
        figures.append(PageFigure(src, f"score histograms, {name}, part {k + 1}",
                                  f"Test-score densities per split ({rows}, rows) and method (columns): normal "
                                  f"images as a dark outline, novel ones filled. Each column shares its x axis; "
                                  f"it spans the {plots.HIST_RANGE[0]}–{plots.HIST_RANGE[1]} percentiles of the "
                                  f"method's scores, the rest count in the end bins.{seed_note}"
                                  + _part(k, len(chunks)), open=k == 0))
    return figures


def _part(k: int, n: int) -> str:
    return f" Part {k + 1} of {n}." if n > 1 else ""


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def _copy_maps(folder: Path, writer: _ImageWriter, names: dict[str, dict[int, str]], warn: Warn) -> list[MapGrid]:
    """The anomaly-map grids of `ndbench maps` (valid PNGs only), copied beside the page."""
    grids = []
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        problem = _png_problem(path)
        if problem is not None:
            warn(f"skipped unreadable anomaly-map grid {path} ({problem})")
            continue
        src = writer.copy(path, f"maps/{path.name}")
        grids.append(MapGrid(src, map_caption(path.stem, names)))
    return grids


def _png_problem(path: Path) -> str | None:
    """Why the image at `path` cannot be shown (None when it can): unreadable, or so large
    that PIL takes it for a decompression bomb."""
    with warnings.catch_warnings():
        # PIL only warns below twice its pixel limit: as an error, such a file is skipped too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                image.verify()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return f"too large: over {Image.MAX_IMAGE_PIXELS:,} pixels"
        except (OSError, SyntaxError, ValueError) as exc:
            return type(exc).__name__
    return None


class _ImageWriter:
    """Stages figures in a hidden folder inside the page's image folder, then puts them in
    place together with the page (`publish`); remembers what it wrote."""

    def __init__(self, folder: Path, warn: Warn) -> None:
        self.folder = folder
        self.warn = warn
        self.staging = folder / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self.names: list[str] = []  # relative to `folder`
        self.missing_glyphs: set[str] = set()  # characters of the figures' labels their font cannot draw

    @property
    def written(self) -> list[Path]:
        """Where the figures are once published."""
        return [self.folder / name for name in self.names]

    def write(self, name: str, figure) -> str:
        """Stage `figure` as PNG `name`; return its path relative to the page."""
        with plots.missing_glyphs(self.missing_glyphs):
            data = plots.png_bytes(figure)
        return self._stage(name, data)

    def copy(self, source: Path, name: str) -> str:
        """Stage a copy of the file `source` as `name`; return its path relative to the page."""
        return self._stage(name, source.read_bytes())

    def _stage(self, name: str, data: bytes) -> str:
        atomic_write_bytes(self.staging / "new" / name, data)
        self.names.append(name)
        return f"{IMAGE_DIR}/{name}"

    def clear_stale_staging(self) -> None:
        """Remove the staging folders of earlier reports that were killed before cleaning up."""
        for path in self.folder.glob(f"{STAGING_PREFIX}*") if self.folder.is_dir() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)

    def discard(self) -> None:
        """Remove this report's staging folder (with the earlier figures `publish` replaced)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def publish(self, index: Path, page: str) -> None:
        """Move the staged figures into place and write the page and the figure list, as one
        step: a failure or interrupt on the way puts back the figures already replaced (only a
        hard kill while moving can leave a mix). Then remove the figures the earlier page
        showed that this one does not."""
        self._refuse_non_files()
        earlier = self._earlier_figures()
        moved: list[tuple[Path, Path | None]] = []  # (figure, the earlier file it replaced)
        try:
            for name in self.names:
                moved.append(self._move_into_place(name))
            atomic_write_files({self.folder / MANIFEST: json.dumps(self.names, indent=0) + "\n", index: page})
        except BaseException:
            _put_back(moved)
            raise
        for name in sorted(earlier - set(self.names)):
            with contextlib.suppress(OSError):  # a stale figure left behind harms nothing
                (self.folder / name).unlink()

    def _refuse_non_files(self) -> None:
        """A WriteFailure, before anything moves, when a figure's place holds something other
        than a file: moved aside, a folder would be deleted with the staging folder."""
        for path in self.written:
            if path.exists() and not path.is_file():
                raise WriteFailure(f"cannot write {path}: it is not a regular file",
                                   "move it away, or choose another folder with --report-dir")

    def _move_into_place(self, name: str) -> tuple[Path, Path | None]:
        """Move staged figure `name` into the image folder, the file it replaces into the
        staging folder; return (figure, that file's new place, None when there was none)."""
        target, backup = self.folder / name, None
        try:
            if target.exists() or target.is_symlink():
                backup = self.staging / "old" / name
                backup.parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, backup)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / "new" / name, target)
        except BaseException as exc:
            _put_back([(target, backup)])
            if isinstance(exc, OSError):
                raise write_error(target, exc) from exc
            raise
        return target, backup

    def _earlier_figures(self) -> set[str]:
        """The figures (relative to the image folder) the earlier report wrote: those in its
        figure list, or, from a report without one, the files named as a report names them."""
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                names = json.loads(manifest.read_text(encoding="utf-8"))
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    return {n for n in names if _is_figure_name(n)}
            except (OSError, ValueError):
                pass
            self.warn(f"ignored damaged figure list {manifest}; earlier figures no longer shown may stay in "
                      f"{self.folder}")
            return set()
        found = [*self.folder.glob("*.png"), *self.folder.glob("maps/*.png")] if self.folder.is_dir() else []
        return {name for path in found if LEGACY_FIGURE.fullmatch(name := path.relative_to(self.folder).as_posix())}


def _put_back(moved: list[tuple[Path, Path | None]]) -> None:
    """Undo `_ImageWriter._move_into_place` for each (figure, the file it replaced), last first."""
    for figure, backup in reversed(moved):
        with contextlib.suppress(OSError):
            if backup is None:
                figure.unlink(missing_ok=True)
            elif backup.exists() or backup.is_symlink():
                os.replace(backup, figure)


def _is_figure_name(name: str) -> bool:
    """A figure list's entry names a PNG inside the image folder (a damaged or edited list
    must not make the report remove files elsewhere)."""
    parts = name.split("/")
    return name.endswith(".png") and len(parts) <= 2 and all(p not in ("", ".", "..") for p in parts)
