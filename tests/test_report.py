"""`ndbench report`: the HTML page from real knn records (complete and partial), the ROC data
it plots, its figures, and the record loader's tolerance of damaged files."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from record_fixtures import write_matching
from rich.console import Console
from sklearn.metrics import roc_curve
from small_splits import fresh_out

from benchmark import plots
from benchmark.cli import main
from benchmark.metrics import fpr_at_tpr, roc_points, threshold_at_tpr
from benchmark.records import Record
from benchmark.report_data import gather, map_caption, missing_jobs, read_record_files, split_scores
from benchmark.runner import job_progress

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """What a test needs from the page: images, in-page links and ids, text; tag balance."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.tags: set[str] = set()
        self.words: list[str] = []
        self.open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, (tag, self.open[-3:])
        self.open.pop()

    def handle_data(self, data):
        self.words.append(data)

    @property
    def text(self) -> str:
        return " ".join("".join(self.words).split())


def read_page(index: Path) -> Page:
    page = Page(index.read_text(encoding="utf-8"))
    assert page.open == []  # every element closed
    return page


def check_images(page: Page, folder: Path) -> None:
    """Every image is a relative path to a valid PNG beside the page; nothing from a network."""
    assert page.images
    for src in page.images:
        assert not src.startswith(("http:", "https:", "//", "/")), src
        path = folder / src
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()


def synthetic(method: str, split: str, seed: int, auroc: float = 0.6, setting: str = "uni-class") -> Record:
    return Record(method=method, config_hash="c0ffee", config={"k": 2}, dataset="embedded", setting=setting,
                  split=split, split_sha256="0" * 64, normal_classes=[0], seed=seed,
                  metrics={"auroc": auroc, "aupr_in": 0.5, "aupr_out": 0.5, "fpr95": 0.9},
                  counts={"train": 4, "test_normal": 2, "test_novel": 2}, train_seconds=1.0,
                  inference_images_per_s=10.0, device="cpu (1 threads)", versions={"torch": "x"},
                  created="2024-01-01T00:00:00+00:00")


# --- quick: functions on synthetic data ------------------------------------------------------

def test_roc_points_are_sklearns_roc_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: ties included
    fpr, tpr, thresholds = roc_points(labels, scores)
    expected = roc_curve(labels, scores)
    for mine, theirs in zip((fpr, tpr, thresholds), expected, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_threshold_at_tpr_is_the_fpr95_operating_point():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 100)
    scores = rng.normal(size=200) + 1.5 * labels
    threshold = threshold_at_tpr(labels, scores, 0.95)
    assert np.mean(scores[labels == 1] >= threshold) >= 0.95
    assert np.mean(scores[labels == 0] >= threshold) == pytest.approx(fpr_at_tpr(labels, scores, 0.95))
    higher = np.min(scores[scores > threshold])  # the next threshold up no longer reaches 95 %
    assert np.mean(scores[labels == 1] >= higher) < 0.95


def test_unreadable_record_files_are_skipped_with_their_reason(tmp_path):
    folder = tmp_path / "runs" / "embedded" / "uni-class" / "knn"
    write_matching(folder / "0__c0ffee__seed0.json", synthetic("knn", "0", 0), ["a", "b"], [0, 1], [0.1, 0.2])
    (folder / "1__c0ffee__seed0.json").write_text('{"method": "knn", "config_ha', encoding="utf-8")
    (folder / "2__c0ffee__seed0.json").write_text('{"method": "knn"}', encoding="utf-8")
    skipped = []
    found = read_record_files(tmp_path, lambda path, reason: skipped.append((path.name, reason)))
    assert [(p.name, r.split) for p, r in found] == [("0__c0ffee__seed0.json", "0")]
    assert [name for name, _ in skipped] == ["1__c0ffee__seed0.json", "2__c0ffee__seed0.json"]
    assert "not valid JSON" in skipped[0][1] and "damaged" in skipped[1][1]
    assert read_record_files(tmp_path / "nothing", lambda *a: None) == []


