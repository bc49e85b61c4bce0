"""Offline supervised pre-training of small backbones on the embedded object-centric pool.

This stands in for the paper's ImageNet-21k pre-training: the pool holds one glyph per image
(handwritten digits of instances no scene uses, deformed, plus font digits and letters; see
`datasets_builders.embedded`). The package ships weights made by `ndbench pretrain --ship`
(`methods/shipped_weights.py`); other data configs or recipes are trained on first use and
cached, keyed by (architecture, embedded data, recipe).
"""

from __future__ import annotations

import datetime
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
from rich.progress import Progress, TaskID
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from datasets_builders.atomic import atomic_write_text, write_error
from datasets_builders.embedded import EmbeddedConfig, cache_root, load_pretrain_set
from datasets_builders.errors import NdbenchError

from .backbones import create_backbone, first_non_finite, meta_model, read_state_dict
from .embedded_archs import CNNStemPatchEmbed  # importing it registers the embedded archs in timm
from .weight_sources import EMBEDDED_WEIGHTS

DEFAULT_ARCH = "ndbench_vit_embedded"
DEFAULT_CNN = "ndbench_resnet_embedded"
# 7: a second stage, a cosine classifier on the ViT's normalised tokens (methods.cosine_finetune);
# 6: the ViT's patch embedding is the CNN's stride-8 stem, started from the teacher's;
# 5: broader pool, patch labels from the glyph's box with a background class, the CNN's soft
# labels; 4: token labels; 3: initial weights seeded (2 drew them from the global RNG)
RECIPE_VERSION = "7"
BACKGROUND = "background"  # the extra class of box token labels
TOKEN_LABELS = ("none", "image", "box")
IGNORE = -100  # cross-entropy's ignore index: patches only partly on the glyph's box


@dataclass(frozen=True)
class PretrainRecipe:
    """Supervised recipe. A ViT trained from scratch on the rendered pool with the plain
    recipe (OneCycle, AdamW, batch 64) stayed at chance (9.8 % held-out after 10 epochs at peak
    lr 3e-4), while a small CNN learns in 2 epochs. So ViTs also learn from the CNN
    (`dense_teacher`): they regress its stride-8 feature map from each patch token (a local
    target that gets the transformer off its plateau) and match its class probabilities with
    the CLS token (`distill_weight`, soft-label distillation)."""

    # 4 epochs (~22-24 min on one CPU thread of a busy 2-core machine): the ViT then named 98.1 %
    # of the test scenes' digit instances rendered object-centric, 85.5 % after 1 epoch (97.9 %
    # after the second stage below).
    epochs: int = 4
    batch_size: int = 64
    peak_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.2
    holdout_fraction: float = 0.05
    seed: int = 0
    dense_teacher: str | None = DEFAULT_CNN  # None: plain supervised training
    # A ViT with the CNN stem (embedded_archs.CNNStemPatchEmbed) starts it from the teacher's.
    stem_from_teacher: bool = True
    dense_weight: float = 1.0
    distill_weight: float = 1.0  # cross-entropy to the dense teacher's softmax (CLS logits)
    # Token labelling (Jiang et al. 2021, "All Tokens Matter"): patch tokens, through the
    # classifier head, also predict a label. "image": every patch predicts the image's class;
    # "box": patches on the glyph's box predict its class, patches off it an extra
    # "background" class, patches partly on it nothing. Without token labels the patch tokens
    # only described local strokes and mkd/defend stayed at chance on the embedded scenes.
    token_labels: str = "box"
    token_label_weight: float = 0.5
    teacher_epochs: int = 3  # the CNN teacher's own recipe: same optimiser, these many epochs
    # Second stage, ViTs only (methods.cosine_finetune): CLS and patch tokens, L2-normalised,
    # classified by cosine x `cosine_scale` (box token labels at `token_label_weight`), no dense
    # teacher. Half an epoch lifted the embedded uni-class AVG AUROC (seed 0) of defend from 72.5
    # to 78.9 and of mkd from 72.4 to 79.0. Tried on the first stage's earlier weights (splits 0,
    # 1, 5, 9 x seeds 0-1, defend): scale 16 / 32 / 64 gave 74.0 / 75.4 / 74.7; a full epoch at
    # scale 16 72.8; 1.5 epochs at scale 10 68.1. Patch tokens at weight 1.0 instead of 0.5: the same.
    cosine_epochs: float = 0.5
    cosine_scale: float = 32.0
    cosine_lr: float = 2e-4
    cosine_warmup_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.token_labels not in TOKEN_LABELS:
            raise NdbenchError(f"unknown token_labels {self.token_labels!r}", f"use one of {', '.join(TOKEN_LABELS)}")


