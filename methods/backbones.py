"""timm backbones by name with honest weight handling, and a ViT wrapper for the methods.

`create_backbone` gets weights from timm's hub, from a local file, or (only when asked)
leaves them random; it never falls back to random weights on its own. `ViTFeatures`
exposes what DEFEND, MKD, Transformaly and kNN read from a timm `VisionTransformer`:
tokens, per-block activations, the CLS attention map and a token-dropping forward.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention, resample_abs_pos_embed
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from datasets_builders.errors import NdbenchError

from . import embedded_archs  # noqa: F401  (registers the ndbench_* architectures in timm)
from .weight_sources import HUB, NO_WEIGHTS

WEIGHTS_FIX = "pass --weights PATH (a timm/torch state dict or .safetensors) or --weights none for random init"
# Classifier prefixes of timm models; head keys are dropped when the class count differs.
HEAD_PREFIXES = ("head", "fc", "classifier", "head.fc", "last_linear")


def create_backbone(
    name: str,
    *,
    weights: str | Path | None = HUB,
    num_classes: int = 0,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model `name` with weights from the hub ("hub"), a local file (a path), or random
    init ("none"/None, only when asked). Other keyword arguments (img_size, patch_size, ...)
    go to `timm.create_model`. Raises NdbenchError (naming `--weights`) when weights cannot be had."""
    check_model_name(name)
    if weights == HUB:
        return _from_hub(name, num_classes, timm_kwargs)
    model = _build(name, num_classes, timm_kwargs)
    if weights is None or weights == NO_WEIGHTS:
        return model
    load_weights(model, Path(weights), name=name)
    return model