def test_json_files_not_named_like_records_are_ignored_not_listed_as_unreadable(tmp_path):
    folder = tmp_path / "runs" / "embedded" / "uni-class" / "knn"
    write_matching(folder / "0__c0ffee__seed0.json", synthetic("knn", "0", 0), ["a", "b"], [0, 1], [0.1, 0.2])
    (folder / "notes.json").write_text('{"todo": "rerun"}', encoding="utf-8")
    skipped, other = [], []
    found = read_record_files(tmp_path, lambda path, reason: skipped.append(path.name),
                              lambda path, reason: other.append(path.name))
    assert [p.name for p, _ in found] == ["0__c0ffee__seed0.json"]
    assert skipped == [] and other == ["notes.json"]
    warnings = []
    results = gather(tmp_path, warnings.append)
    assert results.skipped == []
    assert any("notes.json is not a record" in w and w.endswith("ignored") for w in warnings)


def test_missing_jobs_are_the_holes_in_the_grid_of_what_exists():
    records = [synthetic("knn", "0", 0), synthetic("knn", "1", 0), synthetic("knn", "0", 1),
               synthetic("mkd", "0", 0)]
    missing = missing_jobs(records, {0: "0 · zero", 1: "1 · one"}, "uni-class")
    assert missing.seeds == [0, 1]
    assert missing.by_method == {"knn": [("1 · one", [1])], "mkd": [("0 · zero", [1]), ("1 · one", [0, 1])]}
    assert missing.count == 4
    assert missing_jobs(records[:2], {0: "0", 1: "1"}, "uni-class").by_method == {}


def test_method_colours_are_fixed_by_the_table_order():
    colours = plots.method_colours(["mkd", "zeta", "knn"])
    assert colours == {"knn": plots.PALETTE[0], "mkd": plots.PALETTE[2], "zeta": plots.PALETTE[8]}
    assert plots.method_colours(["mkd"])["mkd"] == colours["mkd"]  # the same in every report


def _texts(figure) -> list[str]:
    return [t.get_text() for ax in figure.axes for t in ax.texts]


def test_figures_say_not_run_instead_of_leaving_panels_empty():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    full = plots.SplitScores("0 · zero", {"knn": (labels, rng.normal(size=40)), "mkd": (labels, rng.normal(size=40))})
    half = plots.SplitScores("1 · one", {"knn": (labels, rng.normal(size=40))})
    empty = plots.SplitScores("2 · two")
    colours = plots.method_colours(["knn", "mkd"])
    roc = plots.roc_figure([full, half, empty], ["knn", "mkd"], colours)
    assert "not run: mkd" in _texts(roc) and "not run" in _texts(roc)
    assert [len(ax.get_lines()) for ax in roc.axes[:3]] == [3, 2, 1]  # curves + the chance diagonal
    hist = plots.histogram_figure([full, half, empty], ["knn", "mkd"], colours)
    assert _texts(hist).count("not run") == 3  # (1, mkd), (2, knn), (2, mkd)
    values = __import__("pandas").DataFrame({"knn": [61.0, 40.0], "mkd": [55.0, float("nan")]}, index=["0", "1"])
    heat = plots.heatmap_figure(values, plots.heatmap_limit(values.to_numpy()))
    assert "not run" in _texts(heat) and "61.0" in _texts(heat)
    for figure in (roc, hist, heat):
        assert plots.png_bytes(figure).startswith(b"\x89PNG")


def test_heatmap_limit_holds_every_value_in_steps_of_five():
    assert plots.heatmap_limit([50.0, 52.0, float("nan")]) == 10.0
    assert plots.heatmap_limit([12.0, 71.0]) == 40.0


