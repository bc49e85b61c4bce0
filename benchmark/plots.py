"""The report's figures (matplotlib, drawn off-screen with the Agg canvas; no pyplot state).

- `heatmap_figure`: AUROC per method and class on one diverging scale centred on chance;
- `roc_figure`: one panel per split, one ROC curve per method;
- `histogram_figure`: one row per split, one column per method: normal vs novel scores.

Every figure colours a method the same way (`method_colours`) and says "not run" where a
record is missing instead of leaving a panel empty. Labels longer than LABEL_MAX characters
are cut short with an ellipsis (the tables beside the figures name them in full).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .metrics import roc_points
from .tables import PREFERRED_METHODS

DPI = 100
# matplotlib's "tab10" colours; a method's colour is fixed by its place in the table order
# (knn, defend, mkd, transformaly, kdad, msad, rdad, dsvdd), other methods follow by name.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
NORMAL_COLOUR = "#222222"
MISSING_COLOUR = "#d9d9d9"
NOT_RUN = "not run"
HEATMAP_CMAP = "RdBu"  # red below chance, white at 50 %, blue above
ANNOTATE_MAX_CELLS = 200  # write the value in each heat-map cell up to this many cells
TRANSPOSE_ABOVE = 24  # more splits than this: splits become the heat map's rows
HIST_BINS = 30
HIST_RANGE = (0.5, 99.5)  # percentiles of a method's scores spanned by its histograms
LABEL_MAX = 24  # characters of a split or method label in a figure
# matplotlib's warning for each character its font has no glyph for (drawn as a box).
_MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")
FONT = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 9,
        "xtick.labelsize": 8, "ytick.labelsize": 8}


def method_colours(methods) -> dict[str, str]:
    """The colour of each method: table-order methods by their fixed place, then the others
    alphabetically, through the palette."""
    others = sorted(set(methods) - set(PREFERRED_METHODS))
    order = list(PREFERRED_METHODS) + others
    return {m: PALETTE[order.index(m) % len(PALETTE)] for m in methods}


@dataclass
class SplitScores:
    """One split's per-image test labels and scores, per method that has a record."""

    title: str  # e.g. "3 · digit-3"
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # method -> (labels, scores)


def figure_label(text: str) -> str:
    """`text` as a figure shows it: cut to LABEL_MAX characters, the last one an ellipsis,
    when longer."""
    return text if len(text) <= LABEL_MAX else text[: LABEL_MAX - 1].rstrip() + "…"


