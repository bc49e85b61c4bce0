"""Offline supervised pre-training of small backbones on the embedded object-centric pool.

This stands in for the paper's ImageNet-21k pre-training: the pool holds one large digit
per image and shares no digit instance with any scene. Weights are cached, keyed by
(architecture, embedded data, recipe), so every later run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
from rich.console import Console
from rich.progress import Progress
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from datasets_builders.atomic import atomic_write_text, write_error
from datasets_builders.embedded import EmbeddedConfig, cache_root, load_pretrain_set
from datasets_builders.errors import NdbenchError

from . import embedded_archs  # noqa: F401  (registers the embedded architectures in timm)
from .backbones import create_backbone, first_non_finite, read_state_dict

EMBEDDED_WEIGHTS = "embedded"  # the `weights` value that means "pre-trained by ndbench"
DEFAULT_ARCH = "ndbench_vit_embedded"
RECIPE_VERSION = "4"  # 4: token labels; 3: initial weights seeded (2 drew them from the global RNG)


@dataclass(frozen=True)
class PretrainRecipe:
    """Supervised recipe. Planning measured that a ViT trained from scratch needs warm-up
    (OneCycle, AdamW, batch 64) and ~10 epochs of ~6,000 object-centric images. On ndbench's
    rendered pool that plain recipe stayed at chance (measured: 9.8 % held-out after 10 epochs
    at peak lr 3e-4, and no progress at 1e-3), while a small CNN learns in 2 epochs. So ViTs
    also regress, from each patch token, the stride-8 feature map of a quickly trained CNN
    (`dense_teacher`, a grid that matches the 8x8 patch grid): a local target for every token
    that gets the transformer off its plateau (measured: ~73 % train accuracy after 6 epochs)."""

    epochs: int = 10
    batch_size: int = 64
    peak_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.2
    holdout_fraction: float = 0.1
    seed: int = 0
    dense_teacher: str | None = "ndbench_resnet_embedded"  # None: plain supervised training
    dense_weight: float = 1.0
    # Token labelling (Jiang et al. 2021, "All Tokens Matter"): every patch token, through the
    # classifier head, also predicts the image's class. Without it the patch tokens only
    # describe local strokes: measured on embedded uni-class 0/3/6/9, a patch-level kNN over
    # teacher patch tokens scored AUROC 45.2 and mkd 49.0 (chance); at weight 0.5 they score
    # 58.1 and 57.6 (defend 60.8), while CLS-token knn moved 61.7 -> 60.7. Weight 1.0 cost knn
    # more (AVG 59.1 -> 54.1 over ten classes).
    token_label_weight: float = 0.5
    teacher_epochs: int = 3  # the CNN teacher's own recipe: same optimiser, these many epochs


@dataclass(frozen=True)
class PretrainResult:
    """Where the weights are and how good they are."""

    weights: Path
    arch: str
    heldout_accuracy: float
    train_seconds: float
    cached: bool


def pretrain_key(arch: str, data: EmbeddedConfig, recipe: PretrainRecipe) -> str:
    """Content key of a pre-training run: architecture, data and recipe."""
    payload = {
        "arch": arch,
        "data": asdict(data),
        "recipe": asdict(recipe),
        "version": RECIPE_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def cnn_recipe(recipe: PretrainRecipe) -> PretrainRecipe:
    """The recipe of a CNN: `teacher_epochs` of plain supervised training. The ViT's dense
    teacher and the CNN methods' embedded backbone are then one and the same cached file."""
    return replace(recipe, epochs=recipe.teacher_epochs, dense_teacher=None, token_label_weight=0.0)


def default_recipe(arch: str) -> PretrainRecipe:
    """The default recipe for `arch`: the ViT recipe for ViTs, `cnn_recipe` for the others."""
    try:
        is_vit = isinstance(timm.create_model(arch, pretrained=False), VisionTransformer)
    except (RuntimeError, ValueError) as exc:
        raise NdbenchError(f"cannot build model {arch!r}: {exc}", "pass a timm model name to --arch") from exc
    return PretrainRecipe() if is_vit else cnn_recipe(PretrainRecipe())


def default_weights_path(arch: str, data: EmbeddedConfig, recipe: PretrainRecipe) -> Path:
    """The cache file of a pre-training run."""
    return cache_root() / "pretrained" / f"{arch}-{pretrain_key(arch, data, recipe)}.safetensors"


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.5  # mean/std 0.5, as the embedded archs' configs say


