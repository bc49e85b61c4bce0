"""Every method fits on a split with one or two training images, or refuses in fit with one
NdbenchError naming the method and the fewest images it needs (never a library's error, never
a fit that trains nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from msad_rdad_fixtures import TINY_CONFIG, ToyDataset
from transformaly_fixtures import TINY as TINY_TRANSFORMALY

from datasets_builders.errors import NdbenchError
from methods.registry import get

CPU = torch.device("cpu")
TINY_DSVDD = dict(ae_epochs=1, epochs=1, ae_batch_size=16, batch_size=16)


@pytest.mark.parametrize(("method", "config", "fewest"), [
    ("transformaly", {**TINY_TRANSFORMALY, "epochs": 1}, 2),  # a Gaussian mixture needs two samples
    ("transformaly", {**TINY_TRANSFORMALY, "epochs": 1, "gmm_components": 3}, 3),
    ("dsvdd", TINY_DSVDD, 2),  # BatchNorm cannot train on one image
    ("msad", {**TINY_CONFIG, "epochs": 1}, 2),  # one image: the contrastive loss is 0
])
def test_too_few_training_images_are_refused_in_one_line(method, config, fewest):
    detector = get(method, **config)
    with pytest.raises(NdbenchError) as caught:
        detector.fit(ToyDataset(fewest - 1, 0, seed=0), device=CPU)
    assert caught.value.problem == f"{method} needs at least {fewest} training images, got {fewest - 1}"
    assert f"--min-train-images {fewest}" in caught.value.fix and not detector.fitted


@pytest.mark.parametrize(("method", "config"), [
    ("transformaly", {**TINY_TRANSFORMALY, "epochs": 1}),
    ("dsvdd", TINY_DSVDD),
    ("msad", {**TINY_CONFIG, "epochs": 1}),
])
def test_the_fewest_training_images_fit_and_score(method, config):
    torch.manual_seed(0)
    detector = get(method, **config)
    detector.fit(ToyDataset(2, 0, seed=0), device=CPU)
    scores = detector.score(ToyDataset(2, 2, seed=1), device=CPU)
    assert scores.shape == (4,) and np.isfinite(scores).all()


def test_msad_with_the_angular_centre_loss_trains_on_one_image():
    torch.manual_seed(0)
    detector = get("msad", **TINY_CONFIG, epochs=1, angular=True)
    detector.fit(ToyDataset(1, 0, seed=0), device=CPU)
    assert detector.extra["loss_per_epoch"][0] > 0


def test_knn_without_training_images_says_so():
    detector = get("knn", backbone="ndbench_vit_embedded", weights="none", img_size=32)
    with pytest.raises(NdbenchError, match=r"^knn got no training images \("):
        detector.fit(ToyDataset(0, 0, seed=0), device=CPU)


@pytest.mark.parametrize(("method", "config"), [
    ("knn", dict(backbone="ndbench_vit_embedded", weights="none", img_size=32)),
    ("msad", {**TINY_CONFIG, "epochs": 1}),
])
def test_a_k_above_the_training_images_is_recorded_as_used(method, config):
    """k=1000 on 3 training images scores with k=3, as before, and the record's extra says so;
    the config (and so its hash) keeps the k asked for."""
    from methods.base import config_hash

    torch.manual_seed(0)
    detector = get(method, **config, k=1000)
    asked = config_hash(detector.config)
    detector.fit(ToyDataset(3, 0, seed=0), device=CPU)
    test = ToyDataset(2, 2, seed=1)
    scores = detector.score(test, device=CPU)
    assert detector.record_extra()["k_used"] == 3 and detector.config.k == 1000
    assert config_hash(detector.config) == asked
    same = get(method, **config, k=3)
    same.set_state(detector.state())
    same.fitted = True
    assert np.array_equal(same.score(test, device=CPU), scores)
