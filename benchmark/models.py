"""Saved detectors: a job's fitted detector kept beside its record, and read back to score.

ndbench run --save-models writes `<record stem>.model.pt` next to each record: the
detector's own `save` file (method, config, fitted state) plus what it takes to trust and use
it later: a format version, the ndbench version, the weights it started from (with the file's
sha256 when they are a file), the split and its sha256, the seed, a decision threshold, and a
sha256 of the method, config and fitted state (`checksum`), so a damaged file is refused
before it scores anything.

The threshold is the score at 95 % TPR on the split's test set: the highest score at or above
which 95 % of the novel test images fall (the threshold behind FPR@95TPR). The splits have no
separate validation part, so it is measured on the test images the record reports; treat it
as a starting point for new images, not as a tuned operating point.

Model files are Python pickles (`torch.load(weights_only=False)`, as the detectors' own
`load`): read only files you trust.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from datasets_builders.errors import NdbenchError
from methods.base import BaseDetector, write_payload
from methods.pretrain import resolve_weights
from methods.registry import get_class

from .metrics import fpr_at_tpr, threshold_at_tpr
from .records import Record

MODEL_FORMAT = "ndbench-model"
# Bump when what `save_model` writes changes in a way older readers would misread.
# 2: the file holds `checksum`, and files without one are refused.
MODEL_FORMAT_VERSION = 2
THRESHOLD_TPR = 0.95
THRESHOLD_STATISTIC = "score at 95% TPR on the split's test set"
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, TypeError, KeyError, AttributeError,
                ImportError, IndexError, pickle.UnpicklingError, zipfile.BadZipFile)


@dataclass(frozen=True)
class SavedModel:
    """A detector read back from a model file, with what was stored beside it."""

    detector: BaseDetector
    path: Path
    info: dict  # everything `save_model` stored besides method, config and state

    @property
    def threshold(self) -> float | None:
        """The stored decision threshold (score at 95 % TPR on the test set), if any."""
        stored = self.info.get("threshold")
        if stored is None:
            return None
        value = stored.get("value") if isinstance(stored, dict) else stored
        if value is None:
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            what = "a finite number" if math.isinf(number) else "a number"
            raise NdbenchError(f"{self.path}: its stored threshold {value!r} is not {what}",
                               "save the model again: run its job once more with --save-models --force")
        return number


def model_path(record_file: Path) -> Path:
    """Where the saved detector of a record lives: `<record stem>.model.pt` beside it."""
    return Path(record_file).with_suffix(".model.pt")


def ndbench_version() -> str:
    """The installed ndbench version ("unknown" when run from a bare source tree)."""
    try:
        return version("ndbench")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_info(config) -> dict:
    """The weights a detector started from: its `weights` setting, the file it resolved to
    and that file's sha256 (None where the weights are not a local file)."""
    setting = getattr(config, "weights", None)
    backbone = getattr(config, "backbone", None)
    resolved = resolve_weights(backbone, setting) if backbone and setting is not None else None
    is_file = resolved is not None and str(resolved) not in ("hub", "none") and Path(resolved).is_file()
    return {
        "setting": None if setting is None else str(setting),
        "file": str(resolved) if is_file else None,
        "sha256": file_sha256(Path(resolved)) if is_file else None,
    }


def content_sha256(payload: Mapping) -> str:
    """The sha256 of a model payload's method, config and fitted state: tensors and arrays
    by dtype, shape and bytes, mappings in key order, other values as `_feed` describes."""
    digest = hashlib.sha256()
    _feed(digest, {key: payload.get(key) for key in ("method", "config", "state")})
    return digest.hexdigest()


def _feed(digest, value) -> None:
    """Add `value` to `digest` in a form that is the same after a save and load."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {value.dtype} {tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, np.ndarray | np.generic) and not np.asarray(value).dtype.hasobject:
        array = np.ascontiguousarray(value)
        digest.update(f"array {array.dtype.str} {array.shape};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    elif isinstance(value, Mapping):
        digest.update(f"mapping {len(value)};".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"sequence {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, bool | int | float | str | bytes):
        digest.update(f"{type(value).__name__} {value!r};".encode())
    elif hasattr(value, "__dict__"):  # fitted scikit-learn objects (PCA, GaussianMixture)
        digest.update(f"object {type(value).__module__}.{type(value).__qualname__};".encode())
        _feed(digest, vars(value))
    else:
        digest.update(pickle.dumps(value, protocol=4))


def save_model(path: Path, detector: BaseDetector, record: Record, labels, scores) -> None:
    """Save a job's fitted detector (`BaseDetector.payload`) with its provenance, the test-set
    threshold and the checksum of its method, config and state."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    info = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "ndbench_version": ndbench_version(),
        "config_hash": record.config_hash,
        "weights": weights_info(detector.config),
        "split": {"id": record.split_id, "sha256": record.split_sha256,
                  "normal_classes": list(record.normal_classes)},
        "seed": record.seed,
        "preset": record.preset,
        "threshold": {
            "statistic": THRESHOLD_STATISTIC,
            "value": threshold_at_tpr(labels, scores, THRESHOLD_TPR),
            "tpr": THRESHOLD_TPR,
            "fpr": fpr_at_tpr(labels, scores, THRESHOLD_TPR),
        },
    }
    payload = detector.payload(info)
    payload["checksum"] = content_sha256(payload)
    write_payload(Path(path), payload)


def load_model(path: Path) -> SavedModel:
    """Read a model file written by `save_model`; one clear error when it is missing, not an
    ndbench model, of another format version, of a method this installation lacks, or damaged
    (its content no longer matches its checksum)."""
    path = Path(path)
    if not path.is_file():
        raise NdbenchError(f"no model file at {path}",
                           "pass a .model.pt written by `ndbench run --method METHOD --save-models`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except _READ_ERRORS as exc:
        raise NdbenchError(
            f"cannot read model file {path}: {_first_line(exc)}",
            "the file is damaged or not a model; save it again with "
            "`ndbench run --method METHOD --save-models --force`",
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise NdbenchError(f"{path} is not an ndbench model file",
                           "pass a .model.pt written by `ndbench run --method METHOD --save-models`")
    found = payload.get("format_version")
    if found != MODEL_FORMAT_VERSION:
        raise NdbenchError(
            f"{path} has model format {found!r} (written by ndbench {payload.get('ndbench_version')}); "
            f"this ndbench ({ndbench_version()}) reads format {MODEL_FORMAT_VERSION}",
            "score it with the ndbench version that wrote it, or re-run the job with --save-models",
        )
    cls = get_class(str(payload.get("method")))
    check_content(payload, path)
    try:
        detector = cls.from_saved(payload, path)
    except NdbenchError as exc:
        raise NdbenchError(f"model file {path}: {exc.problem}", exc.fix) from exc
    except _READ_ERRORS as exc:
        raise NdbenchError(f"cannot restore the {cls.name} model in {path}: {_first_line(exc)}",
                           "the file is damaged or from another method version; save it again") from exc
    info = {k: v for k, v in payload.items() if k not in ("method", "config", "state")}
    return SavedModel(detector, path, info)


def check_content(payload: dict, path: Path) -> None:
    """Refuse a model whose method, config or state differ from what was saved (its checksum)."""
    try:
        matches = payload.get("checksum") == content_sha256(payload)
    except _READ_ERRORS:
        matches = False
    if not matches:
        raise NdbenchError(f"model file {path} is damaged: its content does not match the checksum stored with it",
                           "save it again with `ndbench run --method METHOD --save-models --force`")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
