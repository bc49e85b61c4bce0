"""Pre-training recipes: which recipe each architecture gets, and where its weights are cached."""

from __future__ import annotations

import pytest

from datasets_builders.embedded import EmbeddedConfig
from datasets_builders.errors import NdbenchError
from methods.pretrain import PretrainRecipe, cnn_recipe, default_recipe, default_weights_path

CNN, VIT = "ndbench_resnet_embedded", "ndbench_vit_embedded"


def test_vits_get_the_dense_recipe_and_cnns_the_short_one():
    assert default_recipe(VIT) == PretrainRecipe() and default_recipe(VIT).dense_teacher == CNN
    cnn = default_recipe(CNN)
    assert (cnn.epochs, cnn.dense_teacher) == (PretrainRecipe().teacher_epochs, None)
    with pytest.raises(NdbenchError, match="cannot build model"):
        default_recipe("not_a_timm_model")


def test_the_vits_dense_teacher_is_the_cnn_methods_backbone(tmp_path, monkeypatch):
    """One CNN pre-training serves both (it used to be trained twice, 3 and 10 epochs)."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path))
    data = EmbeddedConfig()
    teacher = default_weights_path(CNN, data, cnn_recipe(default_recipe(VIT)))
    assert teacher == default_weights_path(CNN, data, default_recipe(CNN))
    assert teacher.parent == tmp_path / "pretrained"
    assert default_weights_path(VIT, data, default_recipe(VIT)) != teacher


def test_pretraining_is_reproducible_whatever_ran_before(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from methods.pretrain import pretrain

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    data = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=128)
    recipe = PretrainRecipe(epochs=1, batch_size=32, dense_teacher=None)
    weights = []
    for i, prior in enumerate((0, 123)):
        torch.manual_seed(prior)  # another global RNG state, as other work in the process leaves it
        result = pretrain(CNN, out=tmp_path / f"w{i}.safetensors", data=data, recipe=recipe, force=True)
        weights.append(load_file(str(result.weights)))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_vit_patch_tokens_are_trained_to_predict_the_image_label():
    """Token labelling: each patch token, through the classifier head, is scored against the
    image's label, so the teacher's patch features carry the object's class."""
    import timm
    import torch
    from torch.nn.functional import cross_entropy

    from methods.pretrain import training_loss

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            depth=1, num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 9])
    tokens = vit.forward_features(x)
    plain = cross_entropy(vit.forward_head(tokens), y)
    per_token = torch.stack([cross_entropy(vit.head(tokens[i, 1:]), y[i].repeat(16)) for i in range(4)]).mean()
    labelled = PretrainRecipe(dense_teacher=None, token_label_weight=0.5)
    assert torch.allclose(training_loss(vit, None, x, y, labelled), plain + 0.5 * per_token)
    off = PretrainRecipe(dense_teacher=None, token_label_weight=0.0)
    assert torch.allclose(training_loss(vit, None, x, y, off), plain)
    assert cnn_recipe(PretrainRecipe()).token_label_weight == 0.0  # CNNs have no tokens
