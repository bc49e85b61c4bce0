"""CIFAR / MNIST builders: exact index rows, class names, pixels, split membership, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from array_fixtures import (
    CIFAR10_NAMES,
    CIFAR100_COARSE_NAMES,
    CIFAR100_FINE_NAMES,
    idx_bytes,
    write_cifar10,
    write_cifar100,
    write_mnist,
    write_pickle,
)

from benchmark.cli import main
from benchmark.runner import RunOptions, expand_jobs
from datasets_builders.errors import NdbenchError
from datasets_builders.image_store import Normalise, ResizeDecode, StagedTransform
from datasets_builders.index import IndexRow
from datasets_builders.loading import ManifestDataset
from datasets_builders.single_object import (
    build_cifar_index,
    build_mnist_index,
    read_array_images,
)
from datasets_builders.sources import build_index
from datasets_builders.splits import all_vs_one_split, multi_class_split, uni_class_split

# 20 train images, 4 per batch: image n has class n % 10; every class once in test.
CIFAR10_TRAIN = [n % 10 for n in range(20)]
CIFAR10_TEST = [9, 0, 5, 3, 7, 4, 1, 8, 2, 6]
MNIST_TRAIN = [5, 0, 4, 1, 9, 2]
MNIST_TEST = [7, 2, 1]


def rows_for(subset: str, labels: list[int]) -> list[IndexRow]:
    return [IndexRow(f"{subset}/{n}", f"{subset}/{n}", subset, (c,)) for n, c in enumerate(labels)]


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    write_cifar10(tmp_path, CIFAR10_TRAIN, CIFAR10_TEST)
    return tmp_path


# --- CIFAR-10 ------------------------------------------------------------------------------
def test_cifar10_index_rows_and_names(cifar10_root: Path) -> None:
    index = build_cifar_index(cifar10_root, variant="cifar10")
    assert index.dataset == "cifar10"
    assert index.storage == "cifar10"
    assert index.root == cifar10_root
    assert index.rows == rows_for("train", CIFAR10_TRAIN) + rows_for("test", CIFAR10_TEST)
    assert index.class_names == dict(enumerate(CIFAR10_NAMES))
    assert index.row("train/13").classes == (3,)  # batch 4, second row
    assert index.row("test/4").classes == (7,)


def test_cifar10_root_may_be_the_batches_folder(cifar10_root: Path) -> None:
    outer = build_cifar_index(cifar10_root, variant="cifar10")
    inner = build_cifar_index(cifar10_root / "cifar-10-batches-py", variant="cifar10")
    assert inner.rows == outer.rows
    assert inner.source_sha256 == outer.source_sha256


def test_cifar10_source_sha_follows_the_files(cifar10_root: Path) -> None:
    before = build_cifar_index(cifar10_root, variant="cifar10").source_sha256
    write_cifar10(cifar10_root, CIFAR10_TRAIN, CIFAR10_TEST, seed=5)  # same labels, new pixels
    after = build_cifar_index(cifar10_root, variant="cifar10").source_sha256
    assert len(before) == 64 and before != after


def test_cifar10_through_sources_dispatch(cifar10_root: Path) -> None:
    index = build_index("cifar10", cifar10_root)
    assert index.rows == rows_for("train", CIFAR10_TRAIN) + rows_for("test", CIFAR10_TEST)


@pytest.mark.parametrize("python2", [True, False])
def test_cifar10_pickled_by_either_python(tmp_path: Path, python2: bool) -> None:
    write_cifar10(tmp_path, CIFAR10_TRAIN, CIFAR10_TEST, python2=python2)
    index = build_cifar_index(tmp_path, variant="cifar10")
    assert index.rows == rows_for("train", CIFAR10_TRAIN) + rows_for("test", CIFAR10_TEST)
    assert index.class_names == dict(enumerate(CIFAR10_NAMES))


@pytest.mark.parametrize("python2", [True, False])
def test_cifar10_pixels_match_source(cifar10_root: Path, python2: bool) -> None:
    train, test = write_cifar10(cifar10_root, CIFAR10_TRAIN, CIFAR10_TEST, python2=python2)
    got_train = read_array_images(cifar10_root, "cifar10", "train")
    got_test = read_array_images(cifar10_root, "cifar10", "test")
    assert got_train.dtype == np.uint8 and got_train.shape == (20, 32, 32, 3)
    assert got_test.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(got_train, train)
    np.testing.assert_array_equal(got_test, test)


def test_cifar_row_layout_is_channel_planes_row_major(cifar10_root: Path) -> None:
    row = (np.arange(3072) % 251).astype(np.uint8)
    write_pickle(
        cifar10_root / "cifar-10-batches-py" / "test_batch",
        {b"labels": [4], b"data": row[None, :], b"batch_label": b"testing batch 1 of 1"},
    )
    image = read_array_images(cifar10_root, "cifar10", "test")[0]
    assert image[0, 1, 0] == 1  # red, y=0, x=1 -> byte 1
    assert image[1, 0, 0] == 32  # red, y=1, x=0 -> byte 32
    assert image[0, 0, 1] == 1024 % 251  # green plane starts at byte 1024
    assert image[2, 3, 2] == (2048 + 2 * 32 + 3) % 251  # blue, y=2, x=3
    assert image[31, 31, 2] == 3071 % 251


# --- CIFAR-100 -----------------------------------------------------------------------------
@pytest.fixture
def cifar100_root(tmp_path: Path) -> Path:
    write_cifar100(tmp_path, [0, 57, 99, 12], [4, 19, 0, 4], [31, 2], [7, 0])
    return tmp_path


def test_cifar100_coarse_by_default(cifar100_root: Path) -> None:
    index = build_cifar_index(cifar100_root, variant="cifar100")
    assert index.rows == rows_for("train", [4, 19, 0, 4]) + rows_for("test", [7, 0])
    assert index.class_names == dict(enumerate(CIFAR100_COARSE_NAMES))
    assert len(index.class_names) == 20


def test_cifar100_fine_labels(cifar100_root: Path) -> None:
    index = build_cifar_index(cifar100_root / "cifar-100-python", variant="cifar100", labels="fine")
    assert index.rows == rows_for("train", [0, 57, 99, 12]) + rows_for("test", [31, 2])
    assert index.class_names == dict(enumerate(CIFAR100_FINE_NAMES))


@pytest.mark.parametrize("python2", [True, False])
def test_cifar100_pixels(tmp_path: Path, python2: bool) -> None:
    train, test = write_cifar100(tmp_path, [1, 2, 3], [0, 1, 2], [4], [3], seed=7, python2=python2)
    np.testing.assert_array_equal(read_array_images(tmp_path, "cifar100", "train"), train)
    np.testing.assert_array_equal(read_array_images(tmp_path, "cifar100", "test"), test)


def test_cifar100_unknown_label_kind(cifar100_root: Path) -> None:
    with pytest.raises(NdbenchError, match="label kind 'medium'"):
        build_cifar_index(cifar100_root, variant="cifar100", labels="medium")


# --- splits on CIFAR-10 --------------------------------------------------------------------
def test_uni_class_split_on_cifar10(cifar10_root: Path) -> None:
    manifest = uni_class_split(build_cifar_index(cifar10_root, variant="cifar10"), 3)
    assert manifest.split_id == "cifar10/uni-class/3"
    assert manifest.train == ["train/3", "train/13"]
    assert manifest.test == [(f"test/{n}", 0 if n == 3 else 1) for n in range(10)]


def test_all_vs_one_split_on_cifar10(cifar10_root: Path) -> None:
    manifest = all_vs_one_split(build_cifar_index(cifar10_root, variant="cifar10"), 7)
    assert manifest.split_id == "cifar10/multi-class/except-7"
    assert manifest.normal_classes == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert manifest.train == [f"train/{n}" for n in range(20) if n not in (7, 17)]
    assert manifest.test == [(f"test/{n}", 1 if n == 4 else 0) for n in range(10)]


def test_half_vs_half_split_on_cifar10(cifar10_root: Path) -> None:
    index = build_cifar_index(cifar10_root, variant="cifar10")
    manifest = multi_class_split(index, (0, 1, 2, 3, 4))
    assert manifest.split_id == "cifar10/multi-class/normal-0-1-2-3-4"
    assert manifest.train == [f"train/{n}" for n in (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)]
    # test classes 9 0 5 3 7 4 1 8 2 6 -> novel when >= 5
    novel = [1, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    assert manifest.test == [(f"test/{n}", novel[n]) for n in range(10)]
    assert manifest.counts() == {"train": 10, "test_normal": 5, "test_novel": 5}


def test_a_cifar10_multi_class_run_holds_the_half_vs_half_sets_it_built(cifar10_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert main(["build-splits", "cifar10", "--root", str(cifar10_root), "--out", str(out / "splits")]) == 0
    jobs = expand_jobs(["knn"], dataset="cifar10", settings=["multi-class"], classes=None, seeds=[0],
                       options=RunOptions(out=out))
    built = sorted(p.stem for p in (out / "splits" / "cifar10" / "multi-class").glob("normal-*.json"))
    assert built == ["normal-0-1-2-3-4", "normal-0-2-4-6-8", "normal-1-3-5-7-9", "normal-5-6-7-8-9"]
    assert [job.split for job in jobs] == [f"except-{k}" for k in range(10)] + built


# --- CIFAR bad input -----------------------------------------------------------------------
def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NdbenchError, match="no cifar-10-batches-py folder") as info:
        build_cifar_index(tmp_path, variant="cifar10")
    assert str(tmp_path) in str(info.value)


def test_cifar_archive_not_extracted(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(NdbenchError, match="extract"):
        build_cifar_index(tmp_path, variant="cifar100")


def test_cifar_missing_batch(cifar10_root: Path) -> None:
    folder = cifar10_root / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(NdbenchError, match="expected data_batch_3 in") as info:
        build_cifar_index(cifar10_root, variant="cifar10")
    assert str(folder) in str(info.value)


def test_cifar_missing_meta(cifar10_root: Path) -> None:
    (cifar10_root / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(NdbenchError, match="expected batches.meta"):
        build_cifar_index(cifar10_root, variant="cifar10")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cifar_corrupt_pickle(cifar10_root: Path, damage: str) -> None:
    path = cifar10_root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(b"this is not a pickle" if damage == "garbage" else path.read_bytes()[:60])
    with pytest.raises(NdbenchError, match="not a CIFAR python pickle") as info:
        build_cifar_index(cifar10_root, variant="cifar10")
    assert str(path) in str(info.value)


def test_cifar_pickle_of_wrong_type(cifar100_root: Path) -> None:
    path = cifar100_root / "cifar-100-python" / "test"
    write_pickle(path, [1, 2, 3])
    with pytest.raises(NdbenchError, match="holds a list") as info:
        build_cifar_index(cifar100_root, variant="cifar100")
    assert str(path) in str(info.value)


def test_cifar_batch_without_labels(cifar10_root: Path) -> None:
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_2"
    write_pickle(path, {b"data": np.zeros((4, 3072), np.uint8)})
    with pytest.raises(NdbenchError, match="has no 'labels' entry") as info:
        build_cifar_index(cifar10_root, variant="cifar10")
    assert str(path) in str(info.value)


def test_cifar_batch_with_wrong_row_size(cifar10_root: Path) -> None:
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_5"
    write_pickle(path, {b"data": np.zeros((4, 1024), np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(NdbenchError, match=r"shape \(4, 1024\)") as info:
        build_cifar_index(cifar10_root, variant="cifar10")
    assert str(path) in str(info.value)


def test_cifar_label_count_and_range(cifar10_root: Path) -> None:
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    write_pickle(path, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]})
    with pytest.raises(NdbenchError, match="expected 4 integer labels"):
        build_cifar_index(cifar10_root, variant="cifar10")
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(NdbenchError, match=r"outside 0\.\.9") as info:
        build_cifar_index(cifar10_root, variant="cifar10")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("names", [CIFAR10_NAMES[:3], [*CIFAR10_NAMES, "extra", "more"], ["cat"] * 10],
                         ids=["too-few", "too-many", "not-distinct"])
def test_a_cifar_meta_that_does_not_name_the_classes_is_damaged(cifar10_root: Path, names) -> None:
    meta = cifar10_root / "cifar-10-batches-py" / "batches.meta"
    write_pickle(meta, {b"label_names": [name.encode() for name in names]})
    with pytest.raises(NdbenchError, match="not cifar10's 10") as info:
        build_cifar_index(cifar10_root, variant="cifar10")
    assert str(meta) in str(info.value) and "damaged" in str(info.value)


@pytest.mark.parametrize("shape", [(1, 1), (0, 0), (32, 32)])
def test_mnist_images_of_another_size_are_refused(tmp_path: Path, shape) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, MNIST_TEST)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(idx_bytes(np.zeros((len(MNIST_TRAIN), *shape), np.uint8)))
    with pytest.raises(NdbenchError, match=f"holds {shape[0]}x{shape[1]} images, not mnist's 28x28") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert str(images) in str(info.value)


def test_new_pixel_files_under_the_same_names_make_new_cache_keys(tmp_path: Path) -> None:
    write_mnist(tmp_path / "a", MNIST_TRAIN, MNIST_TEST, seed=0)
    write_mnist(tmp_path / "b", MNIST_TRAIN, MNIST_TEST, seed=5)  # other pixels, the same labels
    first = build_mnist_index(tmp_path / "a", variant="mnist")
    second = build_mnist_index(tmp_path / "b", variant="mnist")
    assert first.sha256 == second.sha256  # index.csv holds ids and labels only
    keys = []
    for index in (first, second):
        data = ManifestDataset(index, uni_class_split(index, 1), "test",
                               transform=StagedTransform(ResizeDecode(32), Normalise((0.5,) * 3, (0.2,) * 3)))
        keys.append(data.image_key)
    assert keys[0].index_sha256 != keys[1].index_sha256  # so no stored image or feature of one serves the other


# --- MNIST / Fashion-MNIST -----------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", [".", "raw", "MNIST/raw"])
def test_mnist_layouts(tmp_path: Path, layout: str, gz: bool) -> None:
    train, test = write_mnist(tmp_path / layout, MNIST_TRAIN, MNIST_TEST, gz=gz)
    index = build_mnist_index(tmp_path, variant="mnist")
    assert index.dataset == "mnist" and index.storage == "mnist"
    assert index.rows == rows_for("train", MNIST_TRAIN) + rows_for("test", MNIST_TEST)
    assert index.class_names == {d: str(d) for d in range(10)}
    got = read_array_images(tmp_path, "mnist", "train")
    assert got.dtype == np.uint8 and got.shape == (6, 28, 28)
    np.testing.assert_array_equal(got, train)
    np.testing.assert_array_equal(read_array_images(tmp_path, "mnist", "test"), test)


def test_fmnist_torchvision_layout_and_names(tmp_path: Path) -> None:
    write_mnist(tmp_path / "FashionMNIST" / "raw", MNIST_TRAIN, MNIST_TEST, gz=True)
    index = build_index("fmnist", tmp_path)
    assert index.dataset == "fmnist" and index.storage == "fmnist"
    assert index.rows == rows_for("train", MNIST_TRAIN) + rows_for("test", MNIST_TEST)
    assert index.class_names[0] == "T-shirt/top"
    assert index.class_names[9] == "Ankle boot"
    assert list(index.class_names.values()) == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ]  # fmt: skip


# Images per class of the published test sets (MNIST's uneven, Fashion-MNIST's 1,000 each).
MNIST_PUBLISHED_TEST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize(("given", "published", "counts"), [
    ("fmnist", "mnist", MNIST_PUBLISHED_TEST),
    ("mnist", "fmnist", [1000] * 10),
])
def test_the_other_variants_files_are_refused(tmp_path: Path, given, published, counts) -> None:
    # Same file names, same format: the test labels' per-class counts tell them apart.
    test_labels = np.repeat(np.arange(10), counts)
    write_mnist(tmp_path, MNIST_TRAIN, test_labels.tolist(), gz=True)
    with pytest.raises(NdbenchError, match=f"holds {published}'s test labels .* not {given}'s"):
        build_index(given, tmp_path)
    assert build_index(published, tmp_path).dataset == published


def test_mnist_uncompressed_preferred_and_sha(tmp_path: Path) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, MNIST_TEST, gz=True)
    gz_index = build_mnist_index(tmp_path, variant="mnist")
    write_mnist(tmp_path, [3, 3, 3, 3, 3, 3], MNIST_TEST, gz=False)  # beside the .gz files
    index = build_mnist_index(tmp_path, variant="mnist")
    assert [r.classes for r in index.subset("train")] == [(3,)] * 6
    assert index.source_sha256 != gz_index.source_sha256


def test_idx_pixel_layout(tmp_path: Path) -> None:
    write_mnist(tmp_path, [0, 1], [2])
    payload = (np.arange(2 * 28 * 28) % 256).astype(np.uint8)
    header = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + payload.tobytes())
    images = read_array_images(tmp_path, "mnist", "train")
    assert images[0, 0, 27] == 27
    assert images[0, 1, 0] == 28
    assert images[1, 2, 3] == (784 + 2 * 28 + 3) % 256


def test_mnist_no_files(tmp_path: Path) -> None:
    with pytest.raises(NdbenchError, match="no mnist idx files") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)


def test_mnist_missing_file(tmp_path: Path) -> None:
    write_mnist(tmp_path / "raw", MNIST_TRAIN, MNIST_TEST)
    (tmp_path / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(NdbenchError, match="expected t10k-labels-idx1-ubyte") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert str(tmp_path / "raw") in str(info.value)


def test_mnist_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, MNIST_TEST)
    path = tmp_path / "train-images-idx3-ubyte"
    # a labels file where the images file should be
    path.write_bytes(idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(NdbenchError, match=r"magic number 0x00000801, expected 0x00000803") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert str(path) in str(info.value)


def test_mnist_size_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, MNIST_TEST, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-1]))
    with pytest.raises(NdbenchError, match=r"holds 2351 data bytes.*promises 2352") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert str(path) in str(info.value)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, MNIST_TEST)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(NdbenchError, match="holds 6 images but .* holds 5 labels") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert "train-labels-idx1-ubyte" in str(info.value)


def test_mnist_corrupt_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, MNIST_TEST, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(NdbenchError, match="cannot read") as info:
        build_mnist_index(tmp_path, variant="mnist")
    assert str(path) in str(info.value)


def test_mnist_label_out_of_range(tmp_path: Path) -> None:
    write_mnist(tmp_path, MNIST_TRAIN, [7, 2, 12])
    with pytest.raises(NdbenchError, match=r"t10k-labels-idx1-ubyte holds labels outside 0\.\.9"):
        build_mnist_index(tmp_path, variant="mnist")
