"""DEFEND + MKD (methods.defend, methods.defend_model) on tiny random ViTs and toy images."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from defend_fixtures import TINY_CONFIG, TINY_VIT, ToyDataset, no_index
from PIL import Image
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score
from torch.optim.optimizer import register_optimizer_step_post_hook

from datasets_builders.errors import NdbenchError
from methods import defend as defend_module
from methods import defend_model as dm
from methods.backbones import ViTFeatures, create_backbone
from methods.defend import DefendDetector, MKDDetector, dense_epochs, num_prototypes, view_workers
from methods.multicrop import MultiCropSpec, MultiCropViews, relative_boxes, sample_crop_boxes
from methods.registry import get
from methods.runtime import JobRuntime

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
    detector = get("defend", **TINY_CONFIG, epochs=5, lr=1e-3, dense_epochs=2, num_prototypes="2x-observed")
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


# --- multi-crop views -------------------------------------------------------------------------
def test_crop_boxes_counts_sizes_scales_and_overlaps():
    spec = MultiCropSpec()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        boxes = sample_crop_boxes(375, 500, spec, g)
        assert boxes.shape == (6, 4)
        assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 375).all())
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (375 * 500)
        assert bool((area[:2] >= 0.3 - 0.01).all() and (area[:2] <= 1.0).all()), area
        assert bool((area[2:] >= 0.1 - 0.01).all() and (area[2:] <= 0.3 + 0.01).all()), area
        for v in range(1, 6):  # every crop overlaps every earlier global crop
            for k in range(min(v, 2)):
                lt = torch.maximum(boxes[v, :2], boxes[k, :2])
                rb = torch.minimum(boxes[v, 2:], boxes[k, 2:])
                inter = float((rb - lt).clamp(min=0).prod())
                assert inter > int(0.01 * 375 * 500) * (2 if v < 2 else 1)


def test_relative_boxes_are_the_overlap_in_each_crops_pixels():
    spec = MultiCropSpec(global_size=224, local_size=96, global_count=2, local_count=1)
    boxes = torch.tensor([[0.0, 0.0, 200.0, 100.0], [100.0, 0.0, 300.0, 100.0], [150.0, 50.0, 250.0, 100.0]])
    gc, other = relative_boxes(boxes, spec)
    assert gc.shape == (2, 3, 4) and other.shape == (3, 2, 4)
    # global 0 with global 1: overlap x 100..200, y 0..100 -> in crop 0 (200x100 -> 224x224)
    torch.testing.assert_close(gc[0, 1], torch.tensor([112.0, 0.0, 224.0, 224.0]))
    torch.testing.assert_close(gc[0, 0], torch.tensor([0.0, 0.0, 224.0, 224.0]))  # itself: whole crop
    # local 2 with global 1: overlap x 150..250, y 50..100 = the whole local crop (100x50 -> 96x96)
    torch.testing.assert_close(other[2, 1], torch.tensor([0.0, 0.0, 96.0, 96.0]))
    torch.testing.assert_close(gc[1, 2], torch.tensor([56.0, 112.0, 168.0, 224.0]))


class PILImages(torch.utils.data.Dataset):
    """Images known only as PIL files of their own size (like ManifestDataset.image)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def __len__(self):
        return len(self.arrays)

    def image(self, item):
        return Image.fromarray(self.arrays[item])

    def __getitem__(self, item):
        raise AssertionError("DEFEND's crops must come from the original image")