def test_figures_cut_long_names_short_and_keep_their_cells_in_view():
    import warnings

    import pandas as pd

    long = "0 · " + "a-very-long-class-name-" * 4
    assert plots.figure_label("2 · short") == "2 · short"
    assert plots.figure_label(long) == long[:23] + "…" and len(plots.figure_label(long)) == plots.LABEL_MAX
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    panels = [plots.SplitScores(title, {"knn": (labels, rng.normal(size=40))}) for title in (long, "1 · one")]
    colours = plots.method_colours(["knn"])
    roc = plots.roc_figure(panels, ["knn"], colours)
    assert [ax.get_title() for ax in roc.axes[:2]] == [plots.figure_label(long), "1 · one"]
    hist = plots.histogram_figure(panels, ["knn"], colours)
    assert [ax.get_ylabel() for ax in hist.axes] == [plots.figure_label(long), "1 · one"]
    values = pd.DataFrame({"knn": [61.0, 40.0], "mkd": [55.0, 70.0]}, index=[long, "1 · one"])
    heat = plots.heatmap_figure(values, 30.0, values.mean())
    assert [t.get_text() for t in heat.axes[0].get_xticklabels()] == [plots.figure_label(long), "1 · one", "AVG"]
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        plots.png_bytes(heat)  # the labels above the cells leave the cells their height
    assert not [str(w.message) for w in shown]


def test_summaries_sit_beside_the_papers_tables_for_its_datasets():
    from dataclasses import replace

    from benchmark.paper import paper_summary
    from benchmark.report_data import paper_summaries

    voc = [replace(synthetic("defend", str(c), 0, auroc=0.7), dataset="voc") for c in (0, 1)]
    summaries = paper_summaries([*voc, synthetic("knn", "0", 0)])  # embedded: not in the paper
    assert list(summaries) == ["uni-class"]
    frame = summaries["uni-class"]
    assert list(frame.index) == ["voc"] and frame.at["voc", "defend"] == pytest.approx(70.0)
    assert frame.at["voc", "defend (paper T4)"] == paper_summary("uni-class").at["voc", "DEFEND+MKD"]
    assert paper_summaries([synthetic("knn", "0", 0)]) == {}


def test_measured_columns_find_methods_under_a_marked_name():
    import pandas as pd

    from benchmark.report_data import measured_columns

    table = pd.DataFrame(columns=["name", "knn", "knn_std", "defend (preset defaults)", "defend (paper T6)"])
    assert measured_columns(table, ["knn", "defend", "mkd"]) == {"knn": "knn", "defend": "defend (preset defaults)"}


def test_map_captions_name_the_split():
    names = {"embedded": {3: "digit-3"}}
    assert map_caption("defend__embedded__uni-class__3__seed0", names) == (
        "defend · embedded uni-class, normal class 3 · digit-3 · seed 0")
    assert map_caption("odd-name", names) == "odd-name"


