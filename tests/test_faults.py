"""Faults met in one process: job locks held or left behind, damaged records, methods that
return NaN or crash, write failures, bad weights. (Separate processes: test_faults_processes.py;
Ray workers: test_faults_ray.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from small_splits import fresh_out

from benchmark import records as records_module
from benchmark import runner as runner_module
from benchmark.cli import main
from benchmark.locks import LockOwner, _process_start, lock_path, remove_stale_lock, try_lock
from benchmark.records import load_records, read_record, scores_path
from benchmark.runner import Job, RunOptions, job_record_path
from datasets_builders.atomic import atomic_write_bytes, atomic_write_files, write_error
from datasets_builders.errors import NdbenchError, WriteFailure
from methods.backbones import create_backbone
from methods.pretrain import pretrain


def faulty_args(out: Path, classes: str = "0", *sets: str) -> list[str]:
    args = ["run", "--method", "faulty", "--setting", "uni-class", "--classes", classes, "--out", str(out),
            "--device", "cpu"]
    for item in sets:
        args += ["--set", item]
    return args


def record_of(out: Path, split: str, *overrides: tuple[str, object]) -> Path:
    options = RunOptions(out=out)
    return job_record_path(Job("faulty", "embedded", "uni-class", split, 0, tuple(sorted(overrides))), options)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ndbench:")]


def leftovers(out: Path) -> list[str]:
    """Lock and temporary files under the records folder."""
    runs = out / "runs"
    return sorted(p.name for p in runs.rglob("*") if p.name.endswith((".lock", ".tmp"))) if runs.exists() else []


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(path: Path, owner: LockOwner) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(owner.__dict__) + "\n")


# --- locks -------------------------------------------------------------------------------------
def test_a_stale_lock_of_a_killed_run_is_taken_over_with_one_warning(splits_root, tmp_path, faulty, capsys):
    out = fresh_out(splits_root, tmp_path)
    lock = lock_path(record_of(out, "0"))
    write_lock(lock, LockOwner(socket.gethostname(), dead_pid(), "2024-01-01T00:00:00+00:00", "", "x" * 32))
    assert main(faulty_args(out)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in error_lines(err) if "stale lock" in line]
    assert len(warnings) == 1 and str(lock) in warnings[0] and "is gone" in warnings[0], err
    assert [r.split for r in load_records(out)] == ["0"] and leftovers(out) == []


@pytest.mark.parametrize("owner", ["another host", "a live process here"])
def test_a_job_locked_by_a_live_run_is_left_to_it_and_not_failed(splits_root, tmp_path, faulty, capsys, owner):
    out = fresh_out(splits_root, tmp_path)
    lock = lock_path(record_of(out, "1"))
    if owner == "another host":
        holder = LockOwner("node-17.cluster", 4242, "2024-01-01T00:00:00+00:00", "", "y" * 32)
    else:
        holder = LockOwner(socket.gethostname(), os.getpid(), "2024-01-01T00:00:00+00:00",
                           _process_start(os.getpid()), "z" * 32)
    write_lock(lock, holder)
    assert main(faulty_args(out, "0,1")) == 0
    err = capsys.readouterr().err
    assert "1 jobs ran, 0 skipped (record exists; --force re-runs), 0 failed, 1 running elsewhere" in err
    elsewhere = [line for line in error_lines(err) if "running elsewhere" in line]
    assert len(elsewhere) == 1 and f"{holder.host} pid {holder.pid}" in elsewhere[0], err
    assert "failed:" not in err
    assert [r.split for r in load_records(out)] == ["0"]
    assert json.loads(lock.read_text())["token"] == holder.token  # the other run's lock is untouched


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_a_stale_lock_beside_a_finished_record_is_removed_a_live_one_kept(splits_root, tmp_path, faulty, capsys,
                                                                          parallel):
    """A run killed after writing its record left the lock: the next run skips the job and
    removes the lock (one warning); a lock a live process or another host holds stays."""
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0,1,2")) == 0
    stale, live, remote = (lock_path(record_of(out, split)) for split in "012")
    write_lock(stale, LockOwner(socket.gethostname(), dead_pid(), "2024-01-01T00:00:00+00:00", "", "x" * 32))
    me = LockOwner(socket.gethostname(), os.getpid(), "2024-01-01T00:00:00+00:00", _process_start(os.getpid()),
                   "z" * 32)
    write_lock(live, me)
    write_lock(remote, LockOwner("node-17.cluster", 4242, "2024-01-01T00:00:00+00:00", "", "y" * 32))
    capsys.readouterr()
    assert main([*faulty_args(out, "0,1,2"), "--parallel", parallel]) == 0
    err = capsys.readouterr().err
    assert "0 jobs ran, 3 skipped" in err
    removed = [line for line in error_lines(err) if "stale lock" in line]
    assert len(removed) == 1 and str(stale) in removed[0] and "is gone" in removed[0], err
    assert not stale.exists() and json.loads(live.read_text())["token"] == me.token and remote.is_file()


def test_a_young_unreadable_lock_beside_a_finished_record_stays(tmp_path):
    record = tmp_path / "r.json"
    lock_path(record).write_text('{"host": "half-writ')
    assert remove_stale_lock(record) == () and lock_path(record).is_file()
    old = lock_path(record).stat().st_mtime - 3600
    os.utime(lock_path(record), (old, old))
    (note,) = remove_stale_lock(record)
    assert "unreadable" in note and not lock_path(record).exists()
    assert remove_stale_lock(record) == ()


def test_a_reused_pid_does_not_keep_a_dead_runs_lock(tmp_path):
    """A pid that is alive again, but as another process (other start time), is not the owner."""
    record = tmp_path / "r.json"
    write_lock(lock_path(record), LockOwner(socket.gethostname(), os.getpid(), "2024-01-01T00:00:00+00:00",
                                            "1", "r" * 32))
    attempt = try_lock(record)
    assert attempt.lock is not None and "stale lock" in attempt.notes[0]
    attempt.lock.release()
    assert not lock_path(record).exists()


def test_an_unreadable_lock_is_held_while_young_and_taken_over_when_old(tmp_path):
    record = tmp_path / "r.json"
    lock_path(record).write_text('{"host": "half-writ')
    young = try_lock(record)
    assert young.lock is None and "being written" in young.holder
    old = lock_path(record).stat().st_mtime - 3600
    os.utime(lock_path(record), (old, old))
    taken = try_lock(record)
    assert taken.lock is not None and "unreadable" in taken.notes[0]
    assert json.loads(lock_path(record).read_text())["pid"] == os.getpid()


def test_a_lock_is_released_after_a_crash(splits_root, tmp_path, faulty, capsys):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0", "fault=raise")) == 1
    assert "simulated crash" in capsys.readouterr().err
    assert leftovers(out) == []


# --- damaged records ---------------------------------------------------------------------------
def test_damaged_records_are_skipped_by_readers_and_rerun_by_run(splits_root, tmp_path, faulty, capsys):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0,1,2")) == 0
    truncated, edited = record_of(out, "0"), scores_path(record_of(out, "1"))
    truncated.write_text(truncated.read_text()[:100])
    lines = edited.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",0.123"  # a hand-edited score
    edited.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    for command in (["table"], ["leaderboard"]):
        assert main([*command, "--out", str(out)]) == 0
        warnings = error_lines(capsys.readouterr().err)
        assert len(warnings) == 2, warnings
        assert str(truncated) in warnings[0] and "not valid JSON" in warnings[0]
        assert str(record_of(out, "1")) in warnings[1] and "changed or truncated" in warnings[1]
    assert main(faulty_args(out, "0,1,2")) == 0
    err = capsys.readouterr().err
    assert "2 jobs ran, 1 skipped" in err and err.count("re-running its job") == 2
    assert [r.split for r in load_records(out)] == ["0", "1", "2"]
    assert error_lines(capsys.readouterr().err) == []


def test_a_metric_typed_over_a_record_is_skipped_by_readers_and_rerun_by_run(splits_root, tmp_path, faulty, capsys):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0,1")) == 0
    path = record_of(out, "0")
    data = json.loads(path.read_text())
    recorded = data["metrics"]["auroc"]
    data["metrics"]["auroc"] = 0.99 if recorded != 0.99 else 0.98  # valid JSON, scores file untouched
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["table", "--out", str(out)]) == 0
    warnings = error_lines(capsys.readouterr().err)
    assert len(warnings) == 1 and str(path) in warnings[0] and "does not match its scores file" in warnings[0]
    assert main(faulty_args(out, "0,1")) == 0
    err = capsys.readouterr().err
    assert "1 jobs ran, 1 skipped" in err and err.count("re-running its job") == 1
    assert [r.metrics["auroc"] for r in load_records(out) if r.split == "0"] == [recorded]
    assert error_lines(capsys.readouterr().err) == []


def test_fields_this_version_does_not_know_are_ignored_not_re_run(splits_root, tmp_path, faulty):
    """A field a later ndbench adds (without a new schema) must not make `run` redo the job over its record."""
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out)) == 0
    path = record_of(out, "0")
    data = json.loads(path.read_text())
    data["colour"] = "blue"
    path.write_text(json.dumps(data))
    assert read_record(path).metrics == data["metrics"]
    before = path.read_bytes()
    assert main(faulty_args(out)) == 0
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d.pop("metrics"), "no 'metrics'"),
        (lambda d: d["metrics"].update(auroc=float("nan")), "auroc is nan, not a number in [0, 1]"),
        (lambda d: d["metrics"].update(auroc=1.7), "not a number in [0, 1]"),
        (lambda d: d["metrics"].pop("auroc"), "no AUROC"),
        (lambda d: d.update(seed="zero"), "seed is 'zero'"),
        (lambda d: d.update(seed=True), "seed is True"),
        (lambda d: d["counts"].update(train=-3), "count train"),
        (lambda d: d.update(config=[1, 2]), "config is [1, 2]"),
        (lambda d: d.update(setting="weird"), "setting 'weird' is not one of uni-class, multi-class"),
        (lambda d: d.update(dataset="../../../evil"), "dataset '../../../evil' is not a plain name"),
        (lambda d: d.update(method="sub/dir"), "method 'sub/dir' is not a plain name"),
        (lambda d: d.update(dataset="coco"), "not the one its path names"),
        (lambda d: d.update(setting="multi-class"), "not the one its path names"),
        (lambda d: d.update(split="3"), "not the one its path names"),
    ],
    ids=["missing-field", "nan-metric", "metric-out-of-range", "no-auroc", "wrong-type", "bool-for-int",
         "negative-count", "list-for-dict", "unknown-setting", "dataset-path", "method-path",
         "other-dataset", "other-setting", "other-split"],
)
def test_a_hand_edited_record_is_refused_naming_the_file(splits_root, tmp_path, faulty, edit, needle):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out)) == 0
    path = record_of(out, "0")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(NdbenchError) as info:
        read_record(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_a_record_nested_past_the_parser_is_damaged_not_a_crash(splits_root, tmp_path, faulty, capsys):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0")) == 0
    record_of(out, "0").write_text("[" * 100_000 + "]" * 100_000)  # json raises RecursionError
    capsys.readouterr()
    assert main(["table", "--out", str(out)]) == 2  # no record left to tabulate
    assert "not valid JSON" in capsys.readouterr().err
    assert main(faulty_args(out, "0")) == 0
    assert "1 jobs ran" in capsys.readouterr().err and len(load_records(out)) == 1


def test_records_whose_scores_file_is_gone_or_not_json_are_skipped(splits_root, tmp_path, faulty):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0,1,2")) == 0
    scores_path(record_of(out, "0")).unlink()
    record_of(out, "1").write_bytes(b"\x00\xff\xfe garbage")
    record_of(out, "2").write_text("[1, 2, 3]")
    skipped: list[str] = []
    assert load_records(out, on_skip=lambda exc: skipped.append(exc.problem)) == []
    assert "scores file" in skipped[0] and "missing" in skipped[0]
    assert "not valid JSON" in skipped[1] and "JSON list, not a record" in skipped[2]


def test_records_written_before_scores_hashes_still_load(splits_root, tmp_path, faulty):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out)) == 0
    path = record_of(out, "0")
    data = json.loads(path.read_text())
    del data["scores_sha256"]
    path.write_text(json.dumps(data))
    assert read_record(path).metrics == data["metrics"]
    scores = scores_path(path)
    scores.write_text("".join(scores.read_text().splitlines(keepends=True)[:-3]))  # truncated
    with pytest.raises(NdbenchError, match="holds"):
        read_record(path)


@pytest.mark.parametrize("force", [False, True], ids=["resume", "force"])
def test_run_never_overwrites_a_record_of_a_newer_schema(splits_root, tmp_path, faulty, capsys, force):
    """A newer ndbench's record (more fields than this version knows) is not damaged: its job
    fails in one line naming the schema, other jobs run, and the record is left byte for byte."""
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0")) == 0
    path = record_of(out, "0")
    data = json.loads(path.read_text())
    data.update(schema=data["schema"] + 1, field_of_the_future="x")
    data["metrics"]["metric_of_the_future"] = 0.5
    path.write_text(json.dumps(data))
    before = path.read_bytes(), scores_path(path).read_bytes()
    capsys.readouterr()
    assert main([*faulty_args(out, "0,1"), *(["--force"] if force else []), "--dry-run"]) == 0
    assert "refuse" in capsys.readouterr().out
    assert main([*faulty_args(out, "0,1"), *(["--force"] if force else [])]) == 2
    err = capsys.readouterr().err
    failed = [line for line in error_lines(err) if "failed" in line]
    assert len(failed) == 1 and str(path) in failed[0] and "newer ndbench" in failed[0], err
    assert "re-running" not in err
    assert (path.read_bytes(), scores_path(path).read_bytes()) == before
    assert record_of(out, "1").is_file()


# --- method failures ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "needle", "code"),
    [
        ("nan", "MethodFailure: faulty returned 1 NaN or infinite scores", 1),
        ("inf", "MethodFailure: faulty returned 1 NaN or infinite scores", 1),
        ("short", "MethodFailure: faulty returned scores of shape", 1),
        ("raise", "RuntimeError: simulated crash in fit", 1),
        ("user-error", "simulated bad input (fix the simulated input)", 2),
    ],
)
def test_a_failing_method_fails_its_job_alone(splits_root, tmp_path, faulty, capsys, fault, needle, code):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0,1,2", f"fault={fault}", "fault_split=1")) == code
    err = capsys.readouterr().err
    failed = [line for line in error_lines(err) if "failed:" in line]
    assert len(failed) == 1 and "faulty embedded/uni-class/1 seed 0" in failed[0] and needle in failed[0], err
    assert "2 jobs ran, 0 skipped (record exists; --force re-runs), 1 failed" in err
    assert [r.split for r in load_records(out)] == ["0", "2"]
    assert all(np.isfinite(list(r.metrics.values())).all() for r in load_records(out))
    overrides = (("fault", fault), ("fault_split", "1"))
    assert not record_of(out, "1", *overrides).exists() and not scores_path(record_of(out, "1", *overrides)).exists()
    assert leftovers(out) == []


def test_exit_code_is_2_when_only_bad_input_failed_and_1_when_a_job_crashed(splits_root, tmp_path, faulty,
                                                                             capsys, monkeypatch):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out, "0,1", "fault=user-error", "fault_split=0")) == 2

    def crash_on_1_bad_input_on_2(self, train, **kwargs):
        split = train.split_id.rsplit("/", 1)[1]
        if split == "1":
            raise RuntimeError("simulated crash")
        if split == "2":
            raise NdbenchError("simulated bad input")
        self.fitted = True

    monkeypatch.setattr(faulty, "fit", crash_on_1_bad_input_on_2)
    assert main(faulty_args(out, "1,2")) == 1
    err = capsys.readouterr().err
    assert "simulated crash" in err and "simulated bad input" in err


def test_retries_run_a_crashed_job_again(splits_root, tmp_path, faulty, capsys, monkeypatch):
    out = fresh_out(splits_root, tmp_path)
    calls = []
    original = faulty.fit

    def crash_once(self, train, **kwargs):
        calls.append(train.split_id)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return original(self, train, **kwargs)

    monkeypatch.setattr(faulty, "fit", crash_once)
    assert main([*faulty_args(out), "--retries", "1"]) == 0
    assert len(calls) == 2 and [r.split for r in load_records(out)] == ["0"]
    calls.clear()
    assert main([*faulty_args(out), "--force"]) == 1  # no retries: the crash fails the job
    assert "RuntimeError: transient" in capsys.readouterr().err


# --- write failures ----------------------------------------------------------------------------
def test_written_files_get_the_mode_of_any_new_file(tmp_path):
    target = tmp_path / "record.json"
    atomic_write_bytes(target, b"{}")
    with open(tmp_path / "plain", "wb"):  # what open() gives under this umask (0644 under 022)
        pass
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


@pytest.mark.parametrize(("code", "fix"), [(errno.ENOSPC, "free disk space"), (errno.EROFS, "writable output folder")])
def test_a_failed_write_leaves_no_file_and_says_what_to_do(tmp_path, monkeypatch, code, fix):
    target = tmp_path / "out" / "record.json"

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(WriteFailure) as info:
        atomic_write_bytes(target, b"x" * 100)
    assert str(target) in str(info.value) and fix in str(info.value)
    assert list(target.parent.iterdir()) == []


def test_a_file_where_the_records_folder_belongs_is_one_line(splits_root, tmp_path, faulty, capsys):
    out = fresh_out(splits_root, tmp_path)
    folder = record_of(out, "0").parent
    folder.parent.mkdir(parents=True)
    folder.write_text("not a folder")
    assert main(faulty_args(out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert str(folder) in line and "a file stands where a folder belongs" in line and "move that file away" in line
    assert folder.read_text() == "not a folder"


def test_a_full_disk_stops_the_run_with_one_line(splits_root, tmp_path, faulty, capsys, monkeypatch):
    out = fresh_out(splits_root, tmp_path)
    real = records_module.atomic_write_files

    def disk_full_on_split_1(files):
        path = next(iter(files))
        if "/1__" in str(path):
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real(files)

    monkeypatch.setattr(records_module, "atomic_write_files", disk_full_on_split_1)
    assert main(faulty_args(out, "0,1,2")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "free disk space" in lines[0], lines
    assert [r.split for r in load_records(out)] == ["0"]  # job 2 never started
    assert leftovers(out) == [] and not scores_path(record_of(out, "1")).exists()


def _fail_replacing_records(monkeypatch, error: BaseException) -> None:
    """os.replace raises `error` when it would put a record (.json) in place: after the
    scores file was replaced, before the record."""
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json") and "/runs/" in str(dst):
            raise error
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_a_record_write_interrupted_after_the_scores_leaves_neither(splits_root, tmp_path, faulty, monkeypatch):
    out = fresh_out(splits_root, tmp_path)
    _fail_replacing_records(monkeypatch, KeyboardInterrupt())
    assert main(faulty_args(out)) == 130
    assert list((out / "runs").rglob("*.csv")) == [] and leftovers(out) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), PermissionError(errno.EPERM, "Operation not permitted")])
def test_a_forced_rerun_whose_write_fails_keeps_the_earlier_record(splits_root, tmp_path, faulty, monkeypatch,
                                                                   capsys, error):
    out = fresh_out(splits_root, tmp_path)
    assert main(faulty_args(out)) == 0
    record = record_of(out, "0")
    before = {p: p.read_bytes() for p in (record, scores_path(record))}
    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "write_record", _with_other_scores(records_module.write_record))
        _fail_replacing_records(patch, error)
        assert main([*faulty_args(out), "--force"]) == (130 if isinstance(error, KeyboardInterrupt) else 2)
    assert {p: p.read_bytes() for p in before} == before and leftovers(out) == []
    capsys.readouterr()
    assert len(load_records(out)) == 1 and error_lines(capsys.readouterr().err) == []


def _signal_after_replacing_scores(monkeypatch) -> None:
    """os.replace puts a job's scores file (.csv) in place, then SIGINT arrives, before the
    record (.json) is replaced."""
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(".csv") and "/runs/" in str(dst):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("force", [False, True])
def test_a_ctrl_c_between_the_scores_and_the_record_leaves_a_whole_pair(splits_root, tmp_path, faulty, monkeypatch,
                                                                        capsys, force):
    """The interrupt waits until both files are in place: the run stops (exit 130) with a
    record whose scores file matches it, never one without the other."""
    out = fresh_out(splits_root, tmp_path)
    earlier = b""
    if force:
        assert main(faulty_args(out)) == 0
        earlier = scores_path(record_of(out, "0")).read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "write_record", _with_other_scores(records_module.write_record))
        _signal_after_replacing_scores(patch)
        assert main([*faulty_args(out), *(["--force"] if force else [])]) == 130
    capsys.readouterr()
    (record,) = load_records(out)  # read back whole: its scores file's sha256 matches the record
    assert error_lines(capsys.readouterr().err) == [] and leftovers(out) == []
    assert scores_path(record_of(out, "0")).read_bytes() != earlier  # the re-run's pair landed whole


def test_a_signal_between_two_replaces_waits_until_every_file_is_in_place(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    real = os.replace

    def replace_then_signal(src, dst):
        real(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    old = tmp_path / "a"
    old.write_text("old a")
    previous = signal.signal(signal.SIGINT, stop)
    try:
        monkeypatch.setattr(os, "replace", replace_then_signal)
        with pytest.raises(Stop):
            atomic_write_files({old: "new a", tmp_path / "b": "new b"})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (old.read_text(), (tmp_path / "b").read_text()) == ("new a", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def _with_other_scores(write_record):
    """write_record with every score shifted, so that the re-run's scores file differs."""
    return lambda path, record, ids, labels, scores: write_record(path, record, ids, labels, scores + 1.0)