@dataclass(frozen=True)
class PretrainResult:
    """Where the weights are and how good they are."""

    weights: Path
    arch: str
    heldout_accuracy: float
    train_seconds: float
    cached: bool


class StageProgress(Progress):
    """A transient progress bar on a terminal. Elsewhere (stderr into a file or a pipe) rich
    draws nothing until the end, then a blank line, so this prints plain lines instead: one
    as a task starts, one each `every` steps (an `epoch` when `per_epoch`) and one at its end."""

    def __init__(self, console: Console | None, every: int = 0, per_epoch: bool = False) -> None:
        console = console or Console(stderr=True)
        self.plain = not console.is_terminal or console.is_dumb_terminal
        super().__init__(console=console, transient=True, disable=self.plain)
        self.every = every
        self.per_epoch = per_epoch

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields) -> TaskID:
        """Add a task (see rich's `Progress.add_task`); off a terminal, say that it started."""
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        if self.plain:
            self._say(f"{description}: 0/{int(total or 0)} steps")
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """Advance a task (see rich's `Progress.advance`); off a terminal, say how far it is at
        each `every` steps and at its end."""
        super().advance(task_id, advance)
        if not self.plain:
            return
        task = next(task for task in self.tasks if task.id == task_id)
        done, total = int(task.completed), int(task.total or 0)
        if done != total and not (self.every and done % self.every == 0):
            return
        elapsed = datetime.timedelta(seconds=round(task.elapsed or 0))
        if self.per_epoch and self.every:
            self._say(f"{task.description}: epoch {done // self.every} of {math.ceil(total / self.every)} done "
                      f"({elapsed})")
        else:
            self._say(f"{task.description}: {done}/{total} steps ({elapsed})")

    def _say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


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


def first_stage(recipe: PretrainRecipe) -> PretrainRecipe:
    """`recipe` without its second (cosine) stage, with neutral values in that stage's fields so
    that all second stages share one first-stage cache entry."""
    return replace(recipe, cosine_epochs=0.0, cosine_scale=1.0, cosine_lr=0.0, cosine_warmup_fraction=0.0)


def cnn_recipe(recipe: PretrainRecipe) -> PretrainRecipe:
    """The recipe of a CNN: `teacher_epochs` of plain supervised training. The ViT's dense
    teacher and the CNN methods' embedded backbone are then one and the same file."""
    return first_stage(replace(recipe, epochs=recipe.teacher_epochs, dense_teacher=None, stem_from_teacher=False,
                               distill_weight=0.0, token_labels="none", token_label_weight=0.0))


def default_recipe(arch: str) -> PretrainRecipe:
    """The default recipe for `arch`: the ViT recipe for ViTs, `cnn_recipe` for the others."""
    return PretrainRecipe() if is_vit(arch) else cnn_recipe(PretrainRecipe())


def is_vit(arch: str) -> bool:
    """Whether the timm model `arch` is a VisionTransformer (NdbenchError if timm has no such model)."""
    try:
        model = meta_model(arch)  # ~0.1 s where a real ViT-B build takes ~1 s
    except NdbenchError:
        model = None  # an unknown name: the real build below says so as it always has
    if model is not None:
        return isinstance(model, VisionTransformer)
    try:
        return isinstance(timm.create_model(arch, pretrained=False), VisionTransformer)
    except (RuntimeError, ValueError) as exc:
        raise NdbenchError(f"cannot build model {arch!r}: {exc}", "pass a timm model name to --arch") from exc


def head_classes(pool_classes: tuple[str, ...], recipe: PretrainRecipe) -> tuple[str, ...]:
    """The classifier's outputs: the pool's classes, plus "background" for box token labels."""
    return pool_classes + ((BACKGROUND,) if recipe.token_labels == "box" else ())


def background_index(classes: tuple[str, ...]) -> int:
    """The head output of the background class, -1 when the head has none."""
    return classes.index(BACKGROUND) if BACKGROUND in classes else -1


