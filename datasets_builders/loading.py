"""A torch `Dataset` over one part (train or test) of a split manifest.

Items are `(image_tensor, label, image_id)`: label 0 normal / 1 novel (every train image is
normal). Images are opened with PIL as RGB (grayscale sources are repeated over the three
channels) and passed through a transform, `to_tensor` by default.

With a `StagedTransform` and an `ImageStore`, a file image is decoded once per machine: its
pixels at the input size are read from the store when there, else decoded and written there
(also from DataLoader workers), and only the transform's cheap tensor stage runs per item.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.transforms.functional import to_tensor

from .array_store import Entry
from .counts import Counts
from .errors import NdbenchError
from .image_store import PIXELS, ImageKey, ImageStore, StagedTransform
from .index import DatasetIndex, IndexRow, build_command, index_build_command
from .single_object import read_array_images
from .splits import Manifest

PARTS = ("train", "test")
Transform = Callable[[PIL.Image.Image], Tensor]


def open_rgb(path: Path, fix: str) -> PIL.Image.Image:
    """An image file as 8-bit RGB; any failure to decode it is one NdbenchError with `fix`.

    Single-channel images PIL opens wider than 8 bits are scaled, not clipped: integer modes
    ("I;16*", and "I", which PIL uses for 16-bit PNG, TIFF and PGM) as 16-bit values
    (v / 257, rounded; outside 0..65535 clipped), so a 16-bit image gives the pixels of the
    8-bit one it was made from. Float images ("F") whose values all lie in [0, 1] are scaled
    by 255; other float images are converted as PIL does (truncated, clipped to 0..255)."""
    try:
        with warnings.catch_warnings():
            # Large images (> ~89 MP) only warn; those past PIL's limit fail below, in one line.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as image:
                return to_8bit(image).convert("RGB")
    # Decoding damaged bytes raises OSError, SyntaxError (PNG chunks), ValueError, struct
    # errors, DecompressionBombError...: all mean the same to the user.
    except Exception as exc:  # noqa: BLE001
        message = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise NdbenchError(f"cannot read image {path}: {message}", fix) from exc


def to_8bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as an 8-bit "L" image when its mode is wider (see `open_rgb`), else itself."""
    # PIL's own convert() clips these modes to 0..255: every 16-bit pixel above 255 turns white.
    if image.mode == "I" or image.mode.startswith("I;16"):
        scaled = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257)
        return PIL.Image.fromarray(scaled.astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            scaled = np.rint(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0) * 255)
            return PIL.Image.fromarray(scaled.astype(np.uint8))
    return image


