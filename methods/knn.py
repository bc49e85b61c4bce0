"""Deep Nearest Neighbour (DN2): Bergman, Cohen & Hoshen, "Deep Nearest Neighbor Anomaly
Detection", arXiv:2002.10445 (2020).

Frozen pre-trained backbone features (the ViT's CLS token, a CNN's pooled features); the
novelty score of an image is the mean distance to its k nearest training features. The
features come from the feature cache: every job of a grid shares its test images' features
and the training images it has in common with other jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress
from sklearn.neighbors import NearestNeighbors
from torch.utils.data import Dataset

from .backbones import create_backbone, vit_patch_size
from .base import BaseDetector, autocast
from .cost import CostModel, FrozenPass
from .defend import PAPER_TEXT, RELEASED_BACKBONE
from .features import FrozenPart, compute_precision, frozen_weights_identity
from .pretrain import resolve_weights
from .registry import register
from .validation import STD, check_ranges, count
from .weight_sources import EMBEDDED_WEIGHTS

POOLED = "pooled"
# Features stay float32 in the cache: ~3 KB per image for ViT-B, and scores equal uncached ones.
FEATURE_DTYPE = torch.float32


@dataclass(frozen=True)
class KNNConfig:
    """DN2 hyper-parameters; the backbone follows the paper's fair setting."""

    # The backbone of `defend` and `mkd` (see methods.defend.RELEASED_BACKBONE), for a fair
    # comparison; the `paper-text` preset uses the paper's IN-21k wording as they do.
    backbone: str = RELEASED_BACKBONE
    weights: str = "hub"  # "hub", a local file, "none" (random, on request) or "embedded"
    img_size: int = 224
    mean: tuple[float, float, float] | None = None  # None: the weights' own (timm's pretrained config)
    std: tuple[float, float, float] | None = None
    k: int = 2  # DN2 (Bergman et al. 2020): k = 2 nearest neighbours
    batch_size: int = 64

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers (one NdbenchError naming the field and the valid range)."""
        check_ranges(self, img_size=count(), std=STD, k=count(), batch_size=count())


@register("knn")
class KNNDetector(BaseDetector):
    """Frozen-feature k-nearest-neighbour distance (the sanity baseline of every table)."""

    Config = KNNConfig
    description = "Deep Nearest Neighbour: mean distance to the k=2 nearest normal features"
    paper = "Bergman, Cohen & Hoshen, Deep Nearest Neighbor Anomaly Detection, 2020"
    presets = {
        "embedded": {"backbone": "ndbench_vit_embedded", "weights": EMBEDDED_WEIGHTS, "img_size": 64},
        "paper-text": PAPER_TEXT,
    }

    def __init__(self, config: KNNConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.model: torch.nn.Module | None = None
        self.train_features: np.ndarray | None = None

    def _backbone(self) -> torch.nn.Module:
        if self.model is None:
            weights = resolve_weights(self.config.backbone, self.config.weights)
            self.model = self._build(weights)
        return self.model

    def _build(self, weights) -> torch.nn.Module:
        """The backbone with `weights` in eval mode; a ViT is set to `img_size`."""
        c = self.config
        # Only a ViT takes img_size (a CNN's timm constructor refuses it); known before building,
        # so the weights are loaded once.
        size = {"img_size": c.img_size} if vit_patch_size(c.backbone) is not None else {}
        return create_backbone(c.backbone, weights=weights, num_classes=0, **size).eval()

    def frozen_part(self, device: torch.device, *, plan: bool = False) -> FrozenPart | None:
        """The feature-cache key of the pooled features (None with random weights). `plan`:
        for a dry run, without pre-training missing embedded weights."""
        c = self.config
        identity = frozen_weights_identity(c.backbone, c.weights, plan=plan)
        if identity is None:
            return None
        return FrozenPart(identity, f"{c.backbone}/{POOLED}", compute_precision(device))

    def cost_model(self, device: torch.device, split_id: str = "") -> CostModel:
        """One frozen backbone pass per train and test image; nothing is trained."""
        return CostModel(frozen=(FrozenPass(self.frozen_part(device, plan=True), ("train", "test"), FEATURE_DTYPE),))

    @torch.no_grad()
    def features(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """Pooled (CLS) features of every image, as float32 rows (from the feature cache)."""

        def compute(x: torch.Tensor) -> dict[str, torch.Tensor]:
            model = self._backbone().to(device)
            with autocast(device):
                return {POOLED: model(x.to(device, non_blocking=True)).float()}

        table = self.runtime.features.get_or_compute(
            self.frozen_part(device), images, compute, loader=self.loader, dtype=FEATURE_DTYPE,
            progress=progress, description=f"{self.name}: features")
        return table.all()[POOLED].numpy() if len(images) else np.zeros((0, 0), dtype=np.float32)

    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None:
        """Store the training features."""
        self.check_train_images(train)
        self.train_features = self.features(train, device=device, progress=progress)
        self.extra = {"k_used": self.neighbours()}
        self.fitted = True

    def neighbours(self) -> int:
        """The k that scoring uses: the config's, or every training image where there are fewer."""
        return min(self.config.k, len(self.train_features))

    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """Mean Euclidean distance to the k nearest training features."""
        test = self.features(images, device=device, progress=progress)
        distances, _ = NearestNeighbors(n_neighbors=self.neighbours()).fit(self.train_features).kneighbors(test)
        return distances.mean(axis=1)

    def state(self) -> dict:
        return {"train_features": self.train_features, "model": self._backbone().state_dict()}

    def set_state(self, state: dict) -> None:
        self.train_features = state["train_features"]
        self.model = self._build("none")
        self.model.load_state_dict(state["model"])
