"""Novelty-detection metrics for one split: AUROC, AUPR-in, AUPR-out, FPR@95TPR.

Convention: novel test images (label 1) are the positive class and a higher score means
more novel. Repositories differ here (some treat normal as the positive class, which swaps
AUPR-in and AUPR-out and changes what FPR@95TPR counts); ndbench always uses this one:

- AUROC = `roc_auc_score(labels, scores)` (the same under either convention).
- AUPR-out = average precision with novel as positive: `average_precision_score(labels, scores)`.
- AUPR-in = average precision with normal as positive:
  `average_precision_score(1 - labels, -scores)`.
- FPR@95TPR = the fraction of normal test images scored at or above the highest threshold
  that still detects at least 95 % of the novel images (TPR on novel >= 0.95).

All values are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from datasets_builders.errors import NdbenchError

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise NdbenchError(
            f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}",
            "pass one label and one score per test image",
        )
    if len(y) != len(s):
        raise NdbenchError(
            f"{len(y)} labels but {len(s)} scores", "pass one score per test image"
        )
    if not np.all(np.isfinite(s)):
        bad = int(np.sum(~np.isfinite(s)))
        raise NdbenchError(
            f"{bad} of {len(s)} scores are NaN or infinite",
            "the method produced invalid scores; check its training (e.g. a diverged loss)",
        )
    if not np.isin(y, (0, 1)).all():
        raise NdbenchError(
            f"labels must be 0 (normal) or 1 (novel), got {sorted(set(y.tolist()))}",
            "use the labels of the split manifest",
        )
    y = y.astype(np.int64)
    if y.min(initial=1) == y.max(initial=0) or len(y) == 0:
        raise NdbenchError(
            "the test set holds only one class (all normal or all novel)",
            "AUROC needs both normal and novel test images; check the split",
        )
    return y, s


def fpr_at_tpr(labels, scores, tpr_level: float = 0.95) -> float:
    """The fraction of normal images scored at or above the threshold at which a fraction
    `tpr_level` of the novel images is detected."""
    y, s = _check(labels, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    # tpr rises with falling threshold: the first point reaching the level is the highest
    # threshold that detects enough novel images, hence the lowest false-positive rate.
    return float(fpr[np.argmax(tpr >= tpr_level)])


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve of one split's test scores, novel (label 1) being the positive class:
    false-positive rates, true-positive rates and the score thresholds, as scikit-learn's
    `roc_curve` gives them."""
    y, s = _check(labels, scores)
    fpr, tpr, thresholds = roc_curve(y, s)
    return fpr, tpr, thresholds


def threshold_at_tpr(labels, scores, tpr_level: float = 0.95) -> float:
    """The highest score threshold at which at least a fraction `tpr_level` of the novel
    images score at or above it (the threshold behind FPR@95TPR)."""
    y, s = _check(labels, scores)
    _, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    return float(thresholds[np.argmax(tpr >= tpr_level)])


def novelty_metrics(labels, scores) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR@95TPR (fractions) of one split's test scores,
    novel (label 1) being the positive class and higher scores meaning more novel."""
    y, s = _check(labels, scores)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_in": float(average_precision_score(1 - y, -s)),
        "aupr_out": float(average_precision_score(y, s)),
        "fpr95": fpr_at_tpr(y, s, 0.95),
    }


def fast_novelty_metrics(labels, scores) -> dict[str, float]:
    """The metrics of `novelty_metrics` by scikit-learn's own formulas but without its input
    checks (which cost most of its time on a few thousand scores), for checking many stored
    results against their scores. Agrees with `novelty_metrics` up to floating-point rounding;
    whatever it finds amiss is for `novelty_metrics` to confirm."""
    y, s = _check(labels, scores)
    tps, fps = _counts_at_thresholds(y, s)
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    # The AUROC on the curve with collinear points dropped, as roc_auc_score integrates it.
    keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]) + 1
    keep = np.r_[0, keep] if len(fps) > 2 else np.arange(len(fpr))
    x, h = fpr[keep], tpr[keep]
    return {
        "auroc": float((np.diff(x) * (h[1:] + h[:-1]) / 2.0).sum()),
        "aupr_in": _average_precision(*_counts_at_thresholds(1 - y, -s)),
        "aupr_out": _average_precision(tps, fps),
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


def _counts_at_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives (float64) at each distinct score taken as the threshold, from
    the highest score down."""
    order = np.argsort(s, kind="stable")[::-1]
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(y) - 1]
    tps = np.cumsum(y.astype(np.float64))[last]
    return tps, 1 + last.astype(np.float64) - tps


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float:
    """Average precision (the step integral of the precision-recall curve) from the counts."""
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]
    recall = np.r_[(tps / tps[-1])[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))
