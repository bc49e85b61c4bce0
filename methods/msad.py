"""Mean-Shifted Contrastive Loss (MSAD): Reiss & Hoshen, "Mean-Shifted Contrastive Loss for
Anomaly Detection", AAAI 2023 (original code: talreiss/Mean-Shifted-Anomaly-Detection; the
"Redefining Normal" authors' copy: SMSD75/Redefining_Normal_ACCV24, Multiobject_bench/Mean-Shifted-AD).

A pre-trained backbone's L2-normalised pooled features (a ResNet's pooled map, or a ViT's CLS
token: timm's pre-logits) are fine-tuned with a contrastive loss computed around the fixed
centre c of the normal training features: each feature is shifted by c and re-normalised
before NT-Xent over two MoCo-v2 views per image. The views are cut from the whole training
image, not from the centre-cropped evaluation input. The novelty score is the kNN distance
(sum of squared distances to the k nearest training features).

Sources cited below: "official" = talreiss/Mean-Shifted-Anomaly-Detection (commit 2276936),
"copy" = SMSD75/Redefining_Normal_ACCV24:Multiobject_bench/Mean-Shifted-AD (commit 13736a9).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from rich.progress import Progress
from sklearn.neighbors import NearestNeighbors
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from datasets_builders.errors import NdbenchError

from .backbones import create_backbone
from .base import BaseDetector, autocast, tracked
from .pretrain import resolve_weights
from .registry import register
from .validation import CACHE_GB, MOMENTUM, STD, between, check_ranges, check_value, count, non_negative, positive
from .weight_sources import EMBEDDED_WEIGHTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class MSADConfig:
    """MSAD hyper-parameters; defaults are the official code's (CIFAR-10, ResNet-152)."""

    # official main.py:118 (--backbone 152) -> utils.py:72-73 torchvision resnet152(pretrained=True)
    backbone: str = "resnet152.tv_in1k"
    weights: str = "hub"  # "hub", a local file, "none" (random, on request) or "embedded"
    img_size: int = 224  # official utils.py:26 CenterCrop(224)
    center_crop: float = 224 / 256  # official utils.py:25-26 Resize(256) + CenterCrop(224): 224/256 kept
    interpolation: str = "bilinear"  # official utils.py:25 Resize(256): torchvision's default, bilinear
    # official utils.py:28 Normalize (ImageNet). None takes the backbone's own from timm's config.
    mean: tuple[float, float, float] | None = IMAGENET_MEAN
    std: tuple[float, float, float] | None = IMAGENET_STD
    # official utils.py:88-96 freeze_parameters (backbone 152): conv1, bn1, layer1, layer2 get no gradient.
    frozen: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")
    temperature: float = 0.25  # official main.py:14 temp = 0.25
    angular: bool = False  # official main.py:119 --angular (off): normalised c + angular centre loss
    lr: float = 1e-5  # official main.py:116 --lr
    weight_decay: float = 5e-5  # official main.py:35 SGD weight_decay=0.00005
    momentum: float = 0.0  # official main.py:35 plain SGD (torch's default, no momentum)
    epochs: int = 20  # official main.py:114 --epochs
    batch_size: int = 64  # official main.py:117 --batch_size
    k: int = 2  # official utils.py:100 knn_score(n_neighbours=2)
    # MoCo v2 augmentation (official utils.py:50-66 Transform), two views per image:
    crop_scale: tuple[float, float] = (0.2, 1.0)  # utils.py:53 RandomResizedCrop(224, scale=(0.2, 1.))
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # utils.py:55 ColorJitter
    jitter_p: float = 0.8  # utils.py:54-56 RandomApply([ColorJitter], p=0.8)
    grayscale_p: float = 0.2  # utils.py:57 RandomGrayscale(p=0.2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # utils.py:58 GaussianBlur([.1, 2.]), pixels of a 224 px view
    blur_p: float = 0.5  # utils.py:58 RandomApply([GaussianBlur], p=0.5)
    flip_p: float = 0.5  # utils.py:59 RandomHorizontalFlip()
    # The views are cut from the whole image as stored (official utils.py:117 hands the full image
    # to Transform, whose RandomResizedCrop runs first). An int resizes it first so its short side
    # has that many pixels (aspect kept), to save memory; None keeps the stored resolution.
    view_source_size: int | None = None
    # ndbench choice: the uncropped training images (uint8) are decoded once per job and kept in
    # memory when they fit in this many GB; else decoded again for every batch.
    max_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise NdbenchError(f"unknown interpolation {self.interpolation!r}",
                               f"use one of {', '.join(INTERPOLATIONS)}")
        probability = between(0, 1)
        check_ranges(
            self, img_size=count(), center_crop=between(0, 1, low_open=True), std=STD, temperature=positive(),
            lr=positive(), weight_decay=non_negative(), momentum=MOMENTUM, epochs=count(), batch_size=count(),
            k=count(), crop_scale=between(0, 1, low_open=True).pair(), jitter=non_negative().each(nonempty=True),
            jitter_p=probability, grayscale_p=probability, blur_sigma=positive().pair(), blur_p=probability,
            flip_p=probability, view_source_size=count().or_none("to keep the stored images"),
            max_cache_gb=CACHE_GB,
        )
        check_value("jitter's hue", self.jitter[-1], between(0, 0.5).because("the last item is ColorJitter's hue"))


