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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import Progress

from datasets_builders.atomic import atomic_write_bytes, atomic_write_text
from methods.base import tracked

from . import plots
from .models import ndbench_version
from .report_data import Block, Warn, gather, map_caption, split_scores
from .report_html import MapGrid, PageFigure, render_page
from .tables import AVG

ROC_PANELS_PER_FIGURE = 20  # 4 rows of 5
HIST_SPLITS_PER_FIGURE = 10
IMAGE_DIR = "img"


@dataclass
class ReportResult:
    """What `build_report` wrote."""

    path: Path
    records: int
    skipped: list[str]
    missing: int
    figures: int
    bytes: int
    seconds: float


def build_report(out: Path, report_dir: Path | None = None, warn: Warn | None = None,
                 progress: Progress | None = None) -> ReportResult:
    """Write the HTML report of the records under `<out>/runs` to `report_dir` (default
    `<out>/report`); return where it went and what it holds."""
    start = time.perf_counter()
    warn = warn or (lambda message: None)
    results = gather(out, warn)
    report_dir = Path(report_dir) if report_dir is not None else results.out / "report"
    blocks = results.blocks
    colours = plots.method_colours({r.method for r in results.records})
    writer = _ImageWriter(report_dir / IMAGE_DIR)
    limit = plots.heatmap_limit(np.concatenate([b.measured().to_numpy().ravel() for b in blocks]))
    figures = {block.key: _block_figures(block, results.paths, colours, limit, writer, warn)
               for block in tracked(blocks, progress, "report: figures")}
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
    )
    index = report_dir / "index.html"
    atomic_write_text(index, page)
    writer.remove_stale()
    size = index.stat().st_size + sum(p.stat().st_size for p in writer.written)
    return ReportResult(index, len(results.records), results.skipped, sum(b.missing.count for b in blocks),
                        len(writer.written), size, time.perf_counter() - start)


def _block_figures(block: Block, paths: dict[int, Path], colours: dict[str, str], limit: float,
                   writer: _ImageWriter, warn: Warn) -> list[PageFigure]:
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
    panels = split_scores(block, paths, warn)
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
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError, ValueError) as exc:
            warn(f"skipped unreadable anomaly-map grid {path} ({type(exc).__name__})")
            continue
        src = writer.copy(path, f"maps/{path.name}")
        grids.append(MapGrid(src, map_caption(path.stem, names)))
    return grids


class _ImageWriter:
    """Writes figures under the page's image folder; remembers what it wrote."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.written: list[Path] = []

    def write(self, name: str, figure) -> str:
        path = self.folder / name
        atomic_write_bytes(path, plots.png_bytes(figure))
        self.written.append(path)
        return f"{IMAGE_DIR}/{name}"

    def copy(self, source: Path, name: str) -> str:
        path = self.folder / name
        atomic_write_bytes(path, source.read_bytes())
        self.written.append(path)
        return f"{IMAGE_DIR}/{name}"

    def remove_stale(self) -> None:
        """Delete PNGs an earlier report left in the image folder that this one does not show."""
        keep = set(self.written)
        for path in self.folder.rglob("*.png") if self.folder.is_dir() else []:
            if path not in keep:
                path.unlink()


