"""Records read back against their scores file: a metric or test count typed over the one `run`
wrote, or a malformed scores file, makes the record damaged (skipped with one warning line
naming it); a whole record, older ones without a scores hash included, still loads."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from record_fixtures import write_matching

from benchmark import records as records_module
from benchmark.cli import main
from benchmark.metrics import novelty_metrics
from benchmark.records import (
    RECORD_SCHEMA,
    NewerRecord,
    NotARecord,
    Record,
    load_records,
    read_record,
    read_scores,
    record_path,
    scores_path,
)
from datasets_builders.errors import NdbenchError


def record(split: str = "0") -> Record:
    return Record(method="knn", config_hash="c0ffee", config={"k": 2}, dataset="embedded", setting="uni-class",
                  split=split, split_sha256="0" * 64, normal_classes=[0], seed=0, metrics={},
                  counts={"train": 40}, train_seconds=1.0, inference_images_per_s=10.0, device="cpu",
                  versions={}, created="2024-01-01T00:00:00+00:00")


def whole(out: Path, split: str = "0", n: int = 1000) -> Path:
    """The path of a whole record (`n` test images, ties among the scores) written under `out`."""
    rng = np.random.default_rng(int(split))
    labels = [int(v) for v in rng.random(n) < 0.3]
    scores = [float(v) for v in np.round(rng.normal(size=n) + labels, 2)]
    path = record_path(out, "knn", "embedded", "uni-class", split, "c0ffee", 0)
    write_matching(path, record(split), [f"scene{i}.png" for i in range(n)], labels, scores)
    return path


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_scores(path: Path, edit) -> None:
    """Apply `edit` to the lines of the record's scores file; the record's scores_sha256 follows,
    so that only the new checks can tell."""
    scores = scores_path(path)
    scores.write_bytes(edit(scores.read_bytes().split(b"\n")))
    edit_json(path, lambda d: d.update(scores_sha256=hashlib.sha256(scores.read_bytes()).hexdigest()))


def skipped_once(out: Path, path: Path, needle: str, capsys) -> None:
    """load_records leaves out the record at `path` with one warning line naming it and `needle`."""
    capsys.readouterr()
    assert [r.split for r in load_records(out)] == ["1"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("ndbench: warning: ") and str(path) in warnings[0] and needle in warnings[0], warnings


def test_whole_records_load_with_the_metrics_of_their_scores(tmp_path, capsys):
    paths = [whole(tmp_path, "0"), whole(tmp_path, "1", n=3)]
    loaded = load_records(tmp_path)
    assert capsys.readouterr().err == ""
    assert [r.split for r in loaded] == ["0", "1"]
    for path, found in zip(paths, loaded, strict=True):
        lines = scores_path(path).read_text().splitlines()[1:]
        labels = [int(line.split(",")[1]) for line in lines]
        assert found.metrics == novelty_metrics(labels, [float(line.split(",")[2]) for line in lines])
        assert (found.counts["test_normal"], found.counts["test_novel"]) == (labels.count(0), labels.count(1))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["metrics"].update(auroc=0.99), "its auroc 0.99 does not match its scores file ("),
        (lambda d: d["metrics"].update(fpr95=round(d["metrics"]["fpr95"] + 0.05, 2)), "its fpr95 "),
        (lambda d: d["metrics"].update(aupr_in=d["metrics"]["aupr_in"] - 1e-6), "its aupr_in "),
        (lambda d: d["metrics"].update(aupr_out=1.0), "its aupr_out 1 does not match"),
        (lambda d: d["counts"].update(test_normal=d["counts"]["test_normal"] + 1), "its count test_normal "),
        (lambda d: d["counts"].update(test_novel=0), "its count test_novel 0 does not match its scores file ("),
        (lambda d: d["counts"].pop("test_novel"), "it has no count test_novel"),
    ],
    ids=["auroc", "fpr95", "aupr_in-off-by-1e-6", "aupr_out", "test_normal", "test_novel", "no-test_novel"],
)
def test_a_metric_or_count_typed_over_the_record_is_skipped_with_one_warning(tmp_path, capsys, edit, needle):
    path, _ = whole(tmp_path, "0"), whole(tmp_path, "1")
    edit_json(path, edit)
    skipped_once(tmp_path, path, needle, capsys)


def test_metrics_this_version_does_not_know_are_kept_unchecked(tmp_path, capsys):
    """A newer ndbench may record more metrics: the record stays whole (a re-run would overwrite
    it) and keeps them; the metrics this version knows are still checked."""
    path, _ = whole(tmp_path, "0"), whole(tmp_path, "1")
    extra = {"accuracy": 0.9, "aurc": 3.5, "per_class": {"a": 1}}
    edit_json(path, lambda d: d["metrics"].update(extra))
    capsys.readouterr()
    assert [r.split for r in load_records(tmp_path)] == ["0", "1"]
    assert capsys.readouterr().err == ""
    assert read_record(path).metrics.items() >= extra.items()
    edit_json(path, lambda d: d["metrics"].update(auroc=0.99))
    skipped_once(tmp_path, path, "its auroc 0.99 does not match its scores file", capsys)


def test_a_record_of_a_newer_schema_is_skipped_naming_it(tmp_path, capsys):
    path, _ = whole(tmp_path, "0"), whole(tmp_path, "1")
    edit_json(path, lambda d: d.update(schema=d["schema"] + 1, field_of_the_future=[1]))
    skipped_once(tmp_path, path, f"written by a newer ndbench (record schema {RECORD_SCHEMA + 1}", capsys)
    with pytest.raises(NewerRecord):
        read_record(path)
    load_records(tmp_path)
    warning = capsys.readouterr().err
    assert "never re-run" in warning and "re-runs its job" not in warning


def test_the_warning_shows_both_numbers_apart(tmp_path):
    path = whole(tmp_path, "0")
    auroc = read_record(path).metrics["auroc"]
    edit_json(path, lambda d: d["metrics"].update(auroc=auroc + 2e-9))
    with pytest.raises(NdbenchError) as info:
        read_record(path)
    recorded, computed = info.value.problem.split("its auroc ")[1].split(" does not match its scores file ")
    assert recorded != computed.strip("()")
    assert abs(float(recorded) - auroc - 2e-9) < 1e-9 and abs(float(computed.strip("()")) - auroc) < 1e-9


def test_a_metric_within_rounding_of_its_scores_still_loads(tmp_path):
    path = whole(tmp_path, "0")
    auroc = read_record(path).metrics["auroc"]
    edit_json(path, lambda d: d["metrics"].update(auroc=auroc + 1e-12))
    assert read_record(path).metrics["auroc"] == auroc + 1e-12


def last_row(lines: list[bytes], row: bytes) -> list[bytes]:
    return [*lines[:-2], row, b""]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda lines: [b"id,label,score", *lines[1:]], "starts with 'id,label,score', not the header"),
        (lambda lines: last_row(lines, b"scene999.png,1,high"), "has score 'high', not a finite number"),
        (lambda lines: last_row(lines, b"scene999.png,1,nan"), "has score 'nan', not a finite number"),
        (lambda lines: last_row(lines, b"scene999.png,2,0.5"), "has label '2', not 0 or 1"),
        (lambda lines: last_row(lines, b"scene999.png,1.0,0.5"), "has label '1.0', not 0 or 1"),
        (lambda lines: last_row(lines, b"0.5"), "line 1001 is '0.5', not image_id,label,score"),
        (lambda lines: [b"\xff\xfe", *lines[1:]], "is not UTF-8 text"),
        (lambda lines: [b""], "is empty"),
    ],
    ids=["header", "word-score", "nan-score", "label-2", "label-float", "one-field", "not-utf8", "empty"],
)
def test_a_malformed_scores_file_is_skipped_with_one_warning(tmp_path, capsys, edit, needle):
    path, _ = whole(tmp_path, "0"), whole(tmp_path, "1")
    edit_scores(path, lambda lines: b"\n".join(edit(lines)))
    skipped_once(tmp_path, path, needle, capsys)
    with pytest.raises(NdbenchError, match=scores_path(path).name):
        read_record(path)


def test_a_scores_file_of_one_class_gives_no_metrics(tmp_path, capsys):
    path, _ = whole(tmp_path, "0", n=4), whole(tmp_path, "1")
    edit_scores(path, lambda lines: b"\n".join([lines[0], *[line.replace(b",1,", b",0,") for line in lines[1:]]]))
    edit_json(path, lambda d: d["counts"].update(test_normal=4, test_novel=0))
    skipped_once(tmp_path, path, "gives no metrics: the test set holds only one class", capsys)


def test_image_ids_may_hold_commas(tmp_path):
    path = record_path(tmp_path, "knn", "embedded", "uni-class", "0", "c0ffee", 0)
    written = write_matching(path, record(), ["a,1,0.5", "b,0,", "c"], [0, 1, 0], [0.2, 0.9, 0.1])
    assert read_record(path).metrics == written.metrics


ODD_IDS = ["a,1,0.5", 'say "cheese".png', "b,0,", "line\nbreak.png", "été/日本,x.png", '"quoted"', "c"]


def test_odd_image_ids_round_trip_through_a_csv_scores_file(tmp_path):
    """Ids holding commas, quotes, line breaks or non-ASCII are quoted as CSV, so any CSV reader
    gets three fields a row, and the ids come back as written."""
    path = record_path(tmp_path, "knn", "embedded", "uni-class", "0", "c0ffee", 0)
    labels, scores = [0, 1, 0, 1, 1, 0, 1], [0.2, 0.9, 0.1, 0.7, 0.8, 0.3, 0.95]
    written = write_matching(path, record(), ODD_IDS, labels, scores)
    with scores_path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image_id", "label", "score"]
    assert rows[1:] == [[i, str(label), repr(score)] for i, label, score in zip(ODD_IDS, labels, scores, strict=True)]
    assert read_scores(scores_path(path)) == (ODD_IDS, labels, scores)
    assert read_record(path).metrics == written.metrics


def test_a_scores_file_written_before_ids_were_quoted_still_reads(tmp_path):
    path = record_path(tmp_path, "knn", "embedded", "uni-class", "0", "c0ffee", 0)
    ids, labels, scores = ["a,1,0.5", 'q"x', '"b,c', "é"], [0, 1, 1, 0], [0.2, 0.9, 0.6, 0.1]
    write_matching(path, record(), ids, labels, scores)
    rows = zip(ids, labels, scores, strict=True)
    unquoted = "image_id,label,score\n" + "".join(f"{i},{a},{s!r}\n" for i, a, s in rows)
    edit_scores(path, lambda lines: unquoted.encode("utf-8"))
    assert read_scores(scores_path(path)) == (ids, labels, scores)
    assert read_record(path).metrics == novelty_metrics(labels, scores)


def older(path: Path) -> None:
    """Make the record at `path` one written before records held their scores file's sha256."""
    edit_json(path, lambda d: d.pop("scores_sha256"))