def test_report_without_records_is_one_line(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "no readable records" in lines[0] and "Traceback" not in err


def test_progress_leaves_nothing_when_no_task_is_left_or_on_an_error():
    def shown(add_and_keep: bool) -> str:
        console = Console(file=io.StringIO(), width=80)
        with job_progress(console) as progress:
            task = progress.add_task("figures", total=1)
            progress.advance(task)
            if not add_and_keep:
                progress.remove_task(task)
        return console.file.getvalue()

    assert shown(add_and_keep=False) == ""
    assert "figures" in shown(add_and_keep=True)
    console = Console(file=io.StringIO(), width=80)
    with pytest.raises(OSError), job_progress(console) as progress:
        progress.add_task("figures", total=2)
        raise OSError("disk full")
    assert console.file.getvalue() == ""  # the error's own line will stand alone


# --- slow: real knn records ------------------------------------------------------------------

@pytest.mark.slow
def test_report_from_real_knn_records(knn_results, capsys):
    assert main(["report", "--out", str(knn_results)]) == 0
    captured = capsys.readouterr()
    index = knn_results / "report" / "index.html"
    assert str(index) in captured.out.replace("\n", "")
    # No warning but the notes on classes without records (the run took 2 of 10 classes), and no
    # blank line left by the finished progress bars.
    assert captured.err.splitlines() == [
        "ndbench: warning: note: knn on embedded uni-class: AVG covers 2 of 10 rows",
        "ndbench: warning: note: knn on embedded multi-class: AVG covers 1 of 10 rows"]
    page = read_page(index)
    assert "script" not in page.tags
    check_images(page, index.parent)
    names = sorted(src.split("/")[-1] for src in page.images)
    assert names == ["heatmap_embedded_multi-class.png", "heatmap_embedded_uni-class.png",
                     "hist_embedded_multi-class_1.png", "hist_embedded_uni-class_1.png",
                     "roc_embedded_multi-class_1.png", "roc_embedded_uni-class_1.png"]
    assert {link[1:] for link in page.links if link.startswith("#")} <= page.ids
    text = page.text
    for needle in ("Leaderboard", "embedded uni-class", "embedded multi-class", "digit-0", "digit-1",
                   "seeds 0, 1 (mean ± std)", "cpu (", "Anomaly maps"):
        assert needle in text, needle
    assert "Not run (16 jobs without a record):knn: 2 · digit-2 (seed 0, 1)" in text
    assert "25 jobs of the grid (each method and seed run, on every split of the setting) have no record" in text
    # The per-class cells are the records' AUROC: mean ± std over the two seeds.
    results = gather(knn_results)
    uni = next(b for b in results.blocks if b.setting == "uni-class")
    for split in ("0", "1"):
        aurocs = [100 * r.metrics["auroc"] for r in uni.records if r.split == split]
        cell = f"{np.mean(aurocs):.1f} ± {np.std(aurocs, ddof=1):.1f}"
        assert cell in text, cell
    # Each run's metadata: its config hash and train/score times are on the page.
    for record in results.records:
        assert record.config_hash in text and record.versions["torch"] in text


@pytest.mark.slow
def test_plotted_roc_curves_are_sklearns_on_the_stored_scores(knn_results):
    results = gather(knn_results)
    for block in results.blocks:
        panels = split_scores(block, results.scores)
        figure = plots.roc_figure(panels, block.methods, plots.method_colours(block.methods))
        for ax, panel, row in zip(figure.axes, panels, block.titles, strict=False):
            assert ax.get_title() == panel.title == block.titles[row]
            runs = [r for r in block.records if r.split.removeprefix("except-") == str(row)]
            if not runs:  # a split of the setting that was not run: its panel has no curve
                assert not panel.scores and not [line for line in ax.get_lines() if line.get_label() == "knn"]
                continue
            record = min(runs, key=lambda r: r.seed)  # the lowest seed is the one drawn
            with open(str(results.paths[id(record)]).replace(".json", ".scores.csv"), newline="") as handle:
                rows = list(csv.DictReader(handle))
            fpr, tpr, _ = roc_curve([int(r["label"]) for r in rows], [float(r["score"]) for r in rows])
            curves = [line for line in ax.get_lines() if line.get_label() == "knn"]
            assert len(curves) == 1
            np.testing.assert_array_equal(curves[0].get_xdata(), fpr)
            np.testing.assert_array_equal(curves[0].get_ydata(), tpr)


@pytest.mark.slow
def test_report_from_a_partial_run_lists_what_is_missing(knn_results, splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    shutil.copytree(knn_results / "runs", out / "runs", ignore=shutil.ignore_patterns("*.model.pt"))
    knn = out / "runs" / "embedded" / "uni-class" / "knn"
    gone = next(knn.glob("1__*__seed1.json"))
    gone.unlink()  # the job never finished: its scores may be there, its record is not
    broken = next((out / "runs" / "embedded" / "multi-class" / "knn").glob("except-0__*__seed0.json"))
    broken.write_text(broken.read_text()[:50], encoding="utf-8")  # cut off mid-write by hand
    (out / "maps").mkdir()
    Image.new("RGB", (40, 20), "red").save(out / "maps" / "mkd__embedded__uni-class__1__seed0.png")
    (out / "maps" / "rdad__embedded__uni-class__1__seed0.png").write_bytes(b"not a png")

    assert main(["report", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert [line for line in warnings if broken.name in line] == [
        next(line for line in warnings if broken.name in line)]  # exactly one line names it
    assert any("rdad__embedded" in line for line in warnings) and "Traceback" not in err
    index = out / "report" / "index.html"
    page = read_page(index)
    check_images(page, index.parent)
    text = page.text
    assert "Incomplete results" in text and broken.name in text
    # Uni-class now lacks seed 1 of split 1: listed, not an error; multi-class has no record left.
    # The splits' manifests name all ten classes: the eight never run are missing too.
    assert "Not run (17 jobs without a record):knn: 1 · digit-1 (seed 1), 2 · digit-2 (seed 0, 1)," in text
    assert "embedded multi-class" not in text
    assert "mkd · embedded uni-class, normal class 1 · digit-1 · seed 0" in text
    assert any(src.endswith("maps/mkd__embedded__uni-class__1__seed0.png") for src in page.images)
    assert not any("rdad" in src for src in page.images)


def test_report_lists_a_split_without_any_record_as_not_run(knn_results, splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    shutil.copytree(knn_results / "runs", out / "runs", ignore=shutil.ignore_patterns("*.model.pt"))
    for record in (out / "runs" / "embedded" / "uni-class" / "knn").glob("1__*.json"):
        record.unlink()  # every seed of class 1: the records alone no longer show the class

    assert main(["report", "--out", str(out)]) == 0
    text = read_page(out / "report" / "index.html").text
    assert "Not run (18 jobs without a record):knn: 1 · digit-1 (seed 0, 1), 2 · digit-2 (seed 0, 1)," in text
    assert "covers 1 of 10 rows" in capsys.readouterr().err


@pytest.mark.slow
def test_report_shows_cost_counters_and_drops_stale_figures(knn_results, splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    shutil.copytree(knn_results / "runs", out / "runs", ignore=shutil.ignore_patterns("*.model.pt"))
    record_file = next((out / "runs" / "embedded" / "uni-class" / "knn").glob("0__*__seed0.json"))
    data = json.loads(record_file.read_text())
    data["extra"]["cost"] = {"teacher_forward_images": 1234}
    record_file.write_text(json.dumps(data))
    stale = out / "report" / "img" / "roc_voc_uni-class_1.png"
    stale.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(stale)
    assert main(["report", "--out", str(out)]) == 0
    text = read_page(out / "report" / "index.html").text
    assert "cost: teacher_forward_images" in text and "1234" in text
    assert not stale.exists()


@pytest.mark.slow
def test_the_demo_ends_by_writing_the_report(knn_results, splits_root, tmp_path, monkeypatch, capsys):
    """The demo's last step, on records it would have made (its jobs replaced by knn's)."""
    from benchmark import demo
    from benchmark.runner import Job, JobResult

    out = fresh_out(splits_root, tmp_path)
    shutil.copytree(knn_results / "runs", out / "runs", ignore=shutil.ignore_patterns("*.model.pt"))
    finished = [JobResult(Job("knn", "embedded", "uni-class", "0", 0), "done", path)
                for path in sorted((out / "runs").rglob("*.json"))]
    monkeypatch.setattr(demo, "execute", lambda *args, **kwargs: finished)
    assert demo.run_demo(full=False, out=out, device="cpu", force=False) == 0
    index = out / "report" / "index.html"
    assert index.resolve().as_uri() in capsys.readouterr().out.replace("\n", "")
    check_images(read_page(index), index.parent)


def test_the_maps_hint_draws_where_the_report_looks(tmp_path):
    from types import SimpleNamespace

    from benchmark.report_html import maps_command

    block = SimpleNamespace(dataset="mylab", setting="multi-class", records=[SimpleNamespace(split="except-4")])
    assert maps_command(tmp_path / "my res", [block]) == (
        f"ndbench maps --method defend --split multi-class/except-4 --dataset mylab --out '{tmp_path / 'my res'}'")
    assert maps_command(Path("results"), []) == "ndbench maps --method defend --split uni-class/3"


def test_a_page_naming_a_folder_that_is_not_utf8_stays_utf8():
    from benchmark.report import escape_undecoded

    folder = os.fsdecode(b"r\xe9sultats")  # a Latin-1 name, as Python reads it
    assert escape_undecoded(f"<code>{folder}</code> é") == "<code>r\\xe9sultats</code> é"
