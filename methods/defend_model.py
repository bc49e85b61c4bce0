"""The torch parts of "Redefining Normal" (Salehi et al., ACCV 2024): DEFEND's dense loss
(Sinkhorn-Knopp targets, the crop alignment alpha(Q), projection head and prototypes) and
MKD's teacher-guided masked distillation (keep orders, student pass on kept tokens, errors).

Only tensors and modules live here; `methods.defend` holds the detectors (data, optimisers,
epochs, caching, persistence).
"""

from __future__ import annotations

import math

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
    [n, K] (SwAV's transport problem): each row of the result sums to 1 and, as `iters`
    grows, each prototype receives n/K of the mass. Float32, never part of the graph."""
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


def crop_grid(img_size: int, patch: int, crop_px: int, reference_px: int) -> int:
    """Patches per side of DEFEND's crop: `crop_px` at `reference_px` input (the paper's 96 at
    224), scaled to `img_size` and rounded to whole patches, at least 2."""
    return max(2, round(img_size * crop_px / reference_px / patch))


def random_boxes(
    batch: int,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """Random crop boxes [B, 4] (x0, y0, x1, y1 in continuous pixel coordinates of an image of
    `size` (H, W)) with area fraction in `scale` and log-uniform aspect ratio (w/h) in `ratio`,
    as RandomResizedCrop draws them (without rounding to whole pixels)."""
    h, w = size
    area = torch.empty(batch).uniform_(*scale, generator=generator) * (h * w)
    log_r = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    bw = (area * aspect).sqrt().clamp(max=w)
    bh = (area / aspect).sqrt().clamp(max=h)
    x0 = torch.rand(batch, generator=generator) * (w - bw)
    y0 = torch.rand(batch, generator=generator) * (h - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)


def _rois(boxes: Tensor) -> Tensor:
    index = torch.arange(len(boxes), device=boxes.device, dtype=torch.float32)[:, None]
    return torch.cat([index, boxes.float()], dim=1)


def resized_crops(images: Tensor, boxes: Tensor, out_px: int) -> Tensor:
    """The region of each image under its box, resampled to out_px x out_px: [B, C, out, out].
    Same resampling as `align_assignments`, so crop pixels and target patches coincide."""
    return roi_align(images.float(), _rois(boxes.to(images.device)), output_size=(out_px, out_px),
                     spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def align_assignments(
    q: Tensor, grid: tuple[int, int], patch: int, boxes: Tensor, out_grid: tuple[int, int]
) -> Tensor:
    """alpha(Q): the part of the full image's assignment map under each crop box, resampled to
    the crop's patch grid. `q` [B, N, K] with N = h*w patches in raster order, `boxes` [B, 4] in
    image pixels, `patch` the patch side in pixels; returns [B, M, K], M = out_grid[0]*out_grid[1].
    """
    b, n, k = q.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"q has {n} patches, the grid {h}x{w} has {h * w}")
    qmap = q.float().transpose(1, 2).reshape(b, k, h, w)
    out = roi_align(qmap, _rois(boxes.to(q.device)), output_size=out_grid,
                    spatial_scale=1.0 / patch, sampling_ratio=-1, aligned=True)
    return out.flatten(2).transpose(1, 2)


class DenseHead(nn.Module):
    """DEFEND's projection head g (Linear-GELU-Linear-GELU-Linear, then L2 normalisation) and
    its K learnable prototypes (rows kept at unit length)."""

    def __init__(self, in_dim: int, num_prototypes: int, hidden: int = 2048, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, out_dim),
        )
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, out_dim), dim=1))

    def forward(self, tokens: Tensor) -> Tensor:
        """L2-normalised projections z [..., out_dim] of patch tokens [..., in_dim]."""
        return F.normalize(self.mlp(tokens).float(), dim=-1)

    def similarities(self, z: Tensor) -> Tensor:
        """Cosine similarities z . p^T [..., K] to the (unit) prototypes, in float32 even under
        autocast (they are divided by eps = 0.05 or the temperature 0.1 next)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return z.float() @ self.prototypes.float().t()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototypes back onto the unit sphere (done before every step)."""
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))


def trainable_for_defend(vit: ViTFeatures, tuned_blocks: int) -> list[nn.Parameter]:
    """Freeze everything but the last `tuned_blocks` blocks and the final norm; return those."""
    model = vit.model
    if not 1 <= tuned_blocks <= len(model.blocks):
        raise ValueError(f"tuned_blocks must be in 1..{len(model.blocks)}, got {tuned_blocks}")
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = [*model.blocks[-tuned_blocks:], model.norm]
    params = [p for module in tuned for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def dense_targets(
    head: DenseHead, patches: Tensor, grid: tuple[int, int], patch: int, boxes: Tensor,
    out_grid: tuple[int, int], eps: float, iters: int,
) -> Tensor:
    """alpha(Q) [B, M, K]: Sinkhorn assignments of the full image's patch features [B, N, D]
    (over all patches of the batch, as SwAV does over a batch), cut out under the crop boxes."""
    with torch.no_grad():
        z = head(patches)
        b, n, _ = z.shape
        q = sinkhorn(head.similarities(z).reshape(b * n, -1), eps, iters).reshape(b, n, -1)
        return align_assignments(q, grid, patch, boxes, out_grid)


def dense_loss(head: DenseHead, crop_patches: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """l_dense = H(Q', alpha(Q)) with Q' = softmax(z' . p^T / temperature), mean over crop patches."""
    logits = head.similarities(head(crop_patches)) / temperature
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


# --- MKD -------------------------------------------------------------------------------------
def num_kept(num_patches: int, mask_ratio: float) -> int:
    """How many patches the student sees: the first (1 - mask_ratio) of them, at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, round(num_patches * (1.0 - mask_ratio)))


def keep_indices(
    attention: Tensor | None, num_patches: int, keep: int, guidance: str, generator: torch.Generator,
    batch: int | None = None,
) -> Tensor:
    """Indices [B, keep] of the patches the student sees. "teacher": the first `keep` of a
    keep-order drawn with torch.multinomial (no replacement) over the teacher's CLS attention
    [B, N], so attended patches tend to stay; "random": the same over a uniform distribution;
    "none": every patch (no masking). Drawn on the CPU from `generator`."""
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
    """Squared error per patch between teacher and student features [L, B, N, D] (each
    L2-normalised first when `normalise`), averaged over the L layers: [B, N], float32."""
    t, s = teacher.float(), student.float()
    if normalise:
        t, s = F.normalize(t, dim=-1), F.normalize(s, dim=-1)
    return (t - s).pow(2).sum(dim=-1).mean(dim=0)
