"""`--parallel N`: jobs side by side in worker processes. The records equal those of a run one
job at a time, a method registered at run time reaches the workers, a worker killed mid-job
(as an out-of-memory kill would) fails its jobs while the rest go on, and `--retries` runs them
again. Jobs whose records exist are skipped before any worker starts, and no more workers start
than jobs that run. Interrupts of a parallel CLI run are tested in test_faults_processes.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from small_splits import fresh_out

from benchmark import parallel
from benchmark.cli import main
from benchmark.executors import execute
from benchmark.parallel import (
    WorkerPool,
    _written_before_break,
    auto_parallel,
    early_workers,
    jobs_at_once,
    parse_parallel,
    start_order,
)
from benchmark.records import load_records, scores_path
from benchmark.runner import DONE, FAILED, SKIPPED, RunOptions, expand_jobs, safe_run_job
from datasets_builders.errors import NdbenchError

GIB = 2**30


def jobs_and_options(out: Path, markers: Path, fault: str, retries: int = 0, classes=(0, 1, 2, 3)):
    options = RunOptions(out=out, device="cpu", progress=False, retries=retries)
    overrides = {"fault": fault, "fault_split": "1", "markers": str(markers)}
    jobs = expand_jobs(["faulty"], settings=["uni-class"], classes=list(classes), seeds=[0], options=options,
                       overrides=overrides)
    return jobs, options


def outcome(out: Path) -> dict[str, tuple[dict, str]]:
    """Per split: the metrics and the scores file's text."""
    return {r.split: (r.metrics, scores_path(next((out / "runs").rglob(f"{r.split}__*.json"))).read_text())
            for r in load_records(out)}


def fits(markers: Path) -> list[tuple[str, int]]:
    """(split, pid) of every fit, in order."""
    return [(split, int(pid)) for split, pid in
            (line.split() for line in (markers / "fits.log").read_text().splitlines())]


@pytest.fixture
def markers(tmp_path) -> Path:
    folder = tmp_path / "markers"
    folder.mkdir()
    return folder


class ThreadPool(WorkerPool):
    """A worker pool whose workers are threads of this process: it starts no process, and
    keeps the job numbers sent to it and whether it was stopped."""

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(self.size)
        self.sent: list[int] = []
        self.stopped = False

    def start(self) -> None:
        pass

    def submit(self, number, job, options) -> None:
        self.sent.append(number)
        self.running[self.executor.submit(safe_run_job, job, options, None, self.threads)] = number

    def stop(self):
        self.stopped = True
        return super().stop()


@pytest.fixture
def pools(monkeypatch) -> list[ThreadPool]:
    """Every worker pool the test makes, in order: thread pools (see `ThreadPool`)."""
    made: list[ThreadPool] = []

    def make(size: int, threads: int) -> ThreadPool:
        made.append(ThreadPool(size, threads))
        return made[-1]

    monkeypatch.setattr(parallel, "WorkerPool", make)
    return made


@contextmanager
def splits_unbuilt(out: Path) -> Iterator[None]:
    """`out` without its splits (as before a first run builds them), then with them again."""
    (out / "splits").rename(out / "splits-aside")
    try:
        yield
    finally:
        (out / "splits-aside").rename(out / "splits")


def test_auto_runs_one_job_per_cpu_within_memory_and_the_jobs():
    assert auto_parallel("cpu", jobs=40, cpus=2, memory=64 * GIB) == 2
    assert auto_parallel("cpu", jobs=40, cpus=16, memory=64 * GIB) == 16
    assert auto_parallel("cpu", jobs=3, cpus=16, memory=64 * GIB) == 3
    assert auto_parallel("cpu", jobs=40, cpus=16, memory=5 * GIB) == 2
    assert auto_parallel("cpu", jobs=40, cpus=16, memory=GIB) == 1


def test_a_given_parallel_starts_no_more_workers_than_jobs():
    assert jobs_at_once(1000, "cpu", jobs=40) == 40
    assert jobs_at_once(3, "cpu", jobs=40) == 3


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_parallel_must_be_a_positive_number_or_auto(value):
    with pytest.raises(NdbenchError, match="--parallel"):
        parse_parallel(value)
    assert parse_parallel("3") == 3 and parse_parallel("auto") is None


def test_each_method_starts_once_before_the_rest_run_costliest_first(splits_root, tmp_path):
    options = RunOptions(out=fresh_out(splits_root, tmp_path), device="cpu", progress=False)
    jobs = expand_jobs(["knn", "mkd", "defend", "transformaly"], settings=["uni-class"], classes=[0, 1, 2],
                       seeds=[0], options=options)
    order = [(jobs[number].method, jobs[number].split) for number in start_order(jobs, options)]
    # Trained passes per image on the embedded presets: defend 6, transformaly 4, mkd 3, knn 0.
    assert order[:4] == [("defend", "0"), ("transformaly", "0"), ("mkd", "0"), ("knn", "0")]
    assert order[4:] == [(m, s) for m in ("defend", "transformaly", "mkd", "knn") for s in ("1", "2")]