def test_an_older_record_without_a_scores_hash_is_checked_against_its_scores(tmp_path, capsys):
    path, other = whole(tmp_path, "0"), whole(tmp_path, "1")
    older(path)
    older(other)
    assert [r.split for r in load_records(tmp_path)] == ["0", "1"]
    metrics = read_record(path).metrics
    edit_json(path, lambda d: d["metrics"].update(auroc=0.99))
    skipped_once(tmp_path, path, "its auroc 0.99 does not match its scores file", capsys)
    edit_json(path, lambda d: d["metrics"].update(metrics))
    assert read_record(path).metrics == metrics
    # Without a hash, an edited score shows by the metrics it gives.
    scores = scores_path(path)
    lines = scores.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.split(",")[1] == "0")
    lines[row] = lines[row].rsplit(",", 1)[0] + ",99.0"
    scores.write_text("\n".join(lines) + "\n")
    with pytest.raises(NdbenchError, match="its auroc .* does not match its scores file"):
        read_record(path)


def test_scikit_learn_has_the_last_word_over_the_fast_metrics(tmp_path, monkeypatch):
    path = whole(tmp_path, "0")
    expected = read_record(path).metrics
    monkeypatch.setattr(records_module, "fast_novelty_metrics", lambda labels, scores: dict.fromkeys(expected, 0.5))
    assert read_record(path).metrics == expected
    edit_json(path, lambda d: d["metrics"].update(auroc=0.5))
    with pytest.raises(NdbenchError, match="its auroc 0.5 does not match"):
        read_record(path)


