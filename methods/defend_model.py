"""The torch parts of "Redefining Normal" (Salehi et al., ACCV 2024), as its released code runs
them (repository SMSD75/Redefining_Normal_ACCV24, cited below as `RN:<path>:<line>`).

DEFEND (`DeFeND/leo_tuning.py` + `DeFeND/leo.py`, a Leopart-style dense tuning): a projection
head with L2-normalised output and prototypes on the patch tokens of the online ViT and of an
EMA teacher; Sinkhorn-Knopp assignments of the teacher's global-crop tokens (with a queue of
past embeddings) are cut with `roi_align` to each crop pair's overlap and predicted from every
other crop. MKD (`DeFeND/main.py`, `DeFeND/vision_transformers.py`): a MAE-initialised student
sees only the tokens kept by a multinomial draw over the teacher's CLS attention and regresses
the teacher's L2-normalised last-layer patch tokens.

Only tensors and modules live here; `methods.defend` holds the detectors and
`methods.multicrop` the crop sampling.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .backbones import ViTFeatures

GUIDANCES = ("teacher", "random", "none")
LAYER_CHOICES = ("last", "all")


# --- DEFEND ----------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn(scores: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Sinkhorn-Knopp soft assignment of n samples to K prototypes from similarity `scores`
    [n, K] (SwAV's transport problem; RN:DeFeND/leo.py:452-474): each row of the result sums to
    1 and, as `iters` grows, each prototype receives n/K of the mass. Float32, never part of
    the graph."""
    if iters < 1:
        raise ValueError("sinkhorn needs at least one iteration")
    logits = scores.detach().float() / eps
    q = torch.exp(logits - logits.max())  # the global shift cancels in the first normalisation
    q /= q.sum()
    n, k = q.shape
    for _ in range(iters):
        q /= q.sum(dim=0, keepdim=True)
        q /= k
        q /= q.sum(dim=1, keepdim=True)
        q /= n
    return q * n


def cosine_schedule(start: float, end: float, steps: int) -> np.ndarray:
    """`steps` values going from `start` to `end` along half a cosine (RN:DeFeND/leo.py:15-20)."""
    i = np.arange(steps)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * i / max(steps, 1)))