# The embedded preset: ndbench's offline ResNet-10-style CNN (the stand-in for ImageNet weights)
# at 64 px with its own mean/std 0.5. Measured on uni-class 0 / 9 (1 thread on a shared 2-core
# CPU): the untuned features give AUROC 0.575 / 0.513; 2 epochs (16 SGD steps) at the official
# lr 1e-5 leave them unchanged; lr 1e-2 -> 0.593 / 0.523, 3e-2 -> 0.603 / 0.534, 1e-1 -> 0.569 /
# 0.504; 3-4 epochs gain nothing more. Each epoch costs ~3.5 s of one core (MoCo views + step).
EMBEDDED_MSAD = {
    "backbone": "ndbench_resnet_embedded",
    "weights": EMBEDDED_WEIGHTS,
    "img_size": 64,
    "center_crop": 1.0,  # ndbench choice: scenes are composed edge to edge (0.875 measured worse)
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "epochs": 2,
    "lr": 3e-2,
}
# Multi-class splits (~2,800 train images): one epoch (measured at 2: fit 27 s on 2 idle cores).
EMBEDDED_MULTI_MSAD = {"epochs": 1}
# How the authors' copy ran MSAD for the paper's numbers ("ViT-B16-224" in the paper's Tables 2
# and 4). What it keeps from the official code: the loss (copy main.py:10-28, 47-67), SGD at lr
# 1e-5 with weight decay 5e-5 and no momentum (main.py:34, 110), temperature 0.25 (main.py:14),
# the plain mean as centre (main.py:35-37, no --angular), eval mode throughout (main.py:31), the
# two MoCo v2 views cut from the whole image (utils.py:330-346, applied at utils.py:527) and the
# 2-NN score (utils.py:413-420).
PAPER_MSAD = {
    # copy main.py:112 (--backbone vit-base) -> utils.py:380-382: the weights of timm's
    # vit_base_patch16_224(pretrained=True) loaded into a DINO-style ViT-B/16 whose forward is the
    # final-normed CLS token (utils.py:244-249), i.e. timm's pre-logits. The copy pins no timm
    # version; from timm 0.9 (the copy's GeneralAD/environment.yml:30 pins 0.9.16) the untagged
    # name resolves to the augreg2_in21k_ft_in1k weights (timm 0.6 and older: augreg_in21k_ft_in1k).
    "backbone": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "frozen": (),  # copy utils.py:399-411: only the ResNet-152 freezes layers; the ViT trains whole
    # copy utils.py:525 picks transform_resnet18 for any backbone but "152": utils.py:302-307
    # Resize(224, bicubic) + CenterCrop(224) + ImageNet mean/std (not the 0.5/0.5 these ViT
    # weights were trained with; the views, utils.py:341, use the same ImageNet mean/std).
    "img_size": 224,
    "center_crop": 1.0,
    "interpolation": "bicubic",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "epochs": 10,  # copy main.py:109 --epochs 10
    "batch_size": 32,  # copy main.py:111 --batch_size 32
}


