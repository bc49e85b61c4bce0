"""Metrics against hand-computed values; novel (label 1) is the positive class."""

import math
import re

import numpy as np
import pytest

from benchmark.metrics import fast_novelty_metrics, fpr_at_tpr, novelty_metrics
from datasets_builders.errors import NdbenchError


def test_small_example_by_hand():
    # Ranked by score: 0.8 novel, 0.4 normal, 0.35 novel, 0.1 normal.
    # AUROC: 3 of 4 (novel, normal) pairs ordered correctly.
    # AUPR-out: recall 1/2 at precision 1, then recall 1 at precision 2/3 -> 1/2 + 1/3.
    # AUPR-in (by -score): 0.1 normal (P 1), 0.35 novel, 0.4 normal (P 2/3) -> 1/2 + 1/3.
    # FPR@95: both novel images need threshold 0.35; normals >= 0.35: only 0.4 -> 1/2.
    m = novelty_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["auroc"] == 0.75
    assert m["aupr_out"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["aupr_in"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["fpr95"] == 0.5


def test_aupr_in_and_out_differ():
    # Ranked: 0.9 novel, 0.6 normal, 0.5 novel, 0.2 normal, 0.1 normal.
    # AUROC: 0.9 beats 3 normals, 0.5 beats 2 -> 5/6.
    # AUPR-out: 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # AUPR-in (by -score: 0.1 n, 0.2 n, 0.5 novel, 0.6 n, 0.9 novel): 1/3 + 1/3 + 1/3 * 3/4 = 11/12.
    # FPR@95: threshold 0.5; normals >= 0.5: 0.6 -> 1/3.
    m = novelty_metrics([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.9])
    assert m["auroc"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["aupr_out"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["aupr_in"] == pytest.approx(11 / 12, abs=1e-12)
    assert m["fpr95"] == pytest.approx(1 / 3, abs=1e-12)


def test_fpr95_threshold_and_ties():
    # 20 novel scores 1..20: detecting 19 of them (95 %) needs threshold 2.
    # Normals 1.5, 2 (tied with the threshold: counted), 2.5, 30 -> 3 of 4 at or above.
    novel = [float(s) for s in range(1, 21)]
    normal = [1.5, 2.0, 2.5, 30.0]
    labels = [1] * 20 + [0] * 4
    assert fpr_at_tpr(labels, novel + normal) == 0.75


def test_fpr95_direction():
    perfect = novelty_metrics([0, 0, 1, 1], [0.0, 1.0, 2.0, 3.0])
    inverted = novelty_metrics([0, 0, 1, 1], [3.0, 2.0, 1.0, 0.0])
    assert perfect == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    assert inverted["auroc"] == 0.0
    assert inverted["fpr95"] == 1.0


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, math.nan, 0.3], "NaN or infinite"),
        ([0, 1, 1], [0.1, math.inf, 0.3], "NaN or infinite"),
        ([0, 0, 0], [0.1, 0.2, 0.3], "only one class"),
        ([1, 1], [0.1, 0.2], "only one class"),
        ([], [], "only one class"),
        ([0, 1], [0.1, 0.2, 0.3], "2 labels but 3 scores"),
        ([0, 2], [0.1, 0.2], "labels must be 0 (normal) or 1 (novel)"),
    ],
)
def test_bad_input(labels, scores, message):
    for metrics in (novelty_metrics, fast_novelty_metrics):
        with pytest.raises(NdbenchError, match=re.escape(message)):
            metrics(labels, scores)


def test_fast_metrics_are_scikit_learns():
    """On scores with and without ties, all tied, and as few as two images."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 300))
        labels = rng.integers(0, 2, n)
        labels[:2] = (0, 1)
        scores = [rng.normal(size=n) + labels, np.round(rng.normal(size=n) + labels, 1),
                  rng.integers(0, 3, n).astype(float), np.full(n, 0.5)][trial % 4]
        fast, slow = fast_novelty_metrics(labels, scores), novelty_metrics(labels, scores)
        assert fast.keys() == slow.keys()
        assert all(abs(fast[k] - slow[k]) <= 1e-12 for k in slow), (trial, fast, slow)
