"""ManifestDataset and load_split: pixels, labels and ids for array sets and file sets."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from array_fixtures import write_cifar10, write_mnist
from torch.utils.data import DataLoader

from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, IndexRow
from datasets_builders.loading import ManifestDataset, load_split, open_rgb
from datasets_builders.single_object import build_cifar_index, build_mnist_index
from datasets_builders.splits import multi_class_split, uni_class_split

CIFAR10_TRAIN = [n % 10 for n in range(20)]
CIFAR10_TEST = [9, 0, 5, 3, 7, 4, 1, 8, 2, 6]


def as_uint8(tensor: torch.Tensor) -> np.ndarray:
    """A to_tensor output (C x H x W floats in 0..1) back to H x W x C uint8."""
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[DatasetIndex, np.ndarray, np.ndarray]:
    train, test = write_cifar10(tmp_path / "src", CIFAR10_TRAIN, CIFAR10_TEST)
    return build_cifar_index(tmp_path / "src", variant="cifar10"), train, test


def test_array_set_train_part(cifar10) -> None:
    index, train, _ = cifar10
    data = ManifestDataset(index, uni_class_split(index, 3), "train")
    assert len(data) == 2
    assert data.image_ids == ["train/3", "train/13"]
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 0]
    image, label, image_id = data[1]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert (label, image_id) == (0, "train/13")
    np.testing.assert_array_equal(as_uint8(image), train[13])
    np.testing.assert_array_equal(as_uint8(data[0][0]), train[3])


def test_array_set_test_part(cifar10) -> None:
    index, _, test = cifar10
    data = ManifestDataset(index, multi_class_split(index, (0, 1, 2, 3, 4)), "test")
    assert data.image_ids == [f"test/{n}" for n in range(10)]
    assert data.labels.tolist() == [1, 0, 1, 0, 1, 0, 0, 1, 0, 1]
    for n in range(10):
        image, label, image_id = data[n]
        assert (label, image_id) == (data.labels[n], f"test/{n}")
        np.testing.assert_array_equal(as_uint8(image), test[n])


def test_arrays_are_read_once(cifar10, tmp_path: Path) -> None:
    index, train, _ = cifar10
    data = ManifestDataset(index, uni_class_split(index, 3), "train")
    first = data[0][0]
    shutil.rmtree(tmp_path / "src")  # the dataset keeps the pixels it needs
    np.testing.assert_array_equal(as_uint8(data[1][0]), train[13])
    assert torch.equal(data[0][0], first)
    assert data._pixels.shape == (2, 32, 32, 3)  # only its own items, not all 20


def test_array_source_missing_at_load_time(cifar10, tmp_path: Path) -> None:
    index, _, _ = cifar10
    data = ManifestDataset(index, uni_class_split(index, 3), "test")
    (tmp_path / "src" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(NdbenchError, match="expected test_batch"):
        data[0]


def test_mnist_gray_becomes_rgb(tmp_path: Path) -> None:
    train, test = write_mnist(tmp_path / "raw", [5, 0, 4, 1, 9, 2], [7, 2, 1], gz=True)
    index = build_mnist_index(tmp_path, variant="mnist")
    data = ManifestDataset(index, uni_class_split(index, 2), "test")
    assert data.image_ids == ["test/0", "test/1", "test/2"]
    assert data.labels.tolist() == [1, 0, 1]
    for n in range(3):
        image, _, _ = data[n]
        assert image.shape == (3, 28, 28)
        pixels = as_uint8(image)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[:, :, channel], test[n])


def test_take_and_dataloader(cifar10) -> None:
    index, _, test = cifar10
    data = ManifestDataset(index, uni_class_split(index, 3), "test")
    small = data.take(4)
    assert len(small) == 4 and len(data) == 10
    assert small.image_ids == ["test/0", "test/1", "test/2", "test/3"]
    assert small.labels.tolist() == [1, 1, 1, 0]
    images, labels, ids = next(iter(DataLoader(small, batch_size=4)))
    assert images.shape == (4, 3, 32, 32)
    assert labels.tolist() == [1, 1, 1, 0]
    assert list(ids) == small.image_ids
    np.testing.assert_array_equal(as_uint8(images[3]), test[3])
    data[0]  # load the arrays, then take from the loaded dataset
    smaller = data.take(2)
    assert smaller._pixels.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(as_uint8(smaller[1][0]), test[1])


def test_custom_transform(cifar10) -> None:
    index, _, _ = cifar10
    data = ManifestDataset(
        index, uni_class_split(index, 3), "train", transform=lambda im: torch.tensor(im.size)
    )
    assert data[0][0].tolist() == [32, 32]


def test_bad_part(cifar10) -> None:
    index, _, _ = cifar10
    with pytest.raises(ValueError, match="part"):
        ManifestDataset(index, uni_class_split(index, 3), "val")


# --- files set -----------------------------------------------------------------------------
@pytest.fixture
def files_set(tmp_path: Path) -> tuple[DatasetIndex, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    pixels = {
        "a": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (6, 4, 3), dtype=np.uint8),
        "c": rng.integers(0, 256, (3, 3), dtype=np.uint8),  # grayscale PNG
        "d": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
    }
    for name, array in pixels.items():
        PIL.Image.fromarray(array).save(root / "sub" / f"{name}.png")
    rows = [
        IndexRow("a", "sub/a.png", "train", (1,)),
        IndexRow("b", "sub/b.png", "train", (1, 2)),
        IndexRow("c", "sub/c.png", "test", (1,)),
        IndexRow("d", "sub/d.png", "test", (2,)),
    ]
    index = DatasetIndex("toy", root, rows, {1: "one", 2: "two"}, source_sha256="0" * 64)
    return index, pixels


def test_files_set_pixels_and_labels(files_set) -> None:
    index, pixels = files_set
    manifest = uni_class_split(index, 1)
    train = ManifestDataset(index, manifest, "train")
    assert train.image_ids == ["a", "b"] and train.labels.tolist() == [0, 0]
    np.testing.assert_array_equal(as_uint8(train[0][0]), pixels["a"])
    np.testing.assert_array_equal(as_uint8(train[1][0]), pixels["b"])
    test = ManifestDataset(index, manifest, "test")
    assert test.image_ids == ["c", "d"] and test.labels.tolist() == [0, 1]
    gray, label, image_id = test[0]
    assert (label, image_id) == (0, "c") and gray.shape == (3, 3, 3)
    np.testing.assert_array_equal(as_uint8(gray), np.repeat(pixels["c"][:, :, None], 3, axis=2))
    assert test[1][1:] == (1, "d")


def test_files_set_missing_image(files_set) -> None:
    index, _ = files_set
    data = ManifestDataset(index, uni_class_split(index, 2), "test")
    missing = index.root / "sub" / "d.png"
    missing.unlink()
    with pytest.raises(NdbenchError, match="is missing") as info:
        data[1]
    assert str(missing) in str(info.value)


def test_files_set_damaged_image(files_set) -> None:
    index, _ = files_set
    (index.root / "sub" / "a.png").write_bytes(b"not a png")
    data = ManifestDataset(index, uni_class_split(index, 1), "train")
    with pytest.raises(NdbenchError, match="cannot read image .*a.png"):
        data[0]


def test_manifest_image_not_in_index(files_set) -> None:
    index, _ = files_set
    manifest = uni_class_split(index, 1)
    manifest.train.append("zzz")
    with pytest.raises(NdbenchError, match="'zzz'"):
        ManifestDataset(index, manifest, "train")


# --- load_split ----------------------------------------------------------------------------
def test_load_split_round_trip(cifar10, tmp_path: Path) -> None:
    index, _, _ = cifar10
    splits = tmp_path / "splits"
    index.write(splits / "cifar10")
    manifest = uni_class_split(index, 3)
    assert manifest.write(splits) == splits / "cifar10" / "uni-class" / "3.json"
    got_index, got_manifest = load_split(splits, "cifar10/uni-class/3")
    assert got_index.rows == index.rows and got_index.storage == "cifar10"
    assert got_manifest == manifest
    data = ManifestDataset(got_index, got_manifest, "train")
    assert data.image_ids == ["train/3", "train/13"]


def test_load_split_refuses_other_index(cifar10, tmp_path: Path) -> None:
    index, _, _ = cifar10
    splits = tmp_path / "splits"
    uni_class_split(index, 3).write(splits)
    other = DatasetIndex(
        index.dataset, index.root, index.rows[1:], index.class_names, index.source_sha256,
        storage=index.storage,
    )  # fmt: skip
    other.write(splits / "cifar10")
    with pytest.raises(NdbenchError, match="built from another index") as info:
        load_split(splits, "cifar10/uni-class/3")
    assert "ndbench build-splits" in str(info.value)


def test_load_split_bad_id_and_missing_manifest(cifar10, tmp_path: Path) -> None:
    index, _, _ = cifar10
    index.write(tmp_path / "cifar10")
    with pytest.raises(NdbenchError, match="cannot read split id"):
        load_split(tmp_path, "cifar10/3")
    with pytest.raises(NdbenchError, match="no split manifest"):
        load_split(tmp_path, "cifar10/uni-class/4")


class _DamagedImages(torch.utils.data.Dataset):
    """Two items whose decoding fails as a damaged image file does."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, item: int):
        try:
            raise OSError("cannot identify image file")
        except OSError as exc:
            raise NdbenchError(f"cannot read image {item}.png: {exc}", "the file is damaged; replace it") from exc


