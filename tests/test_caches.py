"""Decode once, run frozen networks once: the on-disk store (checks, locks, budget), the
decoded-image store behind ManifestDataset, the feature cache, and knn's runs with the
caches cold, warm and off (scores, counts, and `--dry-run` predicting the counts)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from defend_fixtures import TINY_VIT
from safetensors.torch import save_file
from small_splits import fresh_out
from torch.utils.data import DataLoader
from torchvision import transforms

import benchmark.bench
import benchmark.bench_data
from benchmark.cli import main
from benchmark.executors import RayResources, run_local, task_threads
from benchmark.interrupts import Interrupted
from benchmark.plan import plan_run
from benchmark.records import load_records
from benchmark.runner import RunOptions, expand_jobs, interrupted_after, prepare
from datasets_builders.array_store import ArrayStore, Field
from datasets_builders.counts import Counts
from datasets_builders.errors import NdbenchError
from datasets_builders.image_store import ImageStore, Normalise, ResizeDecode, StagedTransform
from datasets_builders.loading import ManifestDataset, decodes_files, load_split
from methods.backbones import create_backbone
from methods.features import FeatureCache, FrozenPart, weights_identity
from methods.knn import KNNDetector
from methods.runtime import CacheSettings, JobRuntime

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)


def staged(size: int = 32) -> StagedTransform:
    return StagedTransform(ResizeDecode(size), Normalise(MEAN, STD))


def dataset(splits_root: Path, part: str = "test", store: ImageStore | None = None, counts: Counts | None = None,
            size: int = 32, n: int = 40) -> ManifestDataset:
    index, manifest = load_split(splits_root, "embedded/uni-class/3")
    return ManifestDataset(index, manifest, part, transform=staged(size), store=store, counts=counts).take(n)


def read_all(data) -> torch.Tensor:
    return torch.stack([data[i][0] for i in range(len(data))])


# --- the staged transform and the image store ------------------------------------------------
def test_staged_transform_equals_resize_totensor_normalize():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8))
    old = transforms.Compose([transforms.Resize((32, 32), antialias=True), transforms.ToTensor(),
                              transforms.Normalize(MEAN, STD)])
    assert torch.equal(staged(32)(image), old(image))
    assert staged(32).decode.signature != staged(48).decode.signature
    assert ResizeDecode(32, "bicubic").signature != ResizeDecode(32).signature


def test_images_are_decoded_once_per_machine(splits_root, tmp_path):
    store = ImageStore(ArrayStore(tmp_path / "store"))
    plain = read_all(dataset(splits_root))
    first_counts, again_counts = Counts(), Counts()
    first = dataset(splits_root, store=store, counts=first_counts)
    assert first.pending() == 40 and decodes_files(first)
    assert torch.equal(read_all(first), plain)
    assert first_counts.as_dict(("decodes", "image_reads")) == {"decodes": 40, "image_reads": 0}
    again = dataset(splits_root, store=store, counts=again_counts)  # a later job, same images
    assert again.pending() == 0 and not decodes_files(again)
    assert torch.equal(read_all(again), plain)
    assert again_counts.as_dict(("decodes", "image_reads")) == {"decodes": 0, "image_reads": 40}
    batched = torch.cat([x for x, _, _ in DataLoader(again, batch_size=16)])  # fetched a batch at a time
    assert torch.equal(batched, plain) and again_counts.get("image_reads") == 80
    bigger = dataset(splits_root, store=store, size=48)  # another decode signature: new rows
    assert bigger.pending() == 40


def test_decodes_in_dataloader_workers_are_counted_and_stored(splits_root, tmp_path):
    counts = Counts()
    data = dataset(splits_root, store=ImageStore(ArrayStore(tmp_path / "store")), counts=counts, n=12)
    batches = list(DataLoader(data, batch_size=4, num_workers=2))
    assert counts.get("decodes") == 12 and data.pending() == 0
    assert torch.equal(torch.cat([x for x, _, _ in batches]), read_all(dataset(splits_root, n=12)))


def test_loader_uses_workers_only_while_files_need_decoding(splits_root, tmp_path):
    detector = KNNDetector(img_size=32)
    runtime = JobRuntime.in_memory()
    runtime.workers, runtime.images = 2, ImageStore(ArrayStore(tmp_path / "store"))
    detector.use_runtime(runtime)
    data = dataset(splits_root, store=runtime.images, n=8)
    assert detector.loader(data).num_workers == 2
    read_all(data)
    assert detector.loader(data).num_workers == 0  # everything is in the store now
    assert detector.loader(torch.utils.data.TensorDataset(torch.zeros(4, 3))).num_workers == 0


def test_a_new_index_makes_new_image_rows(splits_root, tmp_path):
    store = ImageStore(ArrayStore(tmp_path / "store"))
    read_all(dataset(splits_root, store=store))
    index, manifest = load_split(splits_root, "embedded/uni-class/3")
    first = index.rows[0]
    changed = dataclasses.replace(first, classes=tuple(sorted({*first.classes, 9} - {0} if 0 in first.classes
                                                                 else {*first.classes, 0})))
    index = dataclasses.replace(index, rows=[changed, *index.rows[1:]])  # another index: its sha256 differs
    other = ManifestDataset(index, manifest, "test", transform=staged(), store=store).take(40)
    assert other.image_key.index_sha256 != dataset(splits_root).image_key.index_sha256
    assert other.pending() == 40


# --- checks, concurrency, budget --------------------------------------------------------------
def shard_files(root: Path) -> list[Path]:
    return sorted(root.rglob("shard-*.bin"))


def test_a_truncated_shard_is_recomputed_with_one_warning(splits_root, tmp_path, caplog):
    store = ImageStore(ArrayStore(tmp_path / "store"))
    plain = read_all(dataset(splits_root))
    read_all(dataset(splits_root, store=store))
    (shard,) = shard_files(tmp_path / "store")
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    counts = Counts()
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        assert torch.equal(read_all(dataset(splits_root, store=store, counts=counts)), plain)
    assert counts.get("decodes") == 40
    assert len([r for r in caplog.records if "size or header" in r.message]) == 1


def test_a_corrupted_row_is_recomputed_with_one_warning(splits_root, tmp_path, caplog):
    store = ImageStore(ArrayStore(tmp_path / "store"))
    plain = read_all(dataset(splits_root))
    first = dataset(splits_root, store=store)
    read_all(first)
    (shard,) = shard_files(tmp_path / "store")
    raw = bytearray(shard.read_bytes())
    entry = first._store_entry()
    layout_records = shard.stat().st_size - entry.n_rows * 32 * 32 * 3
    raw[layout_records + int(first.positions[5]) * 32 * 32 * 3 + 7] ^= 0xFF
    shard.write_bytes(bytes(raw))
    counts = Counts()
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        again = dataset(splits_root, store=store, counts=counts)
        assert torch.equal(again[5][0], plain[5])
        assert torch.equal(read_all(again), plain)
    assert counts.get("decodes") == 1
    assert len([r for r in caplog.records if "checksum" in r.message]) == 1


FILL_SCRIPT = """
import sys
import numpy as np
from datasets_builders.array_store import ArrayStore, Field
root, order = sys.argv[1], sys.argv[2]
entry = ArrayStore(root).entry("features", "k" * 32, 300)
schema = entry.ensure_schema((Field("x", "<f4", (64,)),))
positions = np.arange(300) if order == "up" else np.arange(300)[::-1]
for chunk in np.array_split(positions, 60):
    records = np.zeros(len(chunk), dtype=schema.record_dtype)
    records["x"] = chunk[:, None] * np.ones(64, dtype=np.float32)
    assert entry.write(chunk, records).all()
