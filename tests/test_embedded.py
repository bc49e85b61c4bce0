"""The embedded digit-scene dataset: determinism, disjoint pools, scene statistics, the COCO
round trip, the pre-training set and the cache."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from datasets_builders import embedded
from datasets_builders.coco import build_coco_index
from datasets_builders.embedded import (
    EmbeddedConfig,
    cache_dir,
    ensure_embedded,
    load_pretrain_set,
    plan_scene_classes,
    pretrain_class_names,
    render_instances,
    render_pretrain_set,
    scene_statistics,
)
from datasets_builders.errors import NdbenchError, WriteFailure
from datasets_builders.sources import build_index
from datasets_builders.splits import paper_protocol, uni_class_split

SMALL = EmbeddedConfig(n_train_scenes=300, n_test_scenes=200, n_pretrain_images=200)
QUIET = Console(file=io.StringIO())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build of SMALL shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NDBENCH_CACHE", str(tmp_path_factory.mktemp("shared") / "cache"))
        return ensure_embedded(SMALL, console=QUIET)


@pytest.fixture
def small_root(built: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NDBENCH_CACHE", str(built.parent))
    return built


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_cache_dir_follows_env_and_config(cache: Path) -> None:
    assert cache_dir(SMALL).parent == cache
    assert cache_dir(SMALL).name.startswith("embedded-")
    assert cache_dir(SMALL) == cache_dir(EmbeddedConfig(n_train_scenes=300, n_test_scenes=200,
                                                        n_pretrain_images=200))
    assert cache_dir(SMALL) != cache_dir(EmbeddedConfig(seed=1, n_train_scenes=300,
                                                        n_test_scenes=200, n_pretrain_images=200))


def test_layout_and_summary(cache: Path) -> None:
    console = Console(file=io.StringIO(), width=120)
    root = ensure_embedded(SMALL, console=console)
    assert root == cache_dir(SMALL)
    assert len(list((root / "train").glob("*.png"))) == 300
    assert len(list((root / "val").glob("*.png"))) == 200
    image = Image.open(root / "val" / "000301.png")
    assert (image.mode, image.size) == ("RGB", (64, 64))
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left
    text = console.file.getvalue()
    assert "classes per image" in text and "digit-9" in text


def test_same_config_gives_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = []
    for name in ("a", "b"):
        monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / name))
        roots.append(ensure_embedded(SMALL, console=QUIET))
    a, b = roots
    assert a != b
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json", "pools.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    for rel in ("train/000001.png", "train/000300.png", "val/000500.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_digit_pools_disjoint_and_respected(small_root: Path) -> None:
    pools = json.loads((small_root / "pools.json").read_text())
    train, test, pretrain = (set(pools[k]) for k in ("train", "test", "pretrain"))
    # Stratified 40/20/40 % of the 1,797 digits (per-class rounding, hand-counted).
    assert (len(train), len(test), len(pretrain)) == (719, 359, 719)
    assert not train & test and not train & pretrain and not test & pretrain
    assert train | test | pretrain == set(range(1797))
    used_train = {a["digit_index"] for a in _json(small_root, "train")["annotations"]}
    used_test = {a["digit_index"] for a in _json(small_root, "val")["annotations"]}
    assert used_train <= train and used_test <= test
    load_pretrain_set(SMALL, console=QUIET)
    with np.load(small_root / "pretrain.npz") as data:
        handwritten = data["digit_index"][data["digit_index"] >= 0]
        assert len(handwritten) and set(handwritten.tolist()) <= pretrain  # never a scene's instance


def test_classes_per_image_follow_voc_shape(small_root: Path) -> None:
    stats = scene_statistics(small_root)
    # 60/28/9/3 % of 300 and of 200 scenes; 10 % get a repeated instance.
    assert stats["train"]["classes_per_image"] == {1: 180, 2: 84, 3: 27, 4: 9}
    assert stats["test"]["classes_per_image"] == {1: 120, 2: 56, 3: 18, 4: 6}
    assert stats["train"]["images_with_repeat"] == 30
    assert stats["test"]["images_with_repeat"] == 20
    n_objects = sum(stats["train"]["objects_per_class"].values())
    assert n_objects == 180 + 2 * 84 + 3 * 27 + 4 * 9 + 30


def test_default_plan_gives_every_uni_class_split_300_train_images() -> None:
    config = EmbeddedConfig()
    plans = plan_scene_classes(config, config.n_train_scenes, np.random.default_rng([0, 1]))
    per_class = np.zeros(10, dtype=int)
    for plan in plans:
        per_class[sorted(set(plan))] += 1
    assert per_class.min() >= 300
    sizes = np.bincount([len(set(plan)) for plan in plans])
    assert sizes.tolist() == [0, 1800, 840, 270, 90]


def test_scene_geometry(small_root: Path) -> None:
    data = _json(small_root, "train")
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len(by_image) == 300  # every scene holds at least one digit
    for anns in by_image.values():
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
        # The first object is the dominant digit: larger than every other one.
        heights = [ann["bbox"][3] for ann in anns]
        assert 27 <= heights[0] <= 44
        assert all(h <= 24 for h in heights[1:])
        for i, a in enumerate(anns):
            for b in anns[i + 1 :]:
                ax, ay, aw, ah = a["bbox"]
                bx, by, bw, bh = b["bbox"]
                inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(
                    0, min(ay + ah, by + bh) - max(ay, by)
                )
                assert inter <= 0.2 * min(aw * ah, bw * bh)


def test_coco_builder_reads_what_was_written(small_root: Path) -> None:
    index = build_coco_index(small_root, year="", dataset="embedded")
    assert index.class_names == {c: f"digit-{c}" for c in range(10)}
    assert len(index.subset("train")) == 300 and len(index.subset("test")) == 200
    assert index.row("1").path == "train/000001.png"
    assert index.row("301").path == "val/000301.png"
    for split in ("train", "val"):
        expected: dict[str, set[int]] = {}
        for ann in _json(small_root, split)["annotations"]:
            expected.setdefault(str(ann["image_id"]), set()).add(ann["category_id"])
        for image_id, classes in expected.items():
            assert index.row(image_id).classes == tuple(sorted(classes))
    stats = scene_statistics(small_root)
    zero = uni_class_split(index, 0)
    assert len(zero.train) == stats["train"]["images_per_class"][0]
    assert zero.counts()["test_normal"] == stats["test"]["images_per_class"][0]
    assert len(paper_protocol(index)) == 20


def test_sources_dispatch_builds_embedded(small_root: Path) -> None:
    index = build_index("embedded", embedded_config=SMALL)
    assert index.dataset == "embedded"
    assert index.root == small_root
    assert len(index.rows) == 500


def test_a_relative_cache_gives_an_index_root_that_works_from_anywhere(small_root: Path, monkeypatch) -> None:
    monkeypatch.chdir(small_root.parent.parent)
    monkeypatch.setenv("NDBENCH_CACHE", str(small_root.parent.relative_to(small_root.parent.parent)))
    index = build_index("embedded", embedded_config=SMALL)
    assert index.root.is_absolute() and index.root == small_root


def test_pretrain_set(small_root: Path) -> None:
    pool = load_pretrain_set(SMALL, console=QUIET)
    assert pool.images.shape == (200, 64, 64, 3) and pool.images.dtype == np.uint8
    assert pool.labels.dtype == np.int64 and pool.boxes.shape == (200, 4)
    assert pool.class_names == pretrain_class_names(SMALL) and len(pool.class_names) == 10 + 52
    # Sources 50/20/30 %: 100 handwritten digits (10 per class), 40 font digits (merged with
    # the handwritten classes, 4 per class), 60 letters over 52 classes.
    handwritten = pool.digit_index >= 0
    assert handwritten.sum() == 100 and np.bincount(pool.labels[handwritten]).tolist() == [10] * 10
    assert np.bincount(pool.labels[~handwritten], minlength=62)[:10].tolist() == [4] * 10
    assert (pool.labels >= 10).sum() == 60 and pool.labels.max() < 62
    again = load_pretrain_set(SMALL, console=QUIET)  # from pretrain.npz
    assert np.array_equal(pool.images, again.images) and np.array_equal(pool.labels, again.labels)
    assert np.array_equal(pool.boxes, again.boxes) and again.class_names == pool.class_names
    # The box holds the glyph: the glyph's colour differs from the background far more than
    # the background varies, so pixels inside the box vary more than a same-size patch of pure
    # background (the box's mirror image where it does not overlap the box).
    x, y, w, h = pool.boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 64).all() and (y + h <= 64).all()
    inside = [pool.images[i, y[i] : y[i] + h[i], x[i] : x[i] + w[i]].astype(float).std(axis=(0, 1)).mean()
              for i in range(200)]
    corner = pool.images[:, :4, :4].astype(float).std(axis=(1, 2)).mean(axis=1)
    off_glyph = (x >= 4) | (y >= 4)
    assert np.mean(inside) > 3 * corner[off_glyph].mean()


@pytest.mark.parametrize("damage", ["longer", "shorter", "flipped"])
def test_a_damaged_pretrain_npz_is_one_line_naming_the_fix(cache: Path, damage: str) -> None:
    tiny = EmbeddedConfig(n_train_scenes=20, n_test_scenes=20, n_pretrain_images=32)
    pool = load_pretrain_set(tiny, console=QUIET)
    path = cache_dir(tiny) / "pretrain.npz"
    size = path.stat().st_size
    if damage == "flipped":  # inside the images array: only its CRC-32 tells
        with path.open("r+b") as handle:
            handle.seek(size // 2)
            byte = handle.read(1)
            handle.seek(size // 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.truncate(path, size + 1_000_000 if damage == "longer" else size // 2)
    with pytest.raises(NdbenchError) as info:
        load_pretrain_set(tiny, console=QUIET)
    assert f"cannot read {path}" in info.value.problem and info.value.fix == f"delete {path} to regenerate it"
    path.unlink()
    again = load_pretrain_set(tiny, console=QUIET)
    assert np.array_equal(again.images, pool.images)


def test_pretrain_sources_and_separate_font_digit_classes() -> None:
    config = EmbeddedConfig(n_train_scenes=10, n_test_scenes=10, n_pretrain_images=60,
                            pretrain_sources=(0.5, 0.5, 0.0), pretrain_font_digits_merged=False)
    assert pretrain_class_names(config) == tuple(f"digit-{d}" for d in range(10)) + tuple(
        f"font-digit-{d}" for d in range(10))
    pool = render_pretrain_set(config, console=QUIET)
    assert np.bincount(pool.labels).tolist() == [3] * 20  # 30 handwritten, 30 font digits
    assert ((pool.labels >= 10) == (pool.digit_index < 0)).all()
    with pytest.raises(NdbenchError, match="pretrain_sources"):
        EmbeddedConfig(pretrain_sources=(0.5, 0.5, 0.5))


def test_instances_of_a_pool_are_drawn_object_centric() -> None:
    images, labels = render_instances(SMALL, "test", copies=2)
    pools = embedded.digit_pools(SMALL)
    assert images.shape == (2 * len(pools["test"]), 64, 64, 3)
    assert np.array_equal(labels[::2], embedded._load_digits()[1][pools["test"]])
    again, _ = render_instances(SMALL, "test", copies=2)
    assert np.array_equal(images, again)
    with pytest.raises(NdbenchError, match="unknown digit pool"):
        render_instances(SMALL, "val")


def test_cache_reused_without_regenerating(small_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = (small_root / "annotations" / "instances_train.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(embedded, "_write_scenes", fail)
    console = Console(file=io.StringIO())
    assert ensure_embedded(SMALL, console=console) == small_root
    assert (small_root / "annotations" / "instances_train.json").stat().st_mtime_ns == stamp
    assert console.file.getvalue() == ""  # the summary is printed only when built


def test_concurrent_builder_loses_race_cleanly(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = embedded._write_scenes
    root = cache_dir(SMALL)

    def write_then_get_overtaken(config: EmbeddedConfig, folder: Path) -> None:
        original(config, folder)
        shutil.copytree(folder, root)  # another process finishes first

    monkeypatch.setattr(embedded, "_write_scenes", write_then_get_overtaken)
    assert ensure_embedded(SMALL, console=QUIET) == root
    assert sorted(p.name for p in cache.iterdir()) == [root.name]  # temp folder removed


def test_a_killed_generations_folder_is_removed_once_abandoned(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = cache_dir(SMALL)
    old, live = (cache / f".{root.name}.{tag}.tmp" for tag in ("killed", "live"))
    for folder in (old, live):
        (folder / "train").mkdir(parents=True)
    stamp = time.time() - embedded.ABANDONED_AFTER_S - 60
    os.utime(old, (stamp, stamp))
    monkeypatch.setattr(embedded, "_write_scenes", lambda config, folder: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))  # PIL's error, no file named
    with pytest.raises(WriteFailure) as info:
        ensure_embedded(SMALL, console=QUIET)
    assert str(cache) in info.value.problem and "No space left" in info.value.problem
    assert "NDBENCH_CACHE" in info.value.fix
    assert sorted(p.name for p in cache.iterdir()) == [live.name]  # a live run's folder stays


def test_a_killed_generations_folder_beside_a_finished_one_is_removed(built: Path, cache: Path) -> None:
    root = cache / built.name
    shutil.copytree(built, root)
    old, live = (cache / f".{root.name}.{tag}.tmp" for tag in ("killed", "live"))
    for folder in (old, live):
        (folder / "train").mkdir(parents=True)
    stamp = time.time() - embedded.ABANDONED_AFTER_S - 60
    os.utime(old, (stamp, stamp))
    assert ensure_embedded(SMALL, console=QUIET) == root
    assert sorted(p.name for p in cache.iterdir()) == sorted([root.name, live.name])


def test_incomplete_cache_is_refused(cache: Path) -> None:
    root = cache_dir(SMALL)
    (root / "annotations").mkdir(parents=True)
    with pytest.raises(NdbenchError) as info:
        ensure_embedded(SMALL, console=QUIET)
    assert str(root) in str(info.value) and "delete" in str(info.value)


def test_bad_config_is_refused() -> None:
    with pytest.raises(NdbenchError, match="pool_fractions must sum to 1"):
        EmbeddedConfig(pool_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(NdbenchError, match="classes_per_image"):
        EmbeddedConfig(classes_per_image=(0.5, 0.2))


def test_damaged_scenes_name_the_folder_to_delete(built: Path, tmp_path: Path, monkeypatch) -> None:
    """Files ndbench generated cannot be re-downloaded: a damaged one names the scene folder
    whose deletion regenerates them."""
    from datasets_builders.loading import ManifestDataset

    root = tmp_path / "cache" / built.name
    shutil.copytree(built, root)
    monkeypatch.setenv("NDBENCH_CACHE", str(root.parent))
    index = build_index("embedded", embedded_config=SMALL)
    row = index.subset("test")[0]
    (root / row.path).write_bytes((root / row.path).read_bytes()[:40])
    data = ManifestDataset(index, uni_class_split(index, 0), "test", transform=None)
    position = data.image_ids.index(row.image_id)
    with pytest.raises(NdbenchError, match=f"delete {root} and run the same command again"):
        data._open_file(data._rows[position])
    json_path = root / "annotations" / "instances_val.json"
    json_path.write_text(json_path.read_text()[:100])
    with pytest.raises(NdbenchError, match=f"delete {root} and run the same command again"):
        build_index("embedded", embedded_config=SMALL)


# --- a reused scene folder is what the generator wrote ----------------------------------------
def _copy_of_built(built: Path, cache: Path) -> Path:
    """A copy of the shared build where `ensure_embedded(SMALL)` finds it under `cache`."""
    root = cache / built.name
    shutil.copytree(built, root)
    return root


def _no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("generated the scenes")

    monkeypatch.setattr(embedded, "_write_scenes", fail)


def _edit_pixel(path: Path) -> None:
    """Change one pixel and save the scene again: still a valid 64x64 RGB PNG."""
    with Image.open(path) as image:
        pixels = np.array(image)
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(path, format="PNG")


def _copy_other_scene(path: Path) -> None:
    shutil.copyfile(path.with_name("000302.png"), path)


def _edit_annotations(path: Path) -> None:
    """Drop one annotation: still valid COCO JSON."""
    data = json.loads(path.read_text())
    data["annotations"].pop()
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def test_the_checksum_list_names_every_generated_file(small_root: Path) -> None:
    written = sorted(p.relative_to(small_root).as_posix() for p in small_root.rglob("*")
                     if p.is_file() and p.name not in (embedded.CHECKSUMS, "pretrain.npz"))
    assert written == embedded.scene_files(SMALL)
    lines = (small_root / embedded.CHECKSUMS).read_text().splitlines()
    assert len(lines) == len(written) == 3 + 300 + 200
    digest, name = lines[-1].split("  ")  # sha256sum's format
    assert name == "val/000500.png"
    assert digest == hashlib.sha256((small_root / name).read_bytes()).hexdigest()


def test_the_cache_folder_name_is_unchanged() -> None:
    """The folder name is part of the index's root, which feature caches and store entries key
    on: the checksum list must not move existing users' scenes."""
    assert cache_dir(EmbeddedConfig()).name == "embedded-c890b9ecaa970a39"


