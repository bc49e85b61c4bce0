"""Pre-training recipes: which recipe each architecture gets, where its weights are cached,
the losses (token labels from the image or the glyph's box, distillation) and the schedule."""

from __future__ import annotations

import pytest
import torch

from datasets_builders.embedded import EmbeddedConfig
from datasets_builders.errors import NdbenchError
from methods.pretrain import (
    BACKGROUND,
    IGNORE,
    Batch,
    PretrainRecipe,
    box_patch_overlap,
    cnn_recipe,
    default_recipe,
    default_weights_path,
    head_classes,
    patch_labels,
    training_loss,
    warmup_cosine,
)

CNN, VIT = "ndbench_resnet_embedded", "ndbench_vit_embedded"


def test_vits_get_the_dense_recipe_and_cnns_the_short_one():
    assert default_recipe(VIT) == PretrainRecipe() and default_recipe(VIT).dense_teacher == CNN
    cnn = default_recipe(CNN)
    assert (cnn.epochs, cnn.dense_teacher, cnn.token_labels, cnn.distill_weight) == (
        PretrainRecipe().teacher_epochs, None, "none", 0.0)
    with pytest.raises(NdbenchError, match="cannot build model"):
        default_recipe("not_a_timm_model")
    with pytest.raises(NdbenchError, match="token_labels"):
        PretrainRecipe(token_labels="pixels")


def test_box_token_labels_add_a_background_class():
    pool = ("digit-0", "digit-1")
    assert head_classes(pool, PretrainRecipe(token_labels="box")) == (*pool, BACKGROUND)
    assert head_classes(pool, PretrainRecipe(token_labels="image")) == pool
    assert head_classes(pool, cnn_recipe(PretrainRecipe())) == pool


def test_the_vits_dense_teacher_is_the_cnn_methods_backbone(tmp_path, monkeypatch):
    """One CNN pre-training serves both (it used to be trained twice, 3 and 10 epochs)."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path))
    data = EmbeddedConfig()
    teacher = default_weights_path(CNN, data, cnn_recipe(default_recipe(VIT)))
    assert teacher == default_weights_path(CNN, data, default_recipe(CNN))
    assert teacher.parent == tmp_path / "pretrained"
    assert default_weights_path(VIT, data, default_recipe(VIT)) != teacher


def test_pretraining_is_reproducible_whatever_ran_before(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from methods.pretrain import pretrain

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    data = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=128)
    recipe = cnn_recipe(PretrainRecipe(teacher_epochs=1, batch_size=32))
    weights = []
    for i, prior in enumerate((0, 123)):
        torch.manual_seed(prior)  # another global RNG state, as other work in the process leaves it
        result = pretrain(CNN, out=tmp_path / f"w{i}.safetensors", data=data, recipe=recipe, force=True)
        weights.append(load_file(str(result.weights)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_weights_at_out_are_reused_only_for_the_arch_data_and_recipe_they_were_trained_with(tmp_path, monkeypatch):
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from methods.pretrain import RECIPE_VERSION, pretrain

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    data, recipe = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=128), default_recipe(CNN)
    out = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(out))
    info = {"arch": CNN, "heldout_accuracy": 0.5, "train_seconds": 1.0, "recipe": asdict(recipe),
            "recipe_version": RECIPE_VERSION, "data": asdict(data)}
    out.with_suffix(".json").write_text(json.dumps(info, default=str))
    assert pretrain(CNN, out=out, data=data, recipe=recipe).cached  # the same run: reused
    # An earlier run of the ViT wrote the file (nothing is trained: the check comes first).
    out.with_suffix(".json").write_text(json.dumps({**info, "arch": VIT}, default=str))
    with pytest.raises(NdbenchError, match=f"of '{VIT}' that differ from '{CNN}' as asked in: arch") as caught:
        pretrain(CNN, out=out, data=data, recipe=recipe)
    assert "--force" in caught.value.fix
    out.with_suffix(".json").write_text(json.dumps(info, default=str))
    with pytest.raises(NdbenchError, match=r"as asked in: data \("):
        pretrain(CNN, out=out, data=EmbeddedConfig(), recipe=recipe)


def test_box_overlap_and_patch_labels():
    # 4x4 grid of 8 px patches; box 1 covers patch (0, 0) fully and half of patch (0, 1); box 2
    # is a 4x4 box inside patch (3, 3).
    boxes = torch.tensor([[0, 0, 12, 8], [25, 25, 4, 4]])
    overlap = box_patch_overlap(boxes, (4, 4), 8)
    assert overlap.shape == (2, 16)
    assert overlap[0, :3].tolist() == [1.0, 0.5, 0.0] and overlap[0, 4:].sum() == 0
    assert overlap[1, 15] == 1.0 and overlap[1, :15].sum() == 0  # a box inside a patch covers it
    labels = patch_labels(boxes[:1], torch.tensor([7]), (4, 4), 8, background=9)
    assert labels[0, :2].tolist() == [7, 7] and labels[0, 2:].tolist() == [9] * 14
    partial = patch_labels(torch.tensor([[0, 0, 10, 10]]), torch.tensor([3]), (4, 4), 8, background=9)
    assert partial[0, [0, 1, 4, 5, 2]].tolist() == [3, IGNORE, IGNORE, IGNORE, 9]


def _tiny_vit(num_classes: int):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                             num_classes=num_classes)


def test_vit_patch_tokens_are_trained_to_predict_the_image_label():
    """Token labelling: each patch token, through the classifier head, is scored against the
    image's label, so the teacher's patch features carry the object's class."""
    from torch.nn.functional import cross_entropy

    vit = _tiny_vit(10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 9])
    batch = Batch(x, y, torch.zeros(4, 4, dtype=torch.long))
    tokens = vit.forward_features(x)
    plain = cross_entropy(vit.forward_head(tokens), y)
    per_token = torch.stack([cross_entropy(vit.head(tokens[i, 1:]), y[i].repeat(16)) for i in range(4)]).mean()
    labelled = PretrainRecipe(dense_teacher=None, token_labels="image", token_label_weight=0.5)
    assert torch.allclose(training_loss(vit, None, batch, labelled), plain + 0.5 * per_token)
    off = PretrainRecipe(dense_teacher=None, token_label_weight=0.0)
    assert torch.allclose(training_loss(vit, None, batch, off), plain)


