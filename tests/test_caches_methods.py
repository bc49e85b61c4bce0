"""The frozen networks of the training methods served from the feature cache: scores with the
caches cold, warm and off agree, the records count what `--dry-run` predicts, and new weights
or another read-out make new cache entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from defend_fixtures import TINY_VIT
from msad_rdad_fixtures import TINY_CNN, tiny_weights
from safetensors.torch import save_file
from small_splits import fresh_out
from torchvision import transforms

from benchmark.executors import run_local
from benchmark.plan import plan_run
from benchmark.records import load_records
from benchmark.runner import RunOptions, expand_jobs, prepare
from datasets_builders.image_store import Normalise, ResizeCropDecode, StagedTransform
from datasets_builders.loading import load_split
from methods.backbones import create_backbone
from methods.runtime import CacheSettings

ON, OFF = CacheSettings(workers=0), CacheSettings(enabled=False)
TINY_MKD = {"backbone": TINY_VIT, "img_size": 32, "epochs": 2, "batch_size": 16}


def vit_weights(path: Path, seed: int) -> Path:
    """A random tiny ViT saved as a weights file (a file has a content identity; "none" is
    never cached)."""
    torch.manual_seed(seed)
    save_file(create_backbone(TINY_VIT, weights="none", num_classes=0).state_dict(), path)
    return path


def run(method: str, splits_root: Path, out_root: Path, weights: Path, caching: CacheSettings, overrides: dict,
        classes=(0, 1), setting: str = "uni-class"):
    """(dry-run plan of `method`, its records sorted by split, per split the scores)."""
    out = fresh_out(splits_root, out_root)
    options = RunOptions(out=out, device="cpu", weights=str(weights), progress=False, caching=caching)
    jobs = expand_jobs([method], settings=[setting], classes=list(classes), seeds=[0], options=options,
                       overrides=overrides)
    prepare(jobs, options)
    plan = plan_run(jobs, options).methods[method]
    results = run_local(jobs, options)
    assert [r.status for r in results] == ["done"] * len(jobs), [r.error for r in results]
    records = sorted(load_records(out), key=lambda r: r.split)
    scores = {r.split: np.loadtxt(next(out.rglob(f"{r.split}__*.scores.csv")), delimiter=",", skiprows=1,
                                  usecols=2) for r in records}
    return plan, records, scores


def total(records, name: str) -> int:
    return sum(r.extra["cost"][name] for r in records)


def image_counts(splits_root: Path, records) -> tuple[int, int, int, int]:
    """(train images over the jobs, distinct train images, test images over the jobs, distinct test images)."""
    train = sum(r.counts["train"] for r in records)
    distinct = len(set().union(*(load_split(splits_root, f"embedded/uni-class/{r.split}")[1].train for r in records)))
    test = sum(r.counts["test_normal"] + r.counts["test_novel"] for r in records)
    return train, distinct, test, records[0].counts["test_normal"] + records[0].counts["test_novel"]


def test_mkd_teacher_outputs_cold_warm_and_off(splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = vit_weights(tmp_path / "w.safetensors", 0)
    off_plan, off, off_scores = run("mkd", splits_root, tmp_path / "off", weights, OFF, TINY_MKD)
    cold_plan, cold, cold_scores = run("mkd", splits_root, tmp_path / "cold", weights, ON, TINY_MKD)
    warm_plan, warm, warm_scores = run("mkd", splits_root, tmp_path / "warm", weights, ON, TINY_MKD)
    train, distinct_train, test, distinct_test = image_counts(splits_root, off)
    # Off: every job runs the teacher on its own images; cold: once per distinct image (the
    # second job reads the shared test images and its overlapping train images); warm: never.
    assert total(off, "frozen_passes") == train + test == off_plan.frozen_without == off_plan.frozen_with
    assert total(cold, "frozen_passes") == distinct_train + distinct_test == cold_plan.frozen_with
    assert cold[1].extra["cost"]["frozen_reads"] >= distinct_test
    assert total(warm, "frozen_passes") == 0 == warm_plan.frozen_with
    assert total(warm, "frozen_reads") == train + test
    # The student is trained and scored in every job either way (2 epochs + 1 scoring pass).
    for records, plan in ((off, off_plan), (cold, cold_plan), (warm, warm_plan)):
        assert total(records, "trained_passes") == 2 * train + test == plan.trained
    assert total(warm, "decodes") == 0 and warm[0].extra["teacher_passes_per_image"] == 0.0
    for split in ("0", "1"):
        # Cached and uncached runs make the same computation on the same inputs: the teacher's
        # targets are float16 and its test features float32 either way. The only freedom left
        # is how rows are batched (a job reading rows another job computed), which moves
        # float32 results by a few ulp; the scores then agree to well under 1e-4.
        np.testing.assert_allclose(cold_scores[split], off_scores[split], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(warm_scores[split], cold_scores[split])  # the same stored values
    np.testing.assert_array_equal(cold_scores["0"], off_scores["0"])  # the first job computed all it read


def test_the_dry_run_counts_repeated_multi_class_training_images(splits_root, tmp_path, monkeypatch):
    """Under the per-class weighting an image holding two normal classes is trained on twice,
    but decoded and passed through the frozen teacher once; the dry run predicts both."""
    weights = vit_weights(tmp_path / "w.safetensors", 0)
    _, manifest = load_split(splits_root, "embedded/multi-class/except-0")
    distinct = len(manifest.train) + len(manifest.test)
    for method, overrides in (("mkd", {**TINY_MKD, "epochs": 1}), ("knn", {"backbone": TINY_VIT, "img_size": 32})):
        monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / method / "cache"))  # a cold store for each
        for name, caching in (("off", OFF), ("cold", ON)):
            label = f"{method}, caches {name}"
            plan, records, _ = run(method, splits_root, tmp_path / method / name, weights, caching, overrides, (0,),
                                   "multi-class")
            (record,) = records
            repeated = record.counts["train_items"]
            assert record.multi_class_weighting == "per-class", label
            assert repeated > record.counts["train"] == len(manifest.train), label
            cost = record.extra["cost"]
            trained = repeated + len(manifest.test) if method == "mkd" else 0  # 1 epoch + scoring
            assert cost["trained_passes"] == trained == plan.trained, label
            # Each distinct image passes through the frozen network once per job, cached or not.
            assert cost["frozen_passes"] == distinct == plan.frozen_with == plan.frozen_without, label
            assert cost["decodes"] == plan.decodes_with, label
            if name == "off":
                assert cost["decodes"] == plan.decodes_without, label
            if name == "cold":  # each image decoded once; without the store, once per listing
                assert cost["decodes"] == distinct, label


def test_mkd_cache_keys_follow_weights_transform_and_layers(splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.safetensors"
    base = {**TINY_MKD, "epochs": 1}
    _, first, _ = run("mkd", splits_root, tmp_path / "a", vit_weights(weights, 0), ON, base, (0,))
    passes = total(first, "frozen_passes")
    _, again, _ = run("mkd", splits_root, tmp_path / "b", weights, ON, base, (0,))
    assert passes > 0 and total(again, "frozen_passes") == 0
    # Another guidance or mask ratio reads the same teacher outputs (attention is always stored).
    _, random_mask, _ = run("mkd", splits_root, tmp_path / "c", weights, ON, {**base, "guidance": "random"}, (0,))
    assert total(random_mask, "frozen_passes") == 0
    _, new_weights, _ = run("mkd", splits_root, tmp_path / "d", vit_weights(weights, 1), ON, base, (0,))
    assert total(new_weights, "frozen_passes") == passes
    _, new_mean, _ = run("mkd", splits_root, tmp_path / "e", weights, ON, {**base, "mean": [0.4, 0.4, 0.4]}, (0,))
    assert total(new_mean, "frozen_passes") == passes and total(new_mean, "decodes") == 0
    # All layers: new training targets; raw targets: new training targets; both keep test entries apart.
    _, all_layers, _ = run("mkd", splits_root, tmp_path / "f", weights, ON, {**base, "distill_layers": "all"}, (0,))
    assert total(all_layers, "frozen_passes") == passes
    _, raw, _ = run("mkd", splits_root, tmp_path / "g", weights, ON, {**base, "normalise": False}, (0,))
    test_images = raw[0].counts["test_normal"] + raw[0].counts["test_novel"]
    assert total(raw, "frozen_passes") == passes - test_images  # raw test tokens are shared


TINY_DEFEND = {**TINY_MKD, "epochs": 1, "dense_epochs": 1, "num_prototypes": 4, "tuned_blocks": 1}


def test_defend_frozen_prefix_cold_warm_and_off(splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = vit_weights(tmp_path / "w.safetensors", 0)
    off_plan, off, off_scores = run("defend", splits_root, tmp_path / "off", weights, OFF, TINY_DEFEND)
    cold_plan, cold, cold_scores = run("defend", splits_root, tmp_path / "cold", weights, ON, TINY_DEFEND)
    warm_plan, warm, warm_scores = run("defend", splits_root, tmp_path / "warm", weights, ON, TINY_DEFEND)
    train, distinct_train, test, distinct_test = image_counts(splits_root, off)
    # Block 0 (the frozen prefix) runs once per distinct image with the caches, once per job
    # and image without; the tuned block 1, DEFEND and the student run in every job.
    assert total(off, "frozen_passes") == train + test == off_plan.frozen_with
    assert total(cold, "frozen_passes") == distinct_train + distinct_test == cold_plan.frozen_with
    assert total(warm, "frozen_passes") == 0 == warm_plan.frozen_with
    for records, plan in ((off, off_plan), (cold, cold_plan), (warm, warm_plan)):
        # 1 DEFEND epoch + the tuned teacher's targets + 1 MKD epoch; tuned block + student per test image
        assert total(records, "trained_passes") == 3 * train + 2 * test == plan.trained
    for split in ("0", "1"):
        # The prefix tokens are float32, so the tuned blocks see what they see without the cache.
        np.testing.assert_allclose(cold_scores[split], off_scores[split], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(warm_scores[split], cold_scores[split])
    np.testing.assert_array_equal(cold_scores["0"], off_scores["0"])


def test_defends_planned_passes_follow_the_papers_epochs_per_dataset():
    from methods.defend import DefendDetector

    cpu = torch.device("cpu")
    paper = DefendDetector(**{**TINY_DEFEND, "dense_epochs": None, "epochs": 10})
    # DEFEND epochs (10 on COCO, 3 elsewhere; paper 4.3) + the tuned teacher's targets + MKD epochs.
    assert paper.cost_model(cpu, "coco/uni-class/1").trained_per_train_image == 10 + 1 + 10
    assert paper.cost_model(cpu, "voc/uni-class/1").trained_per_train_image == 3 + 1 + 10
    assert DefendDetector(**TINY_DEFEND).cost_model(cpu, "coco/uni-class/1").trained_per_train_image == 1 + 1 + 1


def test_defend_prefix_is_the_untuned_blocks_and_all_layers_skip_it(tmp_path):
    from methods.defend import DefendDetector

    detector = DefendDetector(**{**TINY_DEFEND, "weights": str(vit_weights(tmp_path / "w.safetensors", 0))})
    cpu = torch.device("cpu")
    part = detector.prefix_part("test", cpu)
    assert part is not None and "before-last-1-blocks" in part.part
    assert detector.prefix_part("train", cpu).part != part.part  # float16-held training inputs
    all_layers = DefendDetector(**{**TINY_DEFEND, "distill_layers": "all"})
    assert all_layers.prefix_part("test", cpu) is None and all_layers.cost_model(cpu).frozen == ()
    # The prefix path computes what the whole teacher computes.
    teacher = detector._new_teacher("none").eval()
    x = torch.randn(3, 3, 32, 32)
    whole = teacher.forward_features(x, need_attention=True)
    split = teacher.forward_features_from(teacher.prefix_tokens(x, 1), 1, need_attention=True)
    assert torch.equal(whole["patches"], split["patches"])
    assert torch.equal(whole["cls_attention"], split["cls_attention"])


TINY_TRANSFORMALY = {"backbone": TINY_VIT, "img_size": 32, "epochs": 2, "batch_size": 16, "first_error_block": 1,
                     "student_dropout": 0.0}


def test_transformaly_teacher_states_cold_warm_and_off(splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = vit_weights(tmp_path / "w.safetensors", 0)
    args = ("transformaly", splits_root)
    off_plan, off, off_scores = run(*args, tmp_path / "off", weights, OFF, TINY_TRANSFORMALY)
    cold_plan, cold, cold_scores = run(*args, tmp_path / "cold", weights, ON, TINY_TRANSFORMALY)
    warm_plan, warm, warm_scores = run(*args, tmp_path / "warm", weights, ON, TINY_TRANSFORMALY)
    train, distinct_train, test, distinct_test = image_counts(splits_root, off)
    assert total(off, "frozen_passes") == train + test == off_plan.frozen_with
    assert total(cold, "frozen_passes") == distinct_train + distinct_test == cold_plan.frozen_with
    assert total(warm, "frozen_passes") == 0 == warm_plan.frozen_with
    for records, plan in ((off, off_plan), (cold, cold_plan), (warm, warm_plan)):
        assert total(records, "trained_passes") == 3 * train + test == plan.trained  # 2 epochs + errors + scoring
    for split in ("0", "1"):
        # Training states are float16 and test states float32 with or without the cache; only
        # the batching of rows another job computed differs (a few float32 ulp).
        np.testing.assert_allclose(cold_scores[split], off_scores[split], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(warm_scores[split], cold_scores[split])
    np.testing.assert_array_equal(cold_scores["0"], off_scores["0"])


# --- the CNN teachers: kdad's tapped maps, rdad's encoder maps --------------------------------
TINY_CNNS = {
    # kdad at the official 224/256 centre crop (a 37 px resize cropped to 32): its staged decode.
    "kdad": {"backbone": TINY_CNN, "img_size": 32, "epochs": 2, "batch_size": 16, "mean": (0.5,) * 3,
             "std": (0.5,) * 3, "teacher_layers": ("layer1", "layer2", "layer3", "layer4"),
             "score_layers": ("layer2", "layer3", "layer4")},
    "rdad": {"backbone": TINY_CNN, "img_size": 32, "epochs": 2, "batch_size": 16, "mean": (0.5,) * 3,
             "std": (0.5,) * 3, "bottleneck_blocks": 1, "decoder_blocks": (1, 1, 1), "sigma": 0.5},
}


@pytest.mark.parametrize("method", sorted(TINY_CNNS))
def test_cnn_teacher_maps_cold_warm_and_off(method, splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = tiny_weights(tmp_path / "cnn.safetensors")
    config = TINY_CNNS[method]
    off_plan, off, off_scores = run(method, splits_root, tmp_path / "off", weights, OFF, config)
    cold_plan, cold, cold_scores = run(method, splits_root, tmp_path / "cold", weights, ON, config)
    warm_plan, warm, warm_scores = run(method, splits_root, tmp_path / "warm", weights, ON, config)
    train, distinct_train, test, distinct_test = image_counts(splits_root, off)
    assert total(off, "frozen_passes") == train + test == off_plan.frozen_with
    assert total(cold, "frozen_passes") == distinct_train + distinct_test == cold_plan.frozen_with
    assert total(warm, "frozen_passes") == 0 == warm_plan.frozen_with
    assert total(warm, "decodes") == 0 and total(warm, "frozen_reads") == train + test
    for records, plan in ((off, off_plan), (cold, cold_plan), (warm, warm_plan)):
        assert total(records, "trained_passes") == 2 * train + test == plan.trained
    for split in ("0", "1"):
        # The maps are float32 in the cache as they always were in memory: the same numbers,
        # up to the batching of rows another job computed (a few float32 ulp).
        np.testing.assert_allclose(cold_scores[split], off_scores[split], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(warm_scores[split], cold_scores[split])
    np.testing.assert_array_equal(cold_scores["0"], off_scores["0"])


def test_resize_crop_decode_equals_resize_then_centre_crop():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    old = transforms.Compose([transforms.Resize((37, 37), interpolation=transforms.InterpolationMode.LANCZOS,
                                                antialias=True),
                              transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize(mean, std)])
    staged = StagedTransform(ResizeCropDecode(37, 32, "lanczos"), Normalise(mean, std))
    assert torch.equal(staged(image), old(image))
    assert staged.decode.signature != ResizeCropDecode(37, 30, "lanczos").signature


def test_mkd_run_level_bench_counts_teacher_passes_per_distinct_image(splits_root, tmp_path):
    from benchmark.bench_data import mkd_run_level

    rows = {r.name: r for r in mkd_run_level(tmp_path / "mkd-runs", "cpu", report=lambda _: None,
                                             classes=[0, 1], workers=0, splits_root=splits_root,
                                             overrides={"backbone": TINY_VIT, "img_size": 32, "epochs": 1})}
    assert {f"mkd x 2 (1-epoch) jobs, caches {mode}" for mode in ("off", "cold", "warm")} <= set(rows)
    assert rows["mkd teacher passes per distinct image, caches cold"].value == 1.0
    assert rows["mkd teacher passes per distinct image, caches off"].value > 1.0
    assert rows["mkd decodes + teacher passes, caches warm"].value == 0
    assert all(rows[name].met for name in ("mkd teacher passes per distinct image, caches cold",
                                           "mkd decodes + teacher passes, caches warm"))
    off, warm = (rows[f"mkd x 2 (1-epoch) jobs, caches {mode}"].value for mode in ("off", "warm"))
    assert rows["mkd run speed-up with caches, warm"].value == pytest.approx(off / warm)
