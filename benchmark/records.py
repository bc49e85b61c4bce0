"""Run records: one JSON file per job (method + config hash, split, seed), written atomically.

Layout: `<out>/runs/<dataset>/<setting>/<method>/<name>__<config_hash>__seed<seed>.json`
with the per-image scores beside it as `... .scores.csv`. A record exists only once the job
has finished; the runner skips jobs whose record exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets_builders.atomic import atomic_write_text

RECORD_SCHEMA = 1


@dataclass
class Record:
    """The outcome of one job. Metrics are fractions in [0, 1]; novel is the positive class."""

    method: str
    config_hash: str
    config: dict
    dataset: str
    setting: str
    split: str  # the split's name inside its setting: "3", "except-1", "normal-0-1-2-3-4"
    split_sha256: str
    normal_classes: list[int]
    seed: int
    metrics: dict[str, float]  # auroc, aupr_in, aupr_out, fpr95
    counts: dict[str, int]  # train, test_normal, test_novel
    train_seconds: float
    inference_images_per_s: float
    device: str
    versions: dict[str, str]
    created: str  # ISO 8601 UTC
    extra: dict = field(default_factory=dict)
    # The named preset chain the detector was built with ("" = the method's defaults), e.g.
    # "embedded/uni-class" or "paper"; tables mark columns whose preset is not the paper's.
    preset: str = ""
    # How a multi-class training set was weighted: "per-class" (each image once per normal
    # class it holds, as the authors' released code) or "unique"; "" for uni-class splits.
    multi_class_weighting: str = ""
    schema: int = RECORD_SCHEMA

    @property
    def split_id(self) -> str:
        """`<dataset>/<setting>/<split>`."""
        return f"{self.dataset}/{self.setting}/{self.split}"

    def to_json(self) -> str:
        """The record file's text."""
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Record:
        """Parse a record file's text."""
        return cls(**json.loads(text))


def record_path(out: Path, method: str, dataset: str, setting: str, split: str, config_hash: str, seed: int) -> Path:
    """Where the record of one job lives under the results root `out`."""
    return Path(out) / "runs" / dataset / setting / method / f"{split}__{config_hash}__seed{seed}.json"


def scores_path(record_file: Path) -> Path:
    """The per-image scores CSV beside a record."""
    return record_file.with_suffix(".scores.csv")


def write_record(path: Path, record: Record, image_ids: list[str], labels, scores) -> None:
    """Write the per-image scores, then the record (the record last, so it marks completion)."""
    lines = ["image_id,label,score"]
    lines += [f"{i},{int(lab)},{float(s)!r}" for i, lab, s in zip(image_ids, labels, scores, strict=True)]
    atomic_write_text(scores_path(path), "\n".join(lines) + "\n")
    atomic_write_text(path, record.to_json())


def load_records(out: Path) -> list[Record]:
    """Every record under `<out>/runs`, in path order."""
    runs = Path(out) / "runs"
    if not runs.is_dir():
        return []
    return load_records_at(sorted(runs.rglob("*.json")))


def load_records_at(paths: list[Path]) -> list[Record]:
    """The records stored at the given paths."""
    return [Record.from_json(Path(p).read_text(encoding="utf-8")) for p in paths]