def test_an_error_in_a_loader_worker_keeps_its_own_one_line_message() -> None:
    # torch re-raises it with the worker's whole traceback as the message.
    with pytest.raises(NdbenchError) as raised:
        list(DataLoader(_DamagedImages(), num_workers=1))
    assert str(raised.value) == "cannot read image 0.png: cannot identify image file (the file is damaged; replace it)"


def test_an_oversized_image_is_one_line_and_a_large_one_opens_quietly(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # PIL warns past 100 px, refuses past 200
    for side in (12, 20):
        PIL.Image.new("RGB", (side, side)).save(tmp_path / f"{side}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_rgb(tmp_path / "12.png", "fix").size == (12, 12)
    with pytest.raises(NdbenchError, match=r"cannot read image .*20\.png: Image size \(400 pixels\) exceeds"):
        open_rgb(tmp_path / "20.png", "fix")


def _wide_images(folder: Path, gray: np.ndarray) -> dict[str, Path]:
    """`gray` (uint8) saved in the modes PIL opens wider than 8 bits, by the mode it opens as."""
    wide = gray.astype(np.uint16) * 257
    files = {
        "I;16": ("16.png", PIL.Image.fromarray(wide)),
        "I;16B": ("16b.tif", PIL.Image.frombytes("I;16B", gray.shape[::-1], wide.astype(">u2").tobytes())),
        "I": ("32.tif", PIL.Image.fromarray(wide.astype(np.int32))),
        "F": ("unit.tif", PIL.Image.fromarray(gray.astype(np.float32) / 255)),
    }
    written = {}
    for mode, (name, image) in files.items():
        image.save(folder / name)
        with PIL.Image.open(folder / name) as check:
            assert check.mode == mode
        written[mode] = folder / name
    # A 16-bit PGM (maxval 65535) opens as "I" too.
    (folder / "16.pgm").write_bytes(b"P5 %d %d 65535\n" % gray.shape[::-1] + wide.astype(">u2").tobytes())
    written["pgm"] = folder / "16.pgm"
    return written


def test_wide_grayscale_images_give_the_pixels_of_the_8_bit_one(tmp_path: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (9, 13), dtype=np.uint8)
    gray[0, :2] = (0, 255)
    PIL.Image.fromarray(gray).save(tmp_path / "8.png")
    expected = np.asarray(open_rgb(tmp_path / "8.png", "fix"))
    np.testing.assert_array_equal(expected, np.repeat(gray[..., None], 3, axis=2))
    for mode, path in _wide_images(tmp_path, gray).items():
        converted = open_rgb(path, "fix")
        assert converted.mode == "RGB", mode
        np.testing.assert_array_equal(np.asarray(converted), expected, err_msg=mode)


def test_wide_values_are_rounded_and_clipped(tmp_path: Path) -> None:
    PIL.Image.fromarray(np.array([[-5, 128, 129, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    PIL.Image.fromarray(np.array([[0.4, 1.5, 254.6, 300.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(open_rgb(tmp_path / "i.tif", "fix"))[0, :, 0].tolist() == [0, 0, 1, 255]
    # Floats beyond [0, 1] are not scaled: PIL's conversion (truncated, clipped), as before.
    assert np.asarray(open_rgb(tmp_path / "f.tif", "fix"))[0, :, 0].tolist() == [0, 1, 254, 255]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK"])
def test_8_bit_images_convert_as_pil_does(tmp_path: Path, mode: str) -> None:
    rgb = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8))
    source = rgb.convert(mode)
    source.save(tmp_path / "image.tif" if mode == "CMYK" else tmp_path / "image.png")
    path = next(tmp_path.iterdir())
    np.testing.assert_array_equal(np.asarray(open_rgb(path, "fix")), np.asarray(source.convert("RGB")))