class ManifestDataset(Dataset):
    """The images of one manifest part with their labels, as `(tensor, label, image_id)`.

    `store`: keep decoded file images there (only with a `StagedTransform`; array sets are
    in memory already). `counts`: count decodes and store reads (shared with DataLoader
    workers)."""

    def __init__(
        self,
        index: DatasetIndex,
        manifest: Manifest,
        part: str,
        transform: Transform | None = None,
        store: ImageStore | None = None,
        counts: Counts | None = None,
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
        self.counts = counts
        self._store = store if self.stores_decoded(store) else None
        self._entry: Entry | None = None

    def _row(self, image_id: str) -> IndexRow:
        try:
            return self.index.row(image_id)
        except KeyError:
            raise NdbenchError(
                f"split {self.split_id} names image {image_id!r}, which the "
                f"{self.index.dataset} index does not hold",
                f"rebuild the splits with `{index_build_command(self.index)}`",
            ) from None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, item: int) -> tuple[Tensor, int, str]:
        if isinstance(self.transform, StagedTransform):
            tensor = self.transform.finish(self.decoded(item))
        else:
            tensor = self.transform(self._decode_source(item))
        return tensor, int(self.labels[item]), self.image_ids[item]

    def __getitems__(self, items: list[int]) -> list[tuple[Tensor, int, str]]:
        """Several items at once (a DataLoader fetches a batch this way): with a staged
        transform, stored pixels are read and normalised together."""
        if not isinstance(self.transform, StagedTransform):
            return [self[item] for item in items]
        tensors = self.transform.finish.batch(self.decoded_batch(items))
        return [(tensors[k], int(self.labels[item]), self.image_ids[item]) for k, item in enumerate(items)]

    # --- decode once -------------------------------------------------------------------------
    def stores_decoded(self, store: ImageStore | None) -> bool:
        """Whether this dataset keeps decoded images in `store`: file images and a staged transform."""
        return store is not None and self.index.storage == "files" and isinstance(self.transform, StagedTransform)

    @property
    def image_key(self) -> ImageKey | None:
        """What identifies this dataset's input pixels (None without a staged transform)."""
        if not isinstance(self.transform, StagedTransform):
            return None
        return ImageKey(self.index.content_sha256, self.transform.decode.signature, len(self.index.rows),
                        self.transform.finish.signature)

    @property
    def positions(self) -> np.ndarray:
        """Each item's position in the dataset index (the row of its stored pixels and features)."""
        return np.asarray([self.index.position(image_id) for image_id in self.image_ids], dtype=np.int64)

    def _store_entry(self) -> Entry | None:
        if self._store is not None and self._entry is None:
            self._entry = self._store.entry(self.image_key, self.transform.decode)
            self._positions = self.positions
        return self._entry

    def decoded(self, item: int) -> np.ndarray:
        """The item's pixels after the staged transform's decode (uint8 [H, W, 3]): from the
        image store when there, else decoded (and stored)."""
        entry = self._store_entry()
        if entry is not None:
            position = self._positions[item:item + 1]
            records, ok = entry.read(position)
            if ok[0]:
                self._count("image_reads")
                return records[PIXELS][0]
        pixels = self.transform.decode(self._decode_source(item))
        if entry is not None:
            record = np.zeros(1, dtype=entry.schema().record_dtype)
            record[PIXELS][0] = pixels
            entry.write(position, record)
        return pixels

    def decoded_batch(self, items: list[int]) -> np.ndarray:
        """`decoded` for several items: uint8 [len(items), H, W, 3]."""
        entry = self._store_entry()
        if entry is None:
            return np.stack([self.decoded(item) for item in items])
        positions = self._positions[list(items)]
        records, ok = entry.read(positions)
        self._count("image_reads", int(ok.sum()))
        pixels = records[PIXELS]
        if not ok.all():
            # An image listed twice in the batch (a repeated training image) is decoded once.
            missing, first, inverse = np.unique(positions[~ok], return_index=True, return_inverse=True)
            todo = np.flatnonzero(~ok)
            for k in todo[first]:
                pixels[k] = self.transform.decode(self._decode_source(items[k]))
            pixels[todo] = pixels[todo[first]][inverse]
            entry.write(missing, records[todo[first]])
        return pixels

    def pending(self, items: list[int] | None = None) -> int:
        """How many of `items` (default: all) must be decoded from files to be read."""
        if self.index.storage != "files":
            return 0
        items = list(range(len(self))) if items is None else list(items)
        entry = self._store_entry()
        if entry is None or not items:
            return len(items)
        return int((~entry.filled(self._positions[items])).sum())

    def _decode_source(self, item: int) -> PIL.Image.Image:
        image = self.image(item)
        if self.index.storage == "files":
            self._count("decodes")
        return image

    def _count(self, name: str, n: int = 1) -> None:
        if self.counts is not None and n:
            self.counts.add(name, n)

    def image(self, item: int) -> PIL.Image.Image:
        """The item's image as an RGB PIL image, before the transform."""
        if self.index.storage == "files":
            return self._open_file(self._rows[item])
        return PIL.Image.fromarray(self._array_pixels()[item]).convert("RGB")

    def per_class_repeats(self, normal_classes) -> ManifestDataset:
        """The same images, each listed once per class of `normal_classes` it holds (at least
        once): the weighting of a training set built by concatenating per-class image sets."""
        counts = per_class_repeat_counts(self._rows, normal_classes)
        return self._items([i for i, count in enumerate(counts) for _ in range(count)])

    def take(self, n: int) -> ManifestDataset:
        """The same dataset over its first `n` items only."""
        return self._items(list(range(min(n, len(self)))))

    def _items(self, order: list[int]) -> ManifestDataset:
        """A view of this dataset listing its items `order` (repeats allowed)."""
        view = copy.copy(self)
        view.image_ids = [self.image_ids[i] for i in order]
        view.labels = self.labels[order].copy()
        view._rows = [self._rows[i] for i in order]
        view._pixels = None if self._pixels is None else self._pixels[order].copy()
        view._entry = None  # positions are per item: recomputed for the view
        return view

    def _open_file(self, row: IndexRow) -> PIL.Image.Image:
        path = Path(self.index.root) / row.path
        if not path.is_file():
            raise NdbenchError(
                f"image {row.image_id!r} of {self.index.dataset} is missing: expected {path}",
                f"check the dataset root ({self.index.root}) or rebuild the index",
            )
        if self.index.dataset == "embedded":  # generated by ndbench: the scene folder is made again
            return open_rgb(path, f"delete {self.index.root} and run the same command again to regenerate "
                                  "the embedded scenes")
        return open_rgb(path, "the file is damaged; replace it")

    def _array_pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = self._load_pixels()
        return self._pixels

    def _load_pixels(self) -> np.ndarray:
        """Read each needed subset once and keep only the rows of this dataset's items."""
        positions = np.asarray([_position(row, self.index) for row in self._rows], dtype=np.int64)
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
                    f"rebuild the index and splits with `{index_build_command(self.index)}`",
                )
            if pixels is None:
                pixels = np.empty((len(self._rows),) + source.shape[1:], dtype=source.dtype)
            pixels[mine] = source[wanted]
        if pixels is None:  # no items at all
            pixels = np.empty((0, 1, 1), dtype=np.uint8)
        return pixels


