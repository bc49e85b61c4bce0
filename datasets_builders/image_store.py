"""Decode once: an input transform split into a decode part (PIL image -> uint8 pixels at the
method's input size, cached on disk) and a cheap tensor part (to float, normalise), and the
store that keeps decoded images for every job and process of a machine.

A decoded image is keyed by (sha256 of the dataset index, the image's position in it, the
decode signature: size, interpolation, antialias), so a new index or another decode never
reads a stale image. Array datasets (CIFAR, MNIST) are not stored: their pixels are in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .array_store import ArrayStore, Entry, Field, content_key

IMAGES_KIND = "images"
PIXELS = "pixels"


@dataclass(frozen=True)
class ResizeDecode:
    """PIL image -> uint8 array [size, size, 3], exactly as torchvision's
    `Resize((size, size), interpolation, antialias)` resizes a PIL image."""

    size: int
    interpolation: str = "bilinear"
    antialias: bool = True

    @property
    def signature(self) -> str:
        """What the decoded pixels depend on besides the image (part of the store key)."""
        return f"resize-{self.size}x{self.size}-{self.interpolation}-{'aa' if self.antialias else 'noaa'}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    def __call__(self, image: PIL.Image.Image) -> np.ndarray:
        resized = TF.resize(image.convert("RGB"), [self.size, self.size],
                            interpolation=InterpolationMode(self.interpolation), antialias=self.antialias)
        return np.array(resized, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)


@dataclass(frozen=True)
class ResizeCropDecode:
    """PIL image -> uint8 array [crop, crop, 3], exactly as torchvision's
    `Resize((resize, resize), interpolation, antialias)` then `CenterCrop(crop)` on a PIL image."""

    resize: int
    crop: int
    interpolation: str = "bilinear"
    antialias: bool = True

    @property
    def signature(self) -> str:
        """What the decoded pixels depend on besides the image (part of the store key)."""
        aa = "aa" if self.antialias else "noaa"
        return f"resize-{self.resize}x{self.resize}-{self.interpolation}-{aa}-centre-crop-{self.crop}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.crop, self.crop, 3)

    def __call__(self, image: PIL.Image.Image) -> np.ndarray:
        resized = TF.resize(image.convert("RGB"), [self.resize, self.resize],
                            interpolation=InterpolationMode(self.interpolation), antialias=self.antialias)
        return np.array(TF.center_crop(resized, [self.crop, self.crop]), dtype=np.uint8)


Decode = ResizeDecode | ResizeCropDecode


@dataclass(frozen=True)
class Normalise:
    """uint8 pixels [H, W, 3] -> float tensor [3, H, W]: /255, then (x - mean) / std
    (torchvision's ToTensor + Normalize)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def signature(self) -> str:
        """What the tensor stage does (part of the feature-cache key)."""
        return f"normalise-{list(self.mean)}-{list(self.std)}"

    def __call__(self, pixels: np.ndarray) -> Tensor:
        return self.batch(pixels[None])[0]

    def batch(self, pixels: np.ndarray) -> Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W], image by image as `__call__`."""
        # Channels first in memory before the float work (as ToTensor does): the float ops and the
        # DataLoader's batching run several times faster on contiguous tensors.
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous().float().div_(255)
        return TF.normalize(x, list(self.mean), list(self.std), inplace=True)  # x is ours: no copy


@dataclass(frozen=True)
class StagedTransform:
    """A transform in two stages, `finish(decode(image))`: datasets keep `decode`'s output in
    the image store and apply only `finish` when it is there."""

    decode: Decode
    finish: Normalise

    def __call__(self, image: PIL.Image.Image) -> Tensor:
        return self.finish(self.decode(image))


@dataclass(frozen=True)
class ImageKey:
    """What identifies a dataset's input images: the index, the decode (which keys the image
    store) and the tensor stage (which, with the decode, keys frozen features)."""

    index_sha256: str
    signature: str
    n_index_rows: int
    finish: str = ""


class ImageStore:
    """Decoded images of every dataset on this machine, in an `ArrayStore`."""

    def __init__(self, store: ArrayStore):
        self.store = store

    @property
    def root(self) -> Path:
        return self.store.root

    def entry(self, key: ImageKey, decode: Decode) -> Entry:
        """The entry holding `key`'s images (one row per index position), schema set."""
        entry = self.store.entry(IMAGES_KIND, content_key(IMAGES_KIND, key.index_sha256, key.signature),
                                 key.n_index_rows, description=f"images {key.signature}")
        entry.ensure_schema((Field(PIXELS, "u1", decode.shape),))
        return entry

    def lookup(self, key: ImageKey) -> Entry:
        """The entry of `key` without creating anything (for counting what is stored)."""
        return self.store.entry(IMAGES_KIND, content_key(IMAGES_KIND, key.index_sha256, key.signature),
                                key.n_index_rows)
