"""Malformed inputs for every reader: VOC XML and masks, COCO JSON, CIFAR pickles, MNIST idx
files and image files, damaged by generated truncations, bit flips, spliced bytes and (for the
structured formats) values of the wrong type and missing keys. Whatever the damage, a reader
either still reads the file or raises one NdbenchError of one line; at the CLI that is exit 2.
Never another exception."""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from array_fixtures import idx_bytes, write_cifar10, write_mnist
from coco_fixtures import write_coco_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from voc_fixtures import Obj, write_mask, xml_text

from benchmark.cli import main
from datasets_builders.coco import build_coco_index
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, IndexRow
from datasets_builders.loading import ManifestDataset
from datasets_builders.single_object import build_cifar_index, build_mnist_index
from datasets_builders.splits import Manifest
from datasets_builders.voc import read_mask_classes, read_xml_classes

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- damage ------------------------------------------------------------------------------------
@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` truncated, with flipped bits, or with a run of bytes replaced, inserted or removed."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "insert", "delete"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    start = draw(st.integers(0, len(out) - 1))
    length = draw(st.integers(1, 64))
    if kind == "delete":
        return bytes(out[:start] + out[start + length :])
    chunk = draw(st.binary(min_size=1, max_size=length))
    if kind == "insert":
        return bytes(out[:start] + chunk + out[start:])
    return bytes(out[:start] + chunk + out[start + len(chunk) :])


WRONG_VALUES = (None, True, -1, 2**70, 3.5, float("nan"), "", "x", "../x\x00", [], [1, "a"], {}, {"id": None},
                [[1, 2], [3]])


def _paths(obj, prefix=(), depth=0):
    """Every path (tuple of keys / indices) into a JSON-like tree, up to depth 5."""
    yield prefix
    if depth >= 5:
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key), depth + 1)


@st.composite
def restructured(draw, tree):
    """A deep copy of `tree` with one value replaced by one of another type, one key removed or
    one list entry repeated."""
    tree = copy.deepcopy(tree)
    path = draw(st.sampled_from(list(_paths(tree))[1:]))
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "remove", "repeat"]))
    if action == "remove":
        del parent[path[-1]]
    elif action == "repeat" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[path[-1]]))
    else:
        parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(WRONG_VALUES)))
    return tree


def reads_or_refuses(read: Callable[[], object]) -> None:
    """The property: `read` returns, or raises an NdbenchError of one line."""
    try:
        read()
    except NdbenchError as exc:
        assert "\n" not in str(exc), str(exc)


@contextlib.contextmanager
def folder_copy(source: Path):
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / source.name
        shutil.copytree(source, target)
        yield target


# --- seed inputs (valid files, written once) -----------------------------------------------------
@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz-seeds")
    xml = base / "voc.xml"
    xml.write_text(xml_text("VOC2012", "2008_000001", (Obj("dog"), Obj("person", 1, ("head",)), Obj("car"))))
    write_mask(base / "mask.png", ("dog", "person"))
    coco = write_coco_tree(base / "coco-tree")
    write_cifar10(base / "cifar", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5])
    write_mnist(base / "mnist", [0, 1, 2, 3], [4, 5], gz=False)
    write_mnist(base / "mnist-gz", [0, 1, 2, 3], [4, 5], gz=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(base / "image.jpg", "JPEG")
    Image.fromarray(pixels).save(base / "image.png", "PNG")
    return {"xml": xml, "mask": base / "mask.png", "coco": coco, "cifar": base / "cifar",
            "mnist": base / "mnist", "mnist-gz": base / "mnist-gz", "jpg": base / "image.jpg",
            "png": base / "image.png"}


def with_bytes(path: Path, data: bytes, read: Callable[[Path], object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / path.name
        target.write_bytes(data)
        reads_or_refuses(lambda: read(target))


# --- VOC -----------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_damaged_voc_xml(seeds, data):
    original = seeds["xml"].read_bytes()
    with_bytes(seeds["xml"], data.draw(damaged(original)), read_xml_classes)


@pytest.mark.parametrize("text", [
    '<?xml version="1.0" encoding="utf-9"?><annotation/>',  # unknown encoding
    '<?xml version="1.0" encoding="utf-16"?><annotation/>',  # declared, not used
    "<annotation><object><name><b>dog</b></name></object></annotation>",
    "<annotation><object/></annotation>",
    "",
])
def test_odd_voc_xml(tmp_path, text):
    path = tmp_path / "a.xml"
    path.write_text(text)
    reads_or_refuses(lambda: read_xml_classes(path))


@FUZZ
@given(data=st.data())
def test_damaged_voc_mask(seeds, data):
    with_bytes(seeds["mask"], data.draw(damaged(seeds["mask"].read_bytes())), read_mask_classes)


# --- COCO ----------------------------------------------------------------------------------------
def coco_with(seeds: dict[str, Path], content: bytes) -> None:
    with folder_copy(seeds["coco"]) as root:
        (root / "annotations" / "instances_train2014.json").write_bytes(content)
        reads_or_refuses(lambda: build_coco_index(root))


@FUZZ
@given(data=st.data())
def test_damaged_coco_json_bytes(seeds, data):
    original = (seeds["coco"] / "annotations" / "instances_train2014.json").read_bytes()
    coco_with(seeds, data.draw(damaged(original)))


@FUZZ
@given(data=st.data())
def test_coco_json_with_wrong_types_and_missing_keys(seeds, data):
    tree = json.loads((seeds["coco"] / "annotations" / "instances_train2014.json").read_text())
    coco_with(seeds, json.dumps(data.draw(restructured(tree))).encode())


# --- CIFAR ---------------------------------------------------------------------------------------
def cifar_with(seeds: dict[str, Path], name: str, content: bytes) -> None:
    with folder_copy(seeds["cifar"]) as root:
        (root / "cifar-10-batches-py" / name).write_bytes(content)
        reads_or_refuses(lambda: build_cifar_index(root, variant="cifar10"))


@FUZZ
@given(data=st.data(), name=st.sampled_from(["data_batch_1", "test_batch", "batches.meta"]))
def test_damaged_cifar_pickles(seeds, data, name):
    original = (seeds["cifar"] / "cifar-10-batches-py" / name).read_bytes()
    cifar_with(seeds, name, data.draw(damaged(original)))


def _as_tree(batch: dict) -> dict:
    """A batch dict with its arrays as lists, so `restructured` can reach inside them."""
    return {key: value.tolist() if isinstance(value, np.ndarray) else value for key, value in batch.items()}


@FUZZ
@given(data=st.data(), name=st.sampled_from(["data_batch_1", "test_batch", "batches.meta"]))
def test_cifar_pickles_with_wrong_types_and_missing_keys(seeds, data, name):
    with (seeds["cifar"] / "cifar-10-batches-py" / name).open("rb") as handle:
        batch = pickle.load(handle, encoding="latin1")
    tree = _as_tree(batch)
    changed = data.draw(restructured(tree))
    if data.draw(st.booleans()) and isinstance(changed.get(b"data"), list):
        try:
            changed[b"data"] = np.asarray(changed[b"data"], dtype=np.uint8)  # back to an array, maybe reshaped
        except (ValueError, TypeError, OverflowError):
            pass
    cifar_with(seeds, name, pickle.dumps(changed, protocol=2))


def test_a_cifar_pickle_of_another_type(seeds):
    for obj in ([1, 2], "batch", None, {b"data": "x" * 3072, b"labels": [0]}):
        cifar_with(seeds, "data_batch_1", pickle.dumps(obj, protocol=2))


# --- MNIST ---------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data(), gz=st.booleans(),
       name=st.sampled_from(["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]))
def test_damaged_mnist_idx(seeds, data, gz, name):
    folder = seeds["mnist-gz" if gz else "mnist"]
    file_name = f"{name}.gz" if gz else name
    original = (folder / file_name).read_bytes()
    if gz and data.draw(st.booleans()):  # damage inside the compressed stream's content
        original = gzip.compress(data.draw(damaged(gzip.decompress(original))), mtime=0)
    damaged_bytes = data.draw(damaged(original))
    with folder_copy(folder) as root:
        (root / file_name).write_bytes(damaged_bytes)
        reads_or_refuses(lambda: build_mnist_index(root, variant="mnist"))


def test_mnist_header_promising_an_enormous_array(tmp_path, seeds):
    root = tmp_path / "mnist"
    shutil.copytree(seeds["mnist"], root)
    header = bytes([0, 0, 8, 3]) + b"".join((2**32 - 1).to_bytes(4, "big") for _ in range(3))
    (root / "train-images-idx3-ubyte").write_bytes(header + idx_bytes(np.zeros((1, 2, 2), np.uint8))[16:])
    with pytest.raises(NdbenchError, match="promises"):
        build_mnist_index(root, variant="mnist")


# --- image files ---------------------------------------------------------------------------------
def read_image(path: Path) -> object:
    """The first train image of a one-image index, as the runner's datasets read it."""
    index = DatasetIndex("voc", path.parent, [IndexRow("a", path.name, "train", (0,)),
                                              IndexRow("b", "unused.jpg", "test", (1,))], {0: "x", 1: "y"}, "s")
    manifest = Manifest("voc", "uni-class", "0", [0], index.sha256, ["a"], [("b", 1)])
    return ManifestDataset(index, manifest, "train")[0]


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["jpg", "png"]))
def test_damaged_image_files(seeds, data, kind):
    with_bytes(seeds[kind], data.draw(damaged(seeds[kind].read_bytes())), read_image)


# --- at the command line -------------------------------------------------------------------------
@settings(max_examples=10, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_damaged_coco_at_the_cli_is_exit_2_and_one_line(seeds, data):
    tree = json.loads((seeds["coco"] / "annotations" / "instances_val2014.json").read_text())
    content = json.dumps(data.draw(restructured(tree))).encode()
    if data.draw(st.booleans()):
        content = data.draw(damaged(content))
    with folder_copy(seeds["coco"]) as root:
        (root / "annotations" / "instances_val2014.json").write_bytes(content)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["build-splits", "coco", "--root", str(root), "--out", str(root / "out")])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("ndbench: error:"), err.getvalue()