def test_views_are_cut_from_the_original_resolution():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    spec = MultiCropSpec(global_size=32, local_size=16)
    views = MultiCropViews(PILImages(arrays), spec, (0.5,) * 3, (0.5,) * 3, seed=1)
    crops, gc, other = views[0]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    assert gc.shape == (2, 6, 4) and other.shape == (6, 2, 4)
    # Pixels come from the 64x48 original: the first crop equals a resize of its box's pixels.
    boxes = sample_crop_boxes(48, 64, spec, torch.Generator().manual_seed(views.item_seed(0)))
    x1, y1, x2, y2 = boxes[0].int().tolist()
    source = torch.from_numpy(arrays[0]).permute(2, 0, 1).float() / 255
    expected = F.interpolate(source[None, :, y1:y2, x1:x2], size=(32, 32), mode="bilinear",
                             antialias=True, align_corners=False)[0]
    torch.testing.assert_close(crops[0], (expected - 0.5) / 0.5, atol=2e-2, rtol=0)
    again, _, _ = views[0]
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))  # same (seed, epoch, item)
    views.epoch = 1
    assert not torch.equal(views[0][0][0], crops[0])


class PidRecordingToy(ToyDataset):
    """The toy images, appending the pid of the process that reads each one to `log`."""

    def __init__(self, log, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    def __getitem__(self, item: int):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return super().__getitem__(item)


def test_dense_views_are_cut_in_the_runtimes_workers_on_a_gpu_only():
    runtime = JobRuntime.in_memory()
    runtime.workers = 3
    assert view_workers(runtime, torch.device("cuda")) == 3 and view_workers(runtime, CPU) == 0


def test_dense_views_cut_in_workers_give_the_same_result(tmp_path, monkeypatch):
    scores, readers = [], []
    test = ToyDataset(8, 8, seed=6)
    for workers in (0, 2):
        log = tmp_path / f"pids-{workers}"
        detector = get("defend", **TINY_CONFIG, epochs=1, dense_epochs=2, dense_batch_size=8)
        monkeypatch.setattr(defend_module, "view_workers", lambda runtime, device, n=workers: n)
        torch.manual_seed(0)
        detector.fit(PidRecordingToy(log, 16, 0, seed=5), device=CPU)
        scores.append(detector.score(test, device=CPU))
        readers.append(set(log.read_text().split()))
    assert readers[0] == {str(os.getpid())}
    assert readers[1] - {str(os.getpid())}  # the views were cut in worker processes
    np.testing.assert_array_equal(scores[0], scores[1])


# --- DEFEND: which parameters learn, the EMA teacher, the queue --------------------------------
def dense_networks(depth: int = 3, k: int = 4):
    torch.manual_seed(0)
    vit = tiny_vit(depth=depth, dynamic_img_size=True, drop_path_rate=0.1)
    names = dm.freeze_for_defend(vit, 2)
    ema = dm.DenseNetwork(copy.deepcopy(vit).requires_grad_(False).eval(), dm.ProjectionHead(32, k, 64, 16),
                          frozen_blocks=depth)
    ema.head.requires_grad_(False)
    online = dm.DenseNetwork(vit, dm.ProjectionHead(32, k, 64, 16), frozen_blocks=depth - 2)
    return online, ema, names


def dense_batch(n: int = 4, seed: int = 0):
    spec = MultiCropSpec(global_size=32, local_size=16)
    views = MultiCropViews(ToyDataset(n, 0, seed=seed), spec, (0.5,) * 3, (0.5,) * 3, seed=seed)
    return torch.utils.data.default_collate([views[i] for i in range(n)])


def dense_loss(online, ema, batch, queue=None):
    crops, gc, other = batch
    with torch.no_grad():
        targets = ema(crops[:2])
    return dm.leopart_loss(targets, online(crops), gc, other, patch=8, eps=0.05, iters=3, temperature=0.1,
                           roi_size=7, queue=queue, student_prototypes=online.head.prototypes.weight.detach(),
                           queue_per_image=10, generator=torch.Generator().manual_seed(0))


def test_defend_trains_exactly_the_last_two_blocks_head_and_prototypes():
    online, ema, names = dense_networks(depth=3)
    assert {n.split(".")[1] for n in names} == {"1", "2"} and all(n.startswith("blocks.") for n in names)
    optimizer = torch.optim.AdamW(dm.dense_param_groups(online, 1e-2, 1e-2, 0.04))
    before = {k: v.clone() for k, v in online.state_dict().items()}
    online.train()
    loss = dense_loss(online, ema, dense_batch())
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    trains = {n for n, p in online.named_parameters() if p.grad is not None}
    head = {n for n, _ in online.named_parameters() if n.startswith("head.")}
    expected = {f"vit.model.{n}" for n in names} | head
    assert trains == expected and "head.prototypes.weight" in head
    assert not any(n.startswith("vit.model.norm.") for n in trains)  # the final norm stays frozen
    assert all(p.grad is None for p in ema.parameters())
    optimizer.step()
    after = online.state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == expected
    # Optimiser groups: backbone decay / no decay, head decay / no decay; no-decay = biases and 1-D.
    groups = dm.dense_param_groups(online, 1e-5, 1e-4, 0.04)
    assert [g["lr"] for g in groups] == [1e-5, 1e-5, 1e-4, 1e-4]
    assert [g["weight_decay"] for g in groups] == [0.04, 0.0, 0.04, 0.0]
    named = dict(online.named_parameters())
    grouped = 0
    for group, wants_decay in zip(groups, (True, False, True, False), strict=True):
        for p in group["params"]:
            name = next(n for n, q in named.items() if q is p)
            assert (name.endswith(".bias") or p.ndim == 1) != wants_decay, name
            grouped += 1
    assert grouped == len(expected)


def test_dense_tuning_keeps_the_frozen_stems_batch_norm_statistics():
    """The embedded hybrid ViT's CNN stem has batch norms: frozen, they must not follow the
    crops' statistics while the online network trains (the cached frozen prefix relies on it)."""
    vit = ViTFeatures(create_backbone("ndbench_vit_embedded", weights="none", num_classes=0, dynamic_img_size=True))
    dm.freeze_for_defend(vit, 2)
    online = dm.DenseNetwork(vit, dm.ProjectionHead(vit.embed_dim, 4, 16, 8, 3), frozen_blocks=vit.depth - 2)
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    online.train()
    online([torch.randn(2, 3, 64, 64) * 3 + 1, torch.randn(2, 3, 24, 24)])
    assert norms and not any(m.training for m in norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    assert vit.model.blocks[-1].training and vit.model.blocks[0].training  # drop-path stays on


def test_ema_teacher_moves_by_the_momentum_rule_only():
    online, ema, _ = dense_networks()
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    old = [p.clone() for p in ema.parameters()]
    dm.ema_update(ema, online, 0.9)
    for p_ema, p_old, p_online in zip(ema.parameters(), old, online.parameters(), strict=True):
        torch.testing.assert_close(p_ema, 0.9 * p_old + 0.1 * p_online)
        assert not p_ema.requires_grad
    schedule = dm.cosine_schedule(0.9995, 1.0, 10)
    assert schedule[0] == pytest.approx(0.9995) and np.all(np.diff(schedule) > 0) and schedule[-1] < 1.0


def test_queue_fills_then_joins_the_assignment():
    queue = dm.AssignmentQueue(2, 20, 16, CPU)
    prototypes = F.normalize(torch.randn(4, 16), dim=1)
    g = torch.Generator().manual_seed(0)
    assert queue.scores(0, prototypes) is None
    queue.push(0, F.normalize(torch.randn(40, 16), dim=1), 12, g)
    assert queue.scores(0, prototypes) is None  # 12 of 20 slots filled
    queue.push(0, F.normalize(torch.randn(40, 16), dim=1), 12, g)
    scores = queue.scores(0, prototypes)
    assert scores is not None and scores.shape == (20, 4) and queue.in_use
    online, ema, _ = dense_networks()
    full = dm.AssignmentQueue(2, 8, 16, CPU)
    full.embeddings.normal_()
    full.in_use = True
    assert torch.isfinite(dense_loss(online, ema, dense_batch(), queue=full))


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


@pytest.mark.parametrize("lr_final", [None, 1e-5])
def test_mkd_lr_final_decays_over_every_step_and_none_keeps_the_released_constant(toy, lr_final):
    train = ToyDataset(20, 0, seed=3)  # 2 batches of 16 per epoch: 6 steps in 3 epochs
    lrs: list[float] = []
    hook = register_optimizer_step_post_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    try:
        mkd = get("mkd", **TINY_CONFIG, epochs=3, lr=1e-3, lr_final=lr_final)
        mkd.fit(train, device=CPU)
    finally:
        hook.remove()
    assert len(lrs) == 6
    if lr_final is None:
        assert lrs == [1e-3] * 6
        assert mkd.record_extra()["mkd_lr_end"] == 1e-3
    else:  # the lr each step used: from `lr` down; after the last step the decay has reached lr_final
        assert lrs[0] == 1e-3 and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
        assert mkd.record_extra()["mkd_lr_end"] == pytest.approx(lr_final, rel=1e-6)


def test_mkd_lr_final_refuses_a_negative_rate():
    with pytest.raises(NdbenchError, match="lr_final -0.0001 is not valid"):
        get("mkd", **TINY_CONFIG, lr_final=-1e-4)


# --- the tuned teacher reaches MKD ------------------------------------------------------------
def test_defend_teacher_reaches_mkd_and_mkd_teacher_is_untuned(tmp_path, monkeypatch):
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit(seed=5, depth=3).model.state_dict().items()}, str(weights))
    untuned = tiny_vit(seed=5, depth=3).model.state_dict()
    used = {}
    original = MKDDetector.distill

    def spy(self, train, **kwargs):
        used[self.name] = {k: v.clone() for k, v in self.teacher.model.state_dict().items()}
        return original(self, train, **kwargs)

    monkeypatch.setattr(MKDDetector, "distill", spy)
    train = ToyDataset(16, 0, seed=4)
    config = {**TINY_CONFIG, "weights": str(weights), "epochs": 1, "depth": 3}
    monkeypatch.setattr(MKDDetector, "_vit", lambda self, w, **kw: ViTFeatures(create_backbone(
        TINY_VIT, weights=w, num_classes=0, depth=3, **kw)))
    config.pop("depth")
    get("mkd", **config).fit(train, device=CPU)
    defend = get("defend", **config, dense_epochs=1, dense_lr_backbone=1e-3)
    defend.fit(train, device=CPU)
    assert all(torch.equal(used["mkd"][k], untuned[k]) for k in untuned)
    changed = {k for k in untuned if not torch.equal(used["defend"][k], untuned[k])}
    # Only the last two of the three blocks were tuned; the final norm and the rest stay as loaded.
    assert changed and {k.split(".")[1] for k in changed} == {"1", "2"}
    assert all(k.startswith("blocks.") for k in changed)
    assert all(torch.equal(used["defend"][k], v) for k, v in defend.teacher.model.state_dict().items())
    assert defend.record_extra()["dense_steps"] == 1 and defend.record_extra()["crop_px"] == [32, 16]