@pytest.mark.slow
def test_parallel_jobs_write_the_records_of_a_run_one_job_at_a_time(splits_root, tmp_path, markers, faulty):
    # "faulty" is registered at run time only (no entry point): the workers get it from the parent.
    one_out, parallel_out = fresh_out(splits_root, tmp_path / "one"), fresh_out(splits_root, tmp_path / "parallel")
    jobs, options = jobs_and_options(one_out, markers, "none")
    assert [r.status for r in execute(jobs, options, "local")] == [DONE] * 4
    (markers / "fits.log").unlink()

    jobs, options = jobs_and_options(parallel_out, markers, "none")
    results = execute(jobs, options, "local", parallel=2)
    assert [r.status for r in results] == [DONE] * 4, [r.error for r in results]
    assert [r.job for r in results] == jobs
    pids = {pid for _, pid in fits(markers)}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # one worker may take all: these jobs are short
    assert outcome(parallel_out) == outcome(one_out)
    assert not list((parallel_out / "runs").rglob("*.lock"))
    assert [r.status for r in execute(jobs, options, "local", parallel=2)] == [SKIPPED] * 4


@pytest.mark.slow
def test_workers_started_before_the_jobs_are_known_run_them(splits_root, tmp_path, markers, faulty):
    # The demo starts its workers before it expands the jobs, while that generates the scenes.
    out = fresh_out(splits_root, tmp_path)
    options = RunOptions(out=out, device="cpu", progress=False)
    with splits_unbuilt(out):
        with early_workers(2, options, "embedded") as pool:
            started = {process.pid for process in pool.processes()}
            (out / "splits-aside").rename(out / "splits")  # as expanding the jobs builds them
            jobs, options = jobs_and_options(out, markers, "none")
            results = execute(jobs, options, "local", parallel=2, pool=pool)
        (out / "splits").rename(out / "splits-aside")
    assert [r.status for r in results] == [DONE] * 4, [r.error for r in results]
    assert len(started) == 2 and {pid for _, pid in fits(markers)} <= started
    assert not any(_alive(pid) for pid in started)


def test_early_workers_stop_when_the_work_before_the_jobs_fails(tmp_path):
    options = RunOptions(out=tmp_path / "results", device="cpu", progress=False)
    with pytest.raises(NdbenchError, match="no such split"):
        with early_workers(2, options, "embedded") as pool:
            started = {process.pid for process in pool.processes()}
            raise NdbenchError("no such split", "build it")
    assert len(started) == 2 and not any(_alive(pid) for pid in started)
    with early_workers(1, options, "embedded") as pool:
        assert pool is None  # one job at a time runs in this process


def test_no_worker_starts_early_once_the_splits_are_built(splits_root, tmp_path, pools):
    # Expanding the jobs is then quick, and only the jobs not yet recorded need workers.
    options = RunOptions(out=fresh_out(splits_root, tmp_path), device="cpu", progress=False)
    with early_workers(2, options, "embedded") as pool:
        assert pool is None
    assert pools == []


def test_a_rerun_whose_jobs_are_all_recorded_starts_no_worker(splits_root, tmp_path, markers, faulty, pools):
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "none")
    done = execute(jobs, options, "local")
    assert [r.status for r in done] == [DONE] * 4 and pools == []
    (markers / "fits.log").unlink()
    for at_once in (2, 999):
        results = execute(jobs, options, "local", parallel=at_once)
        assert [r.status for r in results] == [SKIPPED] * 4
        assert [(r.job, r.record, r.auroc) for r in results] == [(r.job, r.record, r.auroc) for r in done]
    assert pools == [] and not (markers / "fits.log").exists()


def test_workers_start_only_for_the_jobs_not_recorded(splits_root, tmp_path, markers, faulty, pools):
    # A damaged record is not skipped: its job runs again, and its warning is printed once.
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "none")
    done = execute(jobs, options, "local")
    done[2].record.write_text("{")
    done[3].record.unlink()
    (markers / "fits.log").unlink()
    results = execute(jobs, options, "local", parallel=4)
    assert [r.status for r in results] == [SKIPPED, SKIPPED, DONE, DONE], [r.error for r in results]
    assert [r.job for r in results] == jobs
    assert [(p.size, sorted(p.sent)) for p in pools] == [(2, [2, 3])]
    assert sorted(split for split, _ in fits(markers)) == ["2", "3"]
    assert [len(r.notes) for r in results] == [0, 0, 1, 0] and "re-running its job" in results[2].notes[0]
    assert sorted(outcome(out)) == ["0", "1", "2", "3"]


def test_a_forced_rerun_runs_the_given_number_at_once(splits_root, tmp_path, markers, faulty, pools):
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "none")
    execute(jobs, options, "local")
    forced = RunOptions(out=out, device="cpu", progress=False, force=True)
    assert [r.status for r in execute(jobs, forced, "local", parallel=3)] == [DONE] * 4
    assert [(p.size, sorted(p.sent)) for p in pools] == [(3, [0, 1, 2, 3])]


