"""The ViT's second pre-training stage: the cosine classifier's loss, its folding into the
plain linear head, and the first stage cached apart from it."""

from __future__ import annotations

import timm
import torch
from torch.nn.functional import cross_entropy

from datasets_builders.embedded import EmbeddedConfig
from methods.cosine_finetune import cosine_logits, cosine_loss, cosine_steps, fold_cosine_head
from methods.pretrain import (
    IGNORE,
    Batch,
    PretrainRecipe,
    cnn_recipe,
    default_weights_path,
    first_stage,
    patch_labels,
)

CNN, VIT = "ndbench_resnet_embedded", "ndbench_vit_embedded"


def _tiny_vit(num_classes: int):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                             num_heads=2, num_classes=num_classes)


def test_cosine_logits_ignore_the_norms_of_tokens_and_weights():
    tokens, weight = torch.randn(3, 5, 16), torch.randn(4, 16)
    logits = cosine_logits(tokens, weight, 10.0)
    assert torch.allclose(logits, cosine_logits(7.0 * tokens, 0.1 * weight, 10.0), atol=1e-5)
    assert logits.shape == (3, 5, 4) and logits.abs().max() <= 10.0 + 1e-5
    assert torch.allclose(cosine_logits(weight[:1], weight, 10.0)[0, 0], torch.tensor(10.0))


def test_the_cosine_loss_is_the_cls_and_box_token_cross_entropies():
    vit = _tiny_vit(11)  # ten classes and background (10)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([4, 6])
    boxes = torch.tensor([[0, 0, 16, 16], [8, 8, 24, 24]])
    recipe = PretrainRecipe(cosine_scale=16.0, token_label_weight=0.5)
    tokens = vit.forward_features(x)
    logits = cosine_logits(tokens, vit.head.weight, 16.0)
    targets = patch_labels(boxes, y, (4, 4), 8, 10)
    expected = cross_entropy(logits[:, 0], y) + 0.5 * cross_entropy(
        logits[:, 1:].flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert torch.allclose(cosine_loss(vit, Batch(x, y, boxes, background=10), recipe), expected)
    no_tokens = PretrainRecipe(cosine_scale=16.0, token_label_weight=0.0)
    assert torch.allclose(cosine_loss(vit, Batch(x, y, boxes, 10), no_tokens), cross_entropy(logits[:, 0], y))


def test_the_folded_linear_head_decides_as_the_cosine_classifier():
    vit = _tiny_vit(7).eval()
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    from methods.pretrain import to_input

    with torch.no_grad():
        vit.head.bias.fill_(3.0)
        tokens = vit.forward_features(to_input(images, 32))
        cosine = cosine_logits(tokens, vit.head.weight, 32.0)
        fold_cosine_head(vit, images, 32.0, torch.device("cpu"))
        linear = vit.head(tokens)
    assert torch.equal(vit.head.bias, torch.zeros(7))
    assert torch.equal(linear.argmax(-1), cosine.argmax(-1))
    # Scaled by the mean token norm, the logits are as large as the cosine ones on average.
    assert torch.allclose(linear.abs().mean(), cosine.abs().mean(), rtol=0.3)


def test_cosine_steps_count_a_fraction_of_an_epoch():
    assert cosine_steps(PretrainRecipe(cosine_epochs=0.5, batch_size=64), 1000) == 8
    assert cosine_steps(PretrainRecipe(cosine_epochs=0.0), 1000) == 0
    assert cosine_steps(cnn_recipe(PretrainRecipe()), 1000) == 0


def test_every_second_stage_shares_the_first_stages_cache(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from methods.pretrain import pretrain

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    data = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=96)
    recipe = PretrainRecipe(epochs=1, teacher_epochs=1, batch_size=32, cosine_epochs=1.0)
    assert first_stage(recipe) == first_stage(PretrainRecipe(epochs=1, teacher_epochs=1, batch_size=32,
                                                             cosine_scale=8.0, cosine_lr=1e-3))
    teacher = pretrain(CNN, data=data, recipe=cnn_recipe(recipe))
    tuned = pretrain(VIT, data=data, recipe=recipe, teacher_weights=teacher.weights)
    first = default_weights_path(VIT, data, first_stage(recipe))
    assert first.is_file() and tuned.weights != first
    before, after = load_file(str(first)), load_file(str(tuned.weights))
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert torch.equal(after["head.bias"], torch.zeros_like(after["head.bias"]))
    assert tuned.train_seconds > 0 and 0.0 <= tuned.heldout_accuracy <= 1.0

    stamp = first.stat().st_mtime_ns
    other = pretrain(VIT, data=data, recipe=PretrainRecipe(epochs=1, teacher_epochs=1, batch_size=32,
                                                           cosine_epochs=1.0, cosine_scale=8.0),
                     teacher_weights=teacher.weights)
    assert first.stat().st_mtime_ns == stamp  # the first stage was not trained again
    assert other.weights not in (first, tuned.weights)
