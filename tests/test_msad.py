"""MSAD (methods.msad) on a tiny random-weight CNN and toy images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from msad_rdad_fixtures import TINY_CONFIG, ToyDataset, tiny_weights
from sklearn.metrics import roc_auc_score

from datasets_builders.errors import NdbenchError
from methods.backbones import create_backbone
from methods.msad import MoCoV2Augment, MSADDetector, freeze, mean_shifted_loss
from methods.registry import get

CPU = torch.device("cpu")
RECIPE_TRAINABLE = ("layer3.", "layer4.")


@pytest.fixture(scope="module")
def toy():
    return ToyDataset(40, 0, seed=1), ToyDataset(20, 20, seed=2)


@pytest.fixture(scope="module")
def fitted(toy, tmp_path_factory):
    weights = tiny_weights(tmp_path_factory.mktemp("msad") / "tiny.safetensors")
    torch.manual_seed(0)
    detector = get("msad", **{**TINY_CONFIG, "weights": str(weights)}, epochs=2, batch_size=16, lr=1e-2)
    detector.fit(toy[0], device=CPU)
    return detector, weights


# --- configuration --------------------------------------------------------------------------
def test_paper_defaults_and_embedded_preset():
    c = get("msad").config
    assert (c.backbone, c.weights, c.img_size, c.center_crop) == ("resnet152.tv_in1k", "hub", 224, 224 / 256)
    assert c.frozen == ("conv1", "bn1", "layer1", "layer2")
    assert (c.temperature, c.angular, c.k) == (0.25, False, 2)
    assert (c.lr, c.weight_decay, c.momentum, c.epochs, c.batch_size) == (1e-5, 5e-5, 0.0, 20, 64)
    assert (c.crop_scale, c.jitter, c.jitter_p, c.grayscale_p, c.blur_sigma, c.blur_p) == (
        (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, (0.1, 2.0), 0.5)
    preset = MSADDetector.with_preset("embedded").config
    assert (preset.backbone, preset.weights, preset.img_size, preset.mean) == (
        "ndbench_resnet_embedded", "embedded", 64, (0.5,) * 3)
    with pytest.raises(NdbenchError, match="temperature"):
        get("msad", temperature=0.0)


def test_transform_resizes_then_centre_crops():
    from PIL import Image

    image = Image.new("RGB", (512, 256))  # 2:1; the short side goes to 256, then a 224 crop
    image.paste((255, 255, 255), (0, 0, 128, 256))  # the left quarter is white, cropped away
    x = get("msad").transform()(image)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], -torch.tensor((0.485, 0.456, 0.406)) / torch.tensor((0.229, 0.224, 0.225)))


# --- parameters: what is frozen --------------------------------------------------------------
def test_resnet152_freezes_stem_layer1_layer2():
    with torch.device("meta"):  # shapes and names only: no memory, no init cost
        model = create_backbone("resnet152.tv_in1k", weights="none", num_classes=0)
    frozen = freeze(model, get("msad").config.frozen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.num_features == 2048
    assert trainable and all(n.startswith(RECIPE_TRAINABLE) for n in trainable)
    assert set(frozen) | trainable == {n for n, _ in model.named_parameters()}
    assert all(n.startswith(("conv1.", "bn1.", "layer1.", "layer2.")) for n in frozen)
    assert {n.split(".")[0] for n in frozen} == {"conv1", "bn1", "layer1", "layer2"}
    with pytest.raises(NdbenchError, match="no module 'blocks'"):
        freeze(model, ("blocks",))


def test_embedded_cnn_freezes_the_same_names_and_features_are_unit_norm():
    detector = get("msad", **TINY_CONFIG)
    model = detector.build_model("none")
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(RECIPE_TRAINABLE) for n in trainable)
    assert not model.training
    x = torch.stack(ToyDataset(3, 3, seed=0).images)
    with torch.no_grad():
        z = model(x)
    assert z.shape == (6, 256)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)


# --- the loss ---------------------------------------------------------------------------------
def test_mean_shifted_loss_hand_values():
    e = torch.eye(4)
    z = e[:2]  # two orthogonal unit features, both views identical, centre 0
    # Row e1 sees e2, e1 (its positive), e2 at cosines 0, 1, 0: -log(e^4 / (1 + e^4 + 1)).
    expected = math.log(1 + 2 * math.exp(-4))
    torch.testing.assert_close(mean_shifted_loss(z, z, torch.zeros(4), 0.25), torch.tensor(expected))
    # The centre shifts before the cosine: shifting by -e3 makes every pair less orthogonal.
    centre = -e[2]
    shifted = F.normalize(z - centre, dim=-1)  # (1, 0, 1, 0)/sqrt2 and (0, 1, 1, 0)/sqrt2: cosine 1/2
    expected_c = math.log(1 + 2 * math.exp(2 - 4))
    torch.testing.assert_close(shifted[0] @ shifted[1], torch.tensor(0.5))
    torch.testing.assert_close(mean_shifted_loss(z, z, centre, 0.25), torch.tensor(expected_c))
    # The angular variant adds the mean squared norm of each view's shifted features: 2 + 2.
    torch.testing.assert_close(mean_shifted_loss(z, z, centre, 0.25, angular=True), torch.tensor(expected_c + 4))


def test_mean_shifted_loss_matches_the_sum_over_other_samples():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    z2 = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    c = F.normalize(torch.randn(8, generator=g), dim=-1) * 0.3
    s = F.normalize(torch.cat([z1 - c, z2 - c]), dim=-1)
    sim = torch.exp(s @ s.t() / 0.25)
    denominator = sim.sum(dim=1) - sim.diag()
    positive = torch.exp((s[:5] * s[5:]).sum(dim=1) / 0.25).repeat(2)
    reference = -(positive / denominator).log().mean()
    torch.testing.assert_close(mean_shifted_loss(z1, z2, c, 0.25), reference)


def test_augment_gives_fresh_views_of_the_same_shape():
    detector = get("msad", **TINY_CONFIG)
    augment = MoCoV2Augment(detector.config)
    x = torch.stack(ToyDataset(4, 0, seed=0).images)
    torch.manual_seed(0)
    a = augment(x)
    torch.manual_seed(0)
    b = augment(x)
    c = augment(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert float(a.min()) >= -1 - 1e-5 and float(a.max()) <= 1 + 1e-5  # still [0, 1] pixels, normalised


# --- training ---------------------------------------------------------------------------------
def test_one_step_lowers_the_loss_and_moves_only_trainable_parameters(tmp_path):
    detector = get("msad", **{**TINY_CONFIG, "weights": str(tiny_weights(tmp_path / "w.safetensors"))}, lr=0.05)
    detector.model = detector.build_model(detector.config.weights)
    data = ToyDataset(16, 0, seed=3)
    x = torch.stack(data.images)
    detector.centre = detector.compute_centre(detector.features(data, device=CPU))
    torch.manual_seed(1)
    augment = MoCoV2Augment(detector.config)
    v1, v2 = augment(x), augment(x)
    before = {k: v.clone() for k, v in detector.model.backbone.state_dict().items()}

    def loss_now() -> float:
        with torch.no_grad():
            return float(mean_shifted_loss(detector.model(v1), detector.model(v2), detector.centre, 0.25))

    start = loss_now()
    params = [p for p in detector.model.parameters() if p.requires_grad]
    step_loss = detector.train_step(v1, v2, torch.optim.SGD(params, lr=0.05), CPU)
    assert step_loss == pytest.approx(start, rel=1e-5)
    assert loss_now() < start - 1e-3
    after = detector.model.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(RECIPE_TRAINABLE) for k in changed)
    # BatchNorm stays in eval mode (the original never calls train()): running stats are untouched.
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)


def test_centre_is_fixed_mean_of_pretrained_features(fitted, toy):
    detector, weights = fitted
    untrained = get("msad", **{**TINY_CONFIG, "weights": str(weights)})
    untrained.model = untrained.build_model(untrained.config.weights)
    initial = untrained.features(toy[0], device=CPU)
    torch.testing.assert_close(detector.centre, initial.mean(dim=0), atol=1e-6, rtol=0)
    tuned = detector.features(toy[0], device=CPU)
    assert not torch.allclose(tuned, initial, atol=1e-3)  # the backbone did change ...
    assert float(detector.centre.norm()) < 1  # ... the centre is the plain mean (no --angular)
    torch.testing.assert_close(torch.from_numpy(detector.train_features), tuned)
    assert len(detector.record_extra()["loss_per_epoch"]) == 2
    angular = get("msad", **TINY_CONFIG, angular=True)
    torch.testing.assert_close(angular.compute_centre(initial).norm(), torch.tensor(1.0))


def test_centre_does_not_move_during_training(tmp_path, monkeypatch):
    seen = []
    original = MSADDetector.train_step

    def spy(self, view1, view2, optimizer, device):
        seen.append(self.centre.clone())
        return original(self, view1, view2, optimizer, device)

    monkeypatch.setattr(MSADDetector, "train_step", spy)
    detector = get("msad", **{**TINY_CONFIG, "weights": str(tiny_weights(tmp_path / "w.safetensors"))},
                   epochs=2, batch_size=8, lr=0.05)
    detector.fit(ToyDataset(16, 0, seed=4), device=CPU)
    assert len(seen) == 4 and all(torch.equal(c, seen[0]) for c in seen)
    assert torch.equal(detector.centre, seen[0])


def test_in_memory_and_reread_batches_match():
    data = ToyDataset(10, 0, seed=5)
    detector = get("msad", **TINY_CONFIG, batch_size=4)
    images = detector._images_in_memory(data, None)
    assert images is not None and images.dtype == torch.float16 and images.shape == (10, 3, 32, 32)
    assert get("msad", **TINY_CONFIG, max_cache_gb=0.0)._images_in_memory(data, None) is None
    batches = {}
    for name, source in (("memory", images), ("reread", None)):
        torch.manual_seed(0)
        batches[name] = list(detector._batches(data, source, CPU, None, ""))
    assert [len(b) for b in batches["memory"]] == [4, 4, 2]  # shuffled, last partial batch kept
    for a, b in zip(batches["memory"], batches["reread"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    assert not torch.equal(torch.cat(batches["reread"]), torch.stack(data.images))


# --- scoring ----------------------------------------------------------------------------------
def test_score_is_sum_of_squared_distances_to_two_nearest(monkeypatch):
    detector = get("msad", **TINY_CONFIG)
    detector.fitted = True
    detector.train_features = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=np.float32)
    test = torch.tensor([[0.5, 0.0], [3.0, 2.0]])
    monkeypatch.setattr(detector, "features", lambda images, device, progress=None: test)
    # 0.5^2 + 0.5^2 = 0.5; (2^2) + (2^2 + 2^2) = 12
    np.testing.assert_allclose(detector.score([None, None], device=CPU), [0.5, 12.0], rtol=1e-6)


def test_toy_novel_images_score_higher(fitted, toy):
    detector, _ = fitted
    scores = detector.score(toy[1], device=CPU)
    labels = np.array(toy[1].labels)
    assert scores.shape == (40,) and np.isfinite(scores).all()
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert roc_auc_score(labels, scores) > 0.8


def test_save_load_gives_identical_scores(fitted, toy, tmp_path):
    detector, _ = fitted
    path = tmp_path / "msad.pt"
    detector.save(path)
    loaded = MSADDetector.load(path)
    assert loaded.config == detector.config
    assert torch.equal(loaded.centre, detector.centre)
    np.testing.assert_array_equal(loaded.score(toy[1], device=CPU), detector.score(toy[1], device=CPU))
    assert loaded.record_extra() == detector.record_extra()

