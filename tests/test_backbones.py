"""Tests for methods.backbones: weight handling and the ViT feature wrapper (tiny random ViTs)."""

from __future__ import annotations

import time

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from datasets_builders.errors import NdbenchError
from methods.backbones import ViTFeatures, create_backbone, tiny_vit_kwargs

ARCH = "vit_tiny_patch16_224"


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 32 px, patch 8 (16 patches), width 32, depth 2 random ViT in eval mode."""
    torch.manual_seed(seed)
    return create_backbone(ARCH, weights="none", **{**tiny_vit_kwargs(), **overrides}).eval()


def peaked(model: torch.nn.Module) -> torch.nn.Module:
    """Scale every qkv projection so attention is far from uniform (random init is nearly flat)."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(30.0)
    return model


def images(seed: int = 1, batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_cls_attention(model: VisionTransformer, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """CLS row of the last block's attention as timm's unfused path computes it, via a hook."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        model.forward_features(x)
    finally:
        handle.remove()
    row = seen[0][:, :, 0, prefix:].mean(dim=1)
    return row / row.sum(dim=-1, keepdim=True)


def test_shapes_properties_and_timm_agreement():
    model = tiny_vit()
    vit = ViTFeatures(model)
    x = images()
    with torch.no_grad():
        out = vit.forward_features(x, return_blocks=True)
        assert vit.tokens(x).shape == (2, 17, 32)
        assert out["last"].shape == (2, 17, 32)
        assert out["cls"].shape == (2, 32)
        assert out["patches"].shape == (2, 16, 32)
        assert [b.shape for b in out["blocks"]] == [(2, 17, 32), (2, 17, 32)]
        assert "cls_attention" not in out
        torch.testing.assert_close(out["last"], model.forward_features(x))
        torch.testing.assert_close(vit(x), out["last"])
        torch.testing.assert_close(out["cls"], out["last"][:, 0])
    assert (vit.embed_dim, vit.num_patches, vit.depth, vit.num_prefix_tokens) == (32, 16, 2, 1)
    assert (vit.grid_size, vit.patch_size, vit.img_size) == ((4, 4), (8, 8), (32, 32))


def test_cls_attention_matches_unfused_timm_attention():
    model = peaked(tiny_vit())
    vit = ViTFeatures(model)
    x = images()
    with torch.no_grad():
        att = vit.forward_features(x, need_attention=True)["cls_attention"]
        ref = reference_cls_attention(model, x, prefix=1)
    assert att.shape == (2, 16)
    assert att.dtype == torch.float32
    assert bool((att >= 0).all())
    torch.testing.assert_close(att.sum(dim=1), torch.ones(2))
    assert float(att.max() - att.min()) > 0.05  # peaked: a wrong row or block would show
    torch.testing.assert_close(att, ref, atol=1e-6, rtol=1e-5)


def test_cls_attention_is_the_last_blocks():
    model = peaked(tiny_vit(depth=3))
    vit = ViTFeatures(model)
    x = images()
    with torch.no_grad():
        att = vit.forward_features(x, need_attention=True)["cls_attention"]
        inputs, _ = vit.per_block_io(x)
        first = vit.cls_attention(model.blocks[0], inputs[0])
    torch.testing.assert_close(att, vit.cls_attention(model.blocks[2], inputs[2]))
    assert not torch.allclose(att, first, atol=1e-3)


def test_register_tokens_are_prefix_tokens():
    torch.manual_seed(0)
    model = peaked(VisionTransformer(**tiny_vit_kwargs(), reg_tokens=2, no_embed_class=True).eval())
    vit = ViTFeatures(model)
    x = images()
    with torch.no_grad():
        out = vit.forward_features(x, need_attention=True)
        ref = reference_cls_attention(model, x, prefix=3)
        kept = vit.forward_kept(x, torch.arange(16).repeat(2, 1))
    assert vit.num_prefix_tokens == 3
    assert out["last"].shape == (2, 19, 32)
    assert out["patches"].shape == (2, 16, 32)
    torch.testing.assert_close(out["cls_attention"], ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(kept, out["last"], atol=1e-5, rtol=1e-5)


def test_forward_kept_all_in_order_equals_full_forward():
    vit = ViTFeatures(tiny_vit())
    x = images()
    with torch.no_grad():
        full = vit.forward_features(x)["last"]
        kept = vit.forward_kept(x, torch.arange(16).repeat(2, 1))
    torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-5)


def test_forward_kept_subset_runs_a_shorter_sequence():
    model = tiny_vit()
    vit = ViTFeatures(model)
    x = images()
    keep = torch.tensor([[0, 5, 7, 15], [3, 2, 9, 1]])
    lengths = []
    handle = model.blocks[0].register_forward_hook(lambda mod, inp, out: lengths.append(inp[0].shape[1]))
    with torch.no_grad():
        kept = vit.forward_kept(x, keep)
        tokens = vit.tokens(x)
        handle.remove()
        gathered = torch.stack([torch.cat([tokens[i, :1], tokens[i, 1:][keep[i]]]) for i in range(2)])
        expected = vit.forward_tokens(gathered)
        full = vit.forward_features(x)["last"]
    assert kept.shape == (2, 5, 32)
    assert lengths == [5]
    torch.testing.assert_close(kept, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kept[:, 0], full[:, 0], atol=1e-4)  # dropped tokens are really gone


def test_forward_kept_rejects_bad_indices():
    vit = ViTFeatures(tiny_vit())
    with pytest.raises(ValueError, match="16 patches"):
        vit.forward_kept(images(), torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="keep_idx"):
        vit.forward_kept(images(), torch.tensor([0, 1]))


def test_per_block_io_chains():
    vit = ViTFeatures(tiny_vit(depth=3))
    x = images()
    with torch.no_grad():
        inputs, outputs = vit.per_block_io(x)
        last = vit.forward_features(x)["last"]
        tokens = vit.tokens(x)
    assert len(inputs) == len(outputs) == 3
    assert torch.equal(inputs[0], tokens)
    assert torch.equal(outputs[0], inputs[1]) and torch.equal(outputs[1], inputs[2])
    assert not torch.equal(inputs[0], outputs[0])
    torch.testing.assert_close(vit.model.norm(outputs[-1]), last)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_saved_weights_reproduce_outputs(tmp_path, suffix):
    source = tiny_vit(seed=0)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(7)
    loaded = create_backbone(ARCH, weights=path, **tiny_vit_kwargs()).eval()
    fresh = tiny_vit(seed=7)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
        assert not torch.allclose(fresh(x), source(x))


def test_wrapped_prefixed_checkpoint_and_head_dropped(tmp_path):
    source = tiny_vit(seed=0, num_classes=5)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = create_backbone(ARCH, weights=str(path), **tiny_vit_kwargs()).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), source.forward_features(x))
    assert isinstance(loaded.head, torch.nn.Identity)


def test_head_kept_when_it_fits_and_left_at_init_when_not(tmp_path):
    source = tiny_vit(seed=0, num_classes=5)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    same = create_backbone(ARCH, weights=path, **{**tiny_vit_kwargs(), "num_classes": 5})
    assert torch.equal(same.head.weight, source.head.weight)
    other = create_backbone(ARCH, weights=path, **{**tiny_vit_kwargs(), "num_classes": 3})
    assert other.head.weight.shape == (3, 32)
    assert torch.equal(other.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_pos_embed_resampled_to_a_larger_grid(tmp_path):
    source = tiny_vit(seed=0)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = create_backbone(ARCH, weights=path, **tiny_vit_kwargs(img_size=64))
    assert loaded.pos_embed.shape == (1, 65, 32)
    assert torch.equal(loaded.pos_embed[:, :1], source.pos_embed[:, :1])
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda sd: sd.__setitem__("blocks.0.mlp.fc1.weight", torch.zeros(7, 32)),
         ["'blocks.0.mlp.fc1.weight'", "(7, 32)", "(128, 32)"]),
        (lambda sd: sd.__setitem__("extra.weight", torch.zeros(3)), ["unexpected key 'extra.weight'"]),
        (lambda sd: sd.pop("blocks.1.norm1.weight"), ["missing key 'blocks.1.norm1.weight'"]),
    ],
)
def test_mismatching_state_dict_is_one_clear_error(tmp_path, edit, words):
    state = tiny_vit().state_dict()
    edit(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(NdbenchError) as info:
        create_backbone(ARCH, weights=path, **tiny_vit_kwargs())
    message = str(info.value)
    for word in [*words, str(path), ARCH, "--weights"]:
        assert word in message
    assert "\n" not in message


def test_missing_or_unreadable_weights_file(tmp_path):
    with pytest.raises(NdbenchError, match="does not exist") as info:
        create_backbone(ARCH, weights=tmp_path / "nope.safetensors", **tiny_vit_kwargs())
    assert "--weights" in str(info.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NdbenchError, match="junk.pt is not a torch file"):
        create_backbone(ARCH, weights=junk, **tiny_vit_kwargs())
    junk.write_bytes(b"PK not a zip archive after all")
    with pytest.raises(NdbenchError, match="cannot read weights file"):
        create_backbone(ARCH, weights=junk, **tiny_vit_kwargs())


def test_hub_offline_fails_fast_naming_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads these at import; patch the live values too (undone after the test).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    name = "vit_tiny_patch16_224.augreg_in21k"
    start = time.monotonic()
    with pytest.raises(NdbenchError) as info:
        create_backbone(name)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert name in message and "--weights PATH" in message and "--weights none" in message
    assert "\n" not in message
    assert not [f for f in tmp_path.rglob("*") if f.suffix in (".safetensors", ".bin", ".pth", ".npz")]


def test_names_without_weights_or_unknown():
    with pytest.raises(NdbenchError, match="unknown timm model 'vit_nonexistent_model'"):
        create_backbone("vit_nonexistent_model", weights="none")
    with pytest.raises(NdbenchError, match="no pretrained tag 'bogus'"):
        create_backbone(f"{ARCH}.bogus", weights="none")
    with pytest.raises(NdbenchError, match="no pretrained weights for ndbench_vit_embedded") as info:
        create_backbone("ndbench_vit_embedded")
    assert "--weights" in str(info.value)
    with pytest.raises(NdbenchError, match="cannot build"):
        create_backbone(ARCH, weights="none", **tiny_vit_kwargs(), not_an_option=3)


def test_vit_features_rejects_other_models():
    with pytest.raises(NdbenchError, match="not a timm VisionTransformer"):
        ViTFeatures(timm.create_model("resnet18", pretrained=False, num_classes=0))
    no_cls = VisionTransformer(**tiny_vit_kwargs(), class_token=False, global_pool="avg")
    with pytest.raises(NdbenchError, match="no class token"):
        ViTFeatures(no_cls)
