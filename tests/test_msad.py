"""MSAD (methods.msad) on a tiny random-weight CNN or ViT and toy images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from defend_fixtures import TINY_VIT
from msad_rdad_fixtures import TINY_CONFIG, ToyDataset, tiny_weights
from PIL import Image
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from datasets_builders.errors import NdbenchError
from datasets_builders.loading import ManifestDataset
from methods.backbones import create_backbone
from methods.msad import MoCoV2Augment, MSADDetector, SourceImages, ViewSources, freeze, mean_shifted_loss
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
    augment = MoCoV2Augment(detector.config, *detector.normalisation())
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 48, 64), generator=g, dtype=torch.uint8) for _ in range(4)]  # 4:3
    torch.manual_seed(0)
    a = augment(images)
    torch.manual_seed(0)
    b = augment(images)
    c = augment(images)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 - 1e-5 and float(a.max()) <= 1 + 1e-5  # still [0, 1] pixels, normalised


# --- training ---------------------------------------------------------------------------------
def test_one_step_lowers_the_loss_and_moves_only_trainable_parameters(tmp_path):
    detector = get("msad", **{**TINY_CONFIG, "weights": str(tiny_weights(tmp_path / "w.safetensors"))}, lr=0.05)
    detector.model = detector.build_model(detector.config.weights)
    data = ToyDataset(16, 0, seed=3)
    sources = [detector.source_image(data, i) for i in range(len(data))]
    detector.centre = detector.compute_centre(detector.features(data, device=CPU))
    torch.manual_seed(1)
    augment = MoCoV2Augment(detector.config, *detector.normalisation())
    v1, v2 = augment(sources), augment(sources)
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


def test_view_sources_in_memory_and_reread_match():
    data = ToyDataset(10, 0, seed=5)
    detector = get("msad", **TINY_CONFIG, batch_size=4)
    kept = ViewSources.load(detector, data, budget=2**30, progress=None)
    assert kept.images is not None and all(im.dtype == torch.uint8 and im.shape == (3, 32, 32) for im in kept.images)
    reread = ViewSources.load(detector, data, budget=0, progress=None)
    assert reread.images is None
    batches = {}
    for name, source in (("memory", kept), ("reread", reread)):
        torch.manual_seed(0)
        batches[name] = list(source.batches(4, None, ""))
    assert [len(b) for b in batches["memory"]] == [4, 4, 2]  # shuffled, last partial batch kept
    for a, b in zip(batches["memory"], batches["reread"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Without the image before its transform, a view source is the item taken back to 8-bit pixels.
    first = kept.get(0).float() / 255
    torch.testing.assert_close((first - 0.5) / 0.5, data[0][0], atol=1 / 255 + 1e-6, rtol=0)
    assert sorted(int(im.float().sum()) for b in batches["memory"] for im in b) == sorted(
        int(im.float().sum()) for im in kept.images)  # every image once per epoch


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



# --- the paper preset: the authors' copy's ViT run ---------------------------------------------
def test_paper_preset_is_the_authors_copy_recipe():
    assert MSADDetector.paper_preset == "paper" and MSADDetector.resolve_preset("paper") == "paper"
    c = MSADDetector.with_preset("paper").config
    # Multiobject_bench/Mean-Shifted-AD: utils.py:380-382 (timm vit_base_patch16_224, pretrained),
    # utils.py:403 (nothing frozen), utils.py:302-307 (Resize 224 bicubic + CenterCrop 224, ImageNet
    # mean/std), main.py:109-111 (10 epochs, lr 1e-5, batch 32).
    assert c.backbone == "vit_base_patch16_224.augreg2_in21k_ft_in1k" and c.frozen == ()
    assert (c.img_size, c.center_crop, c.interpolation) == (224, 1.0, "bicubic")
    assert (c.mean, c.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, c.momentum) == (10, 32, 1e-5, 5e-5, 0.0)
    assert (c.temperature, c.k, c.angular, c.crop_scale, c.view_source_size) == (0.25, 2, False, (0.2, 1.0), None)


def test_paper_transform_resizes_the_short_side_bicubic_then_takes_the_centre_square():
    from torchvision import transforms

    detector = get("msad", **{**TINY_CONFIG, "center_crop": 1.0, "interpolation": "bicubic"})
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy())  # 4:3
    x = detector.transform()(image)
    expected = transforms.Compose([  # copy utils.py:302-307 at 32 px
        transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])(image)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, expected)
    bilinear = get("msad", **{**TINY_CONFIG, "center_crop": 1.0}).transform()(image)
    assert not torch.allclose(x, bilinear)


def test_vit_backbone_trains_everything_fits_and_scores(toy, tmp_path):
    torch.manual_seed(3)
    vit = create_backbone(TINY_VIT, weights="none", num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    options = dict(backbone=TINY_VIT, weights=str(path), img_size=32, frozen=(), mean=(0.5,) * 3, std=(0.5,) * 3)
    detector = get("msad", **options, epochs=2, batch_size=16, lr=1e-2)
    model = detector.build_model(detector.config.weights)
    assert all(p.requires_grad for p in model.parameters())
    x = torch.stack(toy[1].images[:3])
    with torch.no_grad():  # the feature is the final-normed CLS token (timm's pre-logits), L2-normalised
        cls = vit.eval().forward_features(x)[:, 0]
        torch.testing.assert_close(model(x), F.normalize(cls, dim=-1))
    torch.manual_seed(0)
    detector.fit(toy[0], device=CPU)
    scores = detector.score(toy[1], device=CPU)
    labels = np.array(toy[1].labels)
    assert scores.shape == (40,) and np.isfinite(scores).all()
    assert roc_auc_score(labels, scores) > 0.7
    tuned = detector.model.backbone.state_dict()
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], vit.state_dict()["blocks.0.attn.qkv.weight"])
    # A ViT is set to the configured input size (its position embedding resampled).
    wider = get("msad", **{**options, "img_size": 64}).build_model(str(path))
    assert tuple(wider.backbone.patch_embed.grid_size) == (8, 8)


class EdgeMarkerImages(torch.utils.data.Dataset):
    """4:3 dark images with a bright red column along the left edge; items are the detector's
    centre-cropped input, `image(item)` the whole picture (as ManifestDataset gives it)."""

    def __init__(self, n: int, transform):
        g = torch.Generator().manual_seed(7)
        self.pictures = []
        for _ in range(n):
            pixels = (torch.rand(72, 96, 3, generator=g) * 60).to(torch.uint8)  # 96 x 72 px, 4:3
            pixels[:, :6] = torch.tensor((255, 0, 0), dtype=torch.uint8)
            self.pictures.append(Image.fromarray(pixels.numpy()))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pictures)

    def image(self, item: int) -> Image.Image:
        return self.pictures[item]

    def __getitem__(self, item: int):
        return self.transform(self.pictures[item]), 0, f"edge/{item}"


def _red(images: torch.Tensor) -> torch.Tensor:
    """Per image, whether some pixel of the [0, 1] batch [B, 3, H, W] is the marker's red."""
    r, g, b = images.unbind(1)
    return ((r > 0.7) & (g < 0.3) & (b < 0.3)).flatten(1).any(dim=1)


def test_training_views_reach_the_image_edges_the_centre_crop_drops(monkeypatch, tmp_path):
    detector = get("msad", **{**TINY_CONFIG, "weights": str(tiny_weights(tmp_path / "w.safetensors"))},
                   epochs=3, batch_size=4, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    data = EdgeMarkerImages(8, detector.transform())
    assert isinstance(data, SourceImages) and issubclass(ManifestDataset, SourceImages)
    crops = torch.stack([data[i][0] for i in range(len(data))]) * 0.5 + 0.5
    assert not _red(crops).any()  # the 224/256 centre crop of a 4:3 image never shows the left edge
    views = []

    def spy(self, view1, view2, optimizer, device):
        views.extend([view1 * 0.5 + 0.5, view2 * 0.5 + 0.5])
        return 0.0

    monkeypatch.setattr(MSADDetector, "train_step", spy)
    torch.manual_seed(0)
    detector.fit(data, device=CPU)
    seen = torch.cat(views)
    assert seen.shape == (2 * 3 * 8, 3, 32, 32)
    assert _red(seen).any()  # some random resized crop of the whole image holds the edge column
    assert detector.record_extra()["view_sources_in_memory"]
