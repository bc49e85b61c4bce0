"""Mean-Shifted Contrastive Loss (MSAD): Reiss & Hoshen, "Mean-Shifted Contrastive Loss for
Anomaly Detection", AAAI 2023 (original code: talreiss/Mean-Shifted-Anomaly-Detection).

A pre-trained ResNet's L2-normalised pooled features are fine-tuned with a contrastive loss
computed around the fixed centre c of the normal training features: each feature is shifted
by c and re-normalised before NT-Xent over two MoCo-v2 views per image. The novelty score is
the kNN distance (sum of squared distances to the k nearest training features).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from sklearn.neighbors import NearestNeighbors
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.transforms import v2

from datasets_builders.errors import NdbenchError

from .backbones import create_backbone
from .base import BaseDetector, autocast, tracked
from .pretrain import EMBEDDED_WEIGHTS, resolve_weights
from .registry import register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MSADConfig:
    """MSAD hyper-parameters; defaults are the original code's (main.py, utils.py)."""

    backbone: str = "resnet152.tv_in1k"  # utils.Model: torchvision resnet152(pretrained=True)
    weights: str = "hub"  # "hub", a local file, "none" (random, on request) or "embedded"
    img_size: int = 224  # utils.transform_color: Resize(256) + CenterCrop(224)
    center_crop: float = 224 / 256  # ... the crop keeps 224/256 of the resized short side
    mean: tuple[float, float, float] = IMAGENET_MEAN  # utils.transform_color Normalize
    std: tuple[float, float, float] = IMAGENET_STD
    # utils.freeze_parameters (backbone 152): conv1, bn1, layer1, layer2 get no gradient.
    frozen: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")
    temperature: float = 0.25  # main.contrastive_loss: temp = 0.25
    angular: bool = False  # main.py --angular (off by default): normalised c + angular centre loss
    lr: float = 1e-5  # main.py --lr
    weight_decay: float = 5e-5  # main.train_model: SGD weight_decay=0.00005
    momentum: float = 0.0  # main.train_model: plain SGD (torch's default, no momentum)
    epochs: int = 20  # main.py --epochs
    batch_size: int = 64  # main.py --batch_size
    k: int = 2  # utils.knn_score: n_neighbours=2
    # MoCo v2 augmentation (utils.Transform), two views per image:
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop(224, scale=(0.2, 1.))
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8  # RandomApply([ColorJitter], p=0.8)
    grayscale_p: float = 0.2  # RandomGrayscale(p=0.2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # GaussianBlur([.1, 2.]), pixels of a 224 px view
    blur_p: float = 0.5  # RandomApply([GaussianBlur], p=0.5)
    flip_p: float = 0.5  # RandomHorizontalFlip()
    # ndbench choice: training images are decoded once per job and kept in memory (float16, under
    # 1/8 of an 8-bit grey level of error) when they fit in this many GB; else read every epoch.
    max_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise NdbenchError(f"temperature {self.temperature} must be positive", "use e.g. 0.25")
        if self.k < 1:
            raise NdbenchError(f"k {self.k} must be at least 1", "use e.g. k=2")
        if not 0 < self.center_crop <= 1:
            raise NdbenchError(f"center_crop {self.center_crop} is out of range", "use a value in (0, 1]")


# The embedded preset: ndbench's offline ResNet-10-style CNN (the stand-in for ImageNet weights)
# at 64 px with its own mean/std 0.5. Measured on uni-class 0 / 9 (issue 6, 1 thread, shared
# CPU): the untuned features give AUROC 0.575 / 0.513; 2 epochs (16 SGD steps) at the paper's
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