@runtime_checkable
class SourceImages(Protocol):
    """A dataset that hands back an item's image before its transform (ManifestDataset does)."""

    def image(self, item: int) -> PIL.Image.Image: ...


class MSADNet(nn.Module):
    """A pooled-feature backbone whose output is L2-normalised (official utils.py:79-82)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.backbone(x).float(), dim=-1)


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Turn off gradients of every parameter whose name starts with one of the module names
    `prefixes` (e.g. "layer1" freezes "layer1.*"); returns the frozen names. An unknown name
    raises, so a backbone with other module names cannot silently train everything."""
    names = dict(model.named_children())
    missing = [p for p in prefixes if p.split(".")[0] not in names]
    if missing:
        raise NdbenchError(
            f"the backbone has no module {missing[0]!r} to freeze (it has {', '.join(names)})",
            "choose a ResNet-style backbone or set `frozen` to its module names",
        )
    frozen = []
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def mean_shifted_loss(z1: Tensor, z2: Tensor, centre: Tensor, temperature: float, angular: bool = False) -> Tensor:
    """The mean-shifted contrastive loss of two views' normalised features [B, D]: NT-Xent over
    the 2B features shifted by `centre` and re-normalised (each view's positive is the other
    view of its image; the denominator runs over the 2B - 1 others), plus, when `angular`,
    the mean squared norm of the shifted features (the angular centre loss)."""
    s1, s2 = z1 - centre, z2 - centre
    shifted = F.normalize(torch.cat([s1, s2]), dim=-1)
    n = s1.shape[0]
    logits = shifted @ shifted.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=logits.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(logits.device)
    loss = F.cross_entropy(logits, positives)
    if angular:
        loss = loss + s1.pow(2).sum(dim=1).mean() + s2.pow(2).sum(dim=1).mean()
    return loss


class MoCoV2Augment:
    """MoCo v2's augmentation (fresh draws per image, from torch's global RNG): random resized
    crop to `img_size`, colour jitter, grayscale, Gaussian blur and horizontal flip, on uint8
    images of any size [3, H, W] (8-bit like the original's PIL images), then normalised."""

    def __init__(self, config: MSADConfig, mean: Sequence[float], std: Sequence[float]):
        c = config
        size = c.img_size
        sigma = tuple(s * size / 224 for s in c.blur_sigma)  # official utils.py:53, 58: it blurs 224 px views
        kernel = 2 * int(np.ceil(3 * sigma[1])) + 1
        self.mean = torch.tensor(tuple(mean)).view(3, 1, 1)
        self.std = torch.tensor(tuple(std)).view(3, 1, 1)
        self.pipeline = v2.Compose([
            v2.RandomResizedCrop(size, scale=c.crop_scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(*c.jitter)], p=c.jitter_p),
            v2.RandomGrayscale(p=c.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=c.blur_p),
            v2.RandomHorizontalFlip(p=c.flip_p),
        ])

    def __call__(self, images: Sequence[Tensor]) -> Tensor:
        """One augmented, normalised view [B, 3, img_size, img_size] (float32, CPU) of each
        uint8 image [3, H, W]."""
        views = torch.stack([self.pipeline(image) for image in images]).float() / 255
        return (views - self.mean) / self.std


