"""A torch `Dataset` over one part (train or test) of a split manifest.

Items are `(image_tensor, label, image_id)`: label 0 normal / 1 novel (every train image is
normal). Images are opened with PIL as RGB (grayscale sources are repeated over the three
channels) and passed through a transform, `to_tensor` by default.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_tensor

from .errors import NdbenchError
from .index import DatasetIndex, IndexRow
from .single_object import read_array_images
from .splits import Manifest

PARTS = ("train", "test")
Transform = Callable[[PIL.Image.Image], Tensor]


class ManifestDataset(Dataset):
    """The images of one manifest part with their labels, as `(tensor, label, image_id)`."""

    def __init__(
        self,
        index: DatasetIndex,
        manifest: Manifest,
        part: str,
        transform: Transform | None = None,
    ) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be 'train' or 'test', not {part!r}")
        if part == "train":
            ids, labels = list(manifest.train), [0] * len(manifest.train)
        else:
            ids = [image_id for image_id, _ in manifest.test]
            labels = [label for _, label in manifest.test]
        self.index = index
        self.part = part
        self.split_id = manifest.split_id
        self.transform: Transform = transform if transform is not None else to_tensor
        self.image_ids: list[str] = ids
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self._rows = [self._row(image_id) for image_id in ids]
        # Array sets: the pixels of exactly these items, read on first use.
        self._pixels: np.ndarray | None = None

    def _row(self, image_id: str) -> IndexRow:
        try:
            return self.index.row(image_id)
        except KeyError:
            raise NdbenchError(
                f"split {self.split_id} names image {image_id!r}, which the "
                f"{self.index.dataset} index does not hold",
                f"rebuild the splits with `ndbench build-splits {self.index.dataset}`",
            ) from None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, item: int) -> tuple[Tensor, int, str]:
        return self.transform(self.image(item)), int(self.labels[item]), self.image_ids[item]

    def image(self, item: int) -> PIL.Image.Image:
        """The item's image as an RGB PIL image, before the transform."""
        if self.index.storage == "files":
            return self._open_file(self._rows[item])
        return PIL.Image.fromarray(self._array_pixels()[item]).convert("RGB")

    def per_class_repeats(self, normal_classes) -> ManifestDataset:
        """The same images, each listed once per class of `normal_classes` it holds (at least
        once): the weighting of a training set built by concatenating per-class image sets."""
        normal = set(normal_classes)
        counts = [max(1, len(normal.intersection(row.classes))) for row in self._rows]
        order = [i for i, count in enumerate(counts) for _ in range(count)]
        repeated = copy.copy(self)
        repeated.image_ids = [self.image_ids[i] for i in order]
        repeated.labels = self.labels[order].copy()
        repeated._rows = [self._rows[i] for i in order]
        repeated._pixels = None if self._pixels is None else self._pixels[order].copy()
        return repeated

    def take(self, n: int) -> ManifestDataset:
        """The same dataset over its first `n` items only."""
        smaller = copy.copy(self)
        smaller.image_ids = self.image_ids[:n]
        smaller.labels = self.labels[:n].copy()
        smaller._rows = self._rows[:n]
        smaller._pixels = None if self._pixels is None else self._pixels[:n].copy()
        return smaller

    def _open_file(self, row: IndexRow) -> PIL.Image.Image:
        path = Path(self.index.root) / row.path
        if not path.is_file():
            raise NdbenchError(
                f"image {row.image_id!r} of {self.index.dataset} is missing: expected {path}",
                f"check the dataset root ({self.index.root}) or rebuild the index",
            )
        try:
            with PIL.Image.open(path) as image:
                return image.convert("RGB")
        # Decoding damaged bytes raises OSError, SyntaxError (PNG chunks), ValueError, struct
        # errors, DecompressionBombError...: all mean the same to the user.
        except Exception as exc:  # noqa: BLE001
            raise NdbenchError(
                f"cannot read image {path}: {exc}", "the file is damaged; replace it"
            ) from exc

    def _array_pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self._load_pixels()
        return self._pixels

    def _load_pixels(self) -> np.ndarray:
        """Read each needed subset once and keep only the rows of this dataset's items."""
        positions = np.asarray([_position(row, self.index.dataset) for row in self._rows], dtype=np.int64)
        subsets = np.asarray([row.subset for row in self._rows])
        pixels: np.ndarray | None = None
        for subset in dict.fromkeys(subsets.tolist()):
            source = read_array_images(self.index.root, self.index.storage, subset)
            mine = subsets == subset
            wanted = positions[mine]
            if len(wanted) and wanted.max() >= len(source):
                raise NdbenchError(
                    f"the {self.index.dataset} index names image {subset}/{wanted.max()} but "
                    f"the source has {len(source)} {subset} images",
                    f"rebuild the index and splits with `ndbench build-splits {self.index.dataset}`",
                )
            if pixels is None:
                pixels = np.empty((len(self._rows),) + source.shape[1:], dtype=source.dtype)
            pixels[mine] = source[wanted]
        if pixels is None:  # no items at all
            pixels = np.empty((0, 1, 1), dtype=np.uint8)
        return pixels


def _position(row: IndexRow, dataset: str) -> int:
    subset, _, number = row.path.partition("/")
    if subset != row.subset or not number.isdigit():
        raise NdbenchError(
            f"array image path {row.path!r} is not '<subset>/<n>'",
            f"rebuild the index with `ndbench build-splits {dataset}`",
        )
    return int(number)


def load_split(splits_root: Path, split_id: str) -> tuple[DatasetIndex, Manifest]:
    """The index and manifest of a split id like `voc/uni-class/14` under `splits_root`.

    Refuses a manifest built from another index than the one beside it.
    """
    parts = split_id.strip("/").split("/")
    if len(parts) != 3 or not all(parts):
        raise NdbenchError(
            f"cannot read split id {split_id!r}",
            "use <dataset>/<setting>/<name>, e.g. voc/uni-class/14",
        )
    dataset, setting, name = parts
    index_dir = Path(splits_root) / dataset
    index = DatasetIndex.read(index_dir)
    manifest_path = index_dir / setting / f"{name}.json"
    manifest = Manifest.read(manifest_path)
    if manifest.index_sha256 != index.sha256:
        raise NdbenchError(
            f"manifest {manifest_path} built from another index than {index_dir / 'index.csv'}",
            f"rebuild with `ndbench build-splits {dataset} --out {splits_root}`",
        )
    return index, manifest