def test_mkd_and_defend_of_one_seed_distil_with_the_same_random_numbers(monkeypatch, toy):
    # A DEFEND tuning that draws random numbers but leaves the teacher as it is: the two methods
    # then differ by nothing, so their scores must be the same (the paired ablation).
    def tuning_that_changes_nothing(self, train, *, device, progress, generator):
        torch.rand(100), torch.randint(0, 10, (5,), generator=generator)

    monkeypatch.setattr(DefendDetector, "prepare_teacher", tuning_that_changes_nothing)
    scores = {}
    for name in ("mkd", "defend"):
        torch.manual_seed(0)
        detector = get(name, **TINY_CONFIG, epochs=2, lr=1e-3, student_drop_path=0.1)
        detector.fit(toy[0], device=CPU)
        scores[name] = detector.score(toy[1], device=CPU)
    np.testing.assert_allclose(scores["defend"], scores["mkd"], rtol=1e-6)
    torch.manual_seed(1)
    other = get("mkd", **TINY_CONFIG, epochs=2, lr=1e-3, student_drop_path=0.1)
    other.fit(toy[0], device=CPU)
    assert not np.allclose(other.score(toy[1], device=CPU), scores["mkd"])  # another seed, other numbers


# --- end to end -------------------------------------------------------------------------------
def test_defend_separates_toy_normal_from_novel(fitted_defend, toy):
    scores = fitted_defend.score(toy[1], device=CPU)
    assert scores.shape == (48,) and np.isfinite(scores).all()
    assert roc_auc_score(toy[1].labels, scores) > 0.8
    extra = fitted_defend.record_extra()
    assert extra["num_prototypes"] == 4 and extra["observed_classes"] == 2  # 2 x {3, 7}
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