@pytest.mark.parametrize(("damage", "name"), [
    (_edit_pixel, "val/000301.png"),
    (_copy_other_scene, "val/000301.png"),
    (_edit_annotations, "annotations/instances_val.json"),
    (lambda path: path.unlink(), "train/000007.png"),
])
def test_a_changed_file_of_a_reused_cache_is_refused_naming_it(built: Path, cache: Path, damage, name: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_of_built(built, cache)
    damage(root / name)
    if name.endswith(".png") and (root / name).exists():
        with Image.open(root / name) as image:  # still decodes: only its bytes tell
            assert (image.mode, image.size) == ("RGB", (64, 64))
    _no_generation(monkeypatch)
    with pytest.raises(NdbenchError) as info:
        ensure_embedded(SMALL, console=QUIET)
    state = "is missing" if "000007" in name else "differs from what ndbench generated"
    assert info.value.problem == f"embedded dataset cache {root} was changed: {name} {state}"
    assert info.value.fix.startswith(f"delete {root} and run the same command again to regenerate it; ")
    assert "`ndbench build-splits embedded --root COPY`" in info.value.fix
    assert "\n" not in info.value.problem + info.value.fix


def test_several_changed_files_are_counted(built: Path, cache: Path) -> None:
    root = _copy_of_built(built, cache)
    for name in ("train/000001.png", "train/000002.png", "val/000500.png"):
        _edit_pixel(root / name)
    with pytest.raises(NdbenchError) as info:
        ensure_embedded(SMALL, console=QUIET)
    assert info.value.problem.endswith("train/000001.png differs from what ndbench generated (and 2 more files)")


@pytest.mark.parametrize("damage", ["line dropped", "line garbled", "not text"])
def test_a_damaged_checksum_list_is_refused(built: Path, cache: Path, damage: str) -> None:
    root = _copy_of_built(built, cache)
    path = root / embedded.CHECKSUMS
    lines = path.read_text().splitlines(keepends=True)
    if damage == "line dropped":  # would leave val/000500.png unchecked
        path.write_text("".join(lines[:-1]))
    elif damage == "line garbled":
        path.write_text("".join(lines[:-1]) + "not a checksum\n")
    else:
        path.write_bytes(b"\xff\xfe" + path.read_bytes())
    with pytest.raises(NdbenchError) as info:
        ensure_embedded(SMALL, console=QUIET)
    assert str(path) in info.value.problem and info.value.fix.startswith(f"delete {root} ")


def test_an_old_cache_is_checked_once_against_a_fresh_generation(built: Path, cache: Path) -> None:
    """A folder from before the checksum list: checked against a fresh generation (in a
    temporary folder), then given its list; its own files are left as they were."""
    root = _copy_of_built(built, cache)
    listed = (root / embedded.CHECKSUMS).read_text()
    (root / embedded.CHECKSUMS).unlink()
    stamp = (root / "val" / "000301.png").stat().st_mtime_ns
    console = Console(file=io.StringIO(), width=80)
    assert ensure_embedded(SMALL, console=console) == root
    lines = console.file.getvalue().splitlines()
    assert lines == [f"embedded dataset cache {root} holds no SHA256SUMS (an earlier ndbench made it): "
                     "checking its files against a fresh generation, once"]
    assert (root / embedded.CHECKSUMS).read_text() == listed
    assert (root / "val" / "000301.png").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == [root.name]  # the fresh generation is gone
    console = Console(file=io.StringIO())
    assert ensure_embedded(SMALL, console=console) == root
    assert console.file.getvalue() == ""  # checked by its list from now on


def test_an_old_cache_with_a_changed_scene_is_refused(built: Path, cache: Path) -> None:
    root = _copy_of_built(built, cache)
    (root / embedded.CHECKSUMS).unlink()
    _edit_pixel(root / "train" / "000010.png")
    with pytest.raises(NdbenchError) as info:
        ensure_embedded(SMALL, console=QUIET)
    assert info.value.problem == (f"embedded dataset cache {root} was changed: train/000010.png differs from "
                                  "what ndbench generated")
    assert not (root / embedded.CHECKSUMS).exists()  # still unchecked: refused again next time
    assert sorted(p.name for p in cache.iterdir()) == [root.name]


def test_an_old_cache_encoded_by_another_zlib_is_accepted(built: Path, cache: Path) -> None:
    """Same pixels, other PNG bytes: the scenes are the generator's."""
    root = _copy_of_built(built, cache)
    (root / embedded.CHECKSUMS).unlink()
    path = root / "val" / "000301.png"
    with Image.open(path) as image:
        image.save(path, format="PNG", compress_level=9)
    assert path.read_bytes() != (built / "val" / "000301.png").read_bytes()
    assert ensure_embedded(SMALL, console=QUIET) == root
    assert embedded._read_checksums(root, SMALL)["val/000301.png"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_refuses_scenes_changed_after_the_splits_were_built(built: Path, cache: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """`run` reads the scenes through an index built earlier: it checks them too, before any job."""
    from benchmark.build import BuildRequest, build_splits
    from benchmark.cli import main

    root = _copy_of_built(built, cache)
    splits = tmp_path / "results" / "splits"
    build_splits(BuildRequest(dataset="embedded", root=root, out=splits))
    args = ["run", "--method", "knn", "--classes", "0", "--weights", "none", "--device", "cpu",
            "--out", str(splits.parent), "--dry-run"]
    assert main(args) == 0
    capsys.readouterr()
    _edit_pixel(root / "val/000301.png")
    assert main(args[:-1]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ndbench: error: embedded dataset cache {root} was changed: val/000301.png differs from what "
                   f"ndbench generated (delete {root} and run the same command again to regenerate it; for scenes "
                   "changed on purpose, build splits from a copy of the folder with `ndbench build-splits embedded "
                   "--root COPY`)"]
    assert not (splits.parent / "runs").exists()
    copy = tmp_path / "mine"  # a user's own copy, given with --root, is theirs to change
    shutil.copytree(root, copy)
    build_splits(BuildRequest(dataset="embedded", root=copy, out=tmp_path / "own" / "splits"))
    assert main([*args[:-3], "--out", str(tmp_path / "own")]) == 0
