"""RDAD (methods.rdad) on tiny random-weight CNNs and toy images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from msad_rdad_fixtures import TINY_CONFIG, TINY_SIZE, ToyDataset, tiny_weights
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from datasets_builders.errors import NdbenchError
from methods.backbones import create_backbone
from methods.rdad import (
    RDADDetector,
    ReverseDistillation,
    anomaly_maps,
    distillation_loss,
    encoder_block_spec,
    flat_distances,
    smooth,
)
from methods.registry import get

CPU = torch.device("cpu")
TINY_RDAD = {**TINY_CONFIG, "bottleneck_blocks": 1, "decoder_blocks": (1, 1, 1), "sigma": 0.5}


@pytest.fixture(scope="module")
def toy():
    return ToyDataset(40, 0, seed=1), ToyDataset(20, 20, seed=2, novel_kind="noise")


@pytest.fixture(scope="module")
def fitted(toy, tmp_path_factory):
    weights = tiny_weights(tmp_path_factory.mktemp("rdad") / "tiny.safetensors")
    torch.manual_seed(0)
    detector = get("rdad", **{**TINY_RDAD, "weights": str(weights)}, epochs=10, batch_size=8, lr=1e-3)
    detector.fit(toy[0], device=CPU)
    return detector


# --- configuration --------------------------------------------------------------------------
def test_paper_defaults_and_embedded_preset():
    c = get("rdad").config
    assert (c.backbone, c.weights, c.img_size) == ("wide_resnet50_2.tv_in1k", "hub", 256)
    assert (c.mean, c.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (c.bottleneck_blocks, c.decoder_blocks) == (3, (3, 4, 6))
    assert (c.lr, c.betas, c.epochs, c.batch_size, c.loss, c.sigma) == (0.005, (0.5, 0.999), 200, 16, "flat", 4.0)
    preset = RDADDetector.with_preset("embedded").config
    assert (preset.backbone, preset.weights, preset.img_size, preset.mean) == (
        "ndbench_resnet_embedded", "embedded", 64, (0.5,) * 3)
    with pytest.raises(NdbenchError, match="multiple of 32"):
        get("rdad", img_size=100)
    with pytest.raises(NdbenchError, match="loss"):
        get("rdad", loss="mse")


# --- shapes: the decoder rebuilds the encoder's scales ------------------------------------------
def test_wide_resnet50_2_scales_match():
    with torch.device("meta"):  # shapes only: no memory, no compute
        backbone = create_backbone("wide_resnet50_2.tv_in1k", weights="none", num_classes=0)
        model = ReverseDistillation(backbone, bottleneck_blocks=3, decoder_blocks=(3, 4, 6))
        encoded, decoded = model(torch.zeros(2, 3, 64, 64))
    assert encoder_block_spec(backbone) == ("bottleneck", 2.0)
    assert model.channels == (256, 512, 1024)
    shapes = [(2, 256, 16, 16), (2, 512, 8, 8), (2, 1024, 4, 4)]
    assert [tuple(f.shape) for f in encoded] == shapes
    assert [tuple(f.shape) for f in decoded] == shapes
    assert model.bottleneck.out_channels == 2048
    # The original's OCBE stage: 3 bottleneck blocks, 3 x 1024 -> 2048 channels through width 1024.
    first = model.bottleneck.embed[0].body
    assert (first[0].in_channels, first[0].out_channels, first[-2].out_channels) == (3072, 1024, 2048)
    assert len(model.bottleneck.embed) == 3 and [len(s) for s in model.decoder.stages] == [3, 4, 6]
    # The decoder's first stage mirrors layer3 of WRN-50-2: width 512, transposed 2x2 stride 2.
    up = model.decoder.stages[0][0].body[3]
    assert isinstance(up, torch.nn.ConvTranspose2d) and (up.in_channels, up.stride) == (512, (2, 2))


@pytest.mark.parametrize("size", [32, 64])
def test_small_cnn_scales_match(size):
    detector = get("rdad", **{**TINY_RDAD, "img_size": size})
    model = detector.build_model("none").eval()
    encoded, decoded = model(torch.zeros(2, 3, size, size))
    assert encoder_block_spec(model.encoder) == ("basic", 1.0) and model.channels == (32, 64, 128)
    shapes = [(2, 32, size // 4, size // 4), (2, 64, size // 8, size // 8), (2, 128, size // 16, size // 16)]
    assert [tuple(f.shape) for f in encoded] == shapes
    assert [tuple(f.shape) for f in decoded] == shapes
    assert model.bottleneck.out_channels == 256


def test_encoder_is_frozen_and_only_ocbe_and_decoder_train():
    detector = get("rdad", **TINY_RDAD, lr=0.01)
    detector.model = detector.build_model("none")
    encoder = {n for n, _ in detector.model.encoder.named_parameters()}
    assert encoder and not any(p.requires_grad for p in detector.model.encoder.parameters())
    trainable = {id(p) for p in detector.trainable_parameters()}
    assert trainable == {id(p) for p in detector.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (detector.model.bottleneck, detector.model.decoder) for p in m.parameters()}
    detector.model.train()
    assert not detector.model.encoder.training and detector.model.decoder.training
    with pytest.raises(NdbenchError, match="ResNet"):
        encoder_block_spec(torch.nn.Linear(2, 2))


def test_one_step_lowers_the_loss_and_leaves_the_encoder_alone():
    torch.manual_seed(0)
    detector = get("rdad", **TINY_RDAD)
    detector.model = detector.build_model("none")
    x = torch.stack(ToyDataset(16, 0, seed=3).images)
    encoder_before = {k: v.clone() for k, v in detector.model.encoder.state_dict().items()}
    trainable_before = [p.detach().clone() for p in detector.trainable_parameters()]
    features = detector.model.encode(x)

    def loss_now() -> float:
        detector.model.eval()
        with torch.no_grad():
            return float(distillation_loss(features, detector.model.decode(features)))

    start = loss_now()
    optimizer = torch.optim.Adam(detector.trainable_parameters(), lr=1e-3, betas=(0.5, 0.999))
    detector.model.train()
    detector.train_step(features, optimizer, CPU)
    assert loss_now() < start - 1e-3
    assert all(torch.equal(v, detector.model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    moved = [not torch.equal(a, b) for a, b in zip(trainable_before, detector.trainable_parameters(), strict=True)]
    assert all(moved)


# --- loss, maps, smoothing ------------------------------------------------------------------------
def test_loss_flat_is_the_official_code_and_map_is_the_paper():
    e = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]: positions (1, 0) and (0, 1)
    d = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # positions (1, 0) and (0, 2): same directions
    # Flattened: (1, 0, 0, 1) . (1, 0, 0, 2) / (sqrt2 sqrt5) = 3 / sqrt10; per position: cosine 1.
    assert float(distillation_loss([e], [d], "flat")) == pytest.approx(1 - 3 / math.sqrt(10))
    assert float(distillation_loss([e], [d], "map")) == pytest.approx(0.0, abs=1e-7)
    three = [e, e, e]
    assert float(distillation_loss(three, [-f for f in three])) == pytest.approx(6.0)  # 3 scales x (1 - -1)


def test_anomaly_maps_sum_upsampled_scales():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]
    assert torch.allclose(anomaly_maps(feats, feats, 32), torch.zeros(2, 32, 32), atol=1e-6)
    opposite = anomaly_maps(feats, [-f for f in feats], 32)
    assert torch.allclose(opposite, torch.full((2, 32, 32), 6.0), atol=1e-5)
    # Only the coarsest scale differs, at one corner position: corners align, so image pixel
    # (0, 0) gets exactly that position's 1 - cos = 2, and the far corner gets 0.
    decoded = [f.clone() for f in feats]
    decoded[2][:, :, 0, 0] *= -1
    maps = anomaly_maps(feats, decoded, 32)
    assert torch.allclose(maps[:, 0, 0], torch.full((2,), 2.0), atol=1e-5)
    assert torch.allclose(maps[:, -1, -1], torch.zeros(2), atol=1e-6)


def test_smoothing_is_scipy_gaussian_per_image():
    spike = torch.zeros(2, 33, 33)
    spike[0, 16, 16] = 1.0
    smoothed = smooth(spike, 4.0)
    np.testing.assert_allclose(smoothed[0], gaussian_filter(spike[0].double().numpy(), sigma=4))
    assert smoothed[0].sum() == pytest.approx(1.0) and smoothed[0].max() < 0.02
    assert np.all(smoothed[1] == 0)  # images are not blurred into each other


# --- end to end ---------------------------------------------------------------------------------
def test_toy_novel_images_score_higher(fitted, toy):
    scores = fitted.score(toy[1], device=CPU)
    labels = np.array(toy[1].labels)
    assert scores.shape == (40,) and np.isfinite(scores).all()
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert roc_auc_score(labels, scores) > 0.8
    losses = fitted.record_extra()["loss_per_epoch"]
    assert len(losses) == 10 and losses[-1] < losses[0]
    maps = fitted.anomaly_map(torch.stack(toy[1].images[:3]))
    assert maps.shape == (3, TINY_SIZE, TINY_SIZE)
    np.testing.assert_allclose(maps.amax(dim=(1, 2)).numpy(), scores[:3], rtol=1e-5)


def test_maps_captions_carry_the_score_a_run_gives_not_the_maps_mean(fitted, toy):
    from benchmark.maps import drawn_scores

    chosen = [0, 5, 25, 33]
    scores = fitted.score(toy[1], device=CPU)
    drawn = drawn_scores(fitted, toy[1], chosen, CPU)
    np.testing.assert_allclose(drawn, scores[chosen], rtol=1e-6)
    means = fitted.anomaly_map(torch.stack([toy[1].images[i] for i in chosen])).mean(dim=(1, 2)).numpy()
    assert not np.allclose(drawn, means, rtol=1e-2)  # rdad scores the map's maximum


def test_save_load_gives_identical_scores(fitted, toy, tmp_path):
    path = tmp_path / "rdad.pt"
    fitted.save(path)
    loaded = RDADDetector.load(path)
    assert loaded.config == fitted.config
    np.testing.assert_array_equal(loaded.score(toy[1], device=CPU), fitted.score(toy[1], device=CPU))
    assert loaded.record_extra() == fitted.record_extra()


def test_cached_encoder_features_train_like_recomputed_ones(tmp_path):
    weights = str(tiny_weights(tmp_path / "w.safetensors"))
    train = ToyDataset(20, 0, seed=5)
    losses = {}
    for cache_gb in (4.0, 0.0):
        torch.manual_seed(3)
        detector = get("rdad", **{**TINY_RDAD, "weights": weights}, epochs=2, max_cache_gb=cache_gb)
        detector.fit(train, device=CPU)
        losses[cache_gb] = detector.record_extra()
    assert losses[4.0]["encoder_features_cached"] and not losses[0.0]["encoder_features_cached"]
    np.testing.assert_allclose(losses[4.0]["loss_per_epoch"], losses[0.0]["loss_per_epoch"], rtol=1e-5)


# --- the paper preset: the authors' copy's VOC run -------------------------------------------------
def test_paper_preset_is_the_authors_copy_recipe():
    assert RDADDetector.paper_preset == "paper" and RDADDetector.resolve_preset("paper") == "paper"
    c = RDADDetector.with_preset("paper").config
    # Multiobject_bench/RD4AD: main.py:52-54 (1 epoch, lr 0.005, batch 32), main.py:68 (betas),
    # dataset.py:410 (Resize((224, 224)) + ToTensor, no Normalize), test.py:86-110 (loss as score).
    assert (c.epochs, c.batch_size, c.lr, c.betas) == (1, 32, 0.005, (0.5, 0.999))
    assert (c.img_size, c.mean, c.std, c.loss, c.score) == (224, (0.0,) * 3, (1.0,) * 3, "flat", "flat_loss")
    assert (c.backbone, c.bottleneck_blocks, c.decoder_blocks) == ("wide_resnet50_2.tv_in1k", 3, (3, 4, 6))
    with pytest.raises(NdbenchError, match="unknown score"):
        get("rdad", score="batch_loss")


def test_flat_distances_are_per_image_and_average_to_the_loss():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(3, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]
    decoded = [f.clone() for f in feats]
    decoded[0][1] *= -1  # only image 1, only scale 0: 1 - cos = 2 there
    np.testing.assert_allclose(flat_distances(feats, decoded).numpy(), [0.0, 2.0, 0.0], atol=1e-6)
    other = [torch.randn(3, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]
    torch.testing.assert_close(flat_distances(feats, other).mean(), distillation_loss(feats, other, "flat"))


def test_flat_loss_score_is_each_images_own_distance(fitted, toy):
    flat = get("rdad", **{**TINY_RDAD, "score": "flat_loss"})
    flat.set_state(fitted.state())
    flat.fitted = True
    scores = flat.score(toy[1], device=CPU)
    x = torch.stack(toy[1].images)
    with torch.no_grad():
        features, decoded = flat.model(x)
    np.testing.assert_allclose(scores, flat_distances(features, decoded).double().numpy(), rtol=1e-5)
    # One image scored alone gets the same score as within its batch (no batch-level pairing).
    np.testing.assert_allclose(flat.flat_scores(x[5:6]), scores[5:6], rtol=1e-5)
    labels = np.array(toy[1].labels)
    assert roc_auc_score(labels, scores) > 0.8
