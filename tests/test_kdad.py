"""KDAD (methods.kdad): layer taps, the student plan, loss/score formulas, training, persistence,
on tiny random CNN teachers and toy images; the VGG-16 default checked for shapes only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cnn_fixtures import ToyImages, stripes_vs_columns
from torch import nn

from datasets_builders.errors import NdbenchError
from methods.kdad import KDADDetector, KDADStudent, kdad_loss, kdad_scores, student_plan, tap_shapes
from methods.registry import get

CPU = torch.device("cpu")
# The official cfg 'B' (rohban-lab/Knowledge_Distillation_AD:models/network.py:102), written out by hand.
CFG_B = [16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M", 16, 16, 512, "M"]
# A tiny random CNN teacher: the embedded ResNet-10 architecture at 32 px, tapped after its stages.
TINY = dict(backbone="ndbench_resnet_embedded", weights="none", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
            teacher_layers=("layer1", "layer2", "layer3", "layer4"), score_layers=("layer2", "layer3", "layer4"),
            batch_size=16)


@pytest.fixture(scope="module")
def toy():
    return stripes_vs_columns()


@pytest.fixture(scope="module")
def fitted(toy):
    torch.manual_seed(0)
    detector = get("kdad", **TINY, epochs=12)
    detector.fit(toy[0], device=CPU)
    return detector


def test_vgg16_default_taps_pools_and_student_is_cfg_b():
    detector = KDADDetector(weights="none", img_size=64)  # the paper default, random weights, 64 px
    assert detector.config.backbone == "vgg16.tv_in1k" and detector.config.lamda == 0.01
    teacher = detector.build_teacher("none")
    modules = dict(teacher.model.named_modules())
    assert all(isinstance(modules[name], nn.MaxPool2d) for name in detector.config.teacher_layers)
    shapes = tap_shapes(teacher, 64)
    assert shapes == [(128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]  # pool2..pool5 at 64 px
    plan, blocks = student_plan([(128, 4), (256, 8), (512, 16), (512, 32)])
    assert plan == CFG_B and blocks == (1, 2, 3, 4)
    student = detector.build_student(teacher)
    maps = student(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == shapes
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [v for v in CFG_B if v != "M"]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)


def test_student_norm_pattern_follows_released_make_layers():
    plan, blocks = student_plan([(8, 2), (12, 8)], width=4, convs=(2, 3))
    # block 1: 2 convs, tapped (8 channels); blocks 2-3: 3 convs (the last count repeats)
    assert plan == [4, 8, "M", 4, 4, 4, "M", 4, 4, 12, "M"] and blocks == (0, 2)
    kinds = []
    for module in KDADStudent(plan, blocks).modules():
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)):
            kinds.append(type(module).__name__[0])  # C, B, R, M
    # conv+BN+ReLU, except the conv right before a pool: conv+ReLU
    assert "".join(kinds) == "CBRCRM" "CBRCBRCRM" "CBRCBRCRM"


def test_bad_taps_and_layers_are_refused():
    with pytest.raises(NdbenchError, match="do not fit"):
        student_plan([(8, 4), (8, 4)])
    with pytest.raises(NdbenchError, match="do not fit"):
        student_plan([(8, 3)])
    with pytest.raises(NdbenchError, match="subset"):
        KDADDetector(**{**TINY, "score_layers": ("layer9",)})
    with pytest.raises(NdbenchError, match="no layer 'nope'"):
        KDADDetector(**{**TINY, "teacher_layers": ("layer1", "nope"), "score_layers": ("layer1",)}).build_teacher(
            "none")


def test_loss_and_score_match_hand_values():
    # One image, two layers. Layer a: s=(1,0,0,0), t=(0,1,0,0): 1-cos = 1, MSE = 2/4.
    # Layer b: s = t = (1,1): 1-cos = 0, MSE = 0.
    s_a, t_a = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 2, 2), torch.tensor([0, 1.0, 0, 0]).view(1, 1, 2, 2)
    s_b = t_b = torch.ones(1, 2, 1, 1)
    assert float(kdad_loss([s_a, s_b], [t_a, t_b], 0.01)) == pytest.approx(1 + 0.01 * 0.5)
    # Two images: the second has s = 2t (cos 1), MSE = mean((t)^2) = 1/4; loss averages over the batch.
    s = torch.stack([s_a[0], 2 * t_a[0]])
    t = torch.stack([t_a[0], t_a[0]])
    torch.testing.assert_close(kdad_scores([s], [t], 0.5), torch.tensor([1 + 0.5 * 0.5, 0 + 0.5 * 0.25]))
    # loss: mean(1-cos) = 0.5; MSE over all 8 elements = (2 + 1) / 8
    assert float(kdad_loss([s], [t], 0.5)) == pytest.approx(0.5 + 0.5 * 3 / 8)


def test_embedded_preset_taps_stages_at_strides_4_to_32():
    assert KDADDetector.with_preset("embedded").config.weights == "embedded"
    detector = KDADDetector.with_preset("embedded", weights="none")
    c = detector.config
    assert (c.backbone, c.img_size, c.mean, c.std) == ("ndbench_resnet_embedded", 64, (0.5,) * 3, (0.5,) * 3)
    teacher = detector.build_teacher("none")
    assert tap_shapes(teacher, 64) == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]
    maps = detector.build_student(teacher)(torch.zeros(2, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]


def test_one_step_lowers_loss_and_leaves_teacher_frozen():
    torch.manual_seed(0)
    detector = KDADDetector(**TINY)
    teacher = detector.teacher = detector.build_teacher("none")
    student = detector.student = detector.build_student(teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = ToyImages(8, 0, seed=3).images
    x = (torch.stack(x) - 0.5) / 0.5
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    first = detector.train_step(x, optimizer, CPU)
    with torch.no_grad():
        after = float(kdad_loss(student(x), teacher(x), detector.config.lamda))
    assert after < first
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())


def test_fit_trains_only_the_student(fitted):
    assert not any(p.requires_grad for p in fitted.teacher.parameters())
    assert not fitted.teacher.training and not fitted.student.training
    extra = fitted.record_extra()
    assert extra["teacher_maps"] == [[32, 8, 8], [64, 4, 4], [128, 2, 2], [256, 1, 1]]
    assert extra["student_channels"] == [16, 16, 16, 32, 16, 16, 64, 16, 16, 128, 16, 16, 256]
    assert extra["train_images_in_memory"] and extra["teacher_maps_cached"]


def test_novel_toy_images_score_higher(fitted, toy):
    scores = fitted.score(toy[1], device=CPU)
    labels = np.asarray(toy[1].labels)
    assert scores.shape == (32,) and scores.dtype == np.float64
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_cached_and_streamed_training_agree(toy):
    results = []
    for budget in (16.0, 0.0):  # in memory vs read through the DataLoader each epoch
        torch.manual_seed(0)
        detector = KDADDetector(**TINY, epochs=2, max_cache_gb=budget)
        detector.fit(toy[0], device=CPU)
        results.append(detector.score(toy[1], device=CPU))
    assert detector.record_extra()["teacher_maps_cached"] is False
    np.testing.assert_allclose(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_save_load_gives_identical_scores(fitted, toy, tmp_path):
    path = tmp_path / "kdad.pt"
    fitted.save(path)
    loaded = KDADDetector.load(path)
    assert loaded.config == fitted.config
    assert np.array_equal(loaded.score(toy[1], device=CPU), fitted.score(toy[1], device=CPU))
    assert loaded.record_extra() == fitted.record_extra()


def test_default_transform_is_the_official_square_resize_and_centre_crop():
    from PIL import Image
    from torchvision import transforms

    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy())
    x = KDADDetector(img_size=28).transform()(image)  # the official 256 -> 224 at 32 -> 28
    expected = transforms.Compose([  # official dataloader.py:16-21
        transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.CenterCrop(28), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    torch.testing.assert_close(x, expected)
    c = KDADDetector().config
    assert (c.img_size, c.center_crop, c.interpolation, c.epochs, c.batch_size, c.lr) == (
        224, 224 / 256, "lanczos", 201, 64, 1e-3)
    with pytest.raises(NdbenchError, match="interpolation"):
        KDADDetector(interpolation="nearest")


def test_paper_preset_is_the_authors_copy_recipe():
    from PIL import Image

    assert KDADDetector.paper_preset == "paper" and KDADDetector.resolve_preset("paper") == "paper"
    detector = KDADDetector.with_preset("paper")
    c = detector.config
    # Multiobject_bench/KDAD: configs/config.yaml:8-10, 15 (1 epoch, batch 64, lr 1e-3, lamda 0.01),
    # dataloader.py:334 (Resize((224, 224)) + ToTensor: no crop, no Normalize).
    assert (c.epochs, c.batch_size, c.lr, c.lamda) == (1, 64, 1e-3, 0.01)
    assert (c.img_size, c.center_crop, c.interpolation, c.mean, c.std) == (224, 1.0, "bilinear", (0.0,) * 3, (1.0,) * 3)
    assert (c.backbone, c.teacher_layers, c.score_layers) == (
        KDADDetector().config.backbone, KDADDetector().config.teacher_layers, KDADDetector().config.score_layers)
    image = Image.new("RGB", (320, 240), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 240))  # a blue left edge survives the squashing resize
    x = detector.transform()(image)
    assert x.shape == (3, 224, 224) and float(x.max()) <= 1.0 and float(x.min()) >= 0.0
    assert float(x[2, :, 0].mean()) > 0.9 and float(x[0, :, -1].mean()) > 0.9
