"""`ndbench report` on damaged inputs and failed writes: bad scores and map files are skipped
with one warning naming them, only the report's own figures are ever removed, and a report
that fails half-way leaves the earlier page and its figures whole."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image
from record_fixtures import write_matching
from test_report import read_page, synthetic

from benchmark import plots, report
from benchmark.locks import LockOwner, _process_start
from benchmark.report import IMAGE_DIR, build_report
from datasets_builders.errors import NdbenchError, WriteFailure

MANIFEST = ".ndbench-figures.json"  # the figures a report wrote, beside them
STAGING_PREFIX = ".ndbench-staging-"  # a report's figures until they are put in place
REPORT_LOCK = ".ndbench-report.lock"  # in the report folder while a report writes it

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def tiny_results(out: Path, splits: tuple[str, ...] = ("0", "1")) -> Path:
    """A results root with one knn record (and its scores file) per uni-class split."""
    folder = out / "runs" / "embedded" / "uni-class" / "knn"
    for split in splits:
        write_matching(folder / f"{split}__c0ffee__seed0.json", synthetic("knn", split, 0),
                       ["a", "b", "c", "d"], LABELS, SCORES)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    """A small valid PNG at `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "blue").save(path)
    return path


def test_bad_labels_in_a_scores_file_skip_that_file_with_a_warning(tmp_path):
    out = tiny_results(tmp_path)
    record = out / "runs" / "embedded" / "uni-class" / "knn" / "1__c0ffee__seed0.json"
    scores = record.with_name("1__c0ffee__seed0.scores.csv")
    scores.write_text(scores.read_text().replace("c,1,", "c,7,"))
    data = json.loads(record.read_text())  # the record still matches its scores file: only the labels are wrong
    data["scores_sha256"] = hashlib.sha256(scores.read_bytes()).hexdigest()
    record.write_text(json.dumps(data))
    warned: list[str] = []
    result = build_report(out, warn=warned.append)
    assert result.records == 1  # a record whose scores file is malformed is damaged
    named = [w for w in warned if scores.name in w]
    assert len(named) == 1 and "label '7', not 0 or 1" in named[0]
    assert result.path.is_file()


def test_the_report_reads_each_scores_file_once(tmp_path, monkeypatch):
    """The figures draw the scores the record's check read: no second read of the file."""
    out = tiny_results(tmp_path)
    opened: list[str] = []
    real_open = io.open

    def counted(file, *args, **kwargs):
        if str(file).endswith(".scores.csv"):
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counted)  # what pathlib opens with
    monkeypatch.setattr(builtins, "open", counted)
    result = build_report(out)
    assert (result.records, result.figures) == (2, 3)
    assert sorted(opened) == ["0__c0ffee__seed0.scores.csv", "1__c0ffee__seed0.scores.csv"]


def test_report_removes_only_the_figures_an_earlier_report_wrote(tmp_path):
    out = tiny_results(tmp_path)
    page_dir = tmp_path / "proj"
    img = page_dir / IMAGE_DIR
    mine = [png(img / "logo.png"), png(img / "holiday" / "beach.png"), png(img / "maps" / "holiday" / "x.png"),
            png(img / "maps" / "mine.png")]
    legacy = png(img / "roc_voc_uni-class_1.png")  # left by a report from before the figure list
    first = build_report(out, page_dir)
    assert (img / MANIFEST).is_file() and not legacy.exists()
    assert all(path.exists() for path in mine)
    # A later report shows fewer figures: the earlier one's extra figure goes, nothing else.
    (out / "maps").mkdir()
    grid = png(out / "maps" / "knn__embedded__uni-class__0__seed0.png")
    build_report(out, page_dir)
    assert (img / "maps" / grid.name).exists()
    grid.unlink()
    second = build_report(out, page_dir)
    assert not (img / "maps" / grid.name).exists()
    assert sorted(second.path.parent.joinpath(src) for src in read_page(second.path).images) == sorted(
        first.path.parent.joinpath(src) for src in read_page(first.path).images)
    assert all(path.exists() for path in mine)
    assert not list(img.glob(f"{STAGING_PREFIX}*"))


def test_a_figure_list_naming_files_elsewhere_removes_nothing_there(tmp_path):
    out = tiny_results(tmp_path)
    page_dir = tmp_path / "report"
    outside = png(tmp_path / "keep.png")
    nested = png(page_dir / IMAGE_DIR / "a" / "b" / "deep.png")
    (page_dir / IMAGE_DIR / MANIFEST).write_text('["../../keep.png", "a/b/deep.png", "/etc/x.png"]')
    build_report(out, page_dir)
    assert outside.exists() and nested.exists()


@pytest.mark.parametrize("pixels", [1500, 2500])  # over PIL's limit: a warning; over twice: an error
def test_huge_anomaly_map_grids_are_skipped_with_one_warning(tmp_path, monkeypatch, pixels):
    out = tiny_results(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    huge = png(out / "maps" / "knn__embedded__uni-class__0__seed0.png", (pixels // 10, 10))
    warned: list[str] = []
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        result = build_report(out, warn=warned.append)
    assert not [w for w in raw if issubclass(w.category, Image.DecompressionBombWarning)]
    named = [w for w in warned if huge.name in w]
    assert len(named) == 1 and "too large" in named[0]
    assert not any("maps/" in src for src in read_page(result.path).images)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_report_failing_mid_figures_leaves_the_earlier_page_and_figures_whole(tmp_path, monkeypatch, error):
    out = tiny_results(tmp_path)
    page_dir = out / "report"
    build_report(out)
    before = snapshot(page_dir)
    # The next report has other records (so other figures); its third figure fails.
    tiny_results(out, ("0", "1", "2"))
    real, calls = plots.png_bytes, []

    def failing(figure) -> bytes:
        calls.append(figure)
        if len(calls) == 3:
            raise error
        return real(figure)

    monkeypatch.setattr(plots, "png_bytes", failing)
    with pytest.raises(type(error)):
        build_report(out)
    assert len(calls) == 3
    assert snapshot(page_dir) == before
    assert not list((page_dir / IMAGE_DIR).glob(f"{STAGING_PREFIX}*"))


def test_a_report_failing_while_moving_figures_puts_the_earlier_ones_back(tmp_path, monkeypatch):
    out = tiny_results(tmp_path)
    page_dir = out / "report"
    build_report(out)
    before = snapshot(page_dir)
    tiny_results(out, ("0", "1", "2"))
    real, moves = os.replace, []

    def failing(source, target) -> None:
        if f"{STAGING_PREFIX}" in str(source) and "/new/" in str(source) and STAGING_PREFIX not in str(target):
            moves.append(target)  # a staged figure moved into place
            if len(moves) == 2:
                raise KeyboardInterrupt
        real(source, target)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        build_report(out)
    monkeypatch.undo()
    assert len(moves) == 2
    assert snapshot(page_dir) == before
    assert not list((page_dir / IMAGE_DIR).glob(f"{STAGING_PREFIX}*"))


def test_a_staging_folder_left_by_a_killed_report_is_removed_next_time(tmp_path):
    out = tiny_results(tmp_path)
    stale = png(out / "report" / IMAGE_DIR / f"{STAGING_PREFIX}0123456789ab" / "new" / "heatmap_x.png")
    build_report(out)
    assert not stale.parent.parent.exists()


def test_a_folder_where_a_figure_goes_is_refused_and_kept(tmp_path):
    out = tiny_results(tmp_path)
    build_report(out)
    before = snapshot(out / "report")
    blocking = out / "report" / IMAGE_DIR / "roc_embedded_uni-class_1.png"
    blocking.unlink()
    kept = png(blocking / "kept.png")
    with pytest.raises(WriteFailure, match="not a regular file"):
        build_report(out)
    assert kept.exists()
    assert {k: v for k, v in snapshot(out / "report").items() if "roc_" not in k} == {
        k: v for k, v in before.items() if "roc_" not in k}



def _lock_held_by(process: subprocess.Popen, path: Path) -> None:
    """Write the lock file `path` as if `process` (on this host) held it."""
    owner = LockOwner(socket.gethostname(), process.pid, "2026-01-01T00:00:00+00:00",
                      _process_start(process.pid), "feed")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(owner)) + "\n")


def test_a_report_waits_for_another_one_writing_the_same_folder(tmp_path):
    out = tiny_results(tmp_path)
    lock = out / "report" / REPORT_LOCK
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_held_by(holder, lock)
        waiting = threading.Event()
        seen: dict[str, bool] = {}

        def finish_the_other_report() -> None:
            seen["told"] = waiting.wait(30)
            seen["page_before_release"] = (out / "report" / "index.html").exists()
            lock.unlink()

        def warn(message: str) -> None:
            if "waiting for" in message:
                waiting.set()

        other = threading.Thread(target=finish_the_other_report)
        other.start()
        result = build_report(out, warn=warn)
        other.join()
    finally:
        holder.kill()
        holder.wait()
    assert seen == {"told": True, "page_before_release": False}
    assert result.path.is_file() and not lock.exists()


def test_a_report_gives_up_on_a_live_lock_after_its_wait_and_writes_nothing(tmp_path, monkeypatch):
    out = tiny_results(tmp_path)
    monkeypatch.setattr(report, "LOCK_WAIT_S", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_held_by(holder, out / "report" / REPORT_LOCK)
        with pytest.raises(NdbenchError, match=f"pid {holder.pid} .* is still writing a report into"):
            build_report(out)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (out / "report").iterdir()) == [REPORT_LOCK]


def test_the_lock_of_a_report_that_was_killed_is_taken_over(tmp_path):
    out = tiny_results(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _lock_held_by(gone, out / "report" / REPORT_LOCK)
    warned: list[str] = []
    result = build_report(out, warn=warned.append)
    assert result.path.is_file() and not (out / "report" / REPORT_LOCK).exists()
    assert any("taking over stale lock" in line and f"pid {gone.pid}" in line for line in warned), warned


def test_names_the_figures_font_cannot_draw_give_one_warning_not_one_per_character(tmp_path):
    out = tiny_results(tmp_path)
    folder = out / "runs" / "embedded" / "uni-class" / "猫犬"
    write_matching(folder / "0__c0ffee__seed0.json", synthetic("猫犬", "0", 0), ["a", "b", "c", "d"], LABELS, SCORES)
    warned: list[str] = []
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = build_report(out, warn=warned.append)
    assert not [str(w.message) for w in shown if "Glyph" in str(w.message)]
    about_font = [w for w in warned if "font" in w]
    assert len(about_font) == 1 and "2 character(s)" in about_font[0] and "犬猫" in about_font[0]
    assert "猫犬" in result.path.read_text(encoding="utf-8")  # the page names it in full


def test_the_console_and_the_page_count_the_runs_shown_and_the_records_ignored(tmp_path, capsys):
    from benchmark.cli import main

    out = tiny_results(tmp_path)
    trial = dataclasses.replace(synthetic("knn", "0", 0), config_hash="beef")  # covers fewer splits: ignored
    write_matching(out / "runs" / "embedded" / "uni-class" / "knn" / "0__beef__seed0.json", trial,
                   ["a", "b", "c", "d"], LABELS, SCORES)
    assert main(["report", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    page = read_page(out / "report" / "index.html").text
    assert "(2 runs," in captured.out and " 2 runs of 1 method " in page
    assert "(1 more record ignored: the tables keep one config per method" in page
    why = "1 more record ignored: the tables keep one config per method and the newest record of each job"
    assert f"\n{why}; see the notes under the page's leaderboard\n" in captured.out
    assert "ignored 1 record(s) of config beef" in captured.err and "ignored 1 record(s) of config beef" in page
    (out / "runs" / "embedded" / "uni-class" / "knn" / "0__beef__seed0.json").unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert "(2 runs," in (printed := capsys.readouterr().out) and "ignored" not in printed
    result = build_report(out)
    assert (result.records, result.ignored) == (2, 0) and "ignored" not in read_page(result.path).text
