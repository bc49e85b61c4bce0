"""Tiny CIFAR-10 / CIFAR-100 / MNIST trees in the real on-disk formats, for tests.

CIFAR: protocol-2 python pickles of dicts with byte-string keys, `data` an N x 3072 uint8
array (red, green, blue 32x32 planes, row-major), labels as lists of ints. By default they are
written as Python 2 wrote the distributed files (byte strings as STRING opcodes, numpy under
`numpy.core`); `python2=False` writes what Python 3's pickle makes of the same dict.
MNIST: big-endian idx files (magic 0x803 images / 0x801 labels), gzipped or not.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
CIFAR100_COARSE_NAMES = [f"super{i}" for i in range(20)]
CIFAR100_FINE_NAMES = [f"fine{i}" for i in range(100)]
PICKLE_PROTOCOL = 2  # the protocol of the distributed CIFAR files


def random_images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic random uint8 images."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 images -> CIFAR's N x 3072 rows (channel planes, row-major)."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


class _Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 pickled its `str` and names numpy's old module path."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = getattr(obj, "__module__", None) or ""
        if not module.startswith("numpy._core"):
            super().save_global(obj, name)
            return
        old = "numpy.core" + module[len("numpy._core") :]
        self.write(pickle.GLOBAL + f"{old}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def write_pickle(path: Path, obj: object, *, python2: bool = True) -> None:
    """Write `obj` as a protocol-2 pickle, Python 2 style by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if python2:
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(pickle.dumps(obj, protocol=PICKLE_PROTOCOL))


def write_cifar10(
    root: Path,
    train_labels: Sequence[int],
    test_labels: Sequence[int],
    seed: int = 0,
    *,
    python2: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Write `root/cifar-10-batches-py` (train split over the 5 batches in order).

    Returns the (train, test) images as N x 32 x 32 x 3 uint8 arrays, in index order.
    """
    folder = root / "cifar-10-batches-py"
    train = random_images(len(train_labels), (32, 32, 3), seed)
    test = random_images(len(test_labels), (32, 32, 3), seed + 1)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for number, chunk in enumerate(chunks, start=1):
        write_pickle(
            folder / f"data_batch_{number}",
            {
                b"batch_label": f"training batch {number} of 5".encode(),
                b"labels": [int(train_labels[i]) for i in chunk],
                b"data": cifar_rows(train[chunk]),
                b"filenames": [f"img_{i}.png".encode() for i in chunk],
            },
            python2=python2,
        )
    write_pickle(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(label) for label in test_labels],
            b"data": cifar_rows(test),
            b"filenames": [f"test_{i}.png".encode() for i in range(len(test_labels))],
        },
        python2=python2,
    )
    write_pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": 10000,
            b"label_names": [name.encode() for name in CIFAR10_NAMES],
            b"num_vis": 3072,
        },
        python2=python2,
    )
    return train, test


def write_cifar100(
    root: Path,
    train_fine: Sequence[int],
    train_coarse: Sequence[int],
    test_fine: Sequence[int],
    test_coarse: Sequence[int],
    seed: int = 0,
    *,
    python2: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Write `root/cifar-100-python` (train, test, meta); returns (train, test) images."""
    folder = root / "cifar-100-python"
    train = random_images(len(train_fine), (32, 32, 3), seed)
    test = random_images(len(test_fine), (32, 32, 3), seed + 1)
    for name, images, fine, coarse in (
        ("train", train, train_fine, train_coarse),
        ("test", test, test_fine, test_coarse),
    ):
        write_pickle(
            folder / name,
            {
                b"filenames": [f"{name}_{i}.png".encode() for i in range(len(fine))],
                b"batch_label": f"{name} batch".encode(),
                b"fine_labels": [int(label) for label in fine],
                b"coarse_labels": [int(label) for label in coarse],
                b"data": cifar_rows(images),
            },
            python2=python2,
        )
    write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [name.encode() for name in CIFAR100_FINE_NAMES],
            b"coarse_label_names": [name.encode() for name in CIFAR100_COARSE_NAMES],
        },
        python2=python2,
    )
    return train, test


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx ubyte file's bytes for a uint8 array (magic 0x08 type, then its dimensions)."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(
    folder: Path,
    train_labels: Sequence[int],
    test_labels: Sequence[int],
    *,
    gz: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Write the four idx files into `folder`; returns (train, test) N x 28 x 28 images."""
    folder.mkdir(parents=True, exist_ok=True)
    train = random_images(len(train_labels), (28, 28), seed)
    test = random_images(len(test_labels), (28, 28), seed + 1)
    files = {
        "train-images-idx3-ubyte": train,
        "train-labels-idx1-ubyte": np.asarray(train_labels, dtype=np.uint8),
        "t10k-images-idx3-ubyte": test,
        "t10k-labels-idx1-ubyte": np.asarray(test_labels, dtype=np.uint8),
    }
    for name, array in files.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return train, test
