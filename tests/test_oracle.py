"""The oracle ceiling and the teacher's quality figures: class bookkeeping of the heads, the
held-out instance accuracy, the patch-token probes and the oracle's scores and AUROCs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from small_splits import SMALL, save_random_vit

from benchmark.oracle import SceneProbabilities, oracle_aurocs, oracle_scores
from datasets_builders.embedded import digit_pools, ensure_embedded
from datasets_builders.errors import NdbenchError
from datasets_builders.splits import Manifest
from methods.pretrain_eval import (
    digit_columns,
    digit_probabilities,
    heldout_scene_instance_accuracy,
    load_classifier,
    load_scenes,
    patch_token_probe,
    weight_classes,
)

VIT = "ndbench_vit_embedded"
CLASSES = (*(f"digit-{d}" for d in range(10)), *(f"font-digit-{d}" for d in range(10)), "letter-A", "background")


def _manifest(normal: list[int], test: list[tuple[str, int]]) -> Manifest:
    return Manifest("embedded", "uni-class", "x", normal, "sha", [], test)


def test_digit_columns_merge_font_and_handwritten_digits():
    assert digit_columns(CLASSES).tolist() == [*range(10), *range(10), -1, -1]
    logits = torch.zeros(1, len(CLASSES))
    logits[0, 3] = logits[0, 13] = 10.0  # handwritten and font 3
    probs = digit_probabilities(logits, CLASSES)
    assert probs.shape == (1, 10) and probs[0, 3] > 0.99 and probs.sum() <= 1.0


def _probs(**mass) -> np.ndarray:
    p = np.zeros(10)
    for digit, value in mass.items():
        p[int(digit[1:])] = value
    return p


def _scene(objects: list[np.ndarray], patches: list[np.ndarray] | None = None) -> SceneProbabilities:
    return SceneProbabilities(np.stack(objects), np.stack(patches if patches is not None else objects))


def test_oracle_scores_one_minus_the_best_objects_normal_mass():
    scenes = {
        "a": _scene([_probs(d3=0.9)]),                        # normal: one confident 3
        "b": _scene([_probs(d3=0.1, d5=0.8), _probs(d3=0.2)]),  # novel: no object is a 3
        "c": _scene([_probs(d3=0.05), _probs(d3=0.7)]),         # normal: the small object is the 3
    }
    labels, scores = oracle_scores(_manifest([3], [("a", 0), ("b", 1), ("c", 0)]), scenes)
    assert labels.tolist() == [0, 1, 0]
    assert np.allclose(scores, [0.1, 0.8, 0.3])
    # Multi-class: the mass on all normal classes of the best object.
    _, scores = oracle_scores(_manifest([3, 5], [("b", 1)]), scenes)
    assert np.allclose(scores, [0.1])


def test_patch_mean_oracle_averages_every_patchs_non_normal_mass():
    # Four patches: one on a confident 3, three on background that carry some 3 and some 5.
    patches = [_probs(d3=0.9), _probs(d3=0.5), _probs(d3=0.3, d5=0.6), _probs(d5=0.2)]
    scenes = {"a": _scene([_probs(d3=0.9)], patches)}
    _, scores = oracle_scores(_manifest([3], [("a", 0)]), scenes, "patch-mean")
    assert np.allclose(scores, [1 - (0.9 + 0.5 + 0.3 + 0.0) / 4])  # boxes play no part
    _, scores = oracle_scores(_manifest([3, 5], [("a", 0)]), scenes, "patch-mean")
    assert np.allclose(scores, [1 - (0.9 + 0.5 + 0.9 + 0.2) / 4])
    with pytest.raises(NdbenchError, match="unknown oracle rule"):
        oracle_scores(_manifest([3], [("a", 0)]), scenes, "max")


@pytest.fixture(scope="module")
def random_vit(tmp_path_factory) -> Path:
    """Random ndbench ViT weights with a head over CLASSES recorded in the file's metadata."""
    return save_random_vit(tmp_path_factory.mktemp("vit") / "vit.safetensors", CLASSES)


def test_classifier_classes_come_from_the_file(random_vit, tmp_path):
    assert weight_classes(random_vit) == CLASSES
    old = tmp_path / "old.safetensors"  # files from before the metadata: ten digits
    save_file(timm.create_model(VIT, pretrained=False, num_classes=10).state_dict(), str(old))
    assert weight_classes(old) == tuple(f"digit-{d}" for d in range(10))
    model, classes = load_classifier(VIT, random_vit, torch.device("cpu"))
    assert classes == CLASSES and model.head.out_features == len(CLASSES) and not model.training


class _Always(torch.nn.Module):
    """A 'classifier' that always answers output `k`."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(k), n).float()
        self.pretrained_cfg = {"input_size": (3, 64, 64)}

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_instance_accuracy_counts_digits_and_maps_font_digits():
    from sklearn.datasets import load_digits

    share_of_fours = float((load_digits().target[digit_pools(SMALL)["test"]] == 4).mean())

    def accuracy(output: int) -> float:
        return heldout_scene_instance_accuracy(_Always(output, len(CLASSES)), CLASSES, SMALL, torch.device("cpu"),
                                               copies=1)

    assert accuracy(4) == pytest.approx(share_of_fours)
    assert accuracy(14) == pytest.approx(share_of_fours)  # "font-digit-4" is a 4 too
    assert accuracy(20) == 0.0  # a letter is never right


def test_patch_probe_counts_patches_on_and_off_the_boxes(random_vit, splits_root, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(Path(splits_root).parents[1] / "cache"))
    model, _ = load_classifier(VIT, random_vit, torch.device("cpu"))
    result = patch_token_probe(model, SMALL, torch.device("cpu"), n_scenes=40)
    scenes = load_scenes(ensure_embedded(SMALL), "val", 40)
    assert len(scenes) == 40 and result["scenes"] == 40
    # Every object covers at least one patch by half; the dominant digit (30-44 px) several.
    assert result["test_object_patches"] >= sum(len(s.classes) for s in scenes)
    assert result["test_object_patches"] + result["test_background_patches"] <= 40 * 64
    assert 0.0 <= result["class_accuracy"] <= 1.0
    assert 0.0 <= result["object_vs_background_balanced_accuracy"] <= 1.0


def test_oracle_aurocs_cover_every_split(random_vit, splits_root):
    rows = oracle_aurocs(splits_root, random_vit, device=torch.device("cpu"))
    assert [r["setting"] for r in rows] == ["uni-class"] * 20 + ["multi-class"] * 20
    assert [r["rule"] for r in rows[:4]] == ["boxes", "patch-mean"] * 2
    assert [r["split"] for r in rows[:6:2]] == ["0", "1", "2"] and rows[20]["split"] == "except-0"
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    with pytest.raises(NdbenchError, match="build-splits"):
        oracle_aurocs(splits_root.parent / "nothing-here", random_vit)


def test_oracle_command_prints_both_rules_per_setting(random_vit, splits_root, capsys):
    from benchmark.cli import main

    assert main(["oracle", "--splits", str(splits_root), "--weights", str(random_vit), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith(("| uni-class", "| multi-class"))]
    assert [row[:2] for row in rows] == [["multi-class", "boxes"], ["multi-class", "patch-mean"],
                                         ["uni-class", "boxes"], ["uni-class", "patch-mean"]]
    assert all(len(row) == 2 + 10 + 1 for row in rows)  # setting, rule, 10 classes, AVG