"""


def test_two_processes_filling_one_entry_leave_one_valid_entry(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets_builders.array_store.SHARD_TARGET_BYTES", 100 * 256)  # 100 rows a shard
    script = tmp_path / "fill.py"
    script.write_text(FILL_SCRIPT.replace("from datasets_builders.array_store import ArrayStore, Field",
                                          "import datasets_builders.array_store as s\n"
                                          "s.SHARD_TARGET_BYTES = 100 * 256\n"
                                          "from datasets_builders.array_store import ArrayStore, Field"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), order], env=env)
               for order in ("up", "down")]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    entry = ArrayStore(tmp_path / "store").entry("features", "k" * 32, 300)
    records, ok = entry.read(np.arange(300))
    assert ok.all()
    np.testing.assert_array_equal(records["x"][:, 0], np.arange(300, dtype=np.float32))
    assert len(shard_files(tmp_path / "store")) == 3
    assert not list((tmp_path / "store").rglob("*.tmp"))


def test_the_budget_is_respected_and_refused_rows_stay_in_memory(splits_root, tmp_path):
    unlimited = ArrayStore(tmp_path / "unlimited")
    read_all(dataset(splits_root, store=ImageStore(unlimited)))
    image_shard = unlimited.allocated_bytes()
    store = ArrayStore(tmp_path / "store", budget_bytes=image_shard + 1000)  # room for the images only
    data = dataset(splits_root, store=ImageStore(store))
    assert torch.equal(read_all(data), read_all(dataset(splits_root)))
    assert store.allocated_bytes() == image_shard and data.pending() == 0
    counts = Counts()
    cache = FeatureCache(store, counts)
    part = FrozenPart("sha256:abc", "mean", "fp32")
    table = cache.get_or_compute(part, data, lambda x: {"m": x.mean(dim=(1, 2, 3))},
                                 loader=lambda d: DataLoader(d, batch_size=16), dtype=torch.float32)
    assert counts.get("frozen_passes") == 40 and store.allocated_bytes() == image_shard  # features refused
    assert torch.allclose(table.all()["m"], read_all(data).mean(dim=(1, 2, 3)))
    assert cache.get_or_compute(part, data, lambda x: {"m": x.mean(dim=(1, 2, 3))}, memory_limit=100,
                                loader=lambda d: DataLoader(d, batch_size=16), dtype=torch.float64) is None
    tiny = ArrayStore(tmp_path / "tiny", budget_bytes=1000)  # not even one shard
    assert torch.equal(read_all(dataset(splits_root, store=ImageStore(tiny))), read_all(data))
    assert tiny.allocated_bytes() == 0


def test_no_shard_is_made_without_free_disk_space(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10**6))
    entry = ArrayStore(tmp_path / "store").entry("features", "f" * 32, 10)
    schema = entry.ensure_schema((Field("x", "<f4", (4,)),))
    assert not entry.write(np.arange(10), np.zeros(10, dtype=schema.record_dtype)).any()
    assert not shard_files(tmp_path / "store")


# --- the feature cache ------------------------------------------------------------------------
def test_feature_cache_stores_several_outputs_and_reads_them_back(splits_root, tmp_path):
    store = ArrayStore(tmp_path / "store")
    data = dataset(splits_root)
    part = FrozenPart("sha256:abc", "two-outputs", "fp32")

    def compute(x):
        return {"mean": x.mean(dim=(2, 3)), "grid": x[:, :, ::8, ::8]}

    first, again = Counts(), Counts()
    cold = FeatureCache(store, first).get_or_compute(part, data.take(25), compute,
                                                     loader=lambda d: DataLoader(d, batch_size=8))
    warm = FeatureCache(store, again).get_or_compute(part, data, compute, loader=lambda d: DataLoader(d, batch_size=8))
    assert (first.get("frozen_passes"), again.get("frozen_passes"), again.get("frozen_reads")) == (25, 15, 25)
    rows = warm.rows(torch.tensor([3, 30]))
    assert rows["mean"].dtype == torch.float16 and rows["grid"].shape == (2, 3, 4, 4)
    expected = compute(torch.stack([data[3][0], data[30][0]]))
    assert torch.allclose(rows["mean"].float(), expected["mean"], atol=1e-3)
    assert torch.equal(cold.rows([3])["grid"], warm.rows([3])["grid"])


def test_outputs_of_another_shape_under_one_key_are_recomputed(splits_root, tmp_path, caplog):
    store, data = ArrayStore(tmp_path / "store"), dataset(splits_root, n=10)
    part = FrozenPart("sha256:abc", "changing", "fp32")

    def load(d):
        return DataLoader(d, batch_size=4)

    FeatureCache(store, Counts()).get_or_compute(part, data.take(6), lambda x: {"v": x.mean(dim=(2, 3))}, loader=load)
    counts = Counts()
    with caplog.at_level(logging.WARNING, logger="ndbench.cache"):
        table = FeatureCache(store, counts).get_or_compute(part, data, lambda x: {"v": x[:, :, 0, :2].flatten(1)},
                                                           loader=load)
    assert table.all()["v"].shape == (10, 6) and counts.get("frozen_passes") == 10
    assert len([r for r in caplog.records if "other fields" in r.message]) == 1


def test_weights_identity_follows_file_contents(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, path)
    before = weights_identity("any", path)
    save_file({"a": torch.ones(3)}, path)
    os.utime(path, ns=(1, 1))  # a new mtime: the remembered hash is not reused
    assert weights_identity("any", path) != before
    assert weights_identity("any", "none") is None and weights_identity("any", None) is None
    hub = "vit_base_patch16_224.augreg_in21k"
    assert weights_identity(hub, "hub").startswith(f"hub:{hub}") and weights_identity(hub, "hub") != before


# --- knn with the caches cold, warm and off ---------------------------------------------------
TINY_KNN = {"backbone": TINY_VIT, "img_size": 32}


def random_weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(create_backbone(TINY_VIT, weights="none", num_classes=0).state_dict(), path)
    return path


def run_knn(splits_root, out_root: Path, weights: Path, caching: CacheSettings, classes=(0, 1), **overrides):
    out = fresh_out(splits_root, out_root)
    options = RunOptions(out=out, device="cpu", weights=str(weights), progress=False, caching=caching)
    jobs = expand_jobs(["knn"], settings=["uni-class"], classes=list(classes), seeds=[0], options=options,
                       overrides={**TINY_KNN, **overrides})
    prepare(jobs, options)
    plan = plan_run(jobs, options).methods["knn"]
    results = run_local(jobs, options)
    assert [r.status for r in results] == ["done"] * len(jobs), [r.error for r in results]
    records = sorted(load_records(out), key=lambda r: r.split)
    scores = {r.split: np.loadtxt(next(out.rglob(f"{r.split}__*.scores.csv")), delimiter=",", skiprows=1,
                                  usecols=2) for r in records}
    return plan, records, scores


def total(records, name: str) -> int:
    return sum(r.extra["cost"][name] for r in records)


def test_knn_scores_and_counts_cold_warm_and_off(splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = random_weights(tmp_path / "w.safetensors", 0)
    on = CacheSettings(workers=0)
    off_plan, off, off_scores = run_knn(splits_root, tmp_path / "off", weights, CacheSettings(enabled=False))
    cold_plan, cold, cold_scores = run_knn(splits_root, tmp_path / "cold", weights, on)
    warm_plan, warm, warm_scores = run_knn(splits_root, tmp_path / "warm", weights, on)
    images = sum(r.counts["train"] + r.counts["test_normal"] + r.counts["test_novel"] for r in off)
    distinct = len({*load_split(splits_root, "embedded/uni-class/0")[1].train,
                    *load_split(splits_root, "embedded/uni-class/1")[1].train}) + off[0].counts["test_normal"] \
        + off[0].counts["test_novel"]
    # Without caches every job decodes and passes its own images; cold, each distinct image once;
    # warm, nothing. The dry run predicted each of these.
    assert total(off, "decodes") == total(off, "frozen_passes") == images == off_plan.decodes_without
    assert (off_plan.decodes_with, off_plan.frozen_with) == (images, images)
    assert total(cold, "decodes") == total(cold, "frozen_passes") == distinct
    assert (cold_plan.decodes_with, cold_plan.frozen_with) == (distinct, distinct)
    assert cold[1].extra["cost"]["frozen_reads"] >= cold[1].counts["test_normal"] + cold[1].counts["test_novel"]
    assert total(warm, "decodes") == total(warm, "frozen_passes") == 0
    assert warm_plan.decodes_with == warm_plan.frozen_with == 0
    assert total(warm, "frozen_reads") == images and total(cold, "trained_passes") == 0
    for split in ("0", "1"):
        np.testing.assert_allclose(cold_scores[split], off_scores[split], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(warm_scores[split], cold_scores[split])
    for a, b in zip(off, cold, strict=True):
        assert abs(a.metrics["auroc"] - b.metrics["auroc"]) < 1e-3


def test_knn_recomputes_features_for_new_weights_and_a_new_transform(splits_root, tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    on = CacheSettings(workers=0)
    weights = tmp_path / "w.safetensors"
    _, first, _ = run_knn(splits_root, tmp_path / "a", random_weights(weights, 0), on, (0,))
    _, again, _ = run_knn(splits_root, tmp_path / "b", weights, on, (0,))
    assert total(first, "frozen_passes") > 0 and total(again, "frozen_passes") == 0
    _, new_weights, _ = run_knn(splits_root, tmp_path / "c", random_weights(weights, 1), on, (0,))
    assert total(new_weights, "frozen_passes") == total(first, "frozen_passes")
    assert total(new_weights, "decodes") == 0  # same images, same decode: read from the store
    _, new_mean, _ = run_knn(splits_root, tmp_path / "d", weights, on, (0,), mean=[0.4, 0.4, 0.4])
    assert total(new_mean, "frozen_passes") == total(first, "frozen_passes")
    assert total(new_mean, "decodes") == 0


# --- the command line -------------------------------------------------------------------------
def test_cache_info_and_clear_by_kind(splits_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = random_weights(tmp_path / "w.safetensors", 0)
    out = fresh_out(splits_root, tmp_path)
    args = ["run", "--method", "knn", "--classes", "0", "--weights", str(weights), "--out", str(out),
            "--device", "cpu", "--workers", "0", "--set", f"backbone={TINY_VIT}", "--set", "img_size=32"]
    assert main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "embedded/uni-class/0" in printed and "frozen passes" in printed and not (out / "runs").exists()
    assert main(args) == 0
    capsys.readouterr()
    assert main(["cache", "info"]) == 0
    printed = capsys.readouterr().out
    assert "images" in printed and "features" in printed
    assert main(["cache", "clear", "--kind", "features"]) == 0
    kinds = {p.name for p in (tmp_path / "cache" / "store").iterdir()}
    assert "images" in kinds and "features" not in kinds
    assert main(["cache", "clear", "--kind", "pixels"]) == 2
    assert "unknown cache kind" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [(["--workers", "-1"], "--workers"),
                                          (["--workers", "100000"], "--workers 100000 is more than 64"),
                                          (["--cache-budget-gb", "-2"], "--cache-budget-gb"),
                                          (["--cache-budget-gb", "nan"], "--cache-budget-gb nan is not 0 or more"),
                                          (["--ray-gpus-per-job", "-1"], "--ray-gpus-per-job")])
def test_bad_cache_and_ray_options_are_one_line(tmp_path, capsys, args, needle):
    assert main(["run", "--method", "knn", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_ray_resources_follow_the_cluster():
    assert RayResources().resolve({"CPU": 2}) == (1.0, 0.0)
    assert RayResources().resolve({"CPU": 64, "GPU": 8}) == (8.0, 1.0)
    assert RayResources(gpus_per_job=0.25).resolve({"CPU": 64, "GPU": 8}) == (2.0, 0.25)
    assert RayResources(cpus_per_job=3).resolve({"CPU": 4}) == (3, 0.0)
    with pytest.raises(NdbenchError, match="GPUs"):
        RayResources(gpus_per_job=1).resolve({"CPU": 4})
    assert (task_threads(0.5), task_threads(2.0)) == (1, 2)


def test_clear_reports_only_the_bytes_it_removed(tmp_path, monkeypatch):
    store = ArrayStore(tmp_path / "store")
    for kind in ("features", "images"):
        entry = store.entry(kind, "k" * 32, 100)
        schema = entry.ensure_schema((Field("x", "<f4", (256,)),))
        assert entry.write(np.arange(100), np.zeros(100, dtype=schema.record_dtype)).all()
    disk = {u.kind: u.disk_bytes for u in store.usage()}
    assert min(disk.values()) > 0
    real_rmtree = shutil.rmtree

    def undeletable_images(path, ignore_errors=False):  # as a file the user may not delete
        if Path(path).name != "images":
            real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("datasets_builders.array_store.shutil.rmtree", undeletable_images)
    assert store.clear() == disk["features"]
    assert [u.kind for u in store.usage()] == ["images"]


def test_an_interrupted_bench_promises_no_resume(splits_root, tmp_path, monkeypatch, capsys):
    """The bench's runs live in a temporary folder that is deleted: its interrupt line says so."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))

    def run_then_interrupt(jobs, options):  # a Ctrl-C as the jobs of the first mode finish
        raise interrupted_after(Interrupted(signal.SIGINT), run_local(jobs, options), len(jobs))

    monkeypatch.setattr(benchmark.bench, "run_bench", lambda *args, **kwargs: [])
    monkeypatch.setattr(benchmark.bench_data, "run_local", run_then_interrupt)
    monkeypatch.setattr(benchmark.bench_data, "knn_run_level",
                        functools.partial(benchmark.bench_data.knn_run_level, classes=[0], overrides=TINY_KNN,
                                          splits_root=splits_root))
    assert main(["bench", "--device", "cpu", "--no-loader", "--steps", "1", "--batch-size", "1", "--img-size", "32",
                 "--workers", "0"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "ndbench: interrupted by SIGINT; nothing is kept (the jobs ran in a temporary folder)"


def test_the_same_annotations_over_other_images_share_no_cache_entries(tmp_path, monkeypatch, capsys):
    """Two datasets built from one annotation file over different pixels (a copy of an export
    with its images re-processed) get their own decoded images and features."""
    from coco_format_fixtures import write_coco_format

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    first = write_coco_format(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for path in (tmp_path / "b").rglob("*.jpg"):
        PIL.Image.fromarray(255 - np.asarray(PIL.Image.open(path).convert("RGB"))).save(path, "JPEG")
    out = tmp_path / "results"
    for name, base in (("first", tmp_path / "a"), ("second", tmp_path / "b")):
        assert main(["build-splits", "coco-format", "--name", name,
                     "--train-annotations", str(base / "train.json"), "--test-annotations", str(base / "test.json"),
                     "--train-images", str(base / "images"), "--test-images", str(base / "images"),
                     "--out", str(out / "splits"), "--setting", "uni-class",
                     "--classes", "2"]) == 0
    assert (tmp_path / "b" / "train.json").read_bytes() == first["train_annotations"].read_bytes()
    tiny = ["--method", "knn", "--classes", "2", "--set", "backbone=ndbench_vit_embedded", "--set", "img_size=64",
            "--weights", "none", "--device", "cpu"]
    for name in ("first", "second"):
        assert main(["run", "--dataset", name, "--out", str(out), *tiny]) == 0, capsys.readouterr().err
    cached = {r.dataset: r for r in load_records(out)}
    assert cached["second"].extra["cost"]["decodes"] > 0  # its own pixels, not the first's rows
    assert cached["first"].scores_sha256 != cached["second"].scores_sha256
    assert main(["run", "--dataset", "second", "--out", str(out), *tiny, "--no-cache", "--force"]) == 0
    uncached = {r.dataset: r for r in load_records(out)}["second"]
    assert abs(cached["second"].metrics["auroc"] - uncached.metrics["auroc"]) < 1e-3
