"""Reverse Distillation (RDAD): Deng & Li, "Anomaly Detection via Reverse Distillation from
One-Class Embedding", CVPR 2022 (official code: hq-deng/RD4AD; the "Redefining Normal" authors'
copy: SMSD75/Redefining_Normal_ACCV24, Multiobject_bench/RD4AD).

A frozen pre-trained ResNet encoder (the teacher) gives feature maps at three scales; a
trainable one-class bottleneck embedding (OCBE) fuses them into one compact code, and a
reverse ResNet decoder (the student) rebuilds the three maps from it. Anomalies are where the
decoder fails: the novelty score is the maximum of the summed, upsampled and smoothed
(1 - cosine) maps.

The bottleneck and the decoder are built from the encoder's channel widths and block type, so
the same code serves Wide-ResNet-50-2 (bottleneck blocks, 256/512/1024 channels) and small
basic-block ResNets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from scipy.ndimage import gaussian_filter
from timm.models import FeatureListNet
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from datasets_builders.errors import NdbenchError

from .backbones import create_backbone
from .base import BaseDetector, autocast, tracked
from .cost import CostModel, FrozenPass
from .features import FeatureTable, FrozenPart, compute_precision, frozen_weights_identity
from .memory import TableRows
from .pretrain import resolve_weights
from .registry import register
from .validation import CACHE_GB, MOMENTUM, STD, check_ranges, count, non_negative, positive
from .weight_sources import EMBEDDED_WEIGHTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSSES = ("flat", "map")
SCORES = ("map_max", "flat_loss")
KINDS = {"basic": 1, "bottleneck": 4}  # block kind -> channel expansion of its last conv


@dataclass(frozen=True)
class RDADConfig:
    """Reverse distillation hyper-parameters; defaults are the official code's (MVTec). Sources:
    "official" = hq-deng/RD4AD (commit 6554076), "copy" =
    SMSD75/Redefining_Normal_ACCV24:Multiobject_bench/RD4AD (commit 13736a9)."""

    backbone: str = "wide_resnet50_2.tv_in1k"  # official main.py:80 resnet.wide_resnet50_2(pretrained=True)
    weights: str = "hub"  # "hub", a local file, "none" (random, on request) or "embedded"
    # official main.py:66, 71 image_size 256 -> dataset.py:12-18 Resize((256, 256)), CenterCrop(256)
    # (crops nothing), Normalize (ImageNet). None takes the backbone's own from timm's config.
    img_size: int = 256
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    bottleneck_blocks: int = 3  # official resnet.py:559 BN_layer(AttnBottleneck, 3)
    # official de_resnet.py:378 layers [3, 4, 6, 3]: decoder stages from the bottleneck outwards.
    decoder_blocks: tuple[int, int, int] = (3, 4, 6)
    lr: float = 0.005  # official main.py:64 learning_rate
    betas: tuple[float, float] = (0.5, 0.999)  # official main.py:87 Adam betas
    epochs: int = 200  # official main.py:63 epochs
    batch_size: int = 16  # official main.py:65 batch_size
    # official main.py:33-43 loss_fucntion: per scale, 1 - cosine of the whole flattened maps,
    # batch-averaged ("flat"); "map" is the paper's eq. 3 (per-position cosine, averaged over positions).
    loss: str = "flat"
    # "map_max": official test.py:83-84, 93, the maximum of the summed, upsampled, smoothed
    # (1 - cos) maps. "flat_loss": the authors' copy's custom_eval (copy test.py:86-110), each
    # image's training loss (the sum over scales of 1 - cosine of the whole flattened maps).
    score: str = "map_max"
    sigma: float = 4.0  # official test.py:84 gaussian_filter(anomaly_map, sigma=4) on 256 px maps
    # ndbench choice: the frozen encoder's training features are computed once per job and kept
    # in memory when they fit in this many GB (the original recomputes them every epoch).
    max_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise NdbenchError(f"unknown loss {self.loss!r}", f"use one of {', '.join(LOSSES)}")
        if self.score not in SCORES:
            raise NdbenchError(f"unknown score {self.score!r}", f"use one of {', '.join(SCORES)}")
        check_ranges(
            self, img_size=count(32).because("the bottleneck works at 1/32 of the image"), std=STD,
            bottleneck_blocks=count(), decoder_blocks=count().each(nonempty=True), lr=positive(),
            betas=MOMENTUM.each(nonempty=True), epochs=count(), batch_size=count(),
            sigma=non_negative().because("0 smooths nothing"), max_cache_gb=CACHE_GB,
        )
        if self.img_size % 32:
            raise NdbenchError(
                f"img_size {self.img_size} is not a multiple of 32",
                "use a multiple of 32 (the bottleneck works at 1/32 of the image), e.g. 256",
            )
        if len(self.decoder_blocks) != 3:
            raise NdbenchError(f"decoder_blocks {self.decoder_blocks!r} is not valid",
                               "give three block counts, e.g. decoder_blocks=(3, 4, 6)")


# The embedded preset: ndbench's offline ResNet-10-style CNN (one basic block per stage, 32/64/128
# channels at layers 1-3) at 64 px, so the bottleneck and the decoder mirror it with one block a
# stage; smoothing sigma scaled with the image (4 at 256 px -> 1 at 64 px). Measured on uni-class
# 0 / 9 (1 thread on a shared 2-core CPU), AUROC by epochs: 2 -> 0.539 / 0.477, 5 -> 0.571 /
# 0.519, 10 -> 0.547 / 0.484, 20 -> 0.517 / 0.502 (one epoch ~2 s of one core); so 5.
EMBEDDED_RDAD = {
    "backbone": "ndbench_resnet_embedded",
    "weights": EMBEDDED_WEIGHTS,
    "img_size": 64,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "bottleneck_blocks": 1,
    "decoder_blocks": (1, 1, 1),
    "sigma": 1.0,
    "epochs": 5,
}
# Multi-class splits (~2,800 train images): one epoch (measured at 5: fit 29 s on 2 idle cores).
EMBEDDED_MULTI_RDAD = {"epochs": 1}
# How the authors' copy ran RD4AD on VOC for the paper (copy main.py:101 dataset_name = 'pvoc').
# It keeps the official WRN-50-2 encoder, OCBE and decoder (main.py:61-66; resnet.py and
# de_resnet.py equal the official files but for comments), the flat loss (main.py:28-33) and Adam
# with betas (0.5, 0.999) at lr 0.005 (main.py:53, 68). Its custom_eval pairs labels and scores
# with zip(labels, [batch loss]) (test.py:104), which would keep only each batch's first label
# with the batch's mean loss; the VOC test loader it reads has batch size 1 (dataset.py:195-197),
# so every image gets its own loss there, and ndbench scores per image.
PAPER_RDAD = {
    # copy dataset.py:410 (pvoc): Resize((224, 224)) + ToTensor, no Normalize ([0, 1] pixels).
    "img_size": 224,
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "epochs": 1,  # copy main.py:52
    "batch_size": 32,  # copy main.py:54
    "score": "flat_loss",  # copy main.py:117 -> test.py:86-110 custom_eval
}


# --- building blocks ----------------------------------------------------------------------------
def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _resample(cin: int, cout: int, kernel: int, resample: str) -> nn.Module:
    """A convolution that keeps the size, halves it (stride 2) or doubles it (2x2 transposed)."""
    if resample == "up":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
    return _conv(cin, cout, kernel, 2 if resample == "down" else 1)


class ResBlock(nn.Module):
    """A ResNet block, basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 through `width` channels),
    that keeps, halves ("down") or doubles ("up", by 2x2 transposed convolutions, as the
    reverse ResNet does) the spatial size; a projected shortcut when the shape changes."""

    def __init__(self, kind: str, cin: int, cout: int, width: int, resample: str = "none"):
        super().__init__()
        if kind == "basic":
            layers = [_resample(cin, cout, 3, resample), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                      _conv(cout, cout, 3), nn.BatchNorm2d(cout)]
        else:
            layers = [_conv(cin, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                      _resample(width, width, 3, resample), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                      _conv(width, cout, 1), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if resample != "none" or cin != cout:
            self.shortcut = nn.Sequential(_resample(cin, cout, 1, resample), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _stage(kind: str, cin: int, cout: int, ratio: float, blocks: int, resample: str) -> nn.Sequential:
    width = int(cout // KINDS[kind] * ratio)
    first = ResBlock(kind, cin, cout, width, resample)
    return nn.Sequential(first, *(ResBlock(kind, cout, cout, width) for _ in range(blocks - 1)))


def _init(module: nn.Module) -> None:
    # As the official resnet.py:416-421 (OCBE) and de_resnet.py:202-207 (decoder): Kaiming (fan-out)
    # for convolutions, BatchNorm at identity; the transposed convolutions keep torch's default.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class OneClassBottleneck(nn.Module):
    """OCBE (paper sec. 3.2): the scale-1 map goes through two stride-2 3x3 convolutions and the
    scale-2 map through one, both to the scale-3 size; the three maps are concatenated and a
    layer4-like residual stage (stride 2) turns them into the one-class embedding of 2 x c3
    channels at 1/32 of the image."""

    def __init__(self, channels: tuple[int, int, int], kind: str, ratio: float, blocks: int):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(
            _conv(c1, c2, 3, 2), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            _conv(c2, c3, 3, 2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.fuse2 = nn.Sequential(_conv(c2, c3, 3, 2), nn.BatchNorm2d(c3), nn.ReLU(inplace=True))
        self.embed = _stage(kind, 3 * c3, 2 * c3, ratio, blocks, "down")
        self.out_channels = 2 * c3
        _init(self)

    def forward(self, features: list[Tensor]) -> Tensor:
        f1, f2, f3 = features
        return self.embed(torch.cat([self.fuse1(f1), self.fuse2(f2), f3], dim=1))


class ReverseDecoder(nn.Module):
    """The student: three up-sampling residual stages from the embedding back to the encoder's
    scale-3, scale-2 and scale-1 maps (the reverse ResNet); returns them in encoder order."""

    def __init__(self, channels: tuple[int, int, int], kind: str, ratio: float, blocks: tuple[int, int, int],
                 in_channels: int):
        super().__init__()
        c1, c2, c3 = channels
        self.stages = nn.ModuleList([
            _stage(kind, in_channels, c3, ratio, blocks[0], "up"),
            _stage(kind, c3, c2, ratio, blocks[1], "up"),
            _stage(kind, c2, c1, ratio, blocks[2], "up"),
        ])
        _init(self)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        outputs = []
        h = embedding
        for stage in self.stages:
            h = stage(h)
            outputs.append(h)
        return outputs[::-1]


def encoder_block_spec(model: nn.Module) -> tuple[str, float]:
    """The block kind ("basic" or "bottleneck") of a timm ResNet and its width ratio (inner
    width over output channels / expansion: 2 for Wide-ResNet-50-2, 1 for a plain ResNet)."""
    layer1 = getattr(model, "layer1", None)
    block = layer1[0] if isinstance(layer1, nn.Sequential) and len(layer1) else None
    if isinstance(block, Bottleneck):
        return "bottleneck", block.conv1.out_channels * KINDS["bottleneck"] / block.conv3.out_channels
    if isinstance(block, BasicBlock):
        return "basic", 1.0
    raise NdbenchError(
        f"rdad needs a timm ResNet encoder with basic or bottleneck blocks, not {type(model).__name__}",
        "choose a ResNet backbone, e.g. wide_resnet50_2.tv_in1k or ndbench_resnet_embedded",
    )


class ReverseDistillation(nn.Module):
    """Frozen encoder (layers 1-3 of a timm ResNet, as timm's features_only wrapper), trainable
    OCBE and decoder. `forward` returns the encoder's and the decoder's three maps."""

    def __init__(self, backbone: nn.Module, bottleneck_blocks: int, decoder_blocks: tuple[int, int, int]):
        super().__init__()
        kind, ratio = encoder_block_spec(backbone)
        # What timm's features_only=True, out_indices=(1, 2, 3) builds, but around a model whose
        # weights were already loaded (a local weights file also holds layer4 and fc).
        self.encoder = FeatureListNet(backbone, out_indices=(1, 2, 3))
        channels = tuple(self.encoder.feature_info.channels())
        self.channels: tuple[int, int, int] = channels
        self.bottleneck = OneClassBottleneck(channels, kind, ratio, bottleneck_blocks)
        self.decoder = ReverseDecoder(channels, kind, ratio, decoder_blocks, self.bottleneck.out_channels)
        self.encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> ReverseDistillation:
        """Train mode for the OCBE and decoder; the encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def encode(self, x: Tensor) -> list[Tensor]:
        """The frozen encoder's three maps (no gradient)."""
        with torch.no_grad():
            return self.encoder(x)

    def decode(self, features: list[Tensor]) -> list[Tensor]:
        """The decoder's reconstruction of the three maps from the encoder's."""
        return self.decoder(self.bottleneck(features))

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        features = self.encode(x)
        return features, self.decode(features)


def flat_distances(encoder: list[Tensor], decoder: list[Tensor]) -> Tensor:
    """Per image [B] (float32), the sum over scales of 1 - cosine of the whole flattened encoder
    and decoder maps (official main.py:33-43 before its batch mean)."""
    total = torch.zeros(encoder[0].shape[0], device=encoder[0].device)
    for e, d in zip(encoder, decoder, strict=True):
        total = total + 1 - F.cosine_similarity(e.float().flatten(1), d.float().flatten(1), dim=1)
    return total


def distillation_loss(encoder: list[Tensor], decoder: list[Tensor], kind: str = "flat") -> Tensor:
    """Sum over scales of the batch mean of (1 - cosine): of each image's whole flattened map
    ("flat", official main.py:33-43) or of each position's channel vector, averaged over
    positions ("map", the paper's eq. 3)."""
    if kind == "flat":
        return flat_distances(encoder, decoder).mean()
    loss = torch.zeros((), device=encoder[0].device)
    for e, d in zip(encoder, decoder, strict=True):
        loss = loss + (1 - F.cosine_similarity(e.float(), d.float(), dim=1)).mean()
    return loss


def anomaly_maps(encoder: list[Tensor], decoder: list[Tensor], size: int) -> Tensor:
    """Sum over scales of the (1 - cosine) maps, each upsampled (bilinear, corners aligned) to
    `size` x `size` as the official test.py:25-45 cal_anomaly_map does (amap_mode 'a', test.py:83):
    [B, size, size], float32."""
    total = None
    for e, d in zip(encoder, decoder, strict=True):
        m = 1 - F.cosine_similarity(e.float(), d.float(), dim=1)
        m = F.interpolate(m[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        total = m if total is None else total + m
    return total


def smooth(maps: Tensor, sigma: float) -> np.ndarray:
    """Gaussian smoothing of each map [B, H, W] (scipy's gaussian_filter, as the official test.py:84)."""
    array = maps.detach().cpu().double().numpy()
    if sigma <= 0:
        return array
    return gaussian_filter(array, sigma=(0, sigma, sigma))


# The frozen encoder's three maps in the feature cache, float32 as rdad always kept them (so
# cached scores equal uncached ones); one entry serves train and test images.
MAPS = ("scale1", "scale2", "scale3")
MAPS_DTYPE = torch.float32


def _draw_seed() -> int:
    """A seed for one epoch's order, drawn from torch's global generator (seeded per job)."""
    return int(torch.randint(0, 2**62, (1,)).item())


@register("rdad")
class RDADDetector(BaseDetector):
    """Reverse distillation: a trainable bottleneck + reverse-ResNet decoder rebuilds a frozen
    encoder's multi-scale maps; the score is the largest smoothed reconstruction error."""

    Config = RDADConfig
    description = "Reverse Distillation: OCBE + reverse-ResNet student, max smoothed (1 - cos) map"
    paper = "Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022"
    presets = {"embedded": EMBEDDED_RDAD, "embedded/multi-class": EMBEDDED_MULTI_RDAD, "paper": PAPER_RDAD}
    paper_preset = "paper"

    def __init__(self, config: RDADConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.model: ReverseDistillation | None = None

    def build_model(self, weights) -> ReverseDistillation:
        """Encoder with `weights` (frozen), freshly initialised OCBE and decoder."""
        c = self.config
        backbone = create_backbone(c.backbone, weights=weights, num_classes=0)
        return ReverseDistillation(backbone, c.bottleneck_blocks, c.decoder_blocks)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The OCBE's and the decoder's parameters (what the official main.py:87 Adam optimises)."""
        return [*self.model.bottleneck.parameters(), *self.model.decoder.parameters()]

    # --- training --------------------------------------------------------------------------
    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None:
        """Train the OCBE and the decoder to rebuild the frozen encoder's maps of the training images."""
        c = self.config
        self.check_train_images(train)
        self.model = self.build_model(resolve_weights(c.backbone, c.weights)).to(device)
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=c.lr, betas=c.betas)
        cache = self._cache_features(train, device, progress)
        losses = []
        self.runtime.counts.add("trained_passes", len(train) * c.epochs)
        for epoch in range(c.epochs):
            self.model.train()
            total, count = 0.0, 0
            for features in self._batches(train, cache, device, progress, f"{self.name}: epoch {epoch + 1}/{c.epochs}"):
                loss = self.train_step(features, optimizer, device)
                total, count = total + loss * len(features[0]), count + len(features[0])
            losses.append(total / max(count, 1))
        self.model.eval()
        self.extra = {"loss_per_epoch": losses, "encoder_features_cached": cache is not None}
        self.fitted = True

    def train_step(self, features: list[Tensor], optimizer: torch.optim.Optimizer, device: torch.device) -> float:
        """One Adam step of the distillation loss on a batch of encoder maps; returns the loss."""
        with autocast(device):
            decoded = self.model.decode(features)
        loss = distillation_loss(features, decoded, self.config.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def _encode(self, x: Tensor, device: torch.device) -> list[Tensor]:
        self.runtime.counts.add("frozen_passes", len(x))
        return self._encoder_maps(x, device)

    def _encoder_maps(self, x: Tensor, device: torch.device) -> list[Tensor]:
        with autocast(device):
            return [f.float() for f in self.model.encode(x.to(device))]

    # --- the feature cache -----------------------------------------------------------------
    def encoder_part(self, device: torch.device, *, plan: bool = False) -> FrozenPart | None:
        """The feature-cache key of the frozen encoder's maps (None with random weights). The
        encoder stays in eval mode and sees the resized image (no augmentation), so its maps
        are the same in every job. `plan`: for a dry run."""
        c = self.config
        identity = frozen_weights_identity(c.backbone, c.weights, plan=plan)
        if identity is None:
            return None
        return FrozenPart(identity, f"{c.backbone}/layers1-3", compute_precision(device))

    def cost_model(self, device: torch.device, split_id: str = "") -> CostModel:
        """One frozen encoder pass per train and test image; the OCBE and decoder run every
        epoch on every train image and once per test image."""
        return CostModel(frozen=(FrozenPass(self.encoder_part(device, plan=True), ("train", "test"), MAPS_DTYPE),),
                         trained_per_train_image=float(self.config.epochs), trained_per_test_image=1.0)

    def _encoder_table(self, images: Dataset, device: torch.device, progress: Progress | None) -> FeatureTable | None:
        """The encoder maps of `images` from the feature cache (or in memory when they are not
        stored), or None when they would exceed `max_cache_gb` in memory."""
        c = self.config
        reductions = self.model.encoder.feature_info.reduction()
        per_image = sum(ch * (c.img_size // r) ** 2 for ch, r in zip(self.model.channels, reductions, strict=True))
        part = self.encoder_part(device)
        limit = c.max_cache_gb * 2**30
        stored = part is not None and getattr(images, "image_key", None) is not None \
            and self.runtime.features.store is not None
        if not stored and len(images) * per_image * MAPS_DTYPE.itemsize > limit:
            return None

        def compute(x: Tensor) -> dict[str, Tensor]:
            return dict(zip(MAPS, self._encoder_maps(x, device), strict=True))

        return self.runtime.features.get_or_compute(
            part, images, compute, loader=self.loader, dtype=MAPS_DTYPE, memory_limit=limit, progress=progress,
            description=f"{self.name}: encoder features")

    def _cache_features(self, train: Dataset, device: torch.device, progress: Progress | None) -> TableRows | None:
        """The encoder maps of every training image, or None past `max_cache_gb` in memory."""
        table = self._encoder_table(train, device, progress)
        return None if table is None else TableRows(table, device)

    def _batches(self, train: Dataset, cache: TableRows | None, device: torch.device,
                 progress: Progress | None, description: str) -> Iterator[list[Tensor]]:
        """Shuffled batches of encoder maps (the official main.py:77 shuffles, keeping the last partial batch),
        in the same order whether the maps are cached or recomputed."""
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_draw_seed()))
        if cache is None:
            for x, _, _ in tracked(self.loader(Subset(train, order.tolist())), progress, description):
                yield self._encode(x, device)
            return
        chunks = order.split(self.config.batch_size)
        for idx in tracked(chunks, progress, description, total=len(chunks)):
            rows = cache.rows(idx)
            yield [rows[name].to(device) for name in MAPS]

    # --- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def raw_maps(self, x: Tensor, features: list[Tensor] | None = None) -> Tensor:
        """Unsmoothed summed (1 - cos) maps of a normalised batch at the image size [B, H, W];
        `features`: its encoder maps when they are known (read from the feature cache)."""
        features, decoded = self._encode_decode(x, features)
        return anomaly_maps(features, decoded, x.shape[-1])

    def anomaly_map(self, images: Tensor) -> Tensor:
        """Smoothed anomaly maps [B, H, W] (CPU, float32) of a normalised batch."""
        return torch.from_numpy(smooth(self.raw_maps(images), self.config.sigma)).float()

    @torch.no_grad()
    def flat_scores(self, x: Tensor, features: list[Tensor] | None = None) -> np.ndarray:
        """Each image's flat distillation distance (see `flat_distances`) of a normalised batch."""
        features, decoded = self._encode_decode(x, features)
        return flat_distances(features, decoded).double().cpu().numpy()

    def _encode_decode(self, x: Tensor, features: list[Tensor] | None) -> tuple[list[Tensor], list[Tensor]]:
        """The encoder maps of a normalised batch (`features` when known) and their decoding."""
        self._require_fitted()
        device = next(self.model.bottleneck.parameters()).device
        self.model.eval()
        features = self._encode(x, device) if features is None else features
        with autocast(device):
            decoded = self.model.decode(features)
        return features, decoded

    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """Per image, the maximum of its smoothed anomaly map ("map_max") or its flat
        distillation distance ("flat_loss"); higher = more novel."""
        self._require_fitted()
        self.model.to(device)
        # With a store, the encoder maps of the test images (the same in every job of a grid)
        # come from the feature cache; without one, they are computed per batch.
        table = self._encoder_table(images, device, progress) if self.runtime.features.store is not None else None
        rows, start = [], 0
        for x, _, _ in tracked(self.loader(images), progress, f"{self.name}: scoring"):
            features = None
            if table is not None:
                got = table.rows(np.arange(start, start + len(x)))
                features = [got[name].to(device) for name in MAPS]
            start += len(x)
            self.runtime.counts.add("trained_passes", len(x))
            if self.config.score == "flat_loss":
                rows.append(self.flat_scores(x.to(device), features))
            else:
                rows.append(smooth(self.raw_maps(x.to(device), features), self.config.sigma).max(axis=(1, 2)))
        return np.concatenate(rows) if rows else np.zeros(0)

    def _require_fitted(self) -> None:
        if not self.fitted or self.model is None:
            raise NdbenchError(f"{self.name} is not fitted", "call fit() (or load a saved model) first")

    # --- persistence -----------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()}, "extra": dict(self.extra)}

    def set_state(self, state: dict) -> None:
        self.model = self.build_model("none")
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.extra = dict(state.get("extra", {}))
