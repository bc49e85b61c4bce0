"""Synthetic records written with scores that bear them out: `read_record` refuses a record whose
metrics or test counts are not those of its scores file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from benchmark.metrics import novelty_metrics
from benchmark.records import Record, write_record


def scores_with_auroc(auroc: float, grid: int = 100) -> tuple[list[str], list[int], list[float]]:
    """Image ids, labels (one normal image, `grid` novel ones) and scores whose AUROC is exactly
    `auroc`, a multiple of 1 / grid (the normal image outscores the rest of the novel ones)."""
    above = round(auroc * grid)
    labels = [0] + [1] * grid
    scores = [0.5] + [1.0] * above + [0.0] * (grid - above)
    found = novelty_metrics(labels, scores)["auroc"]
    if found != auroc:
        raise ValueError(f"AUROC {auroc!r} is not on the grid of 1/{grid} (got {found!r})")
    return [f"img{i}" for i in range(len(labels))], labels, scores


def write_matching(path: Path, record: Record, image_ids: list[str], labels: list[int],
                   scores: list[float]) -> Record:
    """Write `record` with these scores, its metrics and test counts made those of the scores;
    the record as written (but for its scores file's sha256)."""
    record = replace(record, metrics=novelty_metrics(labels, scores),
                     counts={**record.counts, "test_normal": labels.count(0), "test_novel": labels.count(1)})
    write_record(path, record, image_ids, labels, scores)
    return record