class ViewSources:
    """The uncropped training images the views are cut from, uint8 [3, H, W] each (sizes may
    differ): kept in memory when they fit the budget, else decoded again for every batch."""

    def __init__(self, detector: MSADDetector, data: Dataset, images: list[Tensor] | None):
        self.detector = detector
        self.data = data
        self.images = images

    @classmethod
    def load(cls, detector: MSADDetector, data: Dataset, *, budget: float,
             progress: Progress | None) -> ViewSources:
        """Decode every image of `data` once, unless (judged by the first) they exceed `budget` bytes."""
        first = detector.source_image(data, 0)
        if len(data) * first.numel() > budget:
            return cls(detector, data, None)
        items = tracked(range(len(data)), progress, f"{detector.name}: loading training images")
        return cls(detector, data, [detector.source_image(data, i) for i in items])

    def __len__(self) -> int:
        return len(self.data)

    def get(self, item: int) -> Tensor:
        """Image `item` as uint8 [3, H, W]."""
        return self.images[item] if self.images is not None else self.detector.source_image(self.data, item)

    def batches(self, batch_size: int, progress: Progress | None, description: str) -> Iterator[list[Tensor]]:
        """Batches of images in a shuffled order drawn from torch's global RNG (the original
        shuffles and keeps the last partial batch: official utils.py:128-129)."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(seed))
        chunks = order.split(batch_size)
        for idx in tracked(chunks, progress, description, total=len(chunks)):
            yield [self.get(int(i)) for i in idx]


@register("msad")
class MSADDetector(BaseDetector):
    """Mean-shifted contrastive fine-tuning of a pre-trained ResNet or ViT, then kNN scoring."""

    Config = MSADConfig
    description = "Mean-Shifted Contrastive Loss: contrastive fine-tuning around the normal centre, kNN score"
    paper = "Reiss & Hoshen, Mean-Shifted Contrastive Loss for Anomaly Detection, AAAI 2023"
    presets = {"embedded": EMBEDDED_MSAD, "embedded/multi-class": EMBEDDED_MULTI_MSAD, "paper": PAPER_MSAD}
    paper_preset = "paper"

    def __init__(self, config: MSADConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.model: MSADNet | None = None
        self.centre: Tensor | None = None
        self.train_features: np.ndarray | None = None

    # --- input -----------------------------------------------------------------------------
    def transform(self):
        """PIL image -> normalised tensor: resize the short side, then centre-crop `img_size`
        (the official Resize(256) + CenterCrop(224) at 224 px)."""
        c = self.config
        mean, std = self.normalisation()
        return transforms.Compose([
            transforms.Resize(round(c.img_size / c.center_crop), interpolation=InterpolationMode(c.interpolation),
                              antialias=True),
            transforms.CenterCrop(c.img_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    def source_image(self, data: Dataset, item: int) -> Tensor:
        """The whole image `item` of `data` as uint8 [3, H, W], for cutting views: the image
        before its transform when the dataset can give it (`SourceImages`), else the item's
        tensor taken back to 8-bit pixels (then it is all the dataset has)."""
        size = self.config.view_source_size
        if isinstance(data, SourceImages):
            image = data.image(item).convert("RGB")
            if size is not None:
                image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
            return TF.pil_to_tensor(image)
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in self.normalisation())
        pixels = (data[item][0].float() * std + mean).clamp(0, 1)
        if size is not None:
            pixels = TF.resize(pixels, size, antialias=True)
        return pixels.mul(255).round().to(torch.uint8)

    # --- model -----------------------------------------------------------------------------
    def build_model(self, weights) -> MSADNet:
        """The backbone with `weights` (a ViT set to `img_size`), its `frozen` modules frozen,
        in eval mode."""
        c = self.config
        backbone = create_backbone(c.backbone, weights=weights, num_classes=0)
        if isinstance(backbone, VisionTransformer) and tuple(backbone.patch_embed.img_size) != (c.img_size,) * 2:
            backbone = create_backbone(c.backbone, weights=weights, num_classes=0, img_size=c.img_size)
        freeze(backbone, c.frozen)
        return MSADNet(backbone).eval()

    @torch.no_grad()
    def features(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> Tensor:
        """Normalised features [N, D] (float32, CPU) of every image, in eval mode."""
        self._require_model()
        self.model.to(device).eval()
        rows = []
        for x, _, _ in tracked(self.loader(images), progress, f"{self.name}: features"):
            with autocast(device):
                rows.append(self.model(x.to(device)).float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 0)

    # --- training --------------------------------------------------------------------------
    def fewest_train_images(self) -> int:
        """Two, unless `angular`: with one image the contrastive loss has no negatives and is 0,
        so only the angular centre loss would train the backbone."""
        return 1 if self.config.angular else 2

    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None:
        """Fix the centre from the pre-trained features, fine-tune with the mean-shifted loss on
        two views of each whole training image, then store the tuned features for kNN."""
        c = self.config
        self.check_train_images(train)
        self.model = self.build_model(resolve_weights(c.backbone, c.weights)).to(device)
        self.centre = self.compute_centre(self.features(train, device=device, progress=progress))
        sources = ViewSources.load(self, train, budget=c.max_cache_gb * 2**30, progress=progress)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        augment = MoCoV2Augment(c, *self.normalisation())
        # The original never calls model.train() (official main.py:32): BatchNorm keeps its
        # running statistics, dropout (if any) stays off.
        self.model.eval()
        losses = []
        for epoch in range(c.epochs):
            total, count = 0.0, 0
            for batch in sources.batches(c.batch_size, progress, f"{self.name}: epoch {epoch + 1}/{c.epochs}"):
                loss = self.train_step(augment(batch), augment(batch), optimizer, device)
                total, count = total + loss * len(batch), count + len(batch)
            losses.append(total / max(count, 1))
        self.train_features = self.features(train, device=device, progress=progress).numpy()
        self.extra = {"loss_per_epoch": losses, "view_sources_in_memory": sources.images is not None,
                      "k_used": self.neighbours()}
        self.fitted = True

    def compute_centre(self, features: Tensor) -> Tensor:
        """The mean of the (normalised) training features, normalised again when `angular`."""
        centre = features.mean(dim=0)
        return F.normalize(centre, dim=0) if self.config.angular else centre

    def train_step(self, view1: Tensor, view2: Tensor, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> float:
        """One SGD step of the mean-shifted loss on two views of a batch; returns the loss."""
        centre = self.centre.to(device)
        with autocast(device):
            z1, z2 = self.model(view1.to(device)), self.model(view2.to(device))
        loss = mean_shifted_loss(z1.float(), z2.float(), centre, self.config.temperature, self.config.angular)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def neighbours(self) -> int:
        """The k that scoring uses: the config's, or every training image where there are fewer."""
        return min(self.config.k, len(self.train_features))

    # --- scoring ---------------------------------------------------------------------------
    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """Sum of squared Euclidean distances to the k nearest training features."""
        if not self.fitted or self.train_features is None:
            raise NdbenchError(f"{self.name} is not fitted", "call fit() (or load a saved model) first")
        test = self.features(images, device=device, progress=progress).numpy()
        if len(test) == 0:
            return np.zeros(0)
        distances, _ = NearestNeighbors(n_neighbors=self.neighbours()).fit(self.train_features).kneighbors(test)
        return (distances.astype(np.float64) ** 2).sum(axis=1)

    def _require_model(self) -> None:
        if self.model is None:
            raise NdbenchError(f"{self.name} has no model yet", "call fit() (or load a saved model) first")

    # --- persistence -----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": {k: v.cpu() for k, v in self.model.backbone.state_dict().items()},
            "centre": self.centre.cpu(),
            "train_features": self.train_features,
            "extra": dict(self.extra),
        }

    def set_state(self, state: dict) -> None:
        self.model = self.build_model("none")
        self.model.backbone.load_state_dict(state["model"])
        self.centre = state["centre"]
        self.train_features = state["train_features"]
        self.extra = dict(state.get("extra", {}))