def test_eval_batch_size_batches_scoring_without_changing_scores(fitted_defend, toy, monkeypatch):
    seen = []
    original = DefendDetector.loader

    def loader(self, data, **kwargs):
        made = original(self, data, **kwargs)
        seen.append(made.batch_size)
        return made

    monkeypatch.setattr(DefendDetector, "loader", loader)
    before = fitted_defend.score(toy[1], device=CPU)
    assert seen == [fitted_defend.config.batch_size]  # unset: the training batch size
    monkeypatch.setattr(fitted_defend, "config", replace(fitted_defend.config, eval_batch_size=5))
    after = fitted_defend.score(toy[1], device=CPU)
    assert seen[-1] == 5
    np.testing.assert_allclose(after, before, rtol=1e-5)
    with pytest.raises(NdbenchError, match="eval_batch_size 0"):
        get("mkd", **TINY_CONFIG, eval_batch_size=0)


@pytest.mark.parametrize(
    "options, kept",
    [({"guidance": "random"}, 8), ({"guidance": "none"}, 16), ({"distill_layers": "all"}, 8),
     ({"normalise": False, "mask_ratio": 0.75}, 4), ({"student_init": "timm"}, 8)],
)
def test_ablation_options_run(options, kept):
    detector = get("mkd", **TINY_CONFIG, epochs=1, **options)
    detector.fit(ToyDataset(8, 0, seed=6), device=CPU)
    assert detector.record_extra()["student_tokens_kept"] == kept
    assert np.isfinite(detector.score(ToyDataset(2, 2, seed=7), device=CPU)).all()


