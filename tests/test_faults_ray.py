"""A Ray worker killed in the middle of a job (as an out-of-memory kill would), on a local Ray
cluster started once for the module: the other jobs finish, the lost one is reported failed
(or retried with --retries 1), a re-run completes it, and the records equal a local run's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray
from small_splits import fresh_out

from benchmark.executors import execute
from benchmark.locks import _read_owner
from benchmark.records import load_records, scores_path
from benchmark.runner import DONE, FAILED, SKIPPED, RunOptions, expand_jobs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    """Two worker slots; workers import the test-only "faulty" method on start."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "OMP_NUM_THREADS": "1"},
                          "worker_process_setup_hook": "fault_methods.register_fault_methods"})
    yield
    ray.shutdown()


def jobs_and_options(out: Path, markers: Path, fault: str, retries: int = 0):
    options = RunOptions(out=out, device="cpu", progress=False, retries=retries)
    overrides = {"fault": fault, "fault_split": "1", "markers": str(markers)}
    jobs = expand_jobs(["faulty"], settings=["uni-class"], classes=[0, 1, 2], seeds=[0], options=options,
                       overrides=overrides)
    return jobs, options


def wait_until_gone(lock: Path, limit_s: float = 60.0) -> None:
    """Wait for the process that holds `lock` to be gone. Ray reports a killed worker once its
    sockets close, which the kernel does before the process has finished exiting; on a loaded
    machine a re-run can start in between and rightly leave the job to a still-live owner."""
    owner = _read_owner(lock)
    assert owner is not None, lock
    deadline = time.monotonic() + limit_s
    while not owner.is_gone():
        assert time.monotonic() < deadline, f"{owner.describe()} still runs after {limit_s} s"
        time.sleep(0.1)


def outcome(out: Path) -> dict[str, tuple[dict, str]]:
    """Per split: the metrics and the scores file's text."""
    return {r.split: (r.metrics, scores_path(next((out / "runs").rglob(f"{r.split}__*.json"))).read_text())
            for r in load_records(out)}


def test_a_killed_worker_fails_its_job_alone_and_a_rerun_completes_it(splits_root, tmp_path, faulty, local_ray):
    local_out, ray_out = fresh_out(splits_root, tmp_path / "local"), fresh_out(splits_root, tmp_path / "ray")
    markers = tmp_path / "markers"
    markers.mkdir()
    jobs, options = jobs_and_options(local_out, markers, "none")
    assert [r.status for r in execute(jobs, options, "local")] == [DONE] * 3

    jobs, options = jobs_and_options(ray_out, markers, "kill-once")
    results = execute(jobs, options, "ray")
    assert [r.status for r in results] == [DONE, FAILED, DONE], [r.error for r in results]
    assert "the Ray worker running it died" in results[1].error and "--retries 1" in results[1].error
    assert (markers / "killed-1").exists()
    assert sorted(outcome(ray_out)) == ["0", "2"]
    # The killed worker's lock is left behind; the re-run takes it over (its owner is gone).
    wait_until_gone(next((ray_out / "runs").rglob("*.lock")))
    results = execute(jobs, options, "ray")
    assert [r.status for r in results] == [SKIPPED, DONE, SKIPPED], [r.error for r in results]
    assert any("stale lock" in note for note in results[1].notes)
    assert outcome(ray_out) == outcome(local_out)
    assert not list((ray_out / "runs").rglob("*.lock"))


def test_retries_run_a_job_whose_worker_died_again(splits_root, tmp_path, faulty, local_ray):
    out = fresh_out(splits_root, tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    jobs, options = jobs_and_options(out, markers, "kill-once", retries=1)
    results = execute(jobs, options, "ray")
    assert [r.status for r in results] == [DONE] * 3, [r.error for r in results]
    fits = [line.split() for line in (markers / "fits.log").read_text().splitlines()]
    killed = [pid for split, pid in fits if split == "1"]
    assert len(killed) == 2 and killed[0] != killed[1] and int(killed[0]) != os.getpid()
    assert sorted(outcome(out)) == ["0", "1", "2"]
