"""Deep SVDD (methods.dsvdd): the bias-free LeNet and its autoencoder, GCN, the centre guard,
training steps, persistence, on toy images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cnn_fixtures import ToyImages, stripes_vs_columns
from torch import nn

from datasets_builders.errors import NdbenchError
from methods.dsvdd import (
    DSVDDDetector,
    LeNetAutoencoder,
    LeNetEncoder,
    ae_step,
    global_contrast_normalization,
    guard_centre,
    svdd_step,
)
from methods.registry import get

CPU = torch.device("cpu")
# Tiny but complete: both phases at the released learning rates, the released network at 32 px,
# few epochs, small batches.
TINY = dict(ae_epochs=4, epochs=4, ae_batch_size=16, batch_size=16)


@pytest.fixture(scope="module")
def toy():
    return stripes_vs_columns()


@pytest.fixture(scope="module")
def fitted(toy):
    torch.manual_seed(0)
    detector = get("dsvdd", **TINY)
    detector.fit(toy[0], device=CPU)
    return detector


def _has_no_bias(module: nn.Module) -> bool:
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return (
        all(m.bias is None for m in layers)
        and all(not m.affine for m in norms)
        and not any("bias" in name for name, _ in module.named_parameters())
    )


@pytest.mark.parametrize("size, fc_in", [(32, 128 * 4 * 4), (64, 128 * 8 * 8)])
def test_lenet_has_no_bias_and_sizes_fc_to_the_input(size, fc_in):
    encoder, autoencoder = LeNetEncoder(size), LeNetAutoencoder(size)
    assert _has_no_bias(encoder) and _has_no_bias(autoencoder)
    assert encoder.fc1.in_features == fc_in and encoder.fc1.out_features == 128
    assert [m.out_channels for m in encoder.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128]
    assert all(m.kernel_size == (5, 5) for m in encoder.modules() if isinstance(m, nn.Conv2d))
    x = torch.rand(2, 3, size, size)
    assert encoder(x).shape == (2, 128)
    out = autoencoder(x)
    assert out.shape == (2, 3, size, size) and bool((out >= 0).all() and (out <= 1).all())
    # phi and the autoencoder's encoder share parameter names, so the AE initialises phi
    assert set(encoder.state_dict()) == set(autoencoder.encoder.state_dict())


def test_guard_and_gcn_hand_values():
    c = guard_centre(torch.tensor([0.05, -0.05, 0.0, 0.3, -0.2, 0.1]), eps=0.1)
    torch.testing.assert_close(c, torch.tensor([0.1, -0.1, 0.1, 0.3, -0.2, 0.1]))
    # [1, 2, 3, 6]: mean 3 -> [-2, -1, 0, 3]; mean |.| = 1.5 -> [-4/3, -2/3, 0, 2]
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(global_contrast_normalization(x).flatten(),
                               torch.tensor([-4 / 3, -2 / 3, 0.0, 2.0]))
    assert torch.equal(global_contrast_normalization(torch.ones(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))


def test_defaults_follow_the_official_cifar10_recipe():
    c = DSVDDDetector().config
    assert (c.img_size, c.rep_dim, c.eps, c.gcn, c.activation) == (32, 128, 0.1, True, "leaky_relu")
    assert (c.lr, c.epochs, c.milestones, c.batch_size, c.weight_decay) == (1e-4, 150, (50,), 200, 5e-7)
    assert (c.ae_lr, c.ae_epochs, c.ae_milestones, c.ae_batch_size, c.ae_weight_decay) == (1e-4, 350, (250,), 200,
                                                                                             5e-7)
    embedded = DSVDDDetector.with_preset("embedded").config
    assert (embedded.img_size, embedded.ae_epochs, embedded.epochs) == (32, 1, 1)
    with pytest.raises(NdbenchError, match="activation"):
        DSVDDDetector(activation="relu")


def test_one_step_lowers_each_loss():
    # One Adam step at the official lr (1e-4) on a fixed batch, for each phase.
    torch.manual_seed(0)
    x = torch.stack(ToyImages(16, 0, seed=3, normal_kind="square").images)
    ae = LeNetAutoencoder(32).train()
    optimizer = torch.optim.Adam(ae.parameters(), lr=1e-4)
    first = ae_step(ae, x)
    optimizer.zero_grad()
    first.backward()
    optimizer.step()
    assert float(ae_step(ae, x).detach()) < float(first.detach())

    net = LeNetEncoder(32).train()
    c = guard_centre(net(x).detach().mean(dim=0), 0.1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    first = svdd_step(net, x, c)
    optimizer.zero_grad()
    first.backward()
    optimizer.step()
    assert float(svdd_step(net, x, c).detach()) < float(first.detach())


def test_centre_is_the_guarded_mean_embedding(toy):
    torch.manual_seed(0)
    detector = DSVDDDetector(**{**TINY, "epochs": 0})  # AE pre-training only: phi is the AE's encoder
    detector.fit(toy[0], device=CPU)
    x = detector.preprocess(torch.stack(toy[0].images))
    with torch.no_grad():
        expected = guard_centre(detector.net.eval()(x).double().mean(dim=0).float(), 0.1)
    torch.testing.assert_close(detector.c, expected)
    scores = detector.score(toy[0], device=CPU)
    with torch.no_grad():
        np.testing.assert_allclose(scores, (detector.net(x) - detector.c).pow(2).sum(dim=1).numpy(), rtol=1e-5)


def test_fitted_centre_has_no_near_zero_coordinate_and_gcn_range(fitted, toy):
    assert fitted.c.shape == (128,)
    assert bool((fitted.c.abs() >= 0.1).all())
    lo, hi = fitted.scaling
    gcn = global_contrast_normalization(torch.stack(toy[0].images))
    assert (lo, hi) == pytest.approx((float(gcn.min()), float(gcn.max())))
    scaled = fitted.preprocess(torch.stack(toy[0].images))
    assert float(scaled.min()) == pytest.approx(0.0, abs=1e-6) and float(scaled.max()) == pytest.approx(1.0)
    assert not fitted.net.training


def test_novel_toy_images_score_higher(fitted, toy):
    scores = fitted.score(toy[1], device=CPU)
    labels = np.asarray(toy[1].labels)
    assert scores.shape == (32,) and scores.dtype == np.float64
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_in_memory_and_streamed_training_agree(toy):
    results = []
    for budget in (16.0, 0.0):
        torch.manual_seed(0)
        detector = DSVDDDetector(**{**TINY, "ae_epochs": 1, "epochs": 1, "max_cache_gb": budget})
        detector.fit(toy[0], device=CPU)
        results.append(detector.score(toy[1], device=CPU))
    assert detector.record_extra()["train_images_in_memory"] is False
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4)


def test_save_load_gives_identical_scores(fitted, toy, tmp_path):
    path = tmp_path / "dsvdd.pt"
    fitted.save(path)
    loaded = DSVDDDetector.load(path)
    assert loaded.config == fitted.config and loaded.scaling == fitted.scaling
    assert torch.equal(loaded.c, fitted.c)
    assert np.array_equal(loaded.score(toy[1], device=CPU), fitted.score(toy[1], device=CPU))


def test_paper_preset_is_the_authors_copy_and_released_voc_alias():
    assert DSVDDDetector.paper_preset == "paper" and DSVDDDetector.resolve_preset("paper") == "paper"
    assert DSVDDDetector.presets["paper"] is DSVDDDetector.presets["released_voc"]  # one source of truth
    c = DSVDDDetector.with_preset("paper").config
    # Multiobject_bench/Deep-SVDD: src/main.py:29-40 (optimiser settings), src/datasets/pvoc.py:150-153
    # (Resize((224, 224)) + ToTensor only), src/networks/pvoc_LeNet.py (ELU, decoder at 32 px).
    assert (c.img_size, c.gcn, c.activation, c.decoder_size, c.mean, c.std) == (
        224, False, "elu", 32, (0.0,) * 3, (1.0,) * 3)
    assert (c.lr, c.epochs, c.milestones, c.batch_size, c.weight_decay) == (1e-3, 50, (19, 39), 128, 1e-6)
    assert (c.ae_lr, c.ae_epochs, c.ae_milestones, c.ae_batch_size, c.ae_weight_decay) == (
        1e-3, 100, (29, 79), 120, 1e-6)
    assert c == DSVDDDetector.with_preset("released_voc").config


def test_decoder_size_decodes_small_then_resizes_nearest():
    torch.manual_seed(0)
    ae = LeNetAutoencoder(64, activation="elu", decoder_size=32).eval()
    assert ae.encoder.fc1.in_features == 128 * 8 * 8  # phi still sees the whole 64 px input
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = ae(x)
    assert out.shape == (2, 3, 64, 64)
    # Nearest 32 -> 64: every 2 x 2 block holds one decoded pixel.
    torch.testing.assert_close(out, out[:, :, ::2, ::2].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    with pytest.raises(NdbenchError, match="decoder_size"):
        DSVDDDetector(decoder_size=2)
