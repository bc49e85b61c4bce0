"""Run records: one JSON file per job (method + config hash, split, seed), written atomically.

Layout: `<out>/runs/<dataset>/<setting>/<method>/<name>__<config_hash>__seed<seed>.json`
with the per-image scores beside it as `... .scores.csv`. A record exists only once the job
has finished; the runner skips jobs whose record exists. A record that cannot be read back
whole (truncated, hand-edited, its scores file changed, its metrics or test counts not those of
its scores file) counts as absent: readers skip it with one warning line and `run` re-runs its job.
A record a newer ndbench wrote (a higher `schema`) is skipped too, but never re-run: that would
overwrite it. Metrics this version does not know (a newer one's) are kept, unchecked.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from datasets_builders.atomic import atomic_write_files
from datasets_builders.errors import NdbenchError
from datasets_builders.splits import SETTINGS, Manifest

from .metrics import METRICS, fast_novelty_metrics, novelty_metrics

RECORD_SCHEMA = 1
# The file name `record_path` gives a record; other JSON files under <out>/runs are not records.
RECORD_NAME = re.compile(r"(?P<split>.+)__(?P<config_hash>[^_]+)__seed(?P<seed>[0-9]+)\.json")
SCORES_HEADER = "image_id,label,score"
# How far a recorded metric may lie from the one recomputed from its scores file. The scores are
# written with repr(float), so recomputing gives the very same float: any gap is an edit.
METRIC_TOLERANCE = 1e-9


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
    metrics: dict[str, float]  # auroc, aupr_in, aupr_out, fpr95 (and those of newer versions, kept unchecked)
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
    # sha256 of the scores file beside the record ("" in records written before it existed).
    scores_sha256: str = ""
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


class NotARecord(NdbenchError):
    """A file under `<out>/runs` not named like a record (a user's notes.json): not a record,
    damaged or not, so readers ignore it and no run re-runs anything for it."""


class NewerRecord(NdbenchError):
    """A record written by a newer ndbench (its `schema` is higher than RECORD_SCHEMA): this
    version cannot check it, and must not overwrite it."""


def is_record_name(name: str) -> bool:
    """Whether a file name is one `record_path` gives."""
    return RECORD_NAME.fullmatch(name) is not None


def scores_path(record_file: Path) -> Path:
    """The per-image scores CSV beside a record."""
    return record_file.with_suffix(".scores.csv")


def write_record(path: Path, record: Record, image_ids: list[str], labels, scores) -> None:
    """Write the per-image scores and the record (which carries the scores file's sha256) as
    one step, the record last: a job leaves both files or neither, and a re-run (--force)
    whose write fails leaves the earlier pair as it was."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCORES_HEADER.split(","))
    writer.writerows((i, int(lab), repr(float(s))) for i, lab, s in zip(image_ids, labels, scores, strict=True))
    text = buffer.getvalue()
    record_text = replace(record, scores_sha256=_sha256(text.encode("utf-8"))).to_json()
    atomic_write_files({scores_path(path): text, path: record_text})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a Record field's annotation (unions and Optional included;
    annotations it cannot judge fit)."""
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if not isinstance(origin, type):
        return True
    if isinstance(value, bool) and origin is not bool:
        return False
    if origin is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, origin)


def _plain_name(value: str) -> bool:
    """Whether `value` can name one file or folder (no separator, not empty, not . or ..)."""
    return bool(value) and value not in (".", "..") and not any(c in value for c in "/\\\0")


def _record_problem(data, record_file: Path) -> str | None:
    """Why a parsed record file is not a whole record (None when it is); `_checked_scores`
    then checks its scores file."""
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not a record"
    hints = typing.get_type_hints(Record)
    names = {f.name for f in fields(Record)}
    required = {f.name for f in fields(Record) if f.default is MISSING and f.default_factory is MISSING}
    for name in sorted(required - set(data)):
        return f"it has no {name!r}"
    for name, value in data.items():
        if name not in names:  # a later ndbench's addition (one it needs read goes with a new schema)
            continue
        if not _fits(value, hints[name]):
            hint = hints[name]
            return f"{name} is {value!r:.40}, not {hint.__name__ if isinstance(hint, type) else hint}"
    if data["setting"] not in SETTINGS:
        return f"setting {data['setting']!r:.40} is not one of {', '.join(SETTINGS)}"
    # Tables and the report name their files after these fields: they must be the names of the
    # folders the record sits in (record_path), never a path of their own.
    for name in ("dataset", "method", "split"):
        if not _plain_name(data[name]):
            return f"{name} {data[name]!r:.40} is not a plain name"
    where = (data["dataset"], data["setting"], data["method"])
    if (record_file.parent.parent.parent.name, record_file.parent.parent.name, record_file.parent.name) != where \
            or not record_file.name.startswith(f"{data['split']}__"):
        return "its dataset, setting, method or split is not the one its path names"
    for metric, value in _known(data["metrics"]).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            return f"metric {metric} is {value!r}, not a number in [0, 1]"
    if "auroc" not in data["metrics"]:
        return "it has no AUROC"
    for what, count in data["counts"].items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return f"count {what} is {count!r}, not a count"
    return None


def _checked_scores(data: dict, scores_file: Path) -> tuple[list[int], list[float]]:
    """The test labels and scores in the scores file of the whole record `data`. Raises
    ValueError saying why the record is damaged when that file is not the record's."""
    try:
        content = scores_file.read_bytes()
    except OSError:
        raise ValueError(f"its scores file {scores_file.name} is missing") from None
    expected = data.get("scores_sha256", "")
    if expected and _sha256(content) != expected:
        raise ValueError(f"its scores file {scores_file.name} was changed or truncated")
    if not expected:
        # Records older than `scores_sha256`: one line per test image, and whole lines.
        n_test = data["counts"].get("test_normal", 0) + data["counts"].get("test_novel", 0)
        lines = content.decode("utf-8", errors="replace").splitlines()
        if len(lines) != n_test + 1 or not content.endswith(b"\n"):
            raise ValueError(f"its scores file {scores_file.name} holds {len(lines) - 1} scores, not {n_test}")
    try:
        _, labels, scores = _parse_scores(content)
    except ValueError as exc:
        raise ValueError(f"its scores file {scores_file.name} {exc}") from None
    problem = _agreement_problem(data, labels, scores, scores_file)
    if problem:
        raise ValueError(problem)
    return labels, scores


def _agreement_problem(data: dict, labels: list[int], scores: list[float], scores_file: Path) -> str | None:
    """Why the record's test counts or metrics are not those of its scores file (None when they are)."""
    for what, label in (("test_normal", 0), ("test_novel", 1)):
        rows = labels.count(label)
        if what not in data["counts"]:
            return f"it has no count {what}"
        if data["counts"][what] != rows:
            return (f"its count {what} {data['counts'][what]!r} does not match its scores file "
                    f"({rows} rows labelled {label})")
    try:
        found = fast_novelty_metrics(labels, scores)
    except NdbenchError as exc:
        return f"its scores file {scores_file.name} gives no metrics: {exc.problem}"
    recorded = _known(data["metrics"])
    if _metrics_differ(recorded, found):
        # Only what novelty_metrics (the function `run` records with) finds makes a record damaged.
        found = novelty_metrics(labels, scores)
    for metric, computed in found.items():
        value = data["metrics"].get(metric, computed)
        if _metrics_differ({metric: value}, found):
            return "its {} {} does not match its scores file ({})".format(metric, *_apart(value, computed))
    return None


def _known(metrics: dict) -> dict:
    """The metrics this version computes; others (a newer version's) are left unchecked."""
    return {metric: value for metric, value in metrics.items() if metric in METRICS}


def _metrics_differ(recorded: dict[str, float], found: dict[str, float]) -> bool:
    """Whether any recorded metric is not one found or lies further than METRIC_TOLERANCE from it."""
    return any(metric not in found or abs(value - found[metric]) > METRIC_TOLERANCE
               for metric, value in recorded.items())


def _apart(recorded: float, computed: float) -> tuple[str, str]:
    """Both numbers with the fewest significant digits (four at least) that tell them apart."""
    for digits in range(4, 18):
        shown = f"{recorded:.{digits}g}", f"{computed:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return repr(recorded), repr(computed)


def read_scores(path: Path) -> tuple[list[str], list[int], list[float]]:
    """The image ids, labels and scores of a scores file as `write_record` writes it (CSV,
    ids quoted where needed; files written before ids were quoted read as well). Raises
    NdbenchError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise NdbenchError(f"cannot read scores file {path}: {exc.strerror or exc}") from exc
    try:
        return _parse_scores(content)
    except ValueError as exc:
        raise NdbenchError(f"scores file {path} {exc}") from exc


def _parse_scores(content: bytes) -> tuple[list[str], list[int], list[float]]:
    """The image ids, labels and scores of a scores file (see `read_scores`). Raises ValueError
    saying what is wrong with it (worded to follow "its scores file <name>")."""
    if not content:
        raise ValueError("is empty")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    header = text.split("\n", 1)[0]
    if header != SCORES_HEADER:
        raise ValueError(f"starts with {header!r:.60}, not the header {SCORES_HEADER!r}")
    rows = _csv_rows(text)
    if rows is None:
        rows = _unquoted_rows(text)
    ids: list[str] = []
    labels: list[int] = []
    scores: list[float] = []
    for number, (image_id, label, score_text) in rows:
        if label not in ("0", "1"):
            raise ValueError(f"line {number} has label {label!r:.20}, not 0 or 1")
        try:
            score = float(score_text)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise ValueError(f"line {number} has score {score_text!r:.30}, not a finite number")
        ids.append(image_id)
        labels.append(int(label))
        scores.append(score)
    return ids, labels, scores


def _csv_rows(text: str) -> list[tuple[int, tuple[str, str, str]]] | None:
    """(line number, fields) of each row after the header, read as CSV; None when some row
    is not three fields (a file written before ids were quoted, or a malformed one)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        next(reader)
        for row in reader:
            if len(row) != 3:
                return None
            rows.append((reader.line_num, (row[0], row[1], row[2])))
    except csv.Error:
        return None
    return rows


def _unquoted_rows(text: str) -> list[tuple[int, tuple[str, str, str]]]:
    """(line number, fields) of each line after the header, parsed from the right as files
    written before ids were quoted hold them: the image id is the rest of the line, whatever
    it holds. Raises ValueError on a line that is not three fields."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.rsplit(",", 2)
        if len(parts) != 3:
            raise ValueError(f"line {number} is {line!r:.60}, not image_id,label,score")
        rows.append((number, (parts[0], parts[1], parts[2])))
    return rows


def read_record(path: Path) -> Record:
    """The record at `path`, checked whole: valid JSON holding every field with its type,
    metrics in [0, 1], the scores file beside it unchanged and well formed, and the record's
    metrics and test counts those of that scores file. Raises NdbenchError naming the file
    otherwise (NotARecord when its name is not one `record_path` gives, NewerRecord when a
    newer ndbench wrote it)."""
    return read_record_and_scores(path)[0]


def read_record_and_scores(path: Path) -> tuple[Record, tuple[list[int], list[float]]]:
    """The record at `path`, checked as `read_record` checks it, with the test labels (1 =
    novel) and scores of its scores file, as that check read them."""
    path = Path(path)
    if not is_record_name(path.name):
        raise NotARecord(f"{path} is not a record (not named <split>__<config hash>__seed<seed>.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NdbenchError(f"cannot read record {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # Recursion: nesting too deep
        raise NdbenchError(f"record {path} is not valid JSON (truncated or edited?): {exc}") from exc
    _refuse_newer(data, path)
    problem = _record_problem(data, path)
    if problem:
        raise NdbenchError(f"record {path} is damaged: {problem}")
    try:
        scores = _checked_scores(data, scores_path(path))
    except ValueError as exc:
        raise NdbenchError(f"record {path} is damaged: {exc}") from None
    known = {f.name for f in fields(Record)}
    return Record(**{name: value for name, value in data.items() if name in known}), scores


def _refuse_newer(data, path: Path) -> None:
    """Raise NewerRecord when the parsed record file `data` has a schema above RECORD_SCHEMA."""
    schema = data.get("schema") if isinstance(data, dict) else None
    if isinstance(schema, int) and not isinstance(schema, bool) and schema > RECORD_SCHEMA:
        raise NewerRecord(f"record {path} was written by a newer ndbench (record schema {schema}; this one reads "
                          f"schema {RECORD_SCHEMA})", "read it with that ndbench version or a later one")


def refuse_newer(path: Path) -> None:
    """Raise NewerRecord when the record file at `path` was written by a newer ndbench (an
    unreadable or absent file passes: it is no newer record)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return
    _refuse_newer(data, Path(path))


def warn_skipped(error: NdbenchError) -> None:
    """The one warning line of a record that is skipped (or of a file that is not a record)."""
    if isinstance(error, NotARecord):
        print(f"ndbench: warning: {error.problem}; ignored", file=sys.stderr)
        return
    if isinstance(error, NewerRecord):
        print(f"ndbench: warning: {error.problem}; skipped, and never re-run over it ({error.fix})", file=sys.stderr)
        return
    print(f"ndbench: warning: {error.problem}; skipped (the ndbench run command that made it re-runs its job)",
          file=sys.stderr)


def load_records(out: Path, on_skip: Callable[[NdbenchError], None] = warn_skipped,
                 manifest: Callable[[str], Manifest] | None = None) -> list[Record]:
    """Every whole record under `<out>/runs` made on the current build of its split, in path
    order; damaged ones, and those made on an earlier build of their split (another manifest
    under `<out>/splits`, so another test set), are skipped (and reported through `on_skip`,
    as are JSON files not named like records, which are no record: `NotARecord`). `manifest`:
    the manifest under `<out>/splits` of a split id, raising NdbenchError as `Manifest.read`
    (a run's `SplitReader.manifest`, which has read them already); by default read here."""
    runs = Path(out) / "runs"
    if not runs.is_dir():
        return []
    current = _current_split_builds(Path(out) / "splits", manifest)
    records = []
    for path in sorted(runs.rglob("*.json")):
        try:
            record = read_record(path)
        except NdbenchError as exc:
            on_skip(exc)
            continue
        built = current(record)
        if built is not None and built != record.split_sha256:
            on_skip(NdbenchError(f"record {path} was made on an earlier build of split {record.split_id} "
                                 "(its manifest has changed since)"))
            continue
        records.append(record)
    return records


def _current_split_builds(splits_root: Path,
                          manifest: Callable[[str], Manifest] | None = None) -> Callable[[Record], str | None]:
    """A record's split's current manifest sha256 under `splits_root` (None where there is no
    readable manifest: nothing to compare against), each manifest asked for once (of
    `manifest`, by split id, when given)."""
    read = manifest or (lambda split_id: Manifest.read(splits_root / f"{split_id}.json"))
    found: dict[str, str | None] = {}

    def current(record: Record) -> str | None:
        if record.split_id not in found:
            try:
                found[record.split_id] = read(record.split_id).sha256
            except NdbenchError:
                found[record.split_id] = None
        return found[record.split_id]

    return current


def load_records_at(paths: list[Path], on_skip: Callable[[NdbenchError], None] = warn_skipped) -> list[Record]:
    """The whole records stored at the given paths; damaged ones are skipped."""
    records = []
    for path in paths:
        try:
            records.append(read_record(path))
        except NdbenchError as exc:
            on_skip(exc)
    return records