def test_box_token_labels_score_each_patch_against_its_own_label():
    from torch.nn.functional import cross_entropy

    vit = _tiny_vit(11)  # ten classes and background (10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([4, 6])
    boxes = torch.tensor([[0, 0, 16, 16], [8, 8, 24, 24]])
    batch = Batch(x, y, boxes, background=10)
    tokens = vit.forward_features(x)
    targets = patch_labels(boxes, y, (4, 4), 8, 10)
    assert (targets == 10).any() and (targets == 4).any() and (targets == 6).any()
    per_patch = cross_entropy(vit.head(tokens[:, 1:]).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    recipe = PretrainRecipe(dense_teacher=None, token_labels="box", token_label_weight=0.5)
    expected = cross_entropy(vit.forward_head(tokens), y) + 0.5 * per_patch
    assert torch.allclose(training_loss(vit, None, batch, recipe), expected)


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=10, warmup_fraction=0.2)
    values = [factor(step) for step in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(values[1:], values[2:], strict=False)) and values[-1] < 0.05
    assert warmup_cosine(total_steps=3, warmup_fraction=0.01)(0) == 1.0  # at least one warm-up step


def test_the_vits_cnn_stem_is_the_cnns_first_two_stages():
    import timm

    torch.manual_seed(0)
    cnn = timm.create_model(CNN, num_classes=0).eval()
    vit = timm.create_model(VIT, num_classes=0).eval()
    assert tuple(vit.patch_embed.patch_size) == (8, 8) and tuple(vit.patch_embed.grid_size) == (8, 8)
    vit.patch_embed.load_cnn_stem(cnn.state_dict())
    x = torch.randn(2, 3, 64, 64)
    stride8 = cnn.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    with torch.no_grad():
        assert torch.allclose(vit.patch_embed.backbone(x), stride8)
        assert vit.forward_features(x).shape == (2, 1 + 64, 128)
    with pytest.raises(ValueError, match="lacks"):
        vit.patch_embed.load_cnn_stem({})


