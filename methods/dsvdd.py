"""Deep SVDD: Ruff, Vandermeulen, Goernitz, Deecke, Siddiqui, Binder, Mueller & Kloft, "Deep
One-Class Classification", ICML 2018 (official code: lukasruff/Deep-SVDD-PyTorch; the
"Redefining Normal" authors' copy: SMSD75/Redefining_Normal_ACCV24, Multiobject_bench/Deep-SVDD).

One-class Deep SVDD: a bias-free LeNet-style CNN (the official CIFAR10_LeNet) is first
pre-trained as the encoder of an autoencoder, then trained to map normal images close to a
fixed centre c (the mean initial embedding); the novelty score is ||phi(x) - c||^2. No
pre-trained backbone: everything is learnt from the normal training images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from datasets_builders.errors import NdbenchError
from datasets_builders.loading import IndexedImages

from .base import BaseDetector, tracked
from .registry import register
from .validation import CACHE_GB, STD, check_ranges, count, non_negative, positive

PAPER = ("Ruff, Vandermeulen, Goernitz, Deecke, Siddiqui, Binder, Mueller & Kloft, Deep One-Class "
         "Classification, ICML 2018")
ACTIVATIONS = ("leaky_relu", "elu")
STRIDE = 8  # three 2x2 max pools
SEED_GRID = 4  # the decoder starts from the code reshaped to (rep_dim / 16) x 4 x 4


@dataclass(frozen=True)
class DSVDDConfig:
    """One-class Deep SVDD; defaults are the official README's CIFAR-10 command and network.
    Sources: "official" = lukasruff/Deep-SVDD-PyTorch (commit 1901612), "copy" =
    SMSD75/Redefining_Normal_ACCV24:Multiobject_bench/Deep-SVDD (commit 13736a9)."""

    img_size: int = 32  # official src/networks/cifar10_LeNet.py:22: fc1 sized 128 * 4 * 4 (32 px input)
    # official src/datasets/cifar10.py:33-36: ToTensor, then GCN (L1) and min-max scaling to [0, 1];
    # the normalisation below is the identity and `gcn` does the rest.
    mean: tuple[float, float, float] | None = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] | None = (1.0, 1.0, 1.0)
    # official src/datasets/cifar10.py:20-36: per-image global contrast normalisation (L1 scale,
    # preprocessing.py:15-37), then min-max scaling with the min and max of the normal class's
    # training images after GCN (pre-computed per class there; computed here from the training
    # images, which are exactly the normal ones, so multi-class normal sets work too). False:
    # pixels in [0, 1] as they are.
    gcn: bool = True
    activation: str = "leaky_relu"  # official cifar10_LeNet.py:26-30 F.leaky_relu (slope 0.01)
    rep_dim: int = 128  # official cifar10_LeNet.py:13 rep_dim 128
    bn_eps: float = 1e-4  # official cifar10_LeNet.py:17-21 BatchNorm eps 1e-4, affine=False
    eps: float = 0.1  # official src/optim/deepSVDD_trainer.py:156, 173-175: |c_i| < 0.1 pushed to +-0.1
    # The decoder rebuilds the image at this size, then it is resized (nearest) to img_size;
    # None: at img_size (official cifar10_LeNet.py:81-88 doubles 4 -> 8 -> 16 -> 32 = img_size).
    decoder_size: int | None = None
    pretrain: bool = True  # official README.md:105 --pretrain True (autoencoder)
    ae_lr: float = 1e-4  # official README.md:105 --ae_lr 0.0001 (Adam, ae_trainer.py:30)
    ae_epochs: int = 350  # official README.md:105 --ae_n_epochs 350
    ae_milestones: tuple[int, ...] = (250,)  # official README.md:105 --ae_lr_milestone 250 (lr x 0.1)
    ae_batch_size: int = 200  # official README.md:105 --ae_batch_size 200
    ae_weight_decay: float = 5e-7  # official README.md:105 --ae_weight_decay 0.5e-6
    lr: float = 1e-4  # official README.md:105 --lr 0.0001 (Adam, deepSVDD_trainer.py:49)
    epochs: int = 150  # official README.md:105 --n_epochs 150
    # official README.md:105 --lr_milestone 50 (lr x 0.1). Milestones count finished epochs
    # (MultiStepLR stepped after each epoch). The official trainers step it at the start of each
    # epoch (deepSVDD_trainer.py:67, ae_trainer.py:42), which under the torch 0.4.1 they pin
    # (requirements.txt:19) gives the same schedule; under torch >= 1.1 it decays one epoch earlier.
    milestones: tuple[int, ...] = (50,)
    batch_size: int = 200  # official README.md:105 --batch_size 200
    weight_decay: float = 5e-7  # official README.md:105 --weight_decay 0.5e-6
    # ndbench choice: training images are kept in memory up to this size.
    max_cache_gb: float = 16.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise NdbenchError(f"unknown activation {self.activation!r}", f"use one of {', '.join(ACTIVATIONS)}")
        batch = count(2).because("BatchNorm cannot train on one image: a batch of 1 skips every step")
        milestones = count().each()
        seed = f"the decoder starts from a {SEED_GRID} px seed"
        check_ranges(
            self, img_size=count(STRIDE).because("the LeNet pools three times"), std=STD,
            rep_dim=count(SEED_GRID * SEED_GRID), bn_eps=positive(), eps=positive(),
            decoder_size=count(SEED_GRID).or_none("to decode at img_size").because(seed),
            ae_lr=positive(), ae_epochs=count(0), ae_milestones=milestones, ae_batch_size=batch,
            ae_weight_decay=non_negative(), lr=positive(), epochs=count(0).because("0 skips the one-class phase"),
            milestones=milestones, batch_size=batch, weight_decay=non_negative(), max_cache_gb=CACHE_GB,
        )
        if self.rep_dim % (SEED_GRID * SEED_GRID):
            raise NdbenchError(f"rep_dim {self.rep_dim} is not a multiple of {SEED_GRID * SEED_GRID}",
                               "use e.g. 128 (the decoder reshapes the code to a 4x4 grid)")


# The embedded preset: the official network's own 32 px input (the 64 px scenes resized) and
# one epoch of each phase. Measured on the 10 uni-class splits (shipped data, one thread per
# job on a 2-core CPU): at 32 px AVG AUROC 52.4 / 50.1 / 52.0 over seeds 0-2 with ~4.6 s of
# training per job; at 64 px (fc1 grown to 128 * 8 * 8) 49.4 (seed 0) with ~23 s. More epochs
# do not help (32 px, 3 + 3 epochs: 50.5; 64 px, 5 + 5: 49.4), nor does turning GCN off (64 px:
# 48.6): a LeNet learnt from scratch on ~470 scenes stays near chance here.
EMBEDDED = {"img_size": 32, "ae_epochs": 1, "epochs": 1}
# The authors' Pascal VOC run (copy src/main.py:18-19 pvoc / pvoc_LeNet defaults): the official
# trainers unchanged (src/optim differs only in comments), Adam, one-class objective
# (main.py:24, 28, 35), autoencoder pre-training (main.py:34).
RELEASED_VOC = {
    "img_size": 224,  # copy src/datasets/pvoc.py:150-153 Resize((224, 224)) + ToTensor ...
    "gcn": False,  # ... and nothing else: no GCN, no min-max scaling
    "activation": "elu",  # copy src/networks/pvoc_LeNet.py:27-31, 74-90 F.elu
    # copy pvoc_LeNet.py:81-91: the decoder doubles 4 -> 8 -> 16 -> 32 px, then its sigmoid output
    # is resized (nearest) to 224; its fc1 (pvoc_LeNet.py:22, 55) is sized for 224 (128 * 28 * 28).
    "decoder_size": 32,
    "ae_lr": 1e-3,  # copy main.py:36
    "ae_epochs": 100,  # copy main.py:37
    # copy main.py:38 --ae_lr_milestone 30 80, stepped at each epoch's start (src/optim/ae_trainer.py:
    # 43), run under a torch >= 1.1 (its requirements.txt:19 pins torch 0.4.1, which has no wheels
    # for the CPython 3.10 the copy's bytecode shows: Multiobject_bench/Transformaly/__pycache__/
    # utils.cpython-310.pyc), where that order drops the lr after 29 and 79 finished epochs. The
    # copy's own log fits this (log/log.txt:57-59: the loss falls 2833 -> 2762 in epoch 30, before
    # the "new learning rate" line), though one epoch's loss cannot prove it.
    "ae_milestones": (29, 79),
    "ae_batch_size": 120,  # copy main.py:39
    "ae_weight_decay": 1e-6,  # copy main.py:40
    "lr": 1e-3,  # copy main.py:29
    "epochs": 50,  # copy main.py:30
    "milestones": (19, 39),  # copy main.py:31 --lr_milestone 20 40, one epoch earlier as above
    "batch_size": 128,  # copy main.py:32
    "weight_decay": 1e-6,  # copy main.py:33
}


# --- networks --------------------------------------------------------------------------------
def _act(name: str, x: Tensor) -> Tensor:
    return F.leaky_relu(x) if name == "leaky_relu" else F.elu(x)


class LeNetEncoder(nn.Module):
    """phi: the official CIFAR10_LeNet (cifar10_LeNet.py:8-33), 3 x (5x5 conv, BatchNorm without
    affine, activation, 2x2 max pool) with 32/64/128 channels, then a linear map to `rep_dim`; no
    bias anywhere (a bias would let phi collapse onto c). fc1 is sized for `img_size`:
    128 * (img_size // 8)^2."""

    def __init__(self, img_size: int = 32, rep_dim: int = 128, activation: str = "leaky_relu", bn_eps: float = 1e-4):
        super().__init__()
        self.activation = activation
        self.rep_dim = rep_dim
        self.pool = nn.MaxPool2d(2, 2)
        self.conv1 = nn.Conv2d(3, 32, 5, bias=False, padding=2)
        self.bn2d1 = nn.BatchNorm2d(32, eps=bn_eps, affine=False)
        self.conv2 = nn.Conv2d(32, 64, 5, bias=False, padding=2)
        self.bn2d2 = nn.BatchNorm2d(64, eps=bn_eps, affine=False)
        self.conv3 = nn.Conv2d(64, 128, 5, bias=False, padding=2)
        self.bn2d3 = nn.BatchNorm2d(128, eps=bn_eps, affine=False)
        side = img_size // 2 // 2 // 2
        self.fc1 = nn.Linear(128 * side * side, rep_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """The embedding phi(x): [B, rep_dim]."""
        x = self.pool(_act(self.activation, self.bn2d1(self.conv1(x))))
        x = self.pool(_act(self.activation, self.bn2d2(self.conv2(x))))
        x = self.pool(_act(self.activation, self.bn2d3(self.conv3(x))))
        return self.fc1(x.flatten(1))


class LeNetAutoencoder(nn.Module):
    """The official CIFAR10_LeNet_Autoencoder (cifar10_LeNet.py:36-89): the encoder above (whose
    weights initialise phi), BatchNorm on the code, and a bias-free decoder from the code reshaped
    to (rep_dim/16) x 4 x 4: four 5x5 transposed convolutions with BatchNorm, activation and
    nearest upsampling between them, and a sigmoid. Upsampling goes to decoder_size/4, /2 and /1
    (x2 each at the official 32 px, so any size comes back whole), and the output is resized
    (nearest) to img_size when that differs, as the authors' VOC copy does (pvoc_LeNet.py:91).
    Conv weights: Xavier-uniform with the activation's gain."""

    def __init__(self, img_size: int = 32, rep_dim: int = 128, activation: str = "leaky_relu", bn_eps: float = 1e-4,
                 decoder_size: int | None = None):
        super().__init__()
        self.activation = activation
        self.img_size = img_size
        self.decoder_size = decoder_size or img_size
        self.encoder = LeNetEncoder(img_size, rep_dim, activation, bn_eps)
        self.bn1d = nn.BatchNorm1d(rep_dim, eps=bn_eps, affine=False)
        seed = rep_dim // (SEED_GRID * SEED_GRID)
        self.deconv1 = nn.ConvTranspose2d(seed, 128, 5, bias=False, padding=2)
        self.bn2d4 = nn.BatchNorm2d(128, eps=bn_eps, affine=False)
        self.deconv2 = nn.ConvTranspose2d(128, 64, 5, bias=False, padding=2)
        self.bn2d5 = nn.BatchNorm2d(64, eps=bn_eps, affine=False)
        self.deconv3 = nn.ConvTranspose2d(64, 32, 5, bias=False, padding=2)
        self.bn2d6 = nn.BatchNorm2d(32, eps=bn_eps, affine=False)
        self.deconv4 = nn.ConvTranspose2d(32, 3, 5, bias=False, padding=2)
        # Official cifar10_LeNet.py:46-68: leaky_relu gain; the authors' ELU copy (pvoc_LeNet.py:47-69) gain 1.
        gain = nn.init.calculate_gain("leaky_relu") if activation == "leaky_relu" else 1.0
        for conv in (self.encoder.conv1, self.encoder.conv2, self.encoder.conv3,
                     self.deconv1, self.deconv2, self.deconv3, self.deconv4):
            nn.init.xavier_uniform_(conv.weight, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of `x` in [0, 1]: [B, 3, img_size, img_size]."""
        a, s = self.activation, self.decoder_size
        z = self.bn1d(self.encoder(x))
        z = _act(a, z.view(z.shape[0], -1, SEED_GRID, SEED_GRID))
        z = F.interpolate(_act(a, self.bn2d4(self.deconv1(z))), size=(s // 4, s // 4))
        z = F.interpolate(_act(a, self.bn2d5(self.deconv2(z))), size=(s // 2, s // 2))
        z = F.interpolate(_act(a, self.bn2d6(self.deconv3(z))), size=(s, s))
        z = torch.sigmoid(self.deconv4(z))
        if s != self.img_size:
            z = F.interpolate(z, size=(self.img_size, self.img_size))
        return z


def guard_centre(c: Tensor, eps: float) -> Tensor:
    """c with every coordinate of magnitude below `eps` moved to +-eps by its sign (official
    deepSVDD_trainer.py:173-175); an exact zero, which the official code leaves at 0, goes to +eps. A zero
    coordinate could be matched trivially by zero weights."""
    c = c.clone()
    small = c.abs() < eps
    c[small & (c < 0)] = -eps
    c[small & (c >= 0)] = eps
    return c


def global_contrast_normalization(x: Tensor) -> Tensor:
    """Per-image GCN with the L1 scale (official preprocessing.py:15-37, scale='l1'): subtract the
    image's mean over all its values, divide by their mean absolute value. x: [B, ...]."""
    x = x - x.flatten(1).mean(dim=1).view(-1, *([1] * (x.dim() - 1)))
    scale = x.flatten(1).abs().mean(dim=1).view(-1, *([1] * (x.dim() - 1)))
    return x / scale.clamp_min(1e-12)  # a flat image stays all zeros instead of NaN


# --- detector --------------------------------------------------------------------------------
@register("dsvdd")
class DSVDDDetector(BaseDetector):
    """One-class Deep SVDD with autoencoder pre-training."""

    Config = DSVDDConfig
    description = "Deep SVDD: bias-free LeNet mapped onto a hypersphere centre (AE pre-training)"
    paper = PAPER
    # "paper" is the authors' copy, the same values as "released_voc" (kept for old records).
    presets = {"embedded": EMBEDDED, "released_voc": RELEASED_VOC, "paper": RELEASED_VOC}
    paper_preset = "paper"

    def __init__(self, config: DSVDDConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.net: LeNetEncoder | None = None
        self.c: Tensor | None = None
        self.scaling: tuple[float, float] = (0.0, 1.0)  # min-max after GCN (lo, hi), set by fit

    def new_encoder(self) -> LeNetEncoder:
        """A fresh phi for the configured input size."""
        c = self.config
        return LeNetEncoder(c.img_size, c.rep_dim, c.activation, c.bn_eps)

    def new_autoencoder(self) -> LeNetAutoencoder:
        """A fresh autoencoder whose encoder has phi's shape."""
        c = self.config
        return LeNetAutoencoder(c.img_size, c.rep_dim, c.activation, c.bn_eps, c.decoder_size)

    def preprocess(self, x: Tensor) -> Tensor:
        """GCN and min-max scaling (when `gcn`), as the official CIFAR-10 transform (cifar10.py:33-36)."""
        if not self.config.gcn:
            return x
        lo, hi = self.scaling
        return (global_contrast_normalization(x) - lo) / (hi - lo)

    def fewest_train_images(self) -> int:
        """Two: BatchNorm cannot train on one image, so a single image would train nothing."""
        return 2

    # --- training --------------------------------------------------------------------------
    def fit(self, train: Dataset, *, device: torch.device, progress: Progress | None = None) -> None:
        """Pre-train the autoencoder, copy its encoder into phi, fix c, train phi towards c."""
        c = self.config
        self.check_train_images(train)
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        data = _TrainImages.load(self, train, device=device, budget=c.max_cache_gb * 2**30, progress=progress)
        self.net = self.new_encoder().to(device)
        ae_loss = None
        if c.pretrain:
            ae = self.new_autoencoder().to(device)
            ae_loss = self._train(ae, data, ae_step, c.ae_lr, c.ae_weight_decay, c.ae_epochs, c.ae_milestones,
                                  c.ae_batch_size, device, generator, progress, "dsvdd: autoencoder")
            self.net.load_state_dict(ae.encoder.state_dict())
        self.c = self.initial_centre(data, device, progress)
        loss = self._train(self.net, data, lambda net, x: svdd_step(net, x, self.c), c.lr, c.weight_decay,
                           c.epochs, c.milestones, c.batch_size, device, generator, progress, "dsvdd: one-class")
        self.net.eval()
        self.extra = {
            "ae_loss_last_epoch": ae_loss,
            "svdd_loss_last_epoch": loss,
            "gcn_min_max": list(self.scaling) if c.gcn else None,
            "train_images_in_memory": data.images is not None,
        }
        self.fitted = True

    @torch.no_grad()
    def initial_centre(self, data: _TrainImages, device: torch.device, progress: Progress | None) -> Tensor:
        """c = mean of phi over the training images (eval mode), guarded away from zero."""
        self.net.eval()
        total = torch.zeros(self.config.rep_dim, device=device, dtype=torch.float64)
        for x in data.batches(self.config.batch_size, device, None, progress, "dsvdd: centre"):
            total += self.net(x).double().sum(dim=0)
        return guard_centre((total / len(data)).float(), self.config.eps)

    def _train(self, net: nn.Module, data: _TrainImages, step, lr: float, weight_decay: float, epochs: int,
               milestones: tuple[int, ...], batch_size: int, device: torch.device, generator: torch.Generator,
               progress: Progress | None, what: str) -> float | None:
        """Adam with MultiStepLR (x0.1 after each milestone epoch); the last epoch's mean loss."""
        optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
        loss_sum, steps = 0.0, 0
        for epoch in range(epochs):
            net.train()
            loss_sum, steps = 0.0, 0
            for x in data.batches(batch_size, device, generator, progress, f"{what} epoch {epoch + 1}/{epochs}"):
                if len(x) < 2:  # BatchNorm1d cannot train on one image (CIFAR-10: 5,000 in batches of 200)
                    continue
                loss = step(net, x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
            scheduler.step()
        return loss_sum / steps if steps else None

    # --- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: Dataset, *, device: torch.device, progress: Progress | None = None) -> np.ndarray:
        """||phi(x) - c||^2 per image; higher = more novel."""
        if not self.fitted or self.net is None or self.c is None:
            raise NdbenchError("dsvdd is not fitted", "call fit() (or load a saved model) first")
        self.net.to(device).eval()
        centre = self.c.to(device)
        rows = []
        for x, _, _ in tracked(self.loader(images), progress, "dsvdd: scoring"):
            rows.append((self.net(self.preprocess(x.to(device))) - centre).pow(2).sum(dim=1).cpu())
        return torch.cat(rows).double().numpy() if rows else np.zeros(0)

    # --- persistence -----------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "net": {k: v.cpu() for k, v in self.net.state_dict().items()},
            "c": self.c.cpu(),
            "scaling": list(self.scaling),
            "extra": dict(self.extra),
        }

    def set_state(self, state: dict) -> None:
        self.net = self.new_encoder().eval()
        self.net.load_state_dict(state["net"])
        self.c = state["c"].float()
        self.scaling = (float(state["scaling"][0]), float(state["scaling"][1]))
        self.extra = dict(state.get("extra", {}))


def ae_step(ae: nn.Module, x: Tensor) -> Tensor:
    """Official AE loss (ae_trainer.py:58-59): batch mean of each image's summed squared
    reconstruction error."""
    return (ae(x) - x).pow(2).flatten(1).sum(dim=1).mean()


def svdd_step(net: nn.Module, x: Tensor, c: Tensor) -> Tensor:
    """Official one-class objective (deepSVDD_trainer.py:83, 88): batch mean of ||phi(x) - c||^2
    (weight decay in Adam)."""
    return (net(x) - c).pow(2).sum(dim=1).mean()


class _TrainImages:
    """The preprocessed training images, decoded once and kept in memory when they fit the
    budget; else read (and preprocessed) batch by batch each epoch."""

    def __init__(self, detector: DSVDDDetector, dataset: Dataset, images: Tensor | None):
        self.detector = detector
        self.dataset = dataset
        self.images = images

    @classmethod
    def load(cls, detector: DSVDDDetector, dataset: Dataset, *, device: torch.device, budget: float,
             progress: Progress | None) -> _TrainImages:
        """Set the detector's GCN min-max range from `dataset`, and decode and preprocess the
        images once when they fit in `budget` bytes."""
        first = dataset[0][0]
        size = len(dataset) * first.numel() * 4
        keep = size <= budget
        store = device if device.type == "cuda" and keep and size <= torch.cuda.mem_get_info(device)[0] / 4 else (
            torch.device("cpu"))
        chunks: list[Tensor] = []
        lo, hi = float("inf"), float("-inf")
        for x, _ in tracked(detector.loader(IndexedImages(dataset)), progress, "dsvdd: loading images"):
            if detector.config.gcn:
                g = global_contrast_normalization(x)
                lo, hi = min(lo, float(g.min())), max(hi, float(g.max()))
            if keep:
                chunks.append(x.to(store))
        if detector.config.gcn:
            if not hi > lo:
                raise NdbenchError("the training images are all flat after contrast normalisation",
                                   "check the split's train images, or set gcn=False")
            detector.scaling = (lo, hi)
        return cls(detector, dataset, detector.preprocess(torch.cat(chunks)) if keep else None)

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, device: torch.device, generator: torch.Generator | None,
                progress: Progress | None, description: str) -> Iterator[Tensor]:
        """Preprocessed image batches on `device`, shuffled by `generator` (in order without);
        the order is the same whether the images are in memory or not."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        if self.images is None:
            loader = DataLoader(Subset(IndexedImages(self.dataset), order.tolist()), batch_size=batch_size,
                                num_workers=0)
            for x, _ in tracked(loader, progress, description):
                yield self.detector.preprocess(x.to(device))
            return
        chunks = order.split(batch_size)
        for idx in tracked(chunks, progress, description, total=len(chunks)):
            yield self.images[idx.to(self.images.device)].to(device)
