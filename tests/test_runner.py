"""The runner end to end on a small embedded configuration: records, resume, determinism,
crash isolation, atomic writes, CLI errors, tables from records and the Ray executor."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from small_splits import fresh_out

from benchmark.cli import main
from benchmark.executors import execute
from benchmark.records import load_records
from benchmark.runner import Job, RunOptions, build_detector, expand_jobs
from methods.knn import KNNDetector


@pytest.fixture
def workspace(splits_root):
    """Small splits and random backbone weights: enough to exercise the runner's mechanics."""
    return splits_root, "none"


def knn_args(workspace, out: Path, *extra: str) -> list[str]:
    _, weights = workspace
    return ["run", "--method", "knn", "--setting", "uni-class", "--classes", "0,1",
            "--weights", str(weights), "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.slow
def test_knn_end_to_end_is_clearly_better_than_chance(tmp_path, capsys, monkeypatch):
    """The real default path: embedded scenes generated, splits built on the fly, the embedded
    ViT pre-trained (cached in $NDBENCH_CACHE, which CI keeps inside the clone), then knn."""
    if "NDBENCH_CACHE" not in os.environ:
        monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    args = ["run", "--method", "knn", "--setting", "uni-class", "--classes", "0,9", "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 0
    records = load_records(out)
    assert sorted(r.split for r in records) == ["0", "9"]
    aurocs = [r.metrics["auroc"] for r in records]
    assert np.mean(aurocs) > 0.58, aurocs
    for r in records:
        assert r.method == "knn" and r.config["k"] == 2 and r.config["weights"] == "embedded"
        assert r.counts["train"] >= 300 and r.counts["test_normal"] + r.counts["test_novel"] == 1000
        assert r.inference_images_per_s > 0 and r.train_seconds > 0 and "torch" in r.versions
        scores = (out / "runs" / "embedded" / "uni-class" / "knn").glob(f"{r.split}__*.scores.csv")
        lines = next(scores).read_text().splitlines()
        assert lines[0] == "image_id,label,score" and len(lines) == 1001
    assert "AVG" in capsys.readouterr().out
    assert main(["table", "--out", str(out)]) == 0
    table = (out / "tables" / "per_class_embedded_uni-class.md").read_text()
    assert "knn" in table and "AVG" in table and "digit-9" in table
    capsys.readouterr()
    assert main(["table", "--out", str(out), "--paper"]) == 0
    assert "the paper reports no numbers for embedded" in capsys.readouterr().err


@pytest.mark.slow
def test_defend_runs_the_cards_commands_on_the_embedded_default(tmp_path, capsys, monkeypatch):
    """`ndbench run --method defend --setting uni-class` as the README writes it (one class to
    keep CI short) on the real embedded default, and the multi-class command planned with
    --dry-run (a multi-class job trains on ~2,800 images: minutes on a CI core)."""
    if "NDBENCH_CACHE" not in os.environ:
        monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    multi = ["run", "--method", "defend", "--setting", "multi-class", "--classes", "0", "--out", str(out)]
    assert main([*multi, "--device", "cpu", "--dry-run"]) == 0, capsys.readouterr().err
    plan = capsys.readouterr().out
    assert "2,828" in plan and "1,000" in plan and not (out / "runs").exists()
    args = ["run", "--method", "defend", "--setting", "uni-class", "--classes", "0", "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 0, capsys.readouterr().err
    (record,) = load_records(out)
    assert record.setting == "uni-class" and record.split == "0" and record.preset == "embedded/uni-class"
    assert record.config["backbone"] == "ndbench_vit_embedded" and record.config["weights"] == "embedded"
    assert record.extra["teacher_passes_per_image"] == 1.0 and record.extra["student_tokens_kept"] == 32
    assert record.extra["num_prototypes"] == 20 and record.extra["observed_classes"] == 10
    assert (record.config["dense_epochs"], record.config["epochs"], record.config["head_hidden"]) == (1, 2, 384)
    assert record.metrics["auroc"] > 0.55, record.metrics


@pytest.mark.slow
def test_resume_skips_finished_jobs_and_force_reruns(workspace, tmp_path, capsys):
    out = fresh_out(workspace, tmp_path)
    assert main(knn_args(workspace, out, "--classes", "0")) == 0
    record = next((out / "runs").rglob("*.json"))
    first = json.loads(record.read_text())
    capsys.readouterr()
    assert main(knn_args(workspace, out, "--classes", "0")) == 0
    assert "0 jobs ran, 1 skipped" in capsys.readouterr().err
    assert json.loads(record.read_text()) == first
    assert main(knn_args(workspace, out, "--classes", "0", "--force")) == 0
    assert "1 jobs ran, 0 skipped" in capsys.readouterr().err


def test_a_run_of_fewer_jobs_prints_and_keeps_every_record_in_the_tables(workspace, tmp_path, capsys):
    out = fresh_out(workspace, tmp_path)
    assert main(knn_args(workspace, out)) == 0  # classes 0 and 1
    capsys.readouterr()
    assert main(knn_args(workspace, out, "--classes", "1")) == 0
    printed = capsys.readouterr().out
    # The terminal shows the table as written (the notes below it speak of all of it).
    written = (out / "tables" / "per_class_embedded_uni-class.md").read_text()
    for row in [line for line in written.splitlines() if line.startswith("| ") and "digit-" in line]:
        assert row in printed
    for name in ("per_class_embedded_uni-class.csv", "leaderboard.md"):
        assert (out / "tables" / name).read_text() == _tables_of_every_record(out, name)
    assert "digit-0" in (out / "tables" / "per_class_embedded_uni-class.md").read_text()


def test_leaderboard_prints_and_leaves_the_table_files_as_table_wrote_them(workspace, tmp_path, capsys, caplog):
    from benchmark.tables import manifest_splits

    out = fresh_out(workspace, tmp_path)
    assert main(knn_args(workspace, out, "--classes", "0")) == 0
    assert main(["table", "--paper", "--out", str(out)]) == 0
    for path in (out / "tables").iterdir():  # marked, so that writing them again would show
        path.write_bytes(path.read_bytes() + b"kept\n")
    written = {p.name: p.read_bytes() for p in (out / "tables").iterdir()}
    capsys.readouterr()
    caplog.clear()
    assert main(["leaderboard", "--out", str(out)]) == 0
    assert "knn" in capsys.readouterr().out
    # Its AVG coverage counts every split with a manifest, as the table files do.
    every = len(manifest_splits(out / "splits")[("embedded", "uni-class")])
    assert f"knn on embedded uni-class: AVG covers 1 of {every} rows" in [r.getMessage() for r in caplog.records]
    assert {p.name: p.read_bytes() for p in (out / "tables").iterdir()} == written


def test_a_table_note_is_given_once(workspace, tmp_path, capsys, caplog):
    out = fresh_out(workspace, tmp_path)
    assert main(knn_args(workspace, out, "--classes", "0")) == 0
    caplog.clear()
    assert main(knn_args(workspace, out, "--classes", "0", "--set", "k=3")) == 0  # a second config
    for command in (None, ["table", "--out", str(out)]):
        if command is not None:
            caplog.clear()
            assert main(command) == 0
        kept = [r.getMessage() for r in caplog.records if "kept config" in r.getMessage()]
        assert len(kept) == 1, kept


def _tables_of_every_record(out: Path, name: str) -> str:
    from benchmark.records import load_records
    from benchmark.reporting import class_names_under
    from benchmark.tables import manifest_splits, write_tables

    write_tables(load_records(out), out / "expected", class_names=class_names_under(out),
                 splits=manifest_splits(out / "splits"))
    return (out / "expected" / name).read_text()


@pytest.mark.slow
def test_same_seed_gives_identical_scores(workspace, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = fresh_out(workspace, tmp_path / name)
        assert main(knn_args(workspace, out, "--classes", "1")) == 0
        runs.append(next((out / "runs").rglob("*.scores.csv")).read_text())
    assert runs[0] == runs[1]


@pytest.mark.slow
def test_a_crashing_job_leaves_the_other_records(workspace, tmp_path, monkeypatch, capsys):
    out = fresh_out(workspace, tmp_path)
    original = KNNDetector.fit

    def flaky_fit(self, train, **kwargs):
        if train.split_id.endswith("/1"):
            raise RuntimeError("simulated crash")
        return original(self, train, **kwargs)

    monkeypatch.setattr(KNNDetector, "fit", flaky_fit)
    assert main(knn_args(workspace, out)) == 1
    assert "simulated crash" in capsys.readouterr().err
    assert [r.split for r in load_records(out)] == ["0"]


def test_an_interrupted_record_write_leaves_nothing_behind(splits_root, tmp_path, monkeypatch):
    out = fresh_out(splits_root, tmp_path)
    monkeypatch.setattr(KNNDetector, "features", lambda self, images, **kw: np.random.default_rng(
        len(images)).normal(size=(len(images), 4)))
    real_replace = os.replace

    def killed_replace(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_replace)
    options = RunOptions(out=out, device="cpu", weights="none", progress=False)
    jobs = expand_jobs(["knn"], settings=["uni-class"], classes=[0], seeds=[0], options=options)
    with pytest.raises(KeyboardInterrupt):
        from benchmark.runner import run_job

        run_job(jobs[0], options)
    leftovers = [p.name for p in (out / "runs").rglob("*")] if (out / "runs").exists() else []
    assert not any(name.endswith(".json") or name.endswith(".tmp") for name in leftovers), leftovers


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--method", "nope"], "unknown method 'nope'"),
        (["run", "--method", "knn", "--classes", "42"], "unknown class 42"),
        *([] if torch.cuda.is_available() else [(["run", "--method", "knn", "--device", "cuda"], "CUDA is not")]),
        (["run", "--method", "knn", "--weights", "/no/such/weights.pt"], "--weights"),
        (["run", "--method", "knn", "--setting", "sideways"], "unknown setting"),
        (["run", "--method", "knn", "--executor", "slurm"], "unknown executor"),
    ],
)
def test_run_errors_are_one_line(splits_root, tmp_path, capsys, args, needle):
    out = fresh_out(splits_root, tmp_path)
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and line.startswith("ndbench:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_an_unknown_embedded_class_is_refused_before_the_scenes_are_generated(tmp_path, capsys, monkeypatch):
    import benchmark.runner as runner

    def no_build(request):
        raise AssertionError("built the splits before checking --classes")

    monkeypatch.setattr(runner, "build_splits", no_build)
    code = main(["run", "--method", "knn", "--classes", "0,99", "--out", str(tmp_path / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown class 99 for embedded (use ids 0..9)" in err, err
    assert not (tmp_path / "results").exists()


def test_wrong_shaped_weights_are_refused(splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save({"cls_token": torch.zeros(1, 1, 7)}, bad)
    code = main(["run", "--method", "knn", "--classes", "0", "--weights", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cls_token" in err and "Traceback" not in err


@pytest.mark.slow
def test_ray_executor_gives_the_local_records(workspace, tmp_path):
    _, weights = workspace
    records = {}
    for executor in ("local", "ray"):
        out = fresh_out(workspace, tmp_path / executor)
        options = RunOptions(out=out, device="cpu", weights=str(weights), progress=False)
        jobs = expand_jobs(["knn"], settings=["uni-class"], classes=[0, 1], seeds=[0], options=options)
        results = execute(jobs, options, executor)
        assert [r.status for r in results] == ["done", "done"], [r.error for r in results]
        records[executor] = {(r.split, r.seed): (r.metrics, r.config_hash) for r in load_records(out)}
    assert records["ray"] == records["local"]


def test_embedded_presets_are_layered_by_setting(tmp_path):
    """Embedded jobs get the "embedded" preset, then its "embedded/<setting>" layer, then the
    job's overrides; other datasets keep the paper defaults."""
    options = RunOptions(out=tmp_path)

    def config(dataset: str, setting: str, overrides=()):
        return build_detector(Job("defend", dataset, setting, "0", 0, overrides), options).config

    uni, multi = config("embedded", "uni-class"), config("embedded", "multi-class")
    assert (uni.epochs, uni.dense_epochs, uni.lr, uni.head_hidden) == (2, 1, 1e-3, 384)
    # lr, batch size and head from the base layer
    assert (multi.epochs, multi.dense_epochs, multi.lr, multi.batch_size, multi.head_out) == (2, 1, 1e-3, 8, 64)
    assert config("embedded", "multi-class", (("epochs", 5),)).epochs == 5
    paper = config("voc", "multi-class")
    assert (paper.epochs, paper.lr, paper.backbone) == (10, 1e-5, "vit_base_patch16_224.augreg2_in21k_ft_in1k")


@pytest.mark.parametrize(("version", "device", "fused"), [("2.3.1", "cpu", False), ("2.4.0+cpu", "cpu", True),
                                                         ("2.14.1+cu130", "cpu", True), ("2.1.0", "cuda", True)])
def test_adam_gets_its_fused_kernel_where_torch_has_one(monkeypatch, version, device, fused):
    from methods.base import fused_adam

    monkeypatch.setattr(torch, "__version__", version)
    assert fused_adam(torch.device(device)) == ({"fused": True} if fused else {})


@pytest.mark.parametrize(("force", "advice"), [(False, "run the same command again to resume"),
                                               (True, "run it again without --force to resume")])
def test_an_interrupted_run_says_how_to_resume_it(tmp_path, monkeypatch, force, advice):
    import signal

    import benchmark.executors as executors
    from benchmark.interrupts import Interrupted
    from benchmark.runner import interrupted_after

    def interrupted(jobs, options, *args, **kwargs):
        raise interrupted_after(Interrupted(signal.SIGINT), [], len(jobs))

    monkeypatch.setattr(executors, "prepare", lambda jobs, options, splits=None: None)
    monkeypatch.setattr(executors, "run_local", interrupted)
    options = RunOptions(out=tmp_path, force=force, progress=False)
    with pytest.raises(Interrupted) as info:
        executors.execute([Job("knn", "embedded", "uni-class", "0", 0)], options)
    assert info.value.message().endswith(advice)


def test_a_run_removes_temporaries_killed_writes_left_once_abandoned(workspace, tmp_path):
    out = fresh_out(workspace[0], tmp_path)
    folder = out / "runs" / "embedded" / "uni-class" / "knn"
    folder.mkdir(parents=True)
    (out / "tables").mkdir()
    old = [folder / ".0__abc__seed0.json.k2j4.tmp", folder / ".0__abc__seed0.scores.csv.1a2b.bak.tmp",
           out / "tables" / ".embedded_uni-class.md.x9y8.tmp"]
    young = folder / ".1__abc__seed0.json.z7q1.tmp"  # may be a live run's write
    kept = folder / "notes.tmp"  # not a temporary ndbench names
    for path in [*old, young, kept]:
        path.write_text("half")
    stamp = time.time() - 2 * 3600
    for path in [*old, kept]:
        os.utime(path, (stamp, stamp))
    assert main(knn_args(workspace, out)) == 0
    assert not any(path.exists() for path in old)
    assert young.exists() and kept.exists()
    assert len(load_records(out)) == 2


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_dry_run_plans_a_split_not_built_yet_and_writes_nothing(splits_root, tmp_path, capsys):
    """The index is built but a split's manifest is missing: the run would build it, so the dry
    run plans its jobs on the manifest the run would write, and says so."""
    import shutil

    from benchmark.plan import plan_run
    from benchmark.runner import missing_split

    out = tmp_path / "results"
    shutil.copytree(splits_root, out / "splits")
    manifest_file = out / "splits" / "embedded" / "uni-class" / "1.json"
    manifest_file.unlink()
    before = files_under(out)
    capsys.readouterr()
    args = ["run", "--method", "knn", "--classes", "0,1", "--seeds", "0,1", "--weights", "none", "--device", "cpu",
            "--out", str(out), "--dry-run"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1 split(s) not built yet, which the run builds first: embedded/uni-class/1" in printed
    assert files_under(out) == before
    options = RunOptions(out=out, device="cpu", weights="none")
    jobs = expand_jobs(["knn"], settings=["uni-class"], classes=[0, 1], seeds=[0, 1], options=options)
    plan = plan_run(jobs, options)
    assert [(j.job.split, j.builds_split, j.skipped) for j in plan.jobs] == [
        ("0", False, False), ("0", False, False), ("1", True, False), ("1", True, False)]
    assert plan.methods["knn"].jobs == 4
    missing_split(jobs[2], options).write(options.splits)  # as `prepare` builds it
    built = json.loads(manifest_file.read_text())
    assert (plan.jobs[2].train, plan.jobs[2].test) == (len(built["train"]), len(built["test"]))


def test_a_run_reads_each_split_manifest_once(splits_root, tmp_path, faulty, monkeypatch):
    from datasets_builders.splits import Manifest

    out = fresh_out(splits_root, tmp_path)
    options = RunOptions(out=out, device="cpu", progress=False)
    jobs = expand_jobs(["faulty"], settings=["uni-class"], classes=[0, 1], seeds=[0, 1, 2], options=options)
    reads: list[str] = []
    read = Manifest.read.__func__

    def counted(cls, path):
        reads.append(Path(path).name)
        return read(cls, path)

    monkeypatch.setattr(Manifest, "read", classmethod(counted))
    assert [r.status for r in execute(jobs, options)] == ["done"] * 6
    assert sorted(reads) == ["0.json", "1.json"]
    reads.clear()
    assert [r.status for r in execute(jobs, options)] == ["skipped"] * 6
    assert sorted(reads) == ["0.json", "1.json"]


def test_a_local_run_and_the_tables_it_prints_read_each_split_manifest_once(splits_root, tmp_path, faulty,
                                                                               monkeypatch, capsys):
    """The tables printed after a run check its records against the manifests the run read;
    the jobs' expansion, the preparation, the jobs and the tables share one read of the index."""
    from datasets_builders.index import DatasetIndex
    from datasets_builders.splits import Manifest

    out = fresh_out(splits_root, tmp_path)
    reads: list[str] = []

    def counting(cls, name):
        read = getattr(cls, name).__func__

        def counted(cls, path):
            reads.append(Path(path).name)
            return read(cls, path)

        monkeypatch.setattr(cls, name, classmethod(counted))

    counting(Manifest, "read")
    counting(DatasetIndex, "read")
    args = ["run", "--method", "faulty", "--setting", "uni-class", "--classes", "0,1", "--seeds", "0,1",
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    assert "AVG" in capsys.readouterr().out and (out / "tables" / "per_class_embedded_uni-class.md").is_file()
    assert sorted(reads) == ["0.json", "1.json", "embedded"]
