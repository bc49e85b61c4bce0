"""DEFEND + MKD (methods.defend, methods.defend_model) on tiny random ViTs and toy images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from defend_fixtures import TINY_CONFIG, TINY_VIT, ToyDataset, no_index
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score

from datasets_builders.errors import NdbenchError
from methods import defend_model as dm
from methods.backbones import ViTFeatures, create_backbone
from methods.defend import DefendDetector, MKDDetector, dense_epochs, num_prototypes
from methods.registry import get

CPU = torch.device("cpu")


def tiny_vit(seed: int = 0, **kwargs) -> ViTFeatures:
    torch.manual_seed(seed)
    return ViTFeatures(create_backbone(TINY_VIT, weights="none", num_classes=0, **kwargs)).eval()


@pytest.fixture(scope="module")
def toy():
    return ToyDataset(48, 0, seed=1), ToyDataset(24, 24, seed=2)


@pytest.fixture(scope="module")
def fitted_defend(toy):
    torch.manual_seed(0)
    detector = get("defend", **TINY_CONFIG, epochs=5, lr=1e-3, dense_epochs=2)
    detector.fit(toy[0], device=CPU)
    return detector


# --- Sinkhorn ---------------------------------------------------------------------------------
def test_sinkhorn_marginals_and_determinism():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(12, 3, generator=g) * 2 - 1).requires_grad_(True)  # cosine similarities
    q = dm.sinkhorn(scores, eps=0.05, iters=3)
    assert q.shape == (12, 3) and not q.requires_grad and bool((q >= 0).all())
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12), atol=1e-5, rtol=0)  # each patch: mass 1
    assert torch.equal(q, dm.sinkhorn(scores, eps=0.05, iters=3))
    # Prototype marginals converge to n/K = 4 as the iterations grow.
    deviation = [float((dm.sinkhorn(scores, 0.05, i).sum(dim=0) - 4).abs().max()) for i in (1, 3, 200)]
    assert deviation[0] > deviation[1] > deviation[2] and deviation[2] < 1e-3
    # Equal scores: the uniform assignment, exactly.
    torch.testing.assert_close(dm.sinkhorn(torch.zeros(6, 4)), torch.full((6, 4), 0.25))


# --- alpha(Q) and crops -----------------------------------------------------------------------
def test_alpha_full_crop_and_aligned_crop():
    qmap = torch.stack([torch.arange(16.0).reshape(4, 4), 100 + torch.arange(16.0).reshape(4, 4)])
    q = qmap.flatten(1).t()[None]  # [1, N=16, K=2], raster order
    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    same = dm.align_assignments(q, (4, 4), 8, full, (4, 4))
    torch.testing.assert_close(same, q, atol=1e-5, rtol=0)  # full image, same grid: Q itself
    half = dm.align_assignments(q, (4, 4), 8, full, (2, 2))  # full image, 2x2 grid: 2x2 block means
    torch.testing.assert_close(half[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(half[0], F.avg_pool2d(qmap[None], 2)[0].flatten(1).t(), atol=1e-5, rtol=0)
    aligned = dm.align_assignments(q, (4, 4), 8, torch.tensor([[8.0, 8.0, 24.0, 24.0]]), (2, 2))
    torch.testing.assert_close(aligned[0, :, 0], torch.tensor([5.0, 6.0, 9.0, 10.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(aligned[0, :, 1], torch.tensor([105.0, 106.0, 109.0, 110.0]), atol=1e-5, rtol=0)


def test_crops_and_boxes():
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    full = dm.resized_crops(image, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), 32)
    torch.testing.assert_close(full, image, atol=1e-5, rtol=0)
    quarter = dm.resized_crops(image, torch.tensor([[16.0, 0.0, 32.0, 16.0]]), 16)
    torch.testing.assert_close(quarter, image[:, :, :16, 16:], atol=1e-5, rtol=0)
    boxes = dm.random_boxes(200, (32, 32), (0.05, 0.4), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 1024
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all())
    assert bool((area >= 0.05 - 1e-6).all() and (area <= 0.4 + 1e-6).all())
    assert [dm.crop_grid(s, p, 96, 224) for s, p in ((224, 16), (64, 8), (32, 8), (16, 8))] == [6, 3, 2, 2]


# --- DEFEND step: which parameters learn ------------------------------------------------------
def test_defend_step_trains_only_last_blocks_norm_and_head():
    detector = DefendDetector(**TINY_CONFIG, num_prototypes=4)
    vit = tiny_vit(depth=3, dynamic_img_size=True)
    head = dm.DenseHead(vit.embed_dim, 4, hidden=64, out_dim=16)
    tuned = dm.trainable_for_defend(vit, 2)
    optimizer = torch.optim.AdamW([{"params": tuned, "lr": 1e-2}, {"params": head.parameters(), "lr": 1e-2}])
    before = {k: v.clone() for k, v in vit.model.state_dict().items()}
    x = ToyDataset(4, 4, seed=0).images
    loss = detector.dense_step(vit, head, torch.stack(x), 2, torch.Generator().manual_seed(0), CPU)
    loss.backward()

    def trains(name: str) -> bool:
        return name.startswith(("blocks.1.", "blocks.2.", "norm."))

    for name, p in vit.model.named_parameters():
        assert (p.grad is not None) == trains(name), name
    assert all(p.grad is not None for p in head.parameters())
    optimizer.step()
    after = vit.model.state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]) != trains(name), name
    assert {n for n, _ in vit.model.named_parameters() if trains(n)} == {
        n for n, p in vit.model.named_parameters() if p.requires_grad
    }


# --- MKD: guided masking, kept tokens, teacher passes -----------------------------------------
def test_guided_mask_counts_and_prefers_attended_patches():
    assert [dm.num_kept(16, 0.5), dm.num_kept(196, 0.5), dm.num_kept(64, 0.75), dm.num_kept(4, 0.0)] == [8, 98, 16, 4]
    with pytest.raises(ValueError):
        dm.num_kept(16, 1.0)
    attention = torch.full((500, 16), 0.2 / 12)
    attention[:, :4] = 0.2  # four patches hold 80 % of the attention
    keep = dm.keep_indices(attention, 16, 8, "teacher", torch.Generator().manual_seed(0))
    assert keep.shape == (500, 8)
    assert all(len(set(row.tolist())) == 8 for row in keep)
    kept = torch.zeros(500, 16).scatter_(1, keep, 1.0).mean(dim=0)
    assert float(kept[:4].mean()) > 0.9 and float(kept[4:].mean()) < 0.4
    uniform = dm.keep_indices(attention, 16, 8, "random", torch.Generator().manual_seed(0))
    rate = torch.zeros(500, 16).scatter_(1, uniform, 1.0).mean(dim=0)
    assert 0.4 < float(rate[:4].mean()) < 0.6
    assert torch.equal(dm.keep_indices(None, 16, 16, "none", torch.Generator(), batch=2),
                       torch.arange(16).expand(2, -1))


def test_student_sees_only_kept_tokens():
    student = tiny_vit()
    lengths = []
    student.model.blocks[0].register_forward_hook(lambda m, inp, out: lengths.append(inp[0].shape[1]))
    x = torch.stack(ToyDataset(2, 0, seed=0).images)
    keep = dm.keep_indices(None, 16, 8, "random", torch.Generator().manual_seed(0), batch=2)
    feats = dm.student_features(student, x, keep, "last")
    assert feats.shape == (1, 2, 8, 32) and lengths == [1 + 8]
    assert dm.student_features(student, x, keep, "all").shape == (2, 2, 8, 32) and lengths[-1] == 9


def count_teacher_images(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = dm.teacher_features

    def counting(vit, x, layers, need_attention):
        seen.append(x.shape[0])
        return original(vit, x, layers, need_attention)

    monkeypatch.setattr(dm, "teacher_features", counting)
    return seen


def test_teacher_targets_once_per_image(monkeypatch, toy):
    train = ToyDataset(20, 0, seed=3)
    seen = count_teacher_images(monkeypatch)
    mkd = get("mkd", **TINY_CONFIG, epochs=3)
    mkd.fit(train, device=CPU)
    assert sum(seen) == 20 and mkd.record_extra()["teacher_passes_per_image"] == 1.0
    seen.clear()
    uncached = get("mkd", **TINY_CONFIG, epochs=3, max_cache_gb=0.0)  # too big to cache: recompute
    uncached.fit(train, device=CPU)
    assert sum(seen) == 60 and uncached.record_extra()["teacher_passes_per_image"] == 3.0


# --- the tuned teacher reaches MKD ------------------------------------------------------------
def test_defend_teacher_reaches_mkd_and_mkd_teacher_is_untuned(tmp_path, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit(seed=5).model.state_dict().items()}, str(weights))
    untuned = tiny_vit(seed=5).model.state_dict()
    used = {}
    original = MKDDetector.distill

    def spy(self, train, **kwargs):
        used[self.name] = {k: v.clone() for k, v in self.teacher.model.state_dict().items()}
        return original(self, train, **kwargs)

    monkeypatch.setattr(MKDDetector, "distill", spy)
    train = ToyDataset(16, 0, seed=4)
    config = {**TINY_CONFIG, "weights": str(weights), "epochs": 1}
    get("mkd", **config).fit(train, device=CPU)
    defend = get("defend", **config, dense_epochs=1, dense_lr_backbone=1e-3)
    defend.fit(train, device=CPU)
    assert all(torch.equal(used["mkd"][k], untuned[k]) for k in untuned)
    changed = {k for k in untuned if not torch.equal(used["defend"][k], untuned[k])}
    assert changed and all(k.startswith(("blocks.", "norm.")) for k in changed)
    assert any(k.startswith("blocks.0.") for k in changed) and any(k.startswith("norm.") for k in changed)
    assert {k for k in untuned if k.startswith(("cls_token", "pos_embed", "patch_embed"))}.isdisjoint(changed)
    assert all(torch.equal(used["defend"][k], v) for k, v in defend.teacher.model.state_dict().items())


# --- end to end -------------------------------------------------------------------------------
def test_defend_separates_toy_normal_from_novel(fitted_defend, toy):
    scores = fitted_defend.score(toy[1], device=CPU)
    assert scores.shape == (48,) and np.isfinite(scores).all()
    assert roc_auc_score(toy[1].labels, scores) > 0.8
    extra = fitted_defend.record_extra()
    assert extra["num_prototypes"] == 4 and extra["observed_classes"] == 2
    assert extra["teacher_passes_per_image"] == 1.0 and extra["student_tokens_kept"] == 8
    maps = fitted_defend.anomaly_map(torch.stack(toy[1].images[:3]))
    assert maps.shape == (3, 32, 32)
    patch = fitted_defend.patch_error_map(torch.stack(toy[1].images[:3]), CPU)
    assert float(maps.min()) >= float(patch.min()) - 1e-6 and float(maps.max()) <= float(patch.max()) + 1e-6


def test_save_load_round_trip(fitted_defend, toy, tmp_path):
    path = tmp_path / "defend.pt"
    fitted_defend.save(path)
    loaded = DefendDetector.load(path)
    assert loaded.config == fitted_defend.config
    assert np.array_equal(loaded.score(toy[1], device=CPU), fitted_defend.score(toy[1], device=CPU))
    assert loaded.record_extra() == fitted_defend.record_extra()
    with pytest.raises(NdbenchError, match="not 'mkd'"):
        MKDDetector.load(path)


@pytest.mark.parametrize(
    "options, kept",
    [({"guidance": "random"}, 8), ({"guidance": "none"}, 16), ({"distill_layers": "all"}, 8),
     ({"normalise": False, "mask_ratio": 0.75}, 4)],
)
def test_ablation_options_run(options, kept):
    detector = get("mkd", **TINY_CONFIG, epochs=1, **options)
    detector.fit(ToyDataset(8, 0, seed=6), device=CPU)
    assert detector.record_extra()["student_tokens_kept"] == kept
    assert np.isfinite(detector.score(ToyDataset(2, 2, seed=7), device=CPU)).all()


# --- configuration ----------------------------------------------------------------------------
def test_registered_configs_carry_paper_defaults():
    c = get("defend").config
    assert (c.backbone, c.weights, c.img_size, c.mean, c.std) == (
        "vit_base_patch16_224.augreg_in21k", "hub", 224, (0.5,) * 3, (0.5,) * 3)
    assert (c.tuned_blocks, c.head_hidden, c.head_out, c.num_prototypes, c.temperature) == (2, 2048, 256, None, 0.1)
    assert (c.sinkhorn_eps, c.sinkhorn_iters, c.crop_px, c.crop_reference_px) == (0.05, 3, 96, 224)
    assert (c.dense_lr_backbone, c.dense_lr_head, c.dense_epochs) == (1e-5, 1e-4, None)
    mkd = get("mkd").config
    for config in (c, mkd):
        assert (config.mask_ratio, config.guidance, config.distill_layers, config.normalise) == (
            0.5, "teacher", "last", True)
        assert (config.student_drop_path, config.lr, config.betas, config.weight_decay) == (
            0.1, 1e-5, (0.9, 0.95), 0.05)
        assert (config.epochs, config.batch_size) == (10, 32)
    assert not hasattr(mkd, "num_prototypes")
    for cls in (DefendDetector, MKDDetector):
        preset = cls.with_preset("embedded").config
        assert (preset.backbone, preset.weights, preset.img_size) == ("ndbench_vit_embedded", "embedded", 64)
    with pytest.raises(NdbenchError, match="guidance"):
        get("mkd", guidance="attention")


def test_prototype_count_and_dense_epochs(toy):
    train = toy[0]
    assert num_prototypes(get("defend").config, train) == (4, 2)  # 2 x {3, 7}
    assert num_prototypes(get("defend", num_prototypes=5).config, train) == (5, 2)
    assert num_prototypes(get("defend", num_prototypes=5).config, no_index(train)) == (5, None)
    with pytest.raises(NdbenchError, match="num_prototypes"):
        num_prototypes(get("defend").config, no_index(train))

    class Split:
        def __init__(self, split_id):
            self.split_id = split_id

    config = get("defend").config
    assert [dense_epochs(config, Split(s)) for s in ("coco/uni-class/1", "voc/uni-class/14")] == [10, 3]
    assert dense_epochs(get("defend", dense_epochs=1).config, Split("coco/uni-class/1")) == 1