def test_the_table_command_leaves_out_an_edited_record_with_one_warning(tmp_path, capsys):
    path, _ = whole(tmp_path, "0"), whole(tmp_path, "1")
    edit_json(path, lambda d: d["metrics"].update(auroc=0.99))
    capsys.readouterr()
    assert main(["table", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("ndbench:")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "its auroc 0.99 does not match" in warnings[0]
    assert "99.0" not in captured.out


def test_json_files_not_named_like_records_are_ignored_not_damaged(tmp_path, capsys):
    """A user's notes beside the records are no record: one "ignored" line each, never called
    damaged nor said to be re-run."""
    path = whole(tmp_path, "0")
    notes = [path.parent / "notes.json", tmp_path / "runs" / "summary.json"]
    notes[0].write_text('{"todo": "rerun with more seeds"}')
    notes[1].write_text("[]")
    capsys.readouterr()
    assert [r.split for r in load_records(tmp_path)] == ["0"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2, warnings
    for note, warning in zip(sorted(notes), warnings, strict=True):
        assert str(note) in warning and "not a record" in warning and warning.endswith("ignored"), warning
        assert "damaged" not in warning and "re-run" not in warning
    with pytest.raises(NotARecord):
        read_record(notes[0])
    assert main(["table", "--out", str(tmp_path)]) == 0
    assert "damaged" not in capsys.readouterr().err


def test_writing_then_reading_keeps_a_record_as_it_was(tmp_path):
    path = record_path(tmp_path, "knn", "embedded", "uni-class", "0", "c0ffee", 0)
    written = write_matching(path, replace(record(), preset="paper"), ["a", "b", "c", "d"], [0, 0, 1, 1],
                             [0.1, 0.4, 0.35, 0.8])
    assert replace(read_record(path), scores_sha256="") == written


def test_a_record_of_an_earlier_build_of_its_split_is_left_out(splits_root, tmp_path, capsys):
    """Rebuilt splits (another test set) make a record's numbers incomparable with those of the
    current build: readers skip it, as `run` re-runs its job."""
    from small_splits import fresh_out

    from datasets_builders.splits import Manifest

    out = fresh_out(splits_root, tmp_path)
    earlier, current = whole(out, "0"), whole(out, "1")
    built = Manifest.read(out / "splits" / "embedded" / "uni-class" / "1.json").sha256
    edit_json(current, lambda d: d.update(split_sha256=built))
    whole(out, "99")  # a split without a manifest: nothing to compare against, kept
    capsys.readouterr()
    assert [r.split for r in load_records(out)] == ["1", "99"]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and str(earlier) in warnings[0], warnings
    assert "was made on an earlier build of split embedded/uni-class/0 (its manifest has changed since)" in warnings[0]
    assert main(["table", "--out", str(out)]) == 0
    assert "| 1 " in (out / "tables" / "per_class_embedded_uni-class.md").read_text()
    assert "earlier build" in capsys.readouterr().err