def test_early_workers_are_stopped_or_fewer_when_jobs_are_recorded(splits_root, tmp_path, markers, faulty, pools):
    # Records made on splits built again alike (their folder was removed): known only once built.
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "none")
    execute(jobs, options, "local")
    with splits_unbuilt(out), early_workers(2, options, "embedded") as pool:
        pass
    assert [p.size for p in pools] == [2]
    for pending, sizes in ((0, [2]), (1, [2, 1])):
        for job in jobs[:pending]:
            next((out / "runs").rglob(f"{job.split}__*.json")).unlink()
        pools.clear()
        with splits_unbuilt(out):
            with early_workers(2, options, "embedded") as pool:
                (out / "splits-aside").rename(out / "splits")
                results = execute(jobs, options, "local", parallel=2, pool=pool)
            (out / "splits").rename(out / "splits-aside")
        assert [r.status for r in results] == [DONE] * pending + [SKIPPED] * (4 - pending)
        assert [p.size for p in pools] == sizes and pools[0].stopped and pools[0].sent == []
        assert [p.sent for p in pools[1:]] == [[0]] * (pending > 0)


def test_run_parallel_999_on_recorded_jobs_starts_no_worker(splits_root, tmp_path, pools, capsys):
    out = fresh_out(splits_root, tmp_path)
    common = ["run", "--method", "knn", "--weights", "none", "--device", "cpu", "--out", str(out),
              "--classes", "0,1,2"]
    assert main([*common, "--parallel", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--parallel", "999"]) == 0
    assert "0 jobs ran, 3 skipped" in capsys.readouterr().err
    assert pools == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_killed_worker_fails_its_jobs_the_others_go_on_and_a_rerun_completes_them(splits_root, tmp_path,
                                                                                    markers, faulty):
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "kill-once")
    results = execute(jobs, options, "local", parallel=2)
    statuses = [r.status for r in results]
    assert statuses[1] == FAILED and (markers / "killed-1").exists()
    # Killing one worker stops the pool: a job the other worker was running fails with it.
    for result in results:
        assert result.status == DONE or "the worker process running it died" in result.error, result.error
    assert "--retries 1" in results[1].error
    assert statuses[2:].count(DONE) >= 1  # the pool was started again for the jobs after the kill
    results = execute(jobs, options, "local", parallel=2)
    assert all(r.status in (DONE, SKIPPED) for r in results), [r.error for r in results]
    assert sorted(outcome(out)) == ["0", "1", "2", "3"]
    assert not list((out / "runs").rglob("*.lock"))


def test_a_job_whose_record_its_broken_worker_wrote_counts_as_done(splits_root, tmp_path, markers, faulty):
    # When one worker dies the pool fails every running future, also that of a sibling job that
    # had already written its record: it must count as done, not be run again (and reported as
    # skipped), while a record older than the attempt or no record at all leaves it to retry.
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "none", classes=(0, 1))
    before = time.time() - 1.0
    assert _written_before_break(jobs[0], options, before) is None  # nothing written yet
    assert [r.status for r in execute(jobs[:1], options, "local")] == [DONE]
    result = _written_before_break(jobs[0], options, before)
    assert result is not None and result.status == DONE and result.record.is_file()
    assert result.auroc == load_records(out)[0].metrics["auroc"]
    assert _written_before_break(jobs[0], options, time.time() + 60.0) is None  # written before the attempt
    assert _written_before_break(jobs[1], options, before) is None


class BrokenPool(ThreadPool):
    """A pool whose workers died: the first job's future fails at once, the others' only when
    the pool is shut down (a broken process pool may settle them after `wait` returned)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.executor = SimpleNamespace(shutdown=self._shutdown)

    def submit(self, number, job, options) -> None:
        self.sent.append(number)
        future = Future()
        if not self.running:
            future.set_exception(BrokenProcessPool("a worker died"))
        self.running[future] = number

    def _shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        for future in self.running:
            if not future.done():
                future.set_exception(BrokenProcessPool("a worker died"))


def test_every_job_of_a_broken_pool_is_run_again_not_only_those_failed_first(splits_root, tmp_path, markers,
                                                                           faulty, monkeypatch):
    made: list[ThreadPool] = []

    def make(size: int, threads: int) -> ThreadPool:
        made.append((BrokenPool if not made else ThreadPool)(size, threads))
        return made[-1]

    monkeypatch.setattr(parallel, "WorkerPool", make)
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "none", retries=1)
    results = execute(jobs, options, "local", parallel=2)
    assert [r.status for r in results] == [DONE] * 4, [r.error for r in results]
    assert made[0].sent == [0, 1] and sorted(made[1].sent) == [0, 1, 2, 3]


@pytest.mark.slow
def test_retries_run_jobs_whose_worker_died_again(splits_root, tmp_path, markers, faulty):
    out = fresh_out(splits_root, tmp_path)
    jobs, options = jobs_and_options(out, markers, "kill-once", retries=1)
    results = execute(jobs, options, "local", parallel=2)
    assert [r.status for r in results] == [DONE] * 4, [r.error for r in results]
    killed = [pid for split, pid in fits(markers) if split == "1"]
    assert len(killed) == 2 and killed[0] != killed[1]
    assert sorted(outcome(out)) == ["0", "1", "2", "3"]
