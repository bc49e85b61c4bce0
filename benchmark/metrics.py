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