# --- configuration ----------------------------------------------------------------------------
def test_registered_configs_carry_the_released_defaults():
    c = get("defend").config
    assert (c.backbone, c.weights, c.img_size, c.mean, c.std) == (
        "vit_base_patch16_224.augreg2_in21k_ft_in1k", "hub", 224, None, None)
    assert get("defend").normalisation() == ((0.5,) * 3, (0.5,) * 3)  # from timm's pretrained config
    assert (c.tuned_blocks, c.head_hidden, c.head_out, c.head_layers, c.num_prototypes, c.temperature) == (
        2, 2048, 256, 3, 20, 0.1)
    assert (c.sinkhorn_eps, c.sinkhorn_iters, c.queue_length, c.roi_size) == (0.05, 3, 8192, 7)
    assert (c.global_crops, c.local_crops, c.global_scale, c.local_scale, c.local_crop_px) == (
        2, 4, (0.3, 1.0), (0.1, 0.3), 96)
    assert (c.momentum_teacher, c.momentum_teacher_end, c.dense_drop_path) == (0.9995, 1.0, 0.1)
    assert (c.dense_lr_backbone, c.dense_lr_head, c.dense_final_lr, c.dense_epochs) == (1e-5, 1e-4, 0.0, None)
    assert (c.dense_weight_decay, c.dense_weight_decay_end, c.dense_batch_size) == (0.04, 0.5, 32)
    mkd = get("mkd").config
    for config in (c, mkd):
        assert (config.mask_ratio, config.guidance, config.distill_layers, config.normalise) == (
            0.5, "teacher", "last", True)
        assert (config.student_init, config.student_drop_path, config.lr, config.betas, config.weight_decay) == (
            "mae", 0.1, 1e-5, (0.9, 0.95), 0.05)
        assert (config.epochs, config.batch_size) == (10, 32)
    assert not hasattr(mkd, "num_prototypes")
    assert get("knn").config.backbone == c.backbone
    for cls in (DefendDetector, MKDDetector):
        preset = cls.with_preset("embedded").config
        assert (preset.backbone, preset.weights, preset.img_size) == ("ndbench_vit_embedded", "embedded", 64)
        assert cls.with_preset("paper-text").config.backbone == "vit_base_patch16_224.augreg_in21k"
    assert DefendDetector.with_preset("paper-text").config.num_prototypes == "2x-observed"
    with pytest.raises(NdbenchError, match="guidance"):
        get("mkd", guidance="attention")
    with pytest.raises(NdbenchError, match="num_prototypes"):
        get("defend", num_prototypes="3x")


