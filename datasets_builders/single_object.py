"""Single-object array datasets (CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST) -> dataset index.

The files are read as torchvision stores them: CIFAR's python pickle batches
(`cifar-10-batches-py/`, `cifar-100-python/`) and MNIST's idx files (gzipped or not, in the
root, in `root/raw` or in `root/<MNIST|FashionMNIST>/raw`). Every image holds exactly one
class; its id and path are `<subset>/<n>` (n = position in that subset, batches in order),
and the pixels are read back with `read_array_images`.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NdbenchError
from .index import DatasetIndex, IndexRow, sha256_of_files

CIFAR_SIDE = 32
CIFAR_ROW_BYTES = 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR_LABELS = ("coarse", "fine")
# Classes of each (variant, label kind): the meta file must name exactly these many.
CIFAR_CLASS_COUNTS = {("cifar10", "coarse"): 10, ("cifar100", "coarse"): 20, ("cifar100", "fine"): 100}
MNIST_IMAGE_SHAPE = (28, 28)  # MNIST's and Fashion-MNIST's images


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    archive: str
    meta: str
    train: tuple[str, ...]
    test: tuple[str, ...]


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        meta="batches.meta",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        meta="meta",
        train=("train",),
        test=("test",),
    ),
}

# idx files per subset: (images, labels), named as LeCun's site and torchvision name them.
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
# Images per class (0-9) of each published test set: the two datasets share file names and
# format, and this tells their test label files apart (LeCun et al.'s MNIST test set is
# uneven; Xiao et al.'s Fashion-MNIST has 1,000 of each class).
_PUBLISHED_TEST_COUNTS = {
    "mnist": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
    "fmnist": (1000,) * 10,
}
MNIST_CLASS_NAMES = tuple(str(d) for d in range(10))
FMNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# --- CIFAR ---------------------------------------------------------------------------------
def build_cifar_index(root: Path, *, variant: str, labels: str = "coarse") -> DatasetIndex:
    """Index CIFAR-10 or CIFAR-100 (`variant` "cifar10" / "cifar100") from its pickle batches.

    `root` is the folder holding `cifar-10-batches-py` / `cifar-100-python`, or that folder
    itself. CIFAR-100 classes are its 20 coarse superclasses by default, as the one-class
    novelty-detection literature evaluates it (MSAD, Transformaly); `labels="fine"` gives the
    100 fine classes. Class names come from the meta file.
    """
    layout = _cifar_layout(variant)
    if labels not in CIFAR_LABELS:
        raise NdbenchError(f"unknown CIFAR label kind {labels!r}", "use 'coarse' or 'fine'")
    if variant == "cifar10":
        label_key, names_key = "labels", "label_names"
    else:
        label_key, names_key = f"{labels}_labels", f"{labels}_label_names"
    folder = _cifar_folder(Path(root), variant)
    meta_path = folder / layout.meta
    names = _cifar_names(_load_pickle(meta_path, variant, root), names_key, meta_path)
    expected = CIFAR_CLASS_COUNTS[variant, "coarse" if variant == "cifar10" else labels]
    if len(names) != expected or len(set(names)) != len(names):
        raise NdbenchError(f"{meta_path}: {names_key!r} holds {len(names)} names ({len(set(names))} distinct), "
                           f"not {variant}'s {expected}", "the meta file is damaged; download it again")
    rows: list[IndexRow] = []
    read: list[Path] = []
    for subset, batch_names in (("train", layout.train), ("test", layout.test)):
        position = 0
        for batch_name in batch_names:
            path = folder / batch_name
            batch = _load_pickle(path, variant, root)
            count = len(_cifar_data(batch, path))
            for label in _cifar_labels(batch, label_key, count, len(names), path):
                image_id = f"{subset}/{position}"
                rows.append(IndexRow(image_id, image_id, subset, (int(label),)))
                position += 1
            read.append(path)
    read.append(meta_path)
    return _single_object_index(variant, root, rows, names, read)


def _single_object_index(variant: str, root: Path, rows: list[IndexRow], names: Sequence[str],
                         read: list[Path]) -> DatasetIndex:
    """The index of a CIFAR/MNIST-style dataset (images stored in its own array files,
    `storage` = the variant), fingerprinted by the files `read`."""
    return DatasetIndex(
        dataset=variant,
        root=Path(root),
        rows=rows,
        class_names=dict(enumerate(names)),
        source_sha256=sha256_of_files(read),
        storage=variant,
    )


def _cifar_layout(variant: str) -> _CifarLayout:
    if variant not in _CIFAR_LAYOUTS:
        raise NdbenchError(f"unknown CIFAR variant {variant!r}", "use cifar10 or cifar100")
    return _CIFAR_LAYOUTS[variant]


def _cifar_folder(root: Path, variant: str) -> Path:
    """The folder holding the batches: `root/<cifar folder>`, or `root` itself."""
    layout = _CIFAR_LAYOUTS[variant]
    if (root / layout.folder).is_dir():
        return root / layout.folder
    if root.name == layout.folder or (root / layout.meta).is_file():
        return root
    if (root / layout.archive).is_file():
        fix = f"extract {root / layout.archive} (tar xzf) so that {root / layout.folder} exists"
    else:
        fix = (
            f"pass the folder that holds {layout.folder}, as torchvision's "
            f"{'CIFAR10' if variant == 'cifar10' else 'CIFAR100'}(root, download=True) leaves it"
        )
    raise NdbenchError(f"no {layout.folder} folder in {root}", fix)


def _load_pickle(path: Path, variant: str, root: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the real files are Python 2 pickles)."""
    if not path.is_file():
        raise NdbenchError(
            f"{variant}: expected {path.name} in {path.parent}, it is missing",
            f"download {variant} again with torchvision into {root}",
        )
    try:
        with path.open("rb") as handle:
            # latin1 is how Python 2 pickles holding numpy arrays must be decoded.
            obj = pickle.load(handle, encoding="latin1")
    except PermissionError:
        raise
    except Exception as exc:  # unpickling damaged bytes can raise almost anything
        raise NdbenchError(
            f"cannot read {path}: not a CIFAR python pickle ({type(exc).__name__}: {exc})",
            f"the file is damaged; download {variant} again",
        ) from exc
    if not isinstance(obj, dict):
        raise NdbenchError(
            f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict",
            f"the file is damaged; download {variant} again",
        )
    return {_text(key): value for key, value in obj.items()}


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def _cifar_field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise NdbenchError(
            f"{path} has no {key!r} entry (it has {', '.join(sorted(map(str, batch)))})",
            "the file is not a CIFAR file of this variant; download it again",
        )
    return batch[key]