def test_the_stem_runs_channels_last_with_the_same_tokens_and_plainly_stored_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    embed = timm.create_model(VIT, num_classes=0).eval().patch_embed
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain = embed.norm(embed.proj(embed.backbone(x.contiguous())).flatten(2).transpose(1, 2))
        assert torch.allclose(embed(x), plain, atol=1e-5)
    # The layout is the input's only: the weights stay contiguous, so safetensors saves them as is.
    save_file(embed.state_dict(), str(tmp_path / "stem.safetensors"))


def test_pretraining_starts_the_vit_stem_from_its_teacher(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from methods.pretrain import pretrain

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    data = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=64)
    recipe = PretrainRecipe(epochs=0, teacher_epochs=1, batch_size=32, cosine_epochs=0.0)
    teacher = pretrain(CNN, out=tmp_path / "cnn.safetensors", data=data, recipe=cnn_recipe(recipe))
    vit = pretrain(VIT, out=tmp_path / "vit.safetensors", data=data, recipe=recipe, teacher_weights=teacher.weights)
    cnn_state, vit_state = load_file(str(teacher.weights)), load_file(str(vit.weights))
    assert torch.equal(vit_state["patch_embed.backbone.0.weight"], cnn_state["conv1.weight"])
    assert torch.equal(vit_state["patch_embed.backbone.5.0.conv2.weight"], cnn_state["layer2.0.conv2.weight"])


def test_one_teacher_pass_gives_its_stride8_targets_and_its_logits():
    import timm

    from methods.pretrain import DenseTargetHead

    torch.manual_seed(0)
    cnn = timm.create_model(CNN, num_classes=12).eval()
    head = DenseTargetHead(timm.create_model(VIT, num_classes=12), cnn, 64)
    x = torch.randn(2, 3, 64, 64)
    feature, logits = head.teacher_outputs(x)
    with torch.no_grad():
        stride8 = cnn.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        assert torch.allclose(logits, cnn(x), atol=1e-5)
    assert feature.shape == (2, 64, stride8.shape[1])
    assert torch.allclose(feature, stride8.flatten(2).transpose(1, 2))  # already at the 8x8 grid


def test_off_a_terminal_each_stage_and_epoch_is_one_plain_line(tmp_path, monkeypatch):
    """Into a file or a pipe rich draws no bar, only a blank line at the end: a log of a
    30-minute pre-training showed nothing of how far it was."""
    import io

    from rich.console import Console

    from datasets_builders.embedded import ensure_embedded
    from methods.pretrain import pretrain

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    data = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=64)
    ensure_embedded(data, console=Console(file=io.StringIO()))
    log = io.StringIO()
    recipe = PretrainRecipe(epochs=2, teacher_epochs=2, batch_size=32, cosine_epochs=0.5)
    teacher = pretrain(CNN, out=tmp_path / "cnn.safetensors", data=data, recipe=cnn_recipe(recipe),
                       console=Console(file=log))
    pretrain(VIT, out=tmp_path / "vit.safetensors", data=data, recipe=recipe, teacher_weights=teacher.weights,
             console=Console(file=log))
    lines = [line.split(" (0:")[0] for line in log.getvalue().splitlines()]  # without the time taken
    assert lines == [
        "rendering the pre-training pool (64 images)",  # the ViT's pool is read back from the cache
        f"pre-training {CNN}: 0/4 steps",
        f"pre-training {CNN}: epoch 1 of 2 done",
        f"pre-training {CNN}: epoch 2 of 2 done",
        f"pre-training {VIT}: 0/4 steps",
        f"pre-training {VIT}: epoch 1 of 2 done",
        f"pre-training {VIT}: epoch 2 of 2 done",
        f"fine-tuning {VIT} (cosine classifier): 0/1 steps",
        f"fine-tuning {VIT} (cosine classifier): 1/1 steps",
    ]


def test_on_a_terminal_the_stage_progress_is_a_bar_and_no_plain_line():
    import io

    from rich.console import Console

    from methods.pretrain import StageProgress

    screen = io.StringIO()
    with StageProgress(Console(file=screen, force_terminal=True, width=80), every=2, per_epoch=True) as progress:
        task = progress.add_task("pre-training x", total=4)
        for _ in range(4):
            progress.advance(task)
    assert "epoch" not in screen.getvalue() and "0/4 steps" not in screen.getvalue()