def default_weights_path(arch: str, data: EmbeddedConfig, recipe: PretrainRecipe) -> Path:
    """The cache file of a pre-training run."""
    return cache_root() / "pretrained" / f"{arch}-{pretrain_key(arch, data, recipe)}.safetensors"


def to_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, H, W, 3) as the embedded archs' input: float, mean/std 0.5, `size` px."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.5  # mean/std 0.5, as the embedded archs' configs say


def input_size(model: nn.Module) -> int:
    """The square input size a model was built for."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        return int(patch_embed.img_size[0])
    return int(model.pretrained_cfg.get("input_size", (3, 64, 64))[-1])


def pretrain(
    arch: str = DEFAULT_ARCH,
    *,
    out: Path | None = None,
    data: EmbeddedConfig | None = None,
    recipe: PretrainRecipe | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
    force: bool = False,
    teacher_weights: Path | None = None,
) -> PretrainResult:
    """Train `arch` (a timm name) to classify the object-centric pool; cache and return it.
    A ViT's dense teacher is `teacher_weights`, else the teacher's embedded weights."""
    from .cosine_finetune import cosine_finetune, cosine_steps

    data = data or EmbeddedConfig()
    recipe = recipe or default_recipe(arch)
    device = device or torch.device("cpu")
    out = Path(out) if out is not None else default_weights_path(arch, data, recipe)
    info_path = out.with_suffix(".json")
    if out.is_file() and info_path.is_file() and not force:
        info = _read_cached(out, info_path)
        _check_cached_run(info, out, arch, data, recipe)
        return PretrainResult(out, arch, info["heldout_accuracy"], info["train_seconds"], True)

    pool = load_pretrain_set(data, console=console)
    classes = head_classes(pool.class_names, recipe)
    torch.manual_seed(recipe.seed)  # the initial weights too, whatever ran before in this process
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=len(classes))
    except (RuntimeError, ValueError) as exc:
        raise NdbenchError(f"cannot build model {arch!r}: {exc}", "pass a timm model name to --arch") from exc
    model.to(device)
    if isinstance(model, VisionTransformer) and recipe.cosine_epochs > 0:
        # The first stage is cached under its own key: changing the second re-runs only it.
        first = pretrain(arch, data=data, recipe=first_stage(recipe), device=device, console=console, force=force,
                         teacher_weights=teacher_weights)
        model.load_state_dict(read_state_dict(first.weights))
        hold, train = holdout_split(len(pool.labels), recipe, torch.Generator().manual_seed(recipe.seed))
        start = time.perf_counter()
        steps = cosine_steps(recipe, len(train))
        with StageProgress(console, every=math.ceil(steps / 4)) as progress:
            task = progress.add_task(f"fine-tuning {arch} (cosine classifier)", total=steps)
            cosine_finetune(model, torch.from_numpy(pool.images), torch.from_numpy(pool.labels).long(),
                            torch.from_numpy(pool.boxes).long(), train, recipe, background_index(classes),
                            device, progress, task)
        seconds = first.train_seconds + time.perf_counter() - start
    else:
        hold, train, seconds = _train_first_stage(model, arch, pool, classes, data, recipe, device, console,
                                                  teacher_weights)
    accuracy = accuracy_on(model, pool.images[hold], pool.labels[hold], device)
    _save(model, classes, out)
    info = {
        "arch": arch,
        "heldout_accuracy": accuracy,
        "train_seconds": seconds,
        "classes": list(classes),
        "train_images": int(len(train)),
        "heldout_images": int(len(hold)),
        "recipe": asdict(recipe),
        "recipe_version": RECIPE_VERSION,
        "data": asdict(data),
    }
    atomic_write_text(info_path, json.dumps(info, indent=1, default=str) + "\n")
    return PretrainResult(out, arch, accuracy, seconds, False)


def holdout_split(n: int, recipe: PretrainRecipe, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The held-out and training indices (sorted) of a pool of `n` images, drawn from `generator`."""
    order = torch.randperm(n, generator=generator).numpy()
    n_hold = int(n * recipe.holdout_fraction)
    return np.sort(order[:n_hold]), np.sort(order[n_hold:])