def pretrain(
    arch: str = DEFAULT_ARCH,
    *,
    out: Path | None = None,
    data: EmbeddedConfig | None = None,
    recipe: PretrainRecipe | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
    force: bool = False,
) -> PretrainResult:
    """Train `arch` (a timm name) to classify the object-centric pool; cache and return it."""
    data = data or EmbeddedConfig()
    recipe = recipe or default_recipe(arch)
    device = device or torch.device("cpu")
    out = Path(out) if out is not None else default_weights_path(arch, data, recipe)
    info_path = out.with_suffix(".json")
    if out.is_file() and info_path.is_file() and not force:
        info = _read_cached(out, info_path)
        return PretrainResult(out, arch, info["heldout_accuracy"], info["train_seconds"], True)

    images, labels = load_pretrain_set(data)
    num_classes = int(labels.max()) + 1
    torch.manual_seed(recipe.seed)  # the initial weights too, whatever ran before in this process
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except (RuntimeError, ValueError) as exc:
        raise NdbenchError(f"cannot build model {arch!r}: {exc}", "pass a timm model name to --arch") from exc
    size = _input_size(model)
    teacher = None
    if isinstance(model, VisionTransformer) and recipe.dense_teacher:
        teacher_recipe = cnn_recipe(recipe)
        teacher_weights = pretrain(recipe.dense_teacher, data=data, recipe=teacher_recipe, device=device,
                                   console=console).weights
        teacher = create_backbone(recipe.dense_teacher, weights=teacher_weights, num_classes=0).to(device).eval()

    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    order = torch.randperm(len(labels), generator=generator).numpy()
    n_hold = int(len(labels) * recipe.holdout_fraction)
    hold, train = order[:n_hold], order[n_hold:]
    x_train, y_train = _to_tensor(images[train], size), torch.from_numpy(labels[train]).long()
    x_hold, y_hold = _to_tensor(images[hold], size), torch.from_numpy(labels[hold]).long()

    model.to(device)
    dense_head = DenseTargetHead(model, teacher, size).to(device) if teacher is not None else None
    params = list(model.parameters()) + (list(dense_head.parameters()) if dense_head else [])
    optimizer = torch.optim.AdamW(params, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(y_train) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=recipe.peak_lr,
        total_steps=recipe.epochs * steps_per_epoch,
        pct_start=recipe.warmup_fraction,
    )
    start = time.perf_counter()
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"pre-training {arch}", total=recipe.epochs * steps_per_epoch)
        for _ in range(recipe.epochs):
            model.train()
            perm = torch.randperm(len(y_train), generator=generator)
            for i in range(steps_per_epoch):
                idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
                x, y = x_train[idx].to(device), y_train[idx].to(device)
                loss = training_loss(model, dense_head, x, y, recipe)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                progress.advance(task)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, x_hold, y_hold, device)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(out, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = {
        "arch": arch,
        "heldout_accuracy": accuracy,
        "train_seconds": seconds,
        "num_classes": num_classes,
        "train_images": int(len(y_train)),
        "heldout_images": int(len(y_hold)),
        "recipe": asdict(recipe),
        "data": asdict(data),
    }
    atomic_write_text(info_path, json.dumps(info, indent=1, default=str) + "\n")
    return PretrainResult(out, arch, accuracy, seconds, False)


def _read_cached(weights: Path, info_path: Path) -> dict:
    """The info of cached pre-trained weights, after checking both files are whole and the
    weights finite (a damaged cache must not silently become a run's backbone)."""
    fix = f"delete {weights} and {info_path.name} beside it, so they are trained again"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        float(info["heldout_accuracy"]), float(info["train_seconds"])
        bad = first_non_finite(read_state_dict(weights))
    except NdbenchError as exc:
        raise NdbenchError(f"cached pre-trained weights are damaged: {exc.problem}", fix) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NdbenchError(f"cached pre-training info {info_path} is damaged ({exc!r})", fix) from exc
    if bad:
        raise NdbenchError(f"cached pre-trained weights {weights} hold NaN or infinite values (in {bad!r})", fix)
    return info


def training_loss(model: nn.Module, dense_head: DenseTargetHead | None, x: torch.Tensor, y: torch.Tensor,
                  recipe: PretrainRecipe) -> torch.Tensor:
    """The pre-training loss of one batch: the classifier's cross-entropy; for a ViT also the
    token-label cross-entropy and, with a dense teacher, the dense regression."""
    if not isinstance(model, VisionTransformer):
        return nn.functional.cross_entropy(model(x), y)
    tokens = model.forward_features(x)
    loss = nn.functional.cross_entropy(model.forward_head(tokens), y)
    if dense_head is not None:
        loss = loss + recipe.dense_weight * dense_head(tokens, x)
    if recipe.token_label_weight:
        patch_logits = model.head(tokens[:, model.num_prefix_tokens :])
        labels = y.repeat_interleave(patch_logits.shape[1])
        loss = loss + recipe.token_label_weight * nn.functional.cross_entropy(patch_logits.flatten(0, 1), labels)
    return loss


def _input_size(model: nn.Module) -> int:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        return int(patch_embed.img_size[0])
    return int(model.pretrained_cfg.get("input_size", (3, 64, 64))[-1])


class DenseTargetHead(nn.Module):
    """Regresses a frozen CNN's feature map (pooled to the patch grid) from the ViT's patch
    tokens through one linear layer; the loss is the squared distance of the L2-normalised
    vectors, summed over channels and averaged over tokens."""

    def __init__(self, vit: VisionTransformer, teacher: nn.Module, size: int):
        super().__init__()
        self.teacher = teacher
        self.prefix = vit.num_prefix_tokens
        self.grid = tuple(vit.patch_embed.grid_size)
        with torch.no_grad():
            channels = self._target(torch.zeros(1, 3, size, size, device=next(teacher.parameters()).device)).shape[-1]
        self.proj = nn.Linear(vit.embed_dim, channels)

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        # The deepest feature map at stride 8 (stage 2 of a ResNet), pooled to the patch grid.
        feature = self.teacher.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        feature = nn.functional.adaptive_avg_pool2d(feature, self.grid)
        return feature.flatten(2).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        target = nn.functional.normalize(self._target(x), dim=-1)
        pred = nn.functional.normalize(self.proj(tokens[:, self.prefix :]), dim=-1)
        return (pred - target).pow(2).sum(-1).mean()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Top-1 accuracy of `model` on (x, y)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), 256):
        correct += (model(x[i : i + 256].to(device)).argmax(1).cpu() == y[i : i + 256]).sum().item()
    return correct / max(len(y), 1)


def resolve_weights(backbone: str, weights: str | Path | None, *, console: Console | None = None) -> str | Path | None:
    """Turn a config's `weights` into what `create_backbone` takes: "embedded" becomes the
    cached pre-trained file of `backbone` (trained first when missing); others pass through."""
    if weights == EMBEDDED_WEIGHTS:
        return pretrain(backbone, console=console).weights
    return weights