def per_class_repeat_counts(rows, normal_classes) -> list[int]:
    """How often each index row is listed in a training set concatenated from per-class image
    sets: once per class of `normal_classes` the image holds, at least once."""
    normal = set(normal_classes)
    return [max(1, len(normal.intersection(row.classes))) for row in rows]


def base_items(data: Dataset) -> tuple[ManifestDataset, list[int]] | None:
    """The ManifestDataset under `data` (through `Subset`s and wrappers holding it as `.data` or
    `.dataset`) and which of its items `data` reads, or None when there is none."""
    items: list[int] | None = None
    while not isinstance(data, ManifestDataset):
        if isinstance(data, Subset):
            inner = list(data.indices)
            items = inner if items is None else [inner[i] for i in items]
            data = data.dataset
        elif isinstance(getattr(data, "data", None), Dataset):
            data = data.data
        elif isinstance(getattr(data, "dataset", None), Dataset):
            data = data.dataset
        else:
            return None
    return data, list(range(len(data))) if items is None else items


def fetch_items(data: Dataset, items: list[int]) -> list:
    """`data`'s items, fetched together when it can (`__getitems__`), else one by one."""
    batched = getattr(data, "__getitems__", None)
    return batched(list(items)) if batched is not None else [data[item] for item in items]


class IndexedImages(Dataset):
    """The input images of a dataset's items with their positions, `(tensor, item)`, so what is
    computed from a batch can be stored by item."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        return self.data[item][0], item

    def __getitems__(self, items: list[int]) -> list[tuple[Tensor, int]]:
        """Several items at once, fetched together when the dataset can (a stored batch)."""
        return [(got[0], item) for got, item in zip(fetch_items(self.data, items), items, strict=True)]


def decodes_files(data: Dataset) -> bool:
    """Whether reading `data` decodes image files (so DataLoader workers pay off)."""
    found = base_items(data)
    return found is not None and found[0].pending(found[1]) > 0


def _position(row: IndexRow, index: DatasetIndex) -> int:
    subset, _, number = row.path.partition("/")
    if subset != row.subset or not number.isdigit():
        raise NdbenchError(
            f"array image path {row.path!r} is not '<subset>/<n>'",
            f"rebuild the index with `{index_build_command(index)}`",
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
            f"rebuild with `{build_command(index_dir)}`",
        )
    return index, manifest
