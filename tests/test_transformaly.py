"""Transformaly (methods.transformaly) on a tiny random depth-4 ViT and toy images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score
from transformaly_fixtures import DEPTH4_VIT, TINY, ToyDataset

from datasets_builders.errors import NdbenchError
from methods.backbones import ViTFeatures, create_backbone
from methods.registry import get
from methods.transformaly import TransformalyDetector, error_blocks, teacher_states

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy():
    return ToyDataset(48, 0, seed=1), ToyDataset(24, 24, seed=2)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    torch.manual_seed(5)
    model = create_backbone(DEPTH4_VIT, weights="none", num_classes=0)
    path = tmp_path_factory.mktemp("weights") / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def fitted(toy, teacher_file):
    torch.manual_seed(0)
    detector = get("transformaly", **{**TINY, "weights": str(teacher_file)}, epochs=3, lr=1e-3)
    detector.fit(toy[0], device=CPU)
    return detector


def test_error_blocks_are_all_but_the_first_two():
    assert error_blocks(12, 2) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # the original: range(2, 12)
    assert error_blocks(6, 2) == [2, 3, 4, 5]  # the embedded ViT
    assert error_blocks(4, 2) == [2, 3]
    with pytest.raises(NdbenchError, match="no block from 2 on"):
        error_blocks(2, 2)


def test_shapes_states_and_error_definition():
    detector = TransformalyDetector(**TINY)
    torch.manual_seed(0)
    teacher, students = detector._new_teacher("none"), detector._new_students().eval()
    x = torch.stack(ToyDataset(3, 2, seed=0).images)
    states, cls = teacher_states(teacher, x)
    assert states.shape == (5, 5, 17, 32) and cls.shape == (5, 32)  # L+1 = 5 states, 1 + 16 tokens
    with torch.no_grad():
        for i, block in enumerate(teacher.model.blocks):  # state i+1 is block i's output on state i
            torch.testing.assert_close(block(states[:, i]), states[:, i + 1])
        torch.testing.assert_close(cls, teacher.forward_features(x)["cls"])
        predicted = students(states)
        errors = students.errors(states)
    assert predicted.shape == (5, 4, 17, 32) and errors.shape == (5, 4)
    by_hand = (students.blocks[1](states[:, 1]) - states[:, 2]).pow(2).mean(dim=(1, 2))  # all 17 tokens
    torch.testing.assert_close(errors[:, 1], by_hand.detach())
    with torch.no_grad():
        torch.testing.assert_close(students.errors(states, [2, 3]), errors[:, 2:])  # the scored blocks
    # Xavier-uniform student weights (the original's init): std sqrt(2 / (fan_in + fan_out)), with
    # q, k and v initialised as three separate 32 x 32 layers, and the MLP's 32 -> 128 layer.
    for part in students.blocks[0].attn.qkv.weight.detach().chunk(3):
        assert abs(float(part.std()) - (2 / (32 + 32)) ** 0.5) < 0.012
    assert abs(float(students.blocks[0].mlp.fc1.weight.detach().std()) - (2 / (32 + 128)) ** 0.5) < 0.006


def test_teacher_frozen_students_trainable_and_random(fitted, teacher_file):
    teacher, students = fitted.teacher, fitted.students
    assert len(students.blocks) == 4 == teacher.depth
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in students.parameters())
    reference = ViTFeatures(create_backbone(DEPTH4_VIT, weights=teacher_file, num_classes=0))
    for name, value in reference.model.state_dict().items():  # fit left the teacher untouched
        assert torch.equal(teacher.model.state_dict()[name], value), name
    # Students are fresh blocks, not copies of the teacher's, and training moved them.
    fresh = TransformalyDetector(**TINY)._new_students()
    for i in range(4):
        assert not torch.equal(students.blocks[i].attn.qkv.weight, teacher.model.blocks[i].attn.qkv.weight)
        assert not torch.equal(students.blocks[i].attn.qkv.weight, fresh.blocks[i].attn.qkv.weight)


def test_unscored_students_can_be_left_untrained(toy, monkeypatch):
    initial = {}
    build = TransformalyDetector._new_students

    def recording(self):
        students = build(self)
        initial.update({k: v.clone() for k, v in students.state_dict().items()})
        return students

    monkeypatch.setattr(TransformalyDetector, "_new_students", recording)
    torch.manual_seed(0)
    detector = TransformalyDetector(**TINY, epochs=1, train_unscored_students=False)
    detector.fit(toy[0], device=CPU)
    for name, value in detector.students.state_dict().items():
        trained = name.startswith(("blocks.2.", "blocks.3."))
        assert torch.equal(value, initial[name]) != trained, name


def test_one_training_step_lowers_the_loss():
    detector = TransformalyDetector(**TINY)
    torch.manual_seed(0)
    teacher, students = detector._new_teacher("none"), detector._new_students()
    with torch.no_grad():
        states, _ = teacher_states(teacher, torch.stack(ToyDataset(8, 8, seed=3).images))
    optimizer = torch.optim.Adam(students.parameters(), lr=detector.config.lr)  # the paper's 1e-4
    before = students.loss(states)  # float32 on the CPU
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = students.loss(states)
    assert float(after) < float(before.detach())


def test_teacher_states_computed_once_per_training_image(toy, monkeypatch):
    seen = []
    original = ViTFeatures.per_block_io

    def counting(self, x):
        seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(ViTFeatures, "per_block_io", counting)
    torch.manual_seed(0)
    detector = TransformalyDetector(**TINY, epochs=3)
    detector.fit(toy[0], device=CPU)
    assert sum(seen) == 48  # 3 epochs and the training-error pass all read the cache
    assert detector.record_extra()["teacher_passes_per_image"] == 1.0
    assert detector.record_extra()["train_states_cached"] is True

    seen.clear()
    torch.manual_seed(0)
    uncached = TransformalyDetector(**TINY, epochs=3, max_cache_gb=0.0)
    uncached.fit(toy[0], device=CPU)
    assert sum(seen) == 48 * 4  # too big to cache: every epoch + the error pass
    assert uncached.record_extra()["teacher_passes_per_image"] == 4.0
    assert uncached.record_extra()["train_states_cached"] is False


def _hadamard_features() -> np.ndarray:
    """8 points in 5-d whose principal variances are 5 : 3 : 1.5 : 0.5 : 0 (ratios .5 .3 .15 .05)."""
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    z = h[:, 1:5]  # 4 orthogonal, zero-mean +-1 columns
    scaled = z * np.sqrt([5.0, 3.0, 1.5, 0.5])
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    return np.hstack([scaled, np.zeros((8, 1))]) @ rotation + 7.0


def test_pca_keeps_90_percent_whitened_and_gmm_direction():
    detector = TransformalyDetector(**TINY)
    features = _hadamard_features()
    errors = np.random.default_rng(1).normal(0.5, 0.01, size=(40, 2))
    detector.fit_densities(features, errors)
    # Cumulative ratios .5 .8 .95 1: three components are the fewest that keep 90 %.
    assert detector.pca.n_components_ == 3
    np.testing.assert_allclose(detector.pca.explained_variance_ratio_, [0.5, 0.3, 0.15], atol=1e-9)
    whitened = detector.pca.transform(features)
    np.testing.assert_allclose(whitened.var(axis=0, ddof=1), [1.0, 1.0, 1.0], atol=1e-9)

    train_point, train_error = features[:1], errors[:1]
    far_point, far_error = features[:1] + 50.0, errors[:1] + 1.0
    at_train = detector.novelty(train_point, train_error)[0]
    assert detector.novelty(far_point, train_error)[0] > at_train  # far in the CLS space
    assert detector.novelty(train_point, far_error)[0] > at_train  # far in the error space
    # The score is minus the sum of the two log-likelihoods.
    expected = -(detector.feature_gmm.score_samples(detector.pca.transform(far_point))
                 + detector.error_gmm.score_samples(far_error))
    np.testing.assert_allclose(detector.novelty(far_point, far_error), expected)


def test_fitted_pca_keeps_90_percent(fitted):
    kept = fitted.pca.explained_variance_ratio_
    assert kept.sum() >= 0.9 and kept[:-1].sum() < 0.9
    assert fitted.record_extra()["error_blocks"] == [2, 3]
    assert fitted.error_gmm.means_.shape == (1, 2)


def test_novel_toy_images_score_higher(fitted, toy):
    scores = fitted.score(toy[1], device=CPU)
    labels = np.array(toy[1].labels)
    assert scores.shape == (48,)
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert roc_auc_score(labels, scores) > 0.9


def test_save_load_gives_identical_scores(fitted, toy, tmp_path):
    path = tmp_path / "transformaly.pt"
    fitted.save(path)
    loaded = TransformalyDetector.load(path)
    assert loaded.config == fitted.config
    assert np.array_equal(loaded.score(toy[1], device=CPU), fitted.score(toy[1], device=CPU))
    assert loaded.record_extra() == fitted.record_extra()


def test_defaults_and_presets():
    config = get("transformaly").config
    assert (config.backbone, config.img_size, config.epochs, config.batch_size, config.lr) == (
        "vit_base_patch16_224.augreg_in21k", 224, 30, 32, 1e-4)
    assert (config.pca_variance, config.first_error_block, config.gmm_components) == (0.9, 2, 1)
    original = TransformalyDetector.with_preset("original").config
    assert (original.backbone, original.img_size, original.mean, original.std) == (
        "vit_base_patch16_384.orig_in21k_ft_in1k", 384, (0.5,) * 3, (0.5,) * 3)
    embedded = TransformalyDetector.with_preset("embedded").config
    assert (embedded.backbone, embedded.weights, embedded.img_size) == ("ndbench_vit_embedded", "embedded", 64)
    assert (embedded.epochs, embedded.lr, embedded.first_error_block) == (2, 1e-4, 2)
    with pytest.raises(NdbenchError, match="pca_variance"):
        TransformalyDetector(pca_variance=1.5)


def test_paper_preset_is_the_authors_copy_recipe():
    assert TransformalyDetector.paper_preset == "paper" and TransformalyDetector.resolve_preset("paper") == "paper"
    config = TransformalyDetector.with_preset("paper").config
    # Multiobject_bench/Transformaly: train.py:35, 159, 162 (B_16: Google's IN-21k ViT-B/16 at 224),
    # train.py:123 (Resize((224, 224)) + ToTensor, no Normalize), train.py:19-21 (10 epochs,
    # batch 16, lr 1e-4), train.py:34 (error blocks 2..11).
    assert (config.backbone, config.img_size) == ("vit_base_patch16_224.orig_in21k", 224)
    assert (config.mean, config.std) == ((0.0,) * 3, (1.0,) * 3)
    assert (config.epochs, config.batch_size, config.lr, config.first_error_block) == (10, 16, 1e-4, 2)
    assert (config.student_dropout, config.pca_variance) == (0.1, 0.9)
    detector = TransformalyDetector.with_preset("paper")
    assert detector.normalisation() == ((0.0,) * 3, (1.0,) * 3)
    # The teacher's weights exist in timm under that tag, with no classifier (its IN-21k head and
    # pre-logits dropped, as the copy's ViT without load_repr_layer).
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("vit_base_patch16_224.orig_in21k")
    assert cfg.num_classes == 0 and cfg.input_size == (3, 224, 224)