def _train_first_stage(model: nn.Module, arch: str, pool, classes: tuple[str, ...], data: EmbeddedConfig,
                       recipe: PretrainRecipe, device: torch.device, console: Console | None,
                       teacher_weights: Path | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Train `model` in place with the recipe's supervised stage; return the held-out and
    training indices and the seconds it took."""
    from .shipped_weights import embedded_weights

    size = input_size(model)
    teacher = None
    if isinstance(model, VisionTransformer) and recipe.dense_teacher:
        teacher_recipe = cnn_recipe(recipe)
        if teacher_weights is None:
            teacher_weights = embedded_weights(recipe.dense_teacher, data=data, recipe=teacher_recipe,
                                               device=device, console=console)
        teacher = create_backbone(recipe.dense_teacher, weights=teacher_weights,
                                  num_classes=len(head_classes(pool.class_names, teacher_recipe)))
        teacher = teacher.to(device).eval()
        if recipe.stem_from_teacher and isinstance(model.patch_embed, CNNStemPatchEmbed):
            model.patch_embed.load_cnn_stem(teacher.state_dict())

    generator = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    hold, train = holdout_split(len(pool.labels), recipe, generator)
    images = torch.from_numpy(pool.images)
    labels = torch.from_numpy(pool.labels).long()
    boxes = torch.from_numpy(pool.boxes).long()

    dense_head = DenseTargetHead(model, teacher, size).to(device) if teacher is not None else None
    params = list(model.parameters()) + (list(dense_head.parameters()) if dense_head else [])
    optimizer = torch.optim.AdamW(params, lr=recipe.peak_lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(recipe.epochs * steps_per_epoch, recipe.warmup_fraction))
    train_index = torch.from_numpy(train)
    background = background_index(classes)
    start = time.perf_counter()
    with StageProgress(console, every=steps_per_epoch, per_epoch=True) as progress:
        task = progress.add_task(f"pre-training {arch}", total=recipe.epochs * steps_per_epoch)
        for _ in range(recipe.epochs):
            model.train()
            perm = train_index[torch.randperm(len(train_index), generator=generator)]
            for i in range(steps_per_epoch):
                idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
                x = to_input(images[idx], size).to(device)
                batch = Batch(x, labels[idx].to(device), boxes[idx].to(device), background)
                loss = training_loss(model, dense_head, batch, recipe)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                progress.advance(task)
    return hold, train, time.perf_counter() - start


def _save(model: nn.Module, classes: tuple[str, ...], out: Path) -> None:
    """Write `model`'s weights to `out` atomically, its head's classes in the metadata."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"classes": json.dumps(classes)})
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(out, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _check_cached_run(info: dict, weights: Path, arch: str, data: EmbeddedConfig, recipe: PretrainRecipe) -> None:
    """Raise NdbenchError unless the cached `info` (beside `weights`) is of `arch` trained on
    `data` with `recipe` at this recipe version. The cache's own file names carry that key; a
    file given with --out does not, and an earlier run of another arch may have written it."""
    asked = json.loads(json.dumps({"arch": arch, "data": asdict(data), "recipe": asdict(recipe),
                                   "recipe_version": RECIPE_VERSION}, default=str))  # as the info was written
    differ = [key.replace("_", " ") for key, value in asked.items() if info.get(key) != value]
    if differ:
        raise NdbenchError(f"{weights} holds pre-trained weights of {info.get('arch')!r} that differ from "
                           f"{arch!r} as asked in: {', '.join(differ)}",
                           f"pass --force to train {arch} over them, or choose another --out")


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """Learning-rate factor per step: linear warm-up from ~0 to 1 over `warmup_fraction` of the
    steps, then cosine decay to 0 (the shape of timm's and DeiT's schedules)."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass(frozen=True)
class Batch:
    """One training batch: inputs, image labels, the glyphs' boxes (x, y, w, h in input pixels)
    and the background class (-1 when the head has none)."""

    x: torch.Tensor
    y: torch.Tensor
    boxes: torch.Tensor
    background: int = -1


def box_patch_overlap(boxes: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(M, N): how much each box (x, y, w, h) covers each patch of a `grid` of `patch`-px
    patches (raster order), as a share of the smaller of the two areas (a box inside one
    patch covers it fully)."""
    boxes = boxes.reshape(-1, 4).long()
    rows, cols = grid
    y0 = torch.arange(rows, device=boxes.device).repeat_interleave(cols) * patch
    x0 = torch.arange(cols, device=boxes.device).repeat(rows) * patch
    bx, by, bw, bh = (boxes[:, i : i + 1] for i in range(4))
    ix = (torch.minimum(x0 + patch, bx + bw) - torch.maximum(x0, bx)).clamp(min=0)
    iy = (torch.minimum(y0 + patch, by + bh) - torch.maximum(y0, by)).clamp(min=0)
    return (ix * iy).float() / (bw * bh).clamp(min=1, max=patch * patch).float()


def patch_labels(boxes: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], patch: int,
                 background: int) -> torch.Tensor:
    """Box token labels (B, N) of one glyph per image: its class where its box covers at least
    half a patch (`box_patch_overlap` >= 0.5), `background` where it does not touch the
    patch, IGNORE in between."""
    overlap = box_patch_overlap(boxes, grid, patch)
    out = torch.full(overlap.shape, IGNORE, dtype=torch.long, device=boxes.device)
    on = overlap >= 0.5
    out[on] = labels[:, None].expand_as(out)[on]
    out[overlap == 0] = background
    return out


def training_loss(model: nn.Module, dense_head: DenseTargetHead | None, batch: Batch,
                  recipe: PretrainRecipe) -> torch.Tensor:
    """The pre-training loss of one batch: the classifier's cross-entropy; for a ViT also the
    token-label cross-entropy and, with a dense teacher, the dense regression and the
    distillation of the teacher's class probabilities."""
    x, y = batch.x, batch.y
    if not isinstance(model, VisionTransformer):
        return nn.functional.cross_entropy(model(x), y)
    tokens = model.forward_features(x)
    logits = model.forward_head(tokens)
    loss = nn.functional.cross_entropy(logits, y)
    if dense_head is not None:
        feature, teacher_logits = dense_head.teacher_outputs(x)
        loss = loss + recipe.dense_weight * dense_head(tokens, feature)
        if recipe.distill_weight:
            target = teacher_logits.softmax(-1)
            own = logits[:, : target.shape[1]].log_softmax(-1)
            loss = loss - recipe.distill_weight * (target * own).sum(-1).mean()
    if recipe.token_labels != "none" and recipe.token_label_weight:
        patch_logits = model.head(tokens[:, model.num_prefix_tokens :])
        if recipe.token_labels == "image":
            targets = y[:, None].expand(patch_logits.shape[:2])
        else:
            grid = tuple(model.patch_embed.grid_size)
            targets = patch_labels(batch.boxes, y, grid, int(model.patch_embed.patch_size[0]), batch.background)
        loss = loss + recipe.token_label_weight * nn.functional.cross_entropy(
            patch_logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return loss


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
            sample = torch.zeros(1, 3, size, size, device=next(teacher.parameters()).device)
            channels = self.teacher_outputs(sample)[0].shape[-1]
        self.proj = nn.Linear(vit.embed_dim, channels)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the teacher: its deepest stride-8 feature map (stage 2 of a ResNet) pooled
        to the patch grid, as (B, N, C) targets, and its class logits."""
        final, (feature,) = self.teacher.forward_intermediates(x, indices=[2], intermediates_only=False)
        feature = nn.functional.adaptive_avg_pool2d(feature, self.grid)
        return feature.flatten(2).transpose(1, 2), self.teacher.forward_head(final)

    def forward(self, tokens: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The dense loss of patch tokens against the teacher's pooled features (`teacher_outputs`)."""
        target = nn.functional.normalize(feature, dim=-1)
        pred = nn.functional.normalize(self.proj(tokens[:, self.prefix :]), dim=-1)
        return (pred - target).pow(2).sum(-1).mean()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """The classifier's logits for uint8 images (N, H, W, 3)."""
    model.eval()
    size = input_size(model)
    rows = [model(to_input(images[i : i + batch_size], size).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(rows) if rows else torch.empty(0)


def accuracy_on(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """Top-1 accuracy of `model` on uint8 images and their labels."""
    if len(labels) == 0:
        return 0.0
    return float((predict(model, images, device).argmax(1).numpy() == labels).mean())


def resolve_weights(backbone: str, weights: str | Path | None, *, console: Console | None = None) -> str | Path | None:
    """Turn a config's `weights` into what `create_backbone` takes: "embedded" becomes the
    shipped weights of `backbone` when they fit the current data and recipe, else its cached
    pre-trained file (trained first when missing); others pass through."""
    if weights == EMBEDDED_WEIGHTS:
        from .shipped_weights import embedded_weights

        return embedded_weights(backbone, console=console)
    return weights

