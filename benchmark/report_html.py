"""The report page's HTML: plain HTML with inline CSS, no scripts, images by relative path."""

from __future__ import annotations

import json
import math
import numbers
import shlex
from dataclasses import dataclass
from html import escape
from pathlib import Path

import pandas as pd

from .report_data import measured_columns
from .tables import AVG, STD_SUFFIX, display_frame

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1b1b1b;
 margin:0;background:#fff}
main{max-width:1200px;margin:0 auto;padding:22px 28px 72px}
h1{font-size:25px;margin:0 0 2px}
h2{font-size:20px;margin:44px 0 6px;padding-bottom:4px;border-bottom:2px solid #e3e3e3}
h3{font-size:15.5px;margin:26px 0 6px}
p.meta{color:#555;margin:0 0 14px}
code{font:12.5px/1.3 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f3f3;padding:1px 4px;
 border-radius:3px}
nav{background:#f7f7f7;border:1px solid #e6e6e6;border-radius:6px;padding:8px 14px;margin:12px 0 8px}
nav a{margin-right:16px;white-space:nowrap}
a{color:#1a5fa8;text-decoration:none} a:hover{text-decoration:underline}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px;margin:6px 0 10px}
th,td{padding:3px 10px;border-bottom:1px solid #e8e8e8;text-align:right;white-space:nowrap}
th{background:#f5f5f5;font-weight:600;border-bottom:1px solid #cfcfcf;vertical-align:bottom}
.l{text-align:left}
tr.avg td{border-top:2px solid #9a9a9a;font-weight:600;background:#fafafa}
td.best{font-weight:700;color:#000}
.paper{color:#7a7a7a;font-style:italic}
th.paper{font-weight:500}
td.none{color:#b0b0b0}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
figure{margin:14px 0 22px}
figure img{max-width:100%;height:auto;display:block;border:1px solid #eee}
figcaption{font-size:12.5px;color:#555;max-width:920px;margin-top:4px}
details{margin:6px 0 12px}
summary{cursor:pointer;color:#1a5fa8}
.warn{background:#fff7e2;border-left:4px solid #e3a700;padding:8px 14px;margin:10px 0}
.missing{background:#f6f6f6;border-left:4px solid #b9b9b9;padding:6px 14px;margin:8px 0 12px}
.missing ul,.warn ul{margin:4px 0;padding-left:20px}
ul.notes{color:#555;font-size:12.5px;margin:2px 0 10px;padding-left:20px}
dl.common{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:12.5px;margin:6px 0 8px}
dl.common dt{color:#666} dl.common dd{margin:0}
.maps{display:flex;flex-wrap:wrap;gap:18px}
.maps figure{margin:0;max-width:660px}
pre{font-size:12px;background:#f7f7f7;padding:8px 12px;border-radius:4px;overflow-x:auto}
"""

@dataclass
class PageFigure:
    """A written figure: its path relative to the page, alt text and caption."""

    src: str
    alt: str
    caption: str
    open: bool = True  # shown at once; later parts of a long series start folded


@dataclass
class MapGrid:
    """An anomaly-map grid copied beside the page."""

    src: str
    caption: str


FOLD_RUNS_ABOVE = 12  # a longer table of runs starts folded

_HEADERS = {"normal_class": "normal class", "abnormal_class": "abnormal class", "split": "split", "method": "method",
            "name": "name", "dataset": "dataset"}


def render_page(*, title: str, generated: str, version: str, out: Path, leaderboard: pd.DataFrame,
                paper_summaries: dict[str, pd.DataFrame], blocks, figures: dict[str, list[PageFigure]],
                colours: dict[str, str], maps: list[MapGrid], skipped: list[str], ignored: int = 0) -> str:
    """The whole page as one HTML string; `ignored`: how many readable records the tables leave out."""
    n_runs = sum(len(b.records) for b in blocks)
    methods = sorted({m for b in blocks for m in b.methods})
    missing = sum(b.missing.count for b in blocks)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>",
        "<h1>ndbench report</h1>",
        f'<p class="meta">Results root <code>{escape(str(out))}</code> · {n_runs} runs of {len(methods)} '
        f"method{'s' if len(methods) != 1 else ''} on {len(blocks)} dataset/setting pair"
        f"{'s' if len(blocks) != 1 else ''}{_ignored_text(ignored)} · generated {escape(generated)} by ndbench "
        f"{escape(version)}. "
        "AUROC in percent, novel images are the positive class.</p>",
    ]
    if skipped or missing:
        items = []
        if missing:
            items.append(f"<li>{missing} job{'s' if missing != 1 else ''} of the grid (each method and seed run, "
                         "on every split of the setting) have no record (listed under <em>Not run</em> in each "
                         "section); averages cover what ran.</li>")
        items += [f"<li>skipped unreadable record file <code>{escape(s)}</code></li>" for s in skipped]
        parts.append(f'<div class="warn"><strong>Incomplete results.</strong><ul>{"".join(items)}</ul></div>')
    links = ['<a href="#leaderboard">Leaderboard</a>']
    links += [f'<a href="#{b.key}">{escape(b.dataset)} {escape(b.setting)}</a>' for b in blocks]
    links += ['<a href="#maps">Anomaly maps</a>']
    parts.append(f"<nav>{''.join(links)}</nav>")

    parts.append('<h2 id="leaderboard">Leaderboard</h2>')
    parts.append('<p class="meta">Mean AUROC (%) over the classes of each dataset and setting (the per-class '
                 "tables' AVG), ± the standard deviation over seeds where there are several; <em>mean</em> "
                 "averages the columns a method has. Best per column in bold.</p>")
    parts.append(table_html(leaderboard, colours=colours, best=_column_best(leaderboard), swatch_index=True))
    parts.append(_notes(leaderboard.attrs.get("notes", [])))
    for setting, summary in paper_summaries.items():
        number = "4" if setting == "uni-class" else "2"
        columns = measured_columns(summary, colours)
        parts.append(f"<h3>{escape(setting)}: per dataset, beside the paper's Table {number}</h3>")
        parts.append(table_html(summary, colours={c: colours[m] for m, c in columns.items()},
                                best=_row_best(summary, list(columns.values()))))

    for block in blocks:
        parts.append(_block_html(block, figures.get(block.key, []), colours))

    parts.append('<h2 id="maps">Anomaly maps</h2>')
    if maps:
        parts.append('<p class="meta">Grids written by <code>ndbench maps</code>: each test image beside its '
                     "per-patch novelty heat map (one colour scale per grid).</p>")
        figures = [f'<figure><img src="{escape(m.src)}" alt="{escape(m.caption)}" loading="lazy">'
                   f"<figcaption>{escape(m.caption)}</figcaption></figure>" for m in maps]
        parts.append(f'<div class="maps">{"".join(figures)}</div>')
    else:
        parts.append(f'<p class="meta">None under <code>{escape(str(Path(out) / "maps"))}</code>; draw one with '
                     f"<code>{escape(maps_command(out, blocks))}</code>.</p>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def maps_command(out: Path, blocks) -> str:
    """An `ndbench maps` command that draws a grid where the report looks for one: of the first
    dataset and split on the page (uni-class/3 of the embedded dataset when there is none)."""
    dataset, split = "embedded", "uni-class/3"
    for block in blocks:
        if block.records:
            dataset, split = block.dataset, f"{block.setting}/{block.records[0].split}"
            break
    command = f"ndbench maps --method defend --split {shlex.quote(split)}"
    if dataset != "embedded":
        command += f" --dataset {shlex.quote(dataset)}"
    if Path(out) != Path("results"):
        command += f" --out {shlex.quote(str(out))}"
    return command


def _block_html(block, figures: list[PageFigure], colours: dict[str, str]) -> str:
    rows = "normal class" if block.setting == "uni-class" else "abnormal class (all-vs-one)"
    seeds = sorted({r.seed for r in block.records})
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean ± std)"
    parts = [
        f'<h2 id="{escape(block.key)}">{escape(block.dataset)} {escape(block.setting)}</h2>',
        f'<p class="meta">{_count(len(block.titles), "split")} (one per {rows}) × '
        f'{_count(len(block.methods), "method")}, '
        f"{seed_text}; {_count(len(block.records), 'run')}.</p>",
        "<h3>AUROC (%) per class</h3>",
        table_html(block.table, colours={c: colours[m] for m, c in block.columns.items()},
                   best=_row_best(block.table, list(block.columns.values()))),
    ]
    if any("(paper T" in str(c) for c in block.table.columns):
        parts.append('<p class="meta"><span class="paper">Grey italic</span> columns are the paper\'s own numbers '
                     "(table number in the header), beside the measured ones.</p>")
    parts.append(_notes(block.notes))
    parts.append(_missing_html(block.missing))
    for figure in figures:
        image = (f'<figure><img src="{escape(figure.src)}" alt="{escape(figure.alt)}" loading="lazy">'
                 f"<figcaption>{escape(figure.caption)}</figcaption></figure>")
        parts.append(image if figure.open else f"<details><summary>{escape(figure.alt)}</summary>{image}</details>")
    frame, common = block.runs, block.common
    parts.append("<h3>Runs</h3>")
    if common:
        items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in common.items())
        parts.append(f'<dl class="common">{items}</dl>')
    folded = len(frame) > FOLD_RUNS_ABOVE
    table = _plain_table(frame)
    parts.append(f"<details{'' if folded else ' open'}><summary>{len(frame)} runs: times, counts, config "
                 f"hashes{', cost counters' if any(c.startswith('cost:') for c in frame.columns) else ''}"
                 f"</summary>{table}</details>")
    for method, config_hash, config in block.configs:
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        parts.append(f"<details><summary>config {escape(config_hash)} of {escape(method)}</summary>"
                     f"<pre>{escape(text)}</pre></details>")
    return "\n".join(parts)


def _missing_html(missing) -> str:
    if not missing.by_method:
        return ""
    several = len(missing.seeds) > 1
    items = []
    for method, entries in missing.by_method.items():
        listed = ", ".join(f"{escape(title)}" + (f" (seed {', '.join(map(str, s))})" if several else "")
                           for title, s in entries)
        items.append(f"<li><strong>{escape(method)}</strong>: {listed}</li>")
    return (f'<div class="missing"><strong>Not run</strong> ({missing.count} job{"s" if missing.count != 1 else ""} '
            f"without a record):<ul>{''.join(items)}</ul></div>")


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"


def _row_best(frame: pd.DataFrame, columns: list[str]) -> set[tuple[int, str]]:
    """(row position, column) of the highest value among `columns` in each row."""
    best = set()
    for i, (_, row) in enumerate(frame[columns].iterrows()):
        values = row.astype(float)
        if values.notna().sum() > 1:
            top = values.max()
            best |= {(i, c) for c in columns if values[c] == top}
    return best


def _column_best(frame: pd.DataFrame) -> set[tuple[int, str]]:
    """(row position, column) of the highest value in each column (std columns aside)."""
    best = set()
    for column in frame.columns:
        if str(column).endswith(STD_SUFFIX):
            continue
        values = frame[column].astype(float).reset_index(drop=True)
        if values.notna().sum() > 1:
            best |= {(i, column) for i in values.index if values[i] == values.max()}
    return best


def table_html(frame: pd.DataFrame, *, colours: dict[str, str], best: set[tuple[int, str]],
               swatch_index: bool = False) -> str:
    """A results table (the tables' own text cells: mean ± std, "–" when missing): headers
    (with `swatch_index`, index labels) named in `colours` get their plot colour, paper
    columns are grey italic, the AVG row set apart, the `best` cells bold."""
    shown, align = display_frame(frame)
    index_name = frame.index.name
    head = []
    for column, side in zip(shown.columns, align, strict=True):
        label = _HEADERS.get(str(column), str(column))
        classes = [side[0]] if side == "left" else []
        if "(paper T" in str(column):
            classes.append("paper")
        swatch = _swatch(colours[column]) if column in colours else ""
        head.append(f'<th class="{" ".join(classes)}">{swatch}{escape(label)}</th>')
    body = []
    for i in range(len(shown)):
        cells = []
        for column, side in zip(shown.columns, align, strict=True):
            text = shown.iat[i, shown.columns.get_loc(column)]
            classes = ["l"] if side == "left" else []
            if "(paper T" in str(column):
                classes.append("paper")
            if (i, column) in best:
                classes.append("best")
            if text == "–":
                classes.append("none")
            swatch = _swatch(colours[text]) if swatch_index and column == index_name and text in colours else ""
            cells.append(f'<td class="{" ".join(classes)}">{swatch}{escape(str(text))}</td>')
        row_class = ' class="avg"' if str(frame.index[i]) == AVG else ""
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{"".join(head)}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _plain_table(frame: pd.DataFrame) -> str:
    head = "".join(f'<th class="l">{escape(str(c))}</th>' for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            number = isinstance(value, numbers.Number) and not isinstance(value, bool)
            blank = value is None or (isinstance(value, float) and math.isnan(value))
            text = "" if blank else (f"{value:g}" if isinstance(value, float) else str(value))
            cells.append(f'<td class="{"" if number else "l"}">{escape(text)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _ignored_text(ignored: int) -> str:
    return f" ({ignored_records(ignored)}; see the notes under the leaderboard)" if ignored else ""


def ignored_records(ignored: int) -> str:
    """How many readable records the tables leave out, and why (the page and the console say it alike)."""
    return (f"{_count(ignored, 'more record')} ignored: the tables keep one config per method and the newest "
            "record of each job")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _swatch(colour: str) -> str:
    return f'<span class="sw" style="background:{escape(colour)}"></span>'
