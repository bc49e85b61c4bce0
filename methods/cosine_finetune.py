"""Second pre-training stage of the embedded ViT: a cosine classifier on its tokens.

The first stage (`methods.pretrain`) makes the ViT name the pool's glyphs, but its patch
tokens stay close to the CNN's local features it regressed: class is linearly decodable from
them, yet a small part of their L2 distances, which is what a distiller's error (mkd, defend)
measures. A short fine-tune whose classifier reads *L2-normalised* CLS and patch tokens
(cosine logits times a scale, as in normalised-softmax / CosFace-style heads without margin)
makes the angle between tokens carry the class, without the dense CNN regression.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from rich.progress import Progress, TaskID
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .pretrain import IGNORE, Batch, PretrainRecipe, patch_labels, to_input, warmup_cosine


def cosine_logits(tokens: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale` x the cosine of each token (..., D) with each class weight (C, D): (..., C)."""
    return scale * nn.functional.normalize(tokens, dim=-1) @ nn.functional.normalize(weight, dim=-1).T


def cosine_loss(model: VisionTransformer, batch: Batch, recipe: PretrainRecipe) -> torch.Tensor:
    """Cross-entropy of the CLS token's cosine logits against the image label, plus
    `token_label_weight` x that of the patch tokens' against their box token labels."""
    tokens = model.forward_features(batch.x)
    weight, scale = model.head.weight, recipe.cosine_scale
    loss = nn.functional.cross_entropy(cosine_logits(tokens[:, 0], weight, scale), batch.y)
    if recipe.token_label_weight:
        patches = cosine_logits(tokens[:, model.num_prefix_tokens :], weight, scale)
        grid = tuple(model.patch_embed.grid_size)
        targets = patch_labels(batch.boxes, batch.y, grid, int(model.patch_embed.patch_size[0]), batch.background)
        loss = loss + recipe.token_label_weight * nn.functional.cross_entropy(
            patches.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return loss


def cosine_steps(recipe: PretrainRecipe, n_train: int) -> int:
    """Optimiser steps of the cosine stage over `n_train` pool images (0 when it is off)."""
    return math.ceil(recipe.cosine_epochs * n_train / recipe.batch_size) if recipe.cosine_epochs > 0 else 0


def cosine_finetune(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    train: np.ndarray,
    recipe: PretrainRecipe,
    background: int,
    device: torch.device,
    progress: Progress | None = None,
    task: TaskID | None = None,
) -> None:
    """Fine-tune `model` in place for `cosine_steps` on the pool images `train`, then fold the
    cosine classifier into its linear head (see `fold_cosine_head`)."""
    steps = cosine_steps(recipe, len(train))
    if steps == 0:
        return
    size = int(model.patch_embed.img_size[0])
    # Its own stream, so the stage draws the same batches whatever the first stage drew.
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    model.head.bias.data.zero_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.cosine_lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, recipe.cosine_warmup_fraction))
    train_index = torch.from_numpy(train)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(steps):
        if len(order) < recipe.batch_size:
            order = torch.cat([order, train_index[torch.randperm(len(train_index), generator=generator)]])
        idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
        batch = Batch(to_input(images[idx], size).to(device), labels[idx].to(device), boxes[idx].to(device),
                      background)
        loss = cosine_loss(model, batch, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None and task is not None:
            progress.advance(task)
    fold_cosine_head(model, images[torch.from_numpy(train[:2048])], recipe.cosine_scale, device)


@torch.no_grad()
def fold_cosine_head(model: VisionTransformer, images: torch.Tensor, scale: float, device: torch.device) -> None:
    """Make the plain linear head give the cosine classifier's decisions: weight = scale x the
    unit class weights / the mean norm of the tokens of `images` (so its softmax is about as
    sharp as the cosine one's), bias 0. The argmax over classes is the cosine classifier's exactly."""
    model.eval()
    size = int(model.patch_embed.img_size[0])
    norms = [model.forward_features(to_input(images[i : i + 256], size).to(device)).norm(dim=-1).flatten()
             for i in range(0, len(images), 256)]
    mean_norm = float(torch.cat(norms).mean())
    weight = model.head.weight
    weight.copy_(scale * nn.functional.normalize(weight, dim=-1) / mean_norm)
    model.head.bias.zero_()