def test_prototype_count_and_dense_epochs(toy):
    train = toy[0]
    assert num_prototypes(get("defend").config, train) == (20, 2)  # the released default
    assert num_prototypes(get("defend", num_prototypes="2x-observed").config, train) == (4, 2)  # 2 x {3, 7}
    assert num_prototypes(get("defend", num_prototypes=5).config, train) == (5, 2)
    assert num_prototypes(get("defend", num_prototypes=5).config, no_index(train)) == (5, None)
    with pytest.raises(NdbenchError, match="num_prototypes"):
        num_prototypes(get("defend", num_prototypes="2x-observed").config, no_index(train))

    class Split:
        def __init__(self, split_id):
            self.split_id = split_id

    config = get("defend").config
    assert [dense_epochs(config, Split(s)) for s in ("coco/uni-class/1", "voc/uni-class/14")] == [10, 3]
    assert dense_epochs(get("defend", dense_epochs=1).config, Split("coco/uni-class/1")) == 1


# --- the MKD student as released ------------------------------------------------------------------
def reference_sincos(dim: int, side: int) -> np.ndarray:
    """MAE's 2-D sin-cos table, written out from its definition: raster positions; the first half
    of the channels from the column, the second from the row; [sin | cos] of pos / 10000^(2i/(dim/2))."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows = []
    for r in range(side):
        for col in range(side):
            rows.append(np.concatenate([np.sin(col * freq), np.cos(col * freq),
                                        np.sin(r * freq), np.cos(r * freq)]))
    return np.vstack([np.zeros((1, dim)), np.array(rows)])


def test_student_position_embedding_is_frozen_sincos_and_decay_skips_biases():
    mkd = get("mkd", **TINY_CONFIG)
    torch.manual_seed(0)
    student = mkd._new_student()
    pos = student.model.pos_embed
    assert not pos.requires_grad and pos.shape == (1, 17, 32)
    np.testing.assert_allclose(pos[0].numpy(), reference_sincos(32, 4), atol=1e-6)
    linear = student.model.blocks[0].attn.qkv
    assert float(linear.bias.detach().abs().max()) == 0.0
    bound = float(np.sqrt(6.0 / (linear.in_features + linear.out_features)))  # xavier-uniform
    weight = linear.weight.detach()
    assert float(weight.abs().max()) <= bound and float(weight.std()) > bound / 3
    assert float(student.model.cls_token.detach().std()) == pytest.approx(0.02, rel=0.6)
    timm_student = get("mkd", **TINY_CONFIG, student_init="timm")._new_student()
    assert timm_student.model.pos_embed.requires_grad
    # MKD's AdamW groups (timm's param_groups_weight_decay): no decay on exactly biases and 1-D tensors.
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(student, 0.05)
    no_decay, decay = sorted(groups, key=lambda g: g["weight_decay"])
    named = dict(student.named_parameters())
    names = {id(p): n for n, p in named.items()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in named.items() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))}
    assert "model.pos_embed" not in {names[id(p)] for p in decay["params"] + no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