class MSADNet(nn.Module):
    """A pooled-feature backbone whose output is L2-normalised (utils.Model.forward)."""

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
    """MoCo v2's augmentation on normalised image tensors [C, H, W] (fresh draws per image):
    random resized crop, colour jitter, grayscale, Gaussian blur and horizontal flip, applied
    in [0, 1] pixel space and normalised back."""

    def __init__(self, config: MSADConfig):
        c = config
        size = c.img_size
        sigma = tuple(s * size / 224 for s in c.blur_sigma)  # the original blurs 224 px views
        kernel = 2 * int(np.ceil(3 * sigma[1])) + 1
        self.mean = torch.tensor(c.mean).view(3, 1, 1)
        self.std = torch.tensor(c.std).view(3, 1, 1)
        self.pipeline = v2.Compose([
            v2.RandomResizedCrop(size, scale=c.crop_scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(*c.jitter)], p=c.jitter_p),
            v2.RandomGrayscale(p=c.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=c.blur_p),
            v2.RandomHorizontalFlip(p=c.flip_p),
        ])

    def __call__(self, images: Tensor) -> Tensor:
        """One augmented view of each image of a normalised batch [B, C, H, W]."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = (images.float() * std + mean).clamp_(0, 1)
        views = torch.stack([self.pipeline(image) for image in pixels])
        return (views - mean) / std


@register("msad")
class MSADDetector(BaseDetector):
    """Mean-shifted contrastive fine-tuning of a pre-trained ResNet, then kNN scoring."""

    Config = MSADConfig
    description = "Mean-Shifted Contrastive Loss: contrastive fine-tuning around the normal centre, kNN score"
    paper = "Reiss & Hoshen, Mean-Shifted Contrastive Loss for Anomaly Detection, AAAI 2023"
    presets = {"embedded": EMBEDDED_MSAD, "embedded/multi-class": EMBEDDED_MULTI_MSAD}

    def __init__(self, config: MSADConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.model: MSADNet | None = None
        self.centre: Tensor | None = None
        self.train_features: np.ndarray | None = None
        self.extra: dict = {}

    # --- input -----------------------------------------------------------------------------
    def transform(self):
        """PIL image -> normalised tensor: resize the short side, then centre-crop `img_size`
        (the original's Resize(256) + CenterCrop(224) at 224 px)."""
        c = self.config
        return transforms.Compose([
            transforms.Resize(round(c.img_size / c.center_crop), antialias=True),
            transforms.CenterCrop(c.img_size),
            transforms.ToTensor(),
            transforms.Normalize(c.mean, c.std),
        ])

    # --- model -----------------------------------------------------------------------------
    def build_model(self, weights) -> MSADNet:
        """The backbone with `weights`, its `frozen` modules frozen, in eval mode."""
        backbone = create_backbone(self.config.backbone, weights=weights, num_classes=0)
        freeze(backbone, self.config.frozen)
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
    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None:
        """Fix the centre from the pre-trained features, fine-tune with the mean-shifted loss,
        then store the tuned features of the training images for kNN."""
        c = self.config
        if len(train) == 0:
            raise NdbenchError(f"{self.name} got no training images", "check the split's train part")
        self.model = self.build_model(resolve_weights(c.backbone, c.weights)).to(device)
        self.centre = self.compute_centre(self.features(train, device=device, progress=progress))
        images = self._images_in_memory(train, progress)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        augment = MoCoV2Augment(c)
        # The original never calls model.train(): BatchNorm keeps its running statistics.
        self.model.eval()
        losses = []
        for epoch in range(c.epochs):
            total, count = 0.0, 0
            for x in self._batches(train, images, device, progress, f"{self.name}: epoch {epoch + 1}/{c.epochs}"):
                loss = self.train_step(augment(x), augment(x), optimizer, device)
                total, count = total + loss * len(x), count + len(x)
            losses.append(total / max(count, 1))
        self.train_features = self.features(train, device=device, progress=progress).numpy()
        self.extra = {"loss_per_epoch": losses, "train_images_in_memory": images is not None}
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

    def _images_in_memory(self, train: Dataset, progress: Progress | None) -> Tensor | None:
        first = train[0][0]
        if len(train) * first.numel() * 2 > self.config.max_cache_gb * 2**30:
            return None
        batches = [x.to(torch.float16) for x, _, _ in tracked(self.loader(train), progress,
                                                               f"{self.name}: loading images")]
        return torch.cat(batches)

    def _batches(self, train: Dataset, images: Tensor | None, device: torch.device, progress: Progress | None,
                 description: str) -> Iterator[Tensor]:
        """Shuffled training batches (the original shuffles and keeps the last partial batch), in
        the same order whether the images are in memory or read again."""
        seed = int(torch.randint(0, 2**62, (1,)).item())
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        if images is None:
            for x, _, _ in tracked(self.loader(Subset(train, order.tolist())), progress, description):
                yield x.to(device)
            return
        chunks = order.split(self.config.batch_size)
        for idx in tracked(chunks, progress, description, total=len(chunks)):
            yield images[idx].to(device, torch.float32)

    # --- scoring ---------------------------------------------------------------------------
    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """Sum of squared Euclidean distances to the k nearest training features."""
        if not self.fitted or self.train_features is None:
            raise NdbenchError(f"{self.name} is not fitted", "call fit() (or load a saved model) first")
        test = self.features(images, device=device, progress=progress).numpy()
        if len(test) == 0:
            return np.zeros(0)
        k = min(self.config.k, len(self.train_features))
        distances, _ = NearestNeighbors(n_neighbors=k).fit(self.train_features).kneighbors(test)
        return (distances.astype(np.float64) ** 2).sum(axis=1)

    def record_extra(self) -> dict:
        """What the run record keeps besides the metrics (the loss of each epoch)."""
        return dict(self.extra)

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