@contextmanager
def missing_glyphs(found: set[str]) -> Iterator[None]:
    """While drawing in it, the characters the font cannot draw are added to `found` instead
    of each being warned about; other warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=_MISSING_GLYPH.pattern, category=UserWarning)
        yield
    for entry in caught:
        match = _MISSING_GLYPH.match(str(entry.message))
        if match:
            found.add(chr(int(match.group(1))))
        else:
            warnings.showwarning(entry.message, entry.category, entry.filename, entry.lineno)


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes at DPI."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _not_run(ax, text: str = NOT_RUN) -> None:
    ax.set_facecolor("#f4f4f4")
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#666666",
            fontsize=8, style="italic")
    ax.set_xticks([])
    ax.set_yticks([])


def heatmap_limit(values) -> float:
    """Half-width of a heat-map scale around 50 % that holds every value: a multiple of 5,
    at least 10 (so noise around chance is not painted as strong)."""
    finite = [abs(v - 50.0) for v in np.asarray(values, dtype=float).ravel() if math.isfinite(v)]
    return max(10.0, 5.0 * math.ceil(max(finite, default=0.0) / 5.0))


def heatmap_figure(values: pd.DataFrame, limit: float, average: pd.Series | None = None) -> Figure:
    """AUROC (%) per split (rows of `values`, labelled by the index) and method (columns),
    with an optional AVG per method after a gap; grey "not run" where a value is missing.
    Methods are rows unless there are more than TRANSPOSE_ABOVE splits."""
    table = values.copy()
    if average is not None:
        table.loc["AVG"] = average.reindex(table.columns)
    matrix = table.T if len(values) <= TRANSPOSE_ABOVE else table  # rows x columns as drawn
    rows, columns = [figure_label(str(x)) for x in matrix.index], [figure_label(str(x)) for x in matrix.columns]
    data = matrix.to_numpy(dtype=float)
    with _style():
        cell_w = 0.55 if len(columns) <= 12 else 0.42
        cell_h = 0.32 if len(rows) <= TRANSPOSE_ABOVE else 0.2
        label_w = 0.09 * max(len(r) for r in rows)
        rotate = max(map(len, columns)) > 4
        label_h = max(0.0, 0.075 * max(map(len, columns)) - 0.6) if rotate else 0.0  # above the cells
        figure = _figure(min(18.0, label_w + 1.6 + cell_w * len(columns)),
                         max(2.2, 1.3 + label_h + cell_h * len(rows)))
        ax = figure.add_subplot()
        norm = Normalize(50.0 - limit, 50.0 + limit)
        cmap = _cmap()
        image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(columns)), columns, rotation=90 if rotate else 0)
        ax.set_yticks(range(len(rows)), rows)
        ax.tick_params(length=0)
        ax.xaxis.tick_top()
        ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="minor", length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        if average is not None:  # a thick white line before AVG
            position = len(columns) - 1.5 if matrix is not table else len(rows) - 1.5
            (ax.axvline if matrix is not table else ax.axhline)(position, color="white", linewidth=4)
        if data.size <= ANNOTATE_MAX_CELLS:
            for (i, j), value in np.ndenumerate(data):
                if math.isfinite(value):
                    strong = abs(value - 50.0) > 0.6 * limit
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7.5,
                            color="white" if strong else "black")
                else:
                    ax.text(j, i, NOT_RUN, ha="center", va="center", fontsize=6, color="#555555",
                            style="italic")
        bar = figure.colorbar(image, ax=ax, shrink=0.9 if len(rows) > 4 else 1.0, aspect=15, pad=0.02)
        bar.set_label("AUROC (%)")
    return figure


def _cmap():
    from matplotlib import colormaps

    return colormaps[HEATMAP_CMAP].with_extremes(bad=MISSING_COLOUR)


def _grid(n: int, columns: int) -> tuple[int, int]:
    columns = max(1, min(columns, n))
    return -(-n // columns), columns


def _fixed_grid(rows: int, columns: int, panel: tuple[float, float], gap: tuple[float, float],
                margins: tuple[float, float, float, float], **subplot_options) -> tuple[Figure, np.ndarray]:
    """A figure of rows x columns panels of `panel` inches (width, height) with `gap` inches
    between them and `margins` inches (left, right, top, bottom) around them. Fixed margins
    instead of a layout engine, which grows slow with many panels."""
    left, right, top, bottom = margins
    width = left + right + columns * panel[0] + (columns - 1) * gap[0]
    height = top + bottom + rows * panel[1] + (rows - 1) * gap[1]
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    spacing = {"left": left / width, "right": 1 - right / width, "top": 1 - top / height,
               "bottom": bottom / height, "wspace": gap[0] / panel[0], "hspace": gap[1] / panel[1]}
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=spacing, **subplot_options)
    return figure, axes


def _legend_rows(entries: int, width: float, entry_width: float) -> tuple[int, int]:
    """(columns, rows) of a legend of `entries` across `width` inches."""
    columns = max(1, min(entries, int(width // entry_width)))
    return columns, -(-entries // columns)


def roc_figure(panels: list[SplitScores], methods: list[str], colours: dict[str, str],
               columns: int = 5) -> Figure:
    """One ROC panel per split (shared axes), one curve per method that has scores there, the
    chance diagonal dashed; panels say which methods were not run."""
    rows, columns = _grid(len(panels), columns)
    side = 1.75
    width = 0.9 + columns * side + (columns - 1) * 0.22
    legend_columns, legend_rows = _legend_rows(len(methods), width - 0.4, 1.15)
    with _style():
        figure, axes = _fixed_grid(rows, columns, (side, side), (0.22, 0.42),
                                   (0.75, 0.15, 0.45 + 0.2 * legend_rows, 0.55), sharex=True, sharey=True)
        axes = axes.ravel()
        for ax, panel in zip(axes, panels, strict=False):
            ax.set_title(figure_label(panel.title))
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"])
            ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])
            ax.plot([0, 1], [0, 1], linestyle="--", color="#aaaaaa", linewidth=0.8)
            for method in methods:
                if method in panel.scores:
                    fpr, tpr, _ = roc_points(*panel.scores[method])
                    ax.plot(fpr, tpr, color=colours[method], linewidth=1.3, label=method)
            absent = [m for m in methods if m not in panel.scores]
            if absent:
                text = NOT_RUN if len(absent) == len(methods) else f"{NOT_RUN}: {', '.join(map(figure_label, absent))}"
                ax.text(0.97, 0.04, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                        color="#666666", style="italic", wrap=True)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        figure.supxlabel("false-positive rate", y=0.02, va="bottom")
        figure.supylabel("true-positive rate", x=0.02, ha="left")
        figure.legend(handles=_method_handles(methods, colours), loc="upper center", bbox_to_anchor=(0.5, 0.995),
                      ncols=legend_columns, frameon=False, handlelength=1.6, columnspacing=1.2)
    return figure


def histogram_figure(panels: list[SplitScores], methods: list[str], colours: dict[str, str]) -> Figure:
    """Rows = splits, columns = methods: normal test scores as a dark outline, novel ones
    filled in the method's colour (densities). A method's panels share their x axis and
    bins, spanning HIST_RANGE percentiles of all its scores (the rest fall in the end bins)."""
    edges = {m: _bin_edges([p.scores[m][1] for p in panels if m in p.scores]) for m in methods}
    rows, columns = len(panels), len(methods)
    label_w = 0.2 + 0.062 * max(len(figure_label(p.title)) for p in panels)
    with _style():
        panel_w = max(1.45, (4.6 - label_w - 0.12 - 0.14 * (columns - 1)) / columns)  # room for the legend
        figure, axes = _fixed_grid(rows, columns, (panel_w, 0.62), (0.14, 0.1), (label_w, 0.12, 0.62, 0.62),
                                   sharex="col")
        for i, panel in enumerate(panels):
            for j, method in enumerate(methods):
                ax = axes[i, j]
                if i == 0:
                    ax.set_title(figure_label(method), color=colours[method], fontweight="bold")
                if j == 0:
                    ax.set_ylabel(figure_label(panel.title), rotation=0, ha="right", va="center")
                ax.set_yticks([])
                ax.xaxis.set_major_locator(MaxNLocator(3))
                ax.tick_params(axis="x", labelbottom=i == rows - 1, labelsize=7)
                for side in ("top", "right", "left"):
                    ax.spines[side].set_visible(False)
                if method not in panel.scores or edges[method] is None:
                    _not_run(ax)
                    continue
                labels, scores = panel.scores[method]
                bins = edges[method]
                clipped = np.clip(scores, bins[0], bins[-1])
                novel, _ = np.histogram(clipped[labels == 1], bins=bins, density=True)
                normal, _ = np.histogram(clipped[labels != 1], bins=bins, density=True)
                ax.stairs(novel, bins, fill=True, color=colours[method], alpha=0.6, linewidth=0)
                ax.stairs(normal, bins, color=NORMAL_COLOUR, linewidth=1.0)
                ax.set_xlim(bins[0], bins[-1])
                ax.set_ylim(0, 1.05 * max(novel.max(), normal.max()))
        handles = [Line2D([], [], color=NORMAL_COLOUR, linewidth=1.2, label="normal"),
                   Patch(facecolor="#9a9a9a", alpha=0.8, label="novel (method's colour)")]
        figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.998), ncols=2, frameon=False)
        figure.supxlabel("novelty score (higher = more novel)", y=0.01, va="bottom")
    return figure


def _bin_edges(score_lists: list[np.ndarray]) -> np.ndarray | None:
    if not score_lists:
        return None
    values = np.concatenate(score_lists)
    low, high = np.percentile(values, HIST_RANGE)
    if not high > low:
        low, high = float(values.min()), float(values.max())
    if not high > low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, HIST_BINS + 1)


def _method_handles(methods: list[str], colours: dict[str, str]) -> list[Line2D]:
    return [Line2D([], [], color=colours[m], linewidth=2, label=figure_label(m)) for m in methods]


def _style():
    from matplotlib import rc_context

    return rc_context(FONT)