def pretrained_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std that timm records for the weights `name` (architecture and
    pretrained tag, e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k; the architecture's default
    tag when none is given)."""
    check_model_name(name)
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None:
        model = timm.create_model(name, pretrained=False)
        cfg_dict = getattr(model, "pretrained_cfg", {}) or {}
        return tuple(cfg_dict.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg_dict.get("std", IMAGENET_DEFAULT_STD))
    return tuple(cfg.mean), tuple(cfg.std)


def meta_model(name: str) -> nn.Module | None:
    """The timm model `name` built on the meta device, to read its structure and output shapes:
    no parameters are allocated or initialised, so even ViT-B takes ~0.1 s. None when the
    architecture cannot be built there (its real build then checks it)."""
    check_model_name(name)
    try:
        with torch.device("meta"):
            return timm.create_model(split_model_name_tag(name)[0], pretrained=False, num_classes=0)
    except Exception:
        return None


@functools.cache
def vit_patch_size(name: str) -> tuple[int, int] | None:
    """The patch size of the timm model `name` when it is a VisionTransformer, else None."""
    model = meta_model(name)
    if not isinstance(model, VisionTransformer):
        return None
    return tuple(int(side) for side in model.patch_embed.patch_size)


def check_img_size(name: str, img_size: int, method: str) -> None:
    """Raise one NdbenchError when the backbone `name` is a ViT whose patches do not tile an
    `img_size` image (it must be a positive multiple of the patch size); other backbones pass."""
    patch = vit_patch_size(name)
    step = math.lcm(*patch) if patch else 1
    if img_size >= step and img_size % step == 0:
        return
    shown = "x".join(map(str, dict.fromkeys(patch)))
    raise NdbenchError(f"{method}: img_size {img_size} does not fit its ViT backbone {name}, whose patches are "
                       f"{shown} px", f"use --set img_size=N with N a positive multiple of {step}, "
                       f"e.g. img_size={max(step, img_size // step * step)}")


def check_model_name(name: str) -> None:
    """Raise one NdbenchError unless timm knows the model `name` (and its pretrained tag, if any)."""
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise NdbenchError(
            f"unknown timm model {name!r}",
            "use a name from timm.list_models(), e.g. vit_base_patch16_224.augreg_in21k",
        )
    if tag:
        try:
            get_pretrained_cfg(name)
        except RuntimeError as exc:
            raise NdbenchError(
                f"timm model {arch!r} has no pretrained tag {tag!r}",
                f"use one of timm.list_models({arch!r}, pretrained=True)",
            ) from exc


def _build(name: str, num_classes: int, timm_kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **timm_kwargs)
    except TypeError as exc:  # an option the architecture does not take
        raise NdbenchError(
            f"cannot build {name} with options {timm_kwargs}: {_first_line(exc)}",
            "check the backbone options",
        ) from exc


def _from_hub(name: str, num_classes: int, timm_kwargs: dict[str, Any]) -> nn.Module:
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    source = cfg and (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict)
    if not source:
        raise NdbenchError(f"timm has no pretrained weights for {name}", WEIGHTS_FIX)
    try:
        model = _build(name, num_classes, timm_kwargs, pretrained=True)
    except NdbenchError:
        raise
    except Exception as exc:  # offline, no cache, HTTP errors, bad download: all say the same
        raise NdbenchError(
            f"could not get pretrained weights for {name} from the timm hub: "
            f"{type(exc).__name__}: {_first_line(exc)}",
            WEIGHTS_FIX,
        ) from exc
    bad = first_non_finite(model.state_dict())
    if bad:
        raise NdbenchError(f"the timm hub weights of {name} hold NaN or infinite values (in {bad!r})",
                           "delete the damaged download from the hub cache (~/.cache/huggingface) and run again, "
                           "or pass --weights PATH")
    return model


def first_non_finite(state: dict[str, Tensor]) -> str | None:
    """The first key of a state dict whose floating-point tensor holds NaN or infinity."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a local weights file (.safetensors, or a torch file holding a state dict,
    possibly under "state_dict"/"model"), with any leading "module." stripped."""
    path = Path(path)
    if not path.is_file():
        raise NdbenchError(f"weights file {path} does not exist", WEIGHTS_FIX)
    with path.open("rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle); torch.load reads other
    # bytes as a pickle and fails with messages such as "KeyError: 105".
    if path.suffix != ".safetensors" and not (head == b"PK" or head[:1] == b"\x80"):
        raise NdbenchError(f"weights file {path} is not a torch file (nor named .safetensors)", WEIGHTS_FIX)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that weights_only refuses
        raise NdbenchError(f"cannot read weights file {path}: {_first_line(exc)}", WEIGHTS_FIX) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise NdbenchError(f"weights file {path} holds no state dict", WEIGHTS_FIX)
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_weights(model: nn.Module, path: Path, *, name: str = "") -> None:
    """Load a local weights file into `model`, strictly except for the classifier head (dropped
    when its shape differs; kept at init when absent). ViT position embeddings are resampled
    to the model's grid as timm does for hub weights."""
    from .weights_arch import check_backbone_weights, own_weights, state_shapes, weight_shapes

    name = name or type(model).__name__
    # A safetensors file's header tells its architecture before its tensors are read.
    state = None if path.suffix == ".safetensors" else read_state_dict(path)
    check_backbone_weights(model, name, path, weight_shapes(path) if state is None else state_shapes(state))
    state = read_state_dict(path) if state is None else state
    expected = model.state_dict()
    heads = head_prefixes(model)

    def fail(problem: str) -> NdbenchError:
        return NdbenchError(f"weights file {path} does not fit {name}: {problem}", own_weights(name))

    if isinstance(model, VisionTransformer) and "pos_embed" in state and model.pos_embed is not None:
        state["pos_embed"] = _resample_pos_embed(model, state["pos_embed"], fail)

    kept: dict[str, Tensor] = {}
    for key, value in state.items():
        head = is_head(key, heads)
        if key not in expected:
            if head:
                continue
            raise fail(f"unexpected key {key!r}")
        if not isinstance(value, Tensor):
            raise fail(f"key {key!r} is not a tensor")
        if value.shape != expected[key].shape:
            if head:
                continue
            raise fail(f"key {key!r} has shape {tuple(value.shape)}, the model {tuple(expected[key].shape)}")
        kept[key] = value
    missing = [k for k in expected if k not in kept and not is_head(k, heads)]
    if missing:
        raise fail(f"missing key {missing[0]!r} ({len(missing)} missing)")
    bad = first_non_finite(kept)
    if bad:
        raise NdbenchError(f"weights file {path} holds NaN or infinite values (first in {bad!r})", WEIGHTS_FIX)
    model.load_state_dict(kept, strict=False)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The key prefixes of `model`'s classifier head (timm's record of it, and the usual names)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    named = (named,) if isinstance(named, str) else tuple(named or ())
    return tuple(dict.fromkeys(named + HEAD_PREFIXES))