# --- bad weights -------------------------------------------------------------------------------
def vit_state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in create_backbone("ndbench_vit_embedded", weights="none").state_dict().items()}


def truncated(path: Path) -> Path:
    save_file(vit_state(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def other_architecture(path: Path) -> Path:
    state = create_backbone("ndbench_resnet_embedded", weights="none").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def nan_filled(path: Path) -> Path:
    state = vit_state()
    state["blocks.0.attn.qkv.weight"] = torch.full_like(state["blocks.0.attn.qkv.weight"], float("nan"))
    save_file(state, str(path))
    return path


def inf_in_torch_file(path: Path) -> Path:
    state = vit_state()
    state["pos_embed"][0, 0, 0] = float("inf")
    torch.save({"state_dict": state}, path.with_suffix(".pt"))
    return path.with_suffix(".pt")


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (truncated, "cannot read weights file"),
        (other_architecture, "holds ndbench_resnet_embedded weights, not those of knn's backbone ndbench_vit_embedded"),
        (nan_filled, "NaN or infinite values (first in 'blocks.0.attn.qkv.weight')"),
        (inf_in_torch_file, "NaN or infinite values (first in 'pos_embed')"),
    ],
)
def test_bad_weights_are_one_line_before_any_job(splits_root, tmp_path, capsys, make, needle):
    out = fresh_out(splits_root, tmp_path)
    weights = make(tmp_path / "weights.safetensors")
    code = main(["run", "--method", "knn", "--classes", "0,1", "--weights", str(weights), "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and error_lines(err) == [line for line in err.splitlines() if line.strip()], err
    assert len(error_lines(err)) == 1 and needle in err and "--weights" in err and "Traceback" not in err
    assert not (out / "runs").exists()  # no job started


def test_damaged_cached_pretrained_weights_say_to_delete_them(tmp_path):
    weights = tmp_path / "cached.safetensors"
    nan_filled(weights)
    weights.with_suffix(".json").write_text(json.dumps({"heldout_accuracy": 0.9, "train_seconds": 1.0}))
    with pytest.raises(NdbenchError) as info:
        pretrain("ndbench_vit_embedded", out=weights)
    assert "NaN or infinite" in str(info.value) and f"delete {weights}" in str(info.value)
    weights.with_suffix(".json").write_text('{"heldout_accuracy": 0.9')
    with pytest.raises(NdbenchError, match="is damaged"):
        pretrain("ndbench_vit_embedded", out=weights)


# --- repeated signals ----------------------------------------------------------------------------
def test_a_second_signal_while_stopping_is_ignored():
    from benchmark.interrupts import Interrupted, signals_raise_interrupted

    with signals_raise_interrupted():
        handler = signal.getsignal(signal.SIGINT)
        with pytest.raises(Interrupted):
            handler(signal.SIGINT, None)
        assert handler(signal.SIGINT, None) is None and signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None) is None
    with signals_raise_interrupted():  # a new block stops on its first signal again
        with pytest.raises(Interrupted):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)


@pytest.mark.parametrize(("code", "ignored"), [(130, True), (143, True), (0, False), (2, False)])
def test_the_console_script_ignores_signals_after_an_interrupt(monkeypatch, code, ignored):
    import benchmark.cli as cli_module

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(cli_module, "main", lambda: code)
    try:
        assert cli_module.entry() == code
        now = {s: signal.getsignal(s) for s in previous}
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert (now == dict.fromkeys(previous, signal.SIG_IGN)) == ignored
