"""Every method's config refuses out-of-range numbers with one NdbenchError naming the field,
the value and the valid range (methods.validation); defaults and presets still construct, and
`ndbench run --set` reports a bad value as one line with exit code 2, even with --dry-run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cli_checks import one_line_error
from small_splits import fresh_out

from benchmark.cli import main
from datasets_builders.errors import NdbenchError
from methods.registry import available, get, get_class
from methods.validation import Range, between, check_value, count, non_negative, positive

NAN = float("nan")

# (method, field, bad value, what the message must contain: None = "<field> <value!r>"), at least
# one per kind of check of each method: counts, counts from 0, positive and non-negative numbers,
# intervals, pairs, per-item checks, optional values and the checks that predate the helper.
BAD_VALUES = [
    ("knn", "k", 0, None),
    ("knn", "k", -5, None),
    ("knn", "batch_size", 0, None),
    ("knn", "img_size", 0, None),
    ("knn", "std", (0.5, 0.0, 0.5), None),
    ("mkd", "epochs", -1, None),
    ("mkd", "epochs", 0, None),
    ("mkd", "batch_size", 0, None),
    ("mkd", "eval_batch_size", 0, None),
    ("mkd", "lr", -1.0, None),
    ("mkd", "lr", 0.0, None),
    ("mkd", "lr", NAN, None),
    ("mkd", "lr", math.inf, None),
    ("mkd", "weight_decay", -0.05, None),
    ("mkd", "mask_ratio", 1.0, None),
    ("mkd", "student_drop_path", 1.0, None),
    ("mkd", "betas", (0.9, 1.0), None),
    ("mkd", "max_cache_gb", -1.0, None),
    ("defend", "epochs", -1, None),
    ("defend", "tuned_blocks", 0, None),
    ("defend", "head_layers", 0, None),
    ("defend", "head_hidden", -1, None),
    ("defend", "num_prototypes", 0, None),
    ("defend", "temperature", 0.0, None),
    ("defend", "sinkhorn_eps", -0.05, None),
    ("defend", "sinkhorn_iters", 0, None),
    ("defend", "global_crops", 0, None),
    ("defend", "local_crops", -1, None),
    ("defend", "global_scale", (0.5, 0.2), None),
    ("defend", "local_scale", (0.0, 0.3), None),
    ("defend", "local_crop_px", 0, None),
    ("defend", "min_intersection", 0.5, None),
    ("defend", "roi_size", 0, None),
    ("defend", "momentum_teacher", 1.5, None),
    ("defend", "queue_length", -1, None),
    ("defend", "queue_per_image", 0, None),
    ("defend", "dense_lr_head", 0.0, None),
    ("defend", "dense_final_lr", -1e-5, None),
    ("defend", "dense_weight_decay_end", -0.5, None),
    ("defend", "dense_drop_path", -0.1, None),
    ("defend", "dense_epochs", 0, None),
    ("defend", "dense_batch_size", 0, None),
    ("transformaly", "epochs", 0, None),
    ("transformaly", "batch_size", -1, None),
    ("transformaly", "lr", 0.0, None),
    ("transformaly", "student_dropout", 1.0, None),
    ("transformaly", "first_error_block", -1, None),
    ("transformaly", "pca_variance", 1.5, None),
    ("transformaly", "gmm_components", 0, None),
    ("transformaly", "gmm_max_iter_errors", 0, None),
    ("transformaly", "max_cache_gb", -0.5, None),
    ("kdad", "epochs", 0, None),
    ("kdad", "batch_size", 0, None),
    ("kdad", "lr", -1e-3, None),
    ("kdad", "lamda", -0.01, None),
    ("kdad", "center_crop", 0.0, None),
    ("kdad", "center_crop", 1.5, None),
    ("kdad", "student_width", 0, None),
    ("kdad", "student_convs", (2, 0, 3), None),
    ("kdad", "student_convs", (), None),
    ("kdad", "max_cache_gb", -1.0, None),
    ("msad", "epochs", 0, None),
    ("msad", "batch_size", 0, None),
    ("msad", "k", 0, None),
    ("msad", "temperature", 0.0, None),
    ("msad", "lr", 0.0, None),
    ("msad", "weight_decay", -1.0, None),
    ("msad", "momentum", 1.0, None),
    ("msad", "crop_scale", (1.0, 0.2), None),
    ("msad", "jitter", (-0.4, 0.4, 0.4, 0.1), None),
    ("msad", "jitter", (0.4, 0.4, 0.4, 0.6), "jitter's hue 0.6"),
    ("msad", "jitter_p", 1.5, None),
    ("msad", "grayscale_p", -0.1, None),
    ("msad", "blur_sigma", (0.0, 2.0), None),
    ("msad", "view_source_size", 0, None),
    ("msad", "max_cache_gb", -1.0, None),
    ("rdad", "img_size", 0, None),
    ("rdad", "img_size", -32, None),
    ("rdad", "img_size", 100, "img_size 100 is not a multiple of 32"),
    ("rdad", "bottleneck_blocks", 0, None),
    ("rdad", "decoder_blocks", (3, 0, 6), None),
    ("rdad", "lr", 0.0, None),
    ("rdad", "betas", (1.0, 0.999), None),
    ("rdad", "epochs", 0, None),
    ("rdad", "batch_size", 0, None),
    ("rdad", "sigma", -1.0, None),
    ("rdad", "max_cache_gb", -1.0, None),
    ("dsvdd", "img_size", 4, None),
    ("dsvdd", "rep_dim", 0, None),
    ("dsvdd", "rep_dim", -16, None),
    ("dsvdd", "bn_eps", 0.0, None),
    ("dsvdd", "eps", 0.0, None),
    ("dsvdd", "decoder_size", 2, None),
    ("dsvdd", "ae_lr", 0.0, None),
    ("dsvdd", "ae_epochs", -1, None),
    ("dsvdd", "ae_milestones", (0,), None),
    ("dsvdd", "ae_batch_size", 1, None),
    ("dsvdd", "ae_weight_decay", -1.0, None),
    ("dsvdd", "lr", -1.0, None),
    ("dsvdd", "epochs", -1, None),
    ("dsvdd", "milestones", (-5,), None),
    ("dsvdd", "batch_size", 1, None),
    ("dsvdd", "weight_decay", -1e-6, None),
    ("dsvdd", "max_cache_gb", -1.0, None),
]

# Values at the edge of each range, which a method gives a meaning (0 = off, None = default).
EDGE_VALUES = [
    ("knn", {"k": 1, "batch_size": 1, "std": None}),
    ("mkd", {"mask_ratio": 0.0, "eval_batch_size": None, "weight_decay": 0.0, "max_cache_gb": 0.0,
             "student_drop_path": 0.0, "betas": (0.0, 0.0)}),
    ("defend", {"queue_length": 0, "local_crops": 0, "global_crops": 2, "dense_epochs": None, "dense_final_lr": 0.0,
                "momentum_teacher": 1.0, "momentum_teacher_end": 1.0, "min_intersection": 0.0,
                "global_scale": (1.0, 1.0), "num_prototypes": "2x-observed"}),
    ("transformaly", {"first_error_block": 0, "student_dropout": 0.0, "max_cache_gb": 0.0}),
    ("kdad", {"center_crop": 1.0, "lamda": 0.0, "student_convs": (1,), "max_cache_gb": 0.0}),
    ("msad", {"momentum": 0.0, "jitter": (0.0, 0.0, 0.0, 0.5), "flip_p": 1.0, "grayscale_p": 0.0,
              "view_source_size": None, "weight_decay": 0.0}),
    ("rdad", {"img_size": 32, "sigma": 0.0, "max_cache_gb": 0.0}),
    ("dsvdd", {"img_size": 8, "rep_dim": 16, "epochs": 0, "ae_epochs": 0, "milestones": (), "batch_size": 2,
               "decoder_size": None, "max_cache_gb": 0.0}),
]


@pytest.mark.parametrize(("method", "field", "value", "needle"), BAD_VALUES,
                         ids=[f"{m}-{f}={v!r}" for m, f, v, _ in BAD_VALUES])
def test_an_out_of_range_value_is_one_clear_error(method, field, value, needle):
    """Through the registry (as --set applies it) and built directly: one line naming the field
    and the value, with a hint saying what to use."""
    for build in (lambda: get(method, **{field: value}), lambda: get_class(method).Config(**{field: value})):
        with pytest.raises(NdbenchError) as caught:
            build()
        error = caught.value
        assert (needle or f"{field} {value!r}") in error.problem, str(error)
        assert error.fix and "\n" not in str(error), str(error)


def test_every_registered_method_is_covered():
    assert {method for method, *_ in BAD_VALUES} == set(available())


def test_the_message_names_the_range():
    with pytest.raises(NdbenchError) as caught:
        get("mkd", epochs=-1)
    assert str(caught.value) == "epochs -1 is not valid (use a whole number >= 1)"
    with pytest.raises(NdbenchError) as caught:
        get("mkd", eval_batch_size=0)
    assert caught.value.fix == "use a whole number >= 1, or None to use batch_size"
    with pytest.raises(NdbenchError) as caught:
        get("defend", queue_length=-1)
    assert caught.value.fix == "use a whole number >= 0; 0 turns the queue off"
    with pytest.raises(NdbenchError) as caught:
        get("msad", crop_scale=(1.0, 0.2))
    assert caught.value.fix == "use a pair (low, high) with low <= high, each a number in (0, 1]"


@pytest.mark.parametrize("method", sorted({m for m, _ in EDGE_VALUES}))
def test_defaults_presets_and_edge_values_construct(method):
    cls = get_class(method)
    defaults = cls()
    for name in cls.preset_names():
        cls.with_preset(cls.resolve_preset(name))
    for setting in ("uni-class", "multi-class"):
        cls.with_preset(f"embedded/{setting}")
    edges = dict(next(values for m, values in EDGE_VALUES if m == method))
    assert get(method, **edges).config == cls.Config(**edges)
    assert cls().config == defaults.config  # unchanged defaults


@pytest.mark.parametrize(
    ("allowed", "good", "bad", "words"),
    [
        (count(), [1, 7], [0, -1, 1.0, True, None, NAN], "a whole number >= 1"),
        (count(0), [0, 3], [-1], "a whole number >= 0"),
        (positive(), [1e-9, 2, 5.0], [0, -1.0, NAN, math.inf, "1"], "a number > 0"),
        (non_negative(), [0, 0.0, 1.5], [-1e-9], "a number >= 0"),
        (between(0, 1, high_open=True), [0, 0.5], [1, 1.0, -0.1], "a number in [0, 1)"),
        (between(0, 1, low_open=True).pair(), [(0.1, 1.0), (0.5, 0.5)], [(0.5, 0.2), (0, 1), (0.5,), 0.5],
         "a pair (low, high) with low <= high, each a number in (0, 1]"),
        (count().each(nonempty=True), [(1,), (2, 3)], [(), (1, 0), 1], "one or more items, each a whole number >= 1"),
        (count().or_none("to pick"), [None, 1], [0], "a whole number >= 1, or None to pick"),
    ],
)
def test_range_admits_and_describes(allowed: Range, good, bad, words):
    assert all(allowed.admits(value) for value in good), good
    assert not any(allowed.admits(value) for value in bad), bad
    assert allowed.describe() == words
    with pytest.raises(NdbenchError, match=r"^x .* is not valid \(use "):
        check_value("x", bad[0], allowed)


def test_cli_set_out_of_range_is_one_line_with_dry_run(splits_root, tmp_path, monkeypatch, capsys):
    """`ndbench run --method knn --set k=0 --dry-run` on built splits: exit 2, one stderr line,
    no traceback, nothing written (k=2 plans the same jobs)."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    out = fresh_out(splits_root, tmp_path)
    args = ["run", "--method", "knn", "--classes", "0", "--weights", "none", "--device", "cpu", "--out", str(out),
            "--dry-run"]
    assert main([*args, "--set", "k=2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main([*args, "--set", "k=0"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0] == "ndbench: error: k 0 is not valid (use a whole number >= 1)", captured.err
    assert "Traceback" not in captured.err + captured.out and not (out / "runs").exists()


@pytest.mark.parametrize(("method", "size", "dry_run"), [("knn", 7, True), ("knn", 7, False), ("mkd", 12, True)])
def test_an_img_size_the_vit_cannot_cut_into_patches_is_refused_before_any_job(
        method, size, dry_run, splits_root, tmp_path, monkeypatch, capsys):
    """The embedded ViT cuts 8 px patches: img_size 7 (below one patch) and 12 (not a multiple)
    are refused in one line, exit 2, before any job runs, with and without --dry-run."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    out = fresh_out(splits_root, tmp_path)
    args = ["run", "--method", method, "--classes", "0", "--weights", "none", "--device", "cpu", "--out", str(out),
            "--set", f"img_size={size}", *(["--dry-run"] if dry_run else [])]
    one_line_error(main(args), capsys.readouterr().err, f"{method}: img_size {size} does not fit its ViT backbone "
                   "ndbench_vit_embedded, whose patches are 8 px", "a positive multiple of 8")
    assert not (out / "runs").exists()


@pytest.mark.parametrize(("method", "overrides", "refused"), [
    ("transformaly", {"img_size": 200}, True),  # vit_base_patch16_224: 16 px patches
    ("transformaly", {"img_size": 224}, False),
    ("defend", {"img_size": 8}, True),
    ("msad", {"img_size": 7}, False),  # a CNN backbone (resnet152): no patches to fit
    ("msad", {"img_size": 100, "backbone": "vit_base_patch16_224.augreg2_in21k_ft_in1k"}, True),
    ("dsvdd", {"img_size": 16}, False),  # no timm backbone
])
def test_check_config_refuses_what_the_vit_cannot_patch(method, overrides, refused):
    cls = get_class(method)
    config = cls(**overrides).config
    if refused:
        with pytest.raises(NdbenchError, match=rf"^{method}: img_size {overrides['img_size']} does not fit"):
            cls.check_config(config)
    else:
        cls.check_config(config)


def test_knn_scores_with_a_vit_at_another_multiple_of_its_patch_size():
    """knn sets its ViT to img_size (as the other ViT methods do), so 16 px works with the
    64 px embedded ViT, and a saved model loads at that size."""
    import torch
    from cnn_fixtures import ToyImages

    detector = get("knn", backbone="ndbench_vit_embedded", weights="none", img_size=16)
    torch.manual_seed(0)
    detector.fit(ToyImages(3, 0, seed=0, size=16), device=torch.device("cpu"))
    test = ToyImages(2, 2, seed=1, size=16)
    scores = detector.score(test, device=torch.device("cpu"))
    assert scores.shape == (4,) and np.isfinite(scores).all()
    loaded = get_class("knn")(detector.config)
    loaded.set_state(detector.state())
    loaded.fitted = True
    assert np.allclose(loaded.score(test, device=torch.device("cpu")), scores)