def is_head(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the state-dict `key` belongs to a head with one of these `prefixes`."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _resample_pos_embed(model: VisionTransformer, pos: Tensor, fail) -> Tensor:
    if not isinstance(pos, Tensor) or pos.shape == model.pos_embed.shape:
        return pos
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    if pos.ndim != 3 or pos.shape[-1] != model.pos_embed.shape[-1]:
        raise fail(f"key 'pos_embed' has shape {tuple(pos.shape)}, the model {tuple(model.pos_embed.shape)}")
    try:
        return resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    except Exception as exc:  # a non-square old grid cannot be inferred
        raise fail(f"cannot resample 'pos_embed' {tuple(pos.shape)}: {_first_line(exc)}") from exc


class ViTFeatures(nn.Module):
    """What the methods read from a timm `VisionTransformer` with a class token.

    Token sequences are `[prefix tokens, patch tokens]`: the CLS token first, then any register
    tokens (supported; `num_prefix_tokens` counts them), then the N patches in raster order.
    For a standard ViT that is `[B, 1+N, D]`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, VisionTransformer):
            raise NdbenchError(
                f"backbone {type(model).__name__} is not a timm VisionTransformer",
                "choose a ViT backbone (vit_*) for this method",
            )
        if model.cls_token is None:
            raise NdbenchError(
                "the ViT backbone has no class token; this method reads the CLS token",
                "choose a ViT with a class token (e.g. vit_base_patch16_224.augreg_in21k)",
            )
        self.model = model

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.patch_size)

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.img_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def embed(self, x: Tensor) -> Tensor:
        """Patch embedding plus position embedding (and prefix tokens): [B, P+N, D]."""
        return self.model._pos_embed(self.model.patch_embed(x))

    def tokens(self, x: Tensor) -> Tensor:
        """The sequence the first block sees, as timm builds it: [B, P+N, D]."""
        return self.model.norm_pre(self.model.patch_drop(self.embed(x)))

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """All blocks and the final norm on an already-embedded sequence (any length)."""
        return self.model.norm(self.model.blocks(tokens))

    def forward(self, x: Tensor) -> Tensor:
        """Final-normed tokens [B, P+N, D]."""
        return self.forward_tokens(self.tokens(x))

    def forward_features(
        self, x: Tensor, *, return_blocks: bool = False, need_attention: bool = False
    ) -> dict[str, Any]:
        """A dict with "last" (final-normed tokens [B, P+N, D]), "cls" [B, D], "patches"
        [B, N, D]; "blocks" (each block's output [B, P+N, D]) when `return_blocks`;
        "cls_attention" [B, N] (float32) when `need_attention`.

        "cls_attention" is the last block's softmax attention row of the CLS query (over all
        keys, prefix tokens included), restricted to the patch keys, averaged over heads and
        renormalised to sum to 1 over the patches.
        """
        return self.forward_features_from(self.tokens(x), 0, return_blocks=return_blocks,
                                          need_attention=need_attention)

    def prefix_tokens(self, x: Tensor, stop: int) -> Tensor:
        """The output of blocks 0..stop-1 [B, P+N, D]: what block `stop` sees."""
        h = self.tokens(x)
        for block in self.model.blocks[:stop]:
            h = block(h)
        return h

    def forward_features_from(
        self, h: Tensor, start: int, *, return_blocks: bool = False, need_attention: bool = False
    ) -> dict[str, Any]:
        """`forward_features` from the input of block `start` (e.g. `prefix_tokens(x, start)`,
        computed once for a frozen prefix): only blocks start.. run, and "blocks" holds their
        outputs only."""
        if not 0 <= start < self.depth:
            raise ValueError(f"start must be a block of the {self.depth}, got {start}")
        blocks: list[Tensor] = []
        last_input = h
        for block in self.model.blocks[start:]:
            last_input = h
            h = block(h)
            if return_blocks:
                blocks.append(h)
        last = self.model.norm(h)
        p = self.num_prefix_tokens
        out: dict[str, Any] = {"last": last, "cls": last[:, 0], "patches": last[:, p:]}
        if return_blocks:
            out["blocks"] = blocks
        if need_attention:
            out["cls_attention"] = self.cls_attention(self.model.blocks[-1], last_input)
        return out

    def cls_attention(self, block: nn.Module, block_input: Tensor) -> Tensor:
        """CLS-to-patch attention of `block` given its input (see `forward_features`): [B, N]."""
        attn = getattr(block, "attn", None)
        if not isinstance(block, Block) or not isinstance(attn, Attention):
            raise NdbenchError(
                f"cannot read attention from a {type(block).__name__} block",
                "choose a standard timm ViT (pre-norm Block with timm Attention)",
            )
        b, t, _ = block_input.shape
        qkv = attn.qkv(block.norm1(block_input))
        qkv = qkv.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])  # only the CLS query is needed
        with torch.autocast(device_type=block_input.device.type, enabled=False):  # fp32 softmax
            logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, T]
            row = logits.softmax(dim=-1)[:, :, 0, self.num_prefix_tokens :].mean(dim=1)
        return row / row.sum(dim=-1, keepdim=True)

    def forward_kept(self, x: Tensor, keep_idx: Tensor) -> Tensor:
        """Final-normed tokens [B, P+K, D] when only the patches `keep_idx` [B, K] (indices into
        the N patches, in the order given) enter the blocks, after position embedding: the
        dropped patches are removed from the sequence, not zero-filled, so FLOPs drop.
        timm's random patch dropout is not applied here."""
        h = self.embed(x)
        b, t, d = h.shape
        p = self.num_prefix_tokens
        if keep_idx.ndim != 2 or keep_idx.shape[0] != b:
            raise ValueError(f"keep_idx must be [B={b}, K], got {tuple(keep_idx.shape)}")
        # Range check only off the GPU: on CUDA it would force a sync on every batch.
        if not keep_idx.is_cuda and keep_idx.numel():
            if int(keep_idx.min()) < 0 or int(keep_idx.max()) >= t - p:
                raise ValueError(f"keep_idx must index the {t - p} patches")
        index = keep_idx.to(h.device, torch.long).unsqueeze(-1).expand(-1, -1, d)
        kept = torch.cat([h[:, :p], torch.gather(h[:, p:], 1, index)], dim=1)
        return self.forward_tokens(self.model.norm_pre(kept))

    def per_block_io(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The input and the output of every block, each [B, P+N, D] (no final norm)."""
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        h = self.tokens(x)
        for block in self.model.blocks:
            inputs.append(h)
            h = block(h)
            outputs.append(h)
        return inputs, outputs


def tiny_vit_kwargs(
    img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2, num_heads: int = 2
) -> dict[str, int]:
    """Keyword arguments for a tiny ViT (tests): for `create_backbone("vit_tiny_patch16_224", ...)`,
    `timm.create_model` or `VisionTransformer` directly (num_classes=0 included)."""
    return dict(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        num_classes=0,
    )