def _cifar_names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = _cifar_field(meta, key, path)
    if not isinstance(names, list | tuple) or not names:
        raise NdbenchError(f"{path}: {key!r} is not a list of names", "download it again")
    return [str(_text(name)) for name in names]


def _as_array(value: Any, key: str, path: Path) -> np.ndarray:
    """`value` as a numpy array; a ragged or otherwise unconvertible value is one clear error."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise NdbenchError(
            f"{path}: {key!r} is not an array ({exc})", "the file is damaged; download it again"
        ) from exc


def _cifar_data(batch: dict[str, Any], path: Path) -> np.ndarray:
    data = _as_array(_cifar_field(batch, "data", path), "data", path)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        raise NdbenchError(
            f"{path}: 'data' is {data.dtype} of shape {data.shape}, "
            f"expected uint8 of shape (N, {CIFAR_ROW_BYTES})",
            "the file is damaged; download it again",
        )
    return data


def _cifar_labels(
    batch: dict[str, Any], key: str, count: int, n_classes: int, path: Path
) -> np.ndarray:
    labels = _as_array(_cifar_field(batch, key, path), key, path)
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise NdbenchError(
            f"{path}: {key!r} has shape {labels.shape}, expected {count} integer labels",
            "the file is damaged; download it again",
        )
    if count and (labels.min() < 0 or labels.max() >= n_classes):
        raise NdbenchError(
            f"{path}: {key!r} holds labels outside 0..{n_classes - 1}",
            "the file is damaged; download it again",
        )
    return labels.astype(np.int64)


def _read_cifar_images(root: Path, variant: str, subset: str) -> np.ndarray:
    layout = _cifar_layout(variant)
    folder = _cifar_folder(Path(root), variant)
    batch_names = layout.train if subset == "train" else layout.test
    data = [
        _cifar_data(_load_pickle(folder / name, variant, root), folder / name)
        for name in batch_names
    ]
    # Each row is the red, then green, then blue 32x32 plane, row-major.
    flat = np.concatenate(data)
    return np.ascontiguousarray(flat.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1))


# --- MNIST / Fashion-MNIST -----------------------------------------------------------------
def build_mnist_index(root: Path, *, variant: str) -> DatasetIndex:
    """Index MNIST or Fashion-MNIST (`variant` "mnist" / "fmnist") from its four idx files.

    The files (`.gz` or not) may lie in `root`, `root/raw` or `root/<MNIST|FashionMNIST>/raw`
    (torchvision's layout). Class names are the digits, or Fashion-MNIST's ten names.
    """
    _check_mnist_variant(variant)
    folder = _mnist_folder(Path(root), variant)
    rows: list[IndexRow] = []
    read: list[Path] = []
    for subset, (images_name, labels_name) in _MNIST_FILES.items():
        images_path = _mnist_file(folder, images_name, variant)
        labels_path = _mnist_file(folder, labels_name, variant)
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
        if images.shape[1:] != MNIST_IMAGE_SHAPE:
            raise NdbenchError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, not "
                               f"{variant}'s {MNIST_IMAGE_SHAPE[0]}x{MNIST_IMAGE_SHAPE[1]}",
                               f"the file is damaged or not {variant}'s; download it again")
        if len(images) != len(labels):
            raise NdbenchError(
                f"{images_path} holds {len(images)} images but {labels_path} holds "
                f"{len(labels)} labels",
                f"download {variant} again",
            )
        if len(labels) and labels.max() >= 10:
            raise NdbenchError(
                f"{labels_path} holds labels outside 0..9", f"download {variant} again"
            )
        if subset == "test":
            _check_not_the_other_variant(labels, labels_path, variant)
        for position, label in enumerate(labels.tolist()):
            image_id = f"{subset}/{position}"
            rows.append(IndexRow(image_id, image_id, subset, (label,)))
        read += [images_path, labels_path]
    names = MNIST_CLASS_NAMES if variant == "mnist" else FMNIST_CLASS_NAMES
    return _single_object_index(variant, root, rows, names, read)


def _check_mnist_variant(variant: str) -> None:
    if variant not in _TORCHVISION_FOLDERS:
        raise NdbenchError(f"unknown MNIST variant {variant!r}", "use mnist or fmnist")


def _check_not_the_other_variant(labels: np.ndarray, path: Path, variant: str) -> None:
    """Refuse test labels whose per-class counts are exactly the other variant's published
    ones (MNIST's files given as Fashion-MNIST, or the reverse: same names, same format)."""
    other = "mnist" if variant == "fmnist" else "fmnist"
    counts = tuple(np.bincount(labels, minlength=10).tolist())
    if counts == _PUBLISHED_TEST_COUNTS[other]:
        raise NdbenchError(
            f"{path} holds {other}'s test labels (its per-class counts), not {variant}'s",
            f"point --root at the {variant} files, or build these as {other} (`ndbench build-splits {other}` "
            "with the same --root)",
        )


def _mnist_candidates(root: Path, variant: str) -> list[Path]:
    return [root, root / "raw", root / _TORCHVISION_FOLDERS[variant] / "raw"]


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_folder(root: Path, variant: str) -> Path:
    """The first candidate folder holding any of the four idx files."""
    names = [name for pair in _MNIST_FILES.values() for name in pair]
    candidates = _mnist_candidates(root, variant)
    for folder in candidates:
        if any(_find_idx(folder, name) for name in names):
            return folder
    raise NdbenchError(
        f"no {variant} idx files ({names[0]}[.gz] ...) in {', '.join(map(str, candidates))}",
        f"download with torchvision ({_TORCHVISION_FOLDERS[variant]}(root, download=True)) "
        "or put the four idx files in the root",
    )


def _mnist_file(folder: Path, name: str, variant: str) -> Path:
    path = _find_idx(folder, name)
    if path is None:
        raise NdbenchError(
            f"{variant}: expected {name} (or {name}.gz) in {folder}, it is missing",
            f"download {variant} again or copy the missing file there",
        )
    return path


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of one idx file, after checking its magic number and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except PermissionError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise NdbenchError(
            f"cannot read {path}: {exc}", "the file is damaged; download it again"
        ) from exc
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file too short)" if found is None else f"{found:#010x}"
        raise NdbenchError(
            f"{path} is not an idx{ndim} ubyte file (magic number {shown}, expected {magic:#010x})",
            "the file is damaged or is not the expected MNIST file; download it again",
        )
    if len(raw) < header:
        raise NdbenchError(f"{path} is truncated inside its header", "download it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)  # Python ints: a damaged header cannot overflow the check
    if len(raw) - header != expected:
        raise NdbenchError(
            f"{path} holds {len(raw) - header} data bytes, its header {dims} promises {expected}",
            "the file is truncated or damaged; download it again",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_mnist_images(root: Path, variant: str, subset: str) -> np.ndarray:
    _check_mnist_variant(variant)
    folder = _mnist_folder(Path(root), variant)
    path = _mnist_file(folder, _MNIST_FILES[subset][0], variant)
    return _read_idx(path, _IDX_IMAGES_MAGIC, 3)


# --- pixels --------------------------------------------------------------------------------
def read_array_images(root: Path, storage: str, subset: str) -> np.ndarray:
    """All images of one subset of an array set, in index order (position n = `<subset>/<n>`).

    uint8, N x H x W x 3 for CIFAR, N x H x W for MNIST / Fashion-MNIST.
    """
    if subset not in _MNIST_FILES:
        raise ValueError(f"unknown subset {subset!r}")
    if storage in _CIFAR_LAYOUTS:
        return _read_cifar_images(Path(root), storage, subset)
    if storage in _TORCHVISION_FOLDERS:
        return _read_mnist_images(Path(root), storage, subset)
    raise ValueError(f"{storage!r} is not an array storage kind")