class ProjectionHead(nn.Module):
    """DEFEND's projection head g (Linear-GELU-...-Linear, `layers` linear layers, then L2
    normalisation) and its K prototypes (a bias-free linear layer whose rows are kept at unit
    length), initialised as the released code does (truncated normal, std 0.02; zero biases:
    RN:DeFeND/vision_transformers.py:274-310)."""

    def __init__(self, in_dim: int, num_prototypes: int, hidden: int = 2048, out_dim: int = 256, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError("the projection head needs at least one layer")
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i in range(layers):
            modules.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                modules.append(nn.GELU())
        self.mlp = nn.Sequential(*modules)
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(L2-normalised projections z [..., out_dim], prototype scores z . p^T [..., K]),
        both float32."""
        z = F.normalize(self.mlp(tokens).float(), dim=-1)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return z, z @ self.prototypes.weight.float().t()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (before every step: RN:DeFeND/leo.py:295-302)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


class DenseNetwork(nn.Module):
    """A ViT with DEFEND's projection head: patch tokens of each crop -> (z, scores)."""

    def __init__(self, vit: ViTFeatures, head: ProjectionHead, frozen_blocks: int = 0):
        super().__init__()
        self.vit = vit
        self.head = head
        self.frozen_blocks = frozen_blocks

    def train(self, mode: bool = True) -> DenseNetwork:
        """Training mode (drop-path on, as RN:DeFeND/leo.py:185 tunes), except for batch norms
        whose parameters are frozen: their running statistics are part of the pre-trained
        weights and stay as they are (the released ViT-B has none; a hybrid ViT's CNN stem
        does, and in training mode every tuning step would move them)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def patch_tokens(self, x: Tensor) -> Tensor:
        """Final-normed patch tokens [B, N, D]. The first `frozen_blocks` blocks run without
        autograd: they receive no update, so their graph is not needed."""
        model = self.vit.model
        with torch.no_grad():
            h = self.vit.tokens(x)
            for block in model.blocks[: self.frozen_blocks]:
                h = block(h)
        for block in model.blocks[self.frozen_blocks:]:
            h = block(h)
        return model.norm(h)[:, self.vit.num_prefix_tokens:]

    def forward(self, crops: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per crop view [B, 3, s, s]: (z [B, N, out_dim], scores [B, N, K]). Views of one size
        go through the backbone together, as RN:DeFeND/vision_transformers.py:334-367 does."""
        results: list[tuple[Tensor, Tensor]] = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            batch = torch.cat(crops[start:end])
            z, scores = self.head(self.patch_tokens(batch))
            results += list(zip(z.chunk(end - start), scores.chunk(end - start), strict=True))
            start = end
        return results


def freeze_for_defend(vit: ViTFeatures, tuned_blocks: int) -> list[str]:
    """Freeze every backbone parameter but those of the last `tuned_blocks` blocks (the final
    norm stays frozen: RN:DeFeND/leo.py:230-236 optimises only blocks 10 and 11 of ViT-B);
    return the names of the tuned parameters."""
    model = vit.model
    depth = len(model.blocks)
    if not 1 <= tuned_blocks <= depth:
        raise ValueError(f"tuned_blocks must be in 1..{depth}, got {tuned_blocks}")
    tuned = {f"blocks.{i}." for i in range(depth - tuned_blocks, depth)}
    names = []
    for name, p in model.named_parameters():
        trains = name.startswith(tuple(tuned))
        p.requires_grad_(trains)
        if trains:
            names.append(name)
    return names


def no_decay(name: str, p: Tensor) -> bool:
    """Biases and 1-D parameters (norm weights) get no weight decay (RN:DeFeND/leo.py:272)."""
    return name.endswith(".bias") or p.ndim <= 1


def dense_param_groups(network: DenseNetwork, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict]:
    """AdamW groups in the released order (RN:DeFeND/leo.py:238-251): backbone with decay,
    backbone without, head with decay, head without. Only trainable parameters."""
    groups = []
    for module, lr in ((network.vit.model, lr_backbone), (network.head, lr_head)):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        groups.append({"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay, "lr": lr})
        groups.append({"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0, "lr": lr})
    return groups


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, parameter by parameter (RN:DeFeND/leo.py:435-440)."""
    for p_teacher, p_student in zip(teacher.parameters(), student.parameters(), strict=True):
        p_teacher.mul_(momentum).add_(p_student.detach(), alpha=1 - momentum)


class AssignmentQueue:
    """Past teacher embeddings of each assigned global crop (RN:DeFeND/leo.py:197-206, 362-379):
    once full they join the Sinkhorn problem, scored against the online prototypes, so small
    batches still spread over all prototypes."""

    def __init__(self, crops: int, length: int, dim: int, device: torch.device):
        self.embeddings = torch.zeros(crops, length, dim, device=device)
        self.in_use = False

    def new_epoch(self) -> None:
        """The released code re-checks whether the queue is full at each epoch start."""
        self.in_use = False

    def scores(self, crop: int, prototypes: Tensor) -> Tensor | None:
        """Scores [L, K] of the queued embeddings of `crop`, or None while it is not yet full."""
        if self.in_use or not bool((self.embeddings[crop, -1] == 0).all()):
            self.in_use = True
            return self.embeddings[crop] @ prototypes.float().t()
        return None

    def push(self, crop: int, embeddings: Tensor, per_image: int, generator: torch.Generator) -> None:
        """Store a random `per_image` x batch subset of `embeddings` [n, D] at the front."""
        length = self.embeddings.shape[1]
        count = min(per_image, length, embeddings.shape[0])
        idx = torch.randperm(embeddings.shape[0], generator=generator)[:count].to(embeddings.device)
        queue = self.embeddings[crop]
        queue[count:] = queue[:-count].clone()
        queue[:count] = embeddings[idx].float()


def _grid(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"crops must be square: {n} patches")
    return side


def _roi(maps: Tensor, boxes: Tensor, patch: int, size: int) -> Tensor:
    """roi_align of maps [B, C, h, w] under one box per image [B, 4] (crop pixels), size x size."""
    rois = torch.cat([torch.arange(len(boxes), device=maps.device, dtype=torch.float32)[:, None],
                      boxes.to(maps.device, torch.float32) / patch], dim=1)
    return roi_align(maps, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def leopart_loss(
    teacher: list[tuple[Tensor, Tensor]],
    student: list[tuple[Tensor, Tensor]],
    gc_boxes: Tensor,
    all_boxes: Tensor,
    *,
    patch: int,
    eps: float,
    iters: int,
    temperature: float,
    roi_size: int,
    queue: AssignmentQueue | None,
    student_prototypes: Tensor,
    queue_per_image: int,
    generator: torch.Generator,
) -> Tensor:
    """DEFEND's dense loss as released (RN:DeFeND/leo.py:346-427). `teacher`: (z, scores) of
    the assigned global crops; `student`: (z, scores) of every crop, globals first. For each
    assigned global crop g: Sinkhorn targets over its patches (plus the queue), cut to the
    overlap with every other crop v (`gc_boxes` [B, G, V, 4], in g's pixels) and predicted by
    v's own scores under the same overlap (`all_boxes` [B, V, G, 4], in v's pixels), softmax at
    `temperature`; cross-entropy averaged over the other crops, then over g."""
    views = len(student)
    loss = torch.zeros((), device=student[0][1].device)
    for g, (z_g, scores_g) in enumerate(teacher):
        b, n, k = scores_g.shape
        side = _grid(n)
        with torch.no_grad():
            flat = scores_g.reshape(b * n, k).float()
            queued = queue.scores(g, student_prototypes) if queue is not None else None
            if queued is not None:
                flat = torch.cat([queued, flat])
            if queue is not None:
                queue.push(g, z_g.reshape(b * n, -1).detach(), queue_per_image * b, generator)
            q = sinkhorn(flat, eps, iters)[-b * n:]
            q_map = q.reshape(b, side, side, k).permute(0, 3, 1, 2)
        sub = torch.zeros((), device=loss.device)
        for v in range(views):
            if v == g:
                continue
            with torch.no_grad():
                target = _roi(q_map, gc_boxes[:, g, v], patch, roi_size)
            scores_v = student[v][1]
            side_v = _grid(scores_v.shape[1])
            pred = _roi(scores_v.float().reshape(b, side_v, side_v, k).permute(0, 3, 1, 2),
                        all_boxes[:, v, g], patch, roi_size)
            sub = sub - (target * F.log_softmax(pred / temperature, dim=1)).sum(dim=1).mean()
        loss = loss + sub / (views - 1)
    return loss / len(teacher)


# --- MKD -------------------------------------------------------------------------------------
def num_kept(num_patches: int, mask_ratio: float) -> int:
    """How many patches the student sees: int(N (1 - mask_ratio)) as released
    (RN:DeFeND/vision_transformers.py:801), at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1.0 - mask_ratio) + 1e-9))


def keep_indices(
    attention: Tensor | None, num_patches: int, keep: int, guidance: str, generator: torch.Generator,
    batch: int | None = None,
) -> Tensor:
    """Indices [B, keep] of the patches the student sees. "teacher": the first `keep` of a
    keep-order drawn with torch.multinomial (no replacement) over the teacher's CLS attention
    [B, N] (RN:DeFeND/vision_transformers.py:794-820), so attended patches tend to stay;
    "random": the same over a uniform distribution; "none": every patch (no masking). Drawn on
    the CPU from `generator`."""
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    b = batch if attention is None else attention.shape[0]
    if b is None:
        raise ValueError("give the attention or the batch size")
    if guidance == "none":
        return torch.arange(num_patches).expand(b, -1).clone()
    if guidance == "teacher":
        if attention is None:
            raise ValueError("teacher guidance needs the teacher's attention")
        # A floor keeps underflowed (exactly 0) entries drawable once the mass is used up.
        weights = attention.detach().float().cpu().clamp_min(1e-12)
    else:
        weights = torch.ones(b, num_patches)
    return torch.multinomial(weights, keep, replacement=False, generator=generator)


def teacher_features(vit: ViTFeatures, x: Tensor, layers: str, need_attention: bool) -> tuple[Tensor, Tensor | None]:
    """The teacher's patch features [L, B, N, D] (L = 1 for "last": final-normed tokens; for
    "all": every block's output, the last one final-normed) and, when asked, its last-block
    CLS-to-patch attention averaged over heads [B, N]."""
    if layers not in LAYER_CHOICES:
        raise ValueError(f"distill_layers must be one of {LAYER_CHOICES}, got {layers!r}")
    out = vit.forward_features(x, return_blocks=layers == "all", need_attention=need_attention)
    return _read_features(vit, out, layers)


def teacher_features_from(vit: ViTFeatures, tokens: Tensor, start: int,
                          need_attention: bool) -> tuple[Tensor, Tensor | None]:
    """`teacher_features` for the last layer from the input of block `start` (the output of a
    frozen prefix, `ViTFeatures.prefix_tokens`): only blocks start.. run."""
    return _read_features(vit, vit.forward_features_from(tokens, start, need_attention=need_attention), "last")


def _read_features(vit: ViTFeatures, out: dict, layers: str) -> tuple[Tensor, Tensor | None]:
    p = vit.num_prefix_tokens
    if layers == "last":
        feats = out["patches"][None]
    else:
        feats = torch.stack([h[:, p:] for h in out["blocks"][:-1]] + [out["patches"]])
    return feats, out.get("cls_attention")


def student_features(vit: ViTFeatures, x: Tensor, keep_idx: Tensor | None, layers: str) -> Tensor:
    """The student's patch features [L, B, K, D] at the kept positions (all N when `keep_idx`
    is None); only the kept tokens enter the blocks. Layers as in `teacher_features`."""
    if layers == "last":
        out = vit.forward(x) if keep_idx is None else vit.forward_kept(x, keep_idx)
        return out[:, vit.num_prefix_tokens:][None]
    p = vit.num_prefix_tokens
    h = vit.embed(x)
    if keep_idx is not None:
        index = keep_idx.to(h.device, torch.long).unsqueeze(-1).expand(-1, -1, h.shape[-1])
        h = torch.cat([h[:, :p], torch.gather(h[:, p:], 1, index)], dim=1)
    h = vit.model.norm_pre(h)
    feats = []
    for block in vit.model.blocks:
        h = block(h)
        feats.append(h[:, p:])
    feats[-1] = vit.model.norm(h)[:, p:]
    return torch.stack(feats)


def gather_patches(feats: Tensor, keep_idx: Tensor) -> Tensor:
    """feats [L, B, N, D] at keep_idx [B, K]: [L, B, K, D]."""
    index = keep_idx.to(feats.device, torch.long)[None, :, :, None]
    return torch.gather(feats, 2, index.expand(feats.shape[0], -1, -1, feats.shape[-1]))


def patch_errors(teacher: Tensor, student: Tensor, normalise: bool) -> Tensor:
    """Mean squared error per patch between teacher and student features [L, B, N, D] (each
    L2-normalised first when `normalise`; RN:DeFeND/main.py:228-236 takes the element mean
    over channels), averaged over the L layers: [B, N], float32."""
    t, s = teacher.float(), student.float()
    if normalise:
        t, s = F.normalize(t, dim=-1), F.normalize(s, dim=-1)
    return (t - s).pow(2).mean(dim=-1).mean(dim=0)


def sincos_pos_embed(dim: int, grid: tuple[int, int], prefix_tokens: int = 1) -> Tensor:
    """The fixed 2-D sin-cos position table of MAE [prefix + h*w, dim] (zeros for the prefix
    tokens; RN:DeFeND/vision_transformers.py:49-95): in raster order, the first half of the
    channels encodes the patch's column, the second half its row, each as [sin, cos] of the
    position times 1 / 10000^(i / (dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([one_axis(cols), one_axis(rows)], dim=1)
    return torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), table]).float()


def init_mae_student(vit: ViTFeatures) -> None:
    """Initialise a timm ViT as the released MKD student (MAE's recipe,
    RN:DeFeND/vision_transformers.py:631, 694-720): fixed, frozen 2-D sin-cos position
    embedding; patch projection and every linear layer xavier-uniform with zero biases;
    LayerNorms at 1 / 0; class token normal with std 0.02."""
    model = vit.model
    if model.pos_embed is None or getattr(model, "no_embed_class", False):
        raise ValueError("the MKD student needs a ViT whose position table covers the class token")
    table = sincos_pos_embed(vit.embed_dim, vit.grid_size, vit.num_prefix_tokens)
    with torch.no_grad():
        model.pos_embed.copy_(table[None].to(model.pos_embed.dtype))
    model.pos_embed.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    proj = model.patch_embed.proj.weight
    with torch.no_grad():
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    nn.init.normal_(model.cls_token, std=0.02)
