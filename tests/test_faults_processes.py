"""Faults that need real separate processes: two runs on one results folder, SIGINT / SIGTERM
in the middle of a job, and a file-size limit (a full disk, as the kernel reports it) during a
record write and during split building. The processes run tests/fault_cli.py: the ndbench CLI
with the test-only "faulty" method (tests/fault_methods.py)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from small_splits import fresh_out

from benchmark.cli import main
from benchmark.records import load_records

ROOT = Path(__file__).resolve().parents[1]
# Only a bound that keeps a broken test from hanging; nothing is asserted about durations.
PATIENCE_S = 240


def start(args: list[str], cwd: Path, preexec_fn=None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_cli.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def wait_for(marker: Path, process: subprocess.Popen) -> None:
    """Wait until `process` has written `marker` (it is then inside the job's fit)."""
    deadline = time.monotonic() + PATIENCE_S
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run never reached {marker.name}: {process.communicate()[1]}")
        time.sleep(0.05)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=PATIENCE_S)
    return process.returncode, err


def run_args(out: Path, classes: str, markers: Path, fault: str = "wait") -> list[str]:
    return ["run", "--method", "faulty", "--classes", classes, "--out", str(out), "--device", "cpu",
            "--set", f"fault={fault}", "--set", "fault_split=1", "--set", f"markers={markers}"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ndbench:")]


def files_under(out: Path) -> list[str]:
    runs = out / "runs"
    return sorted(p.name for p in runs.rglob("*") if p.is_file()) if runs.exists() else []


def stop_and_check(process: subprocess.Popen, signum: int, finished: int, total: int) -> None:
    """Send `signum`; the run must exit 128 + signum with the one interrupt line, no traceback."""
    process.send_signal(signum)
    code, err = finish(process)
    assert code == 128 + signum
    name = signal.Signals(signum).name
    assert error_lines(err) == [f"ndbench: interrupted by {name}: {finished} of {total} jobs finished and their "
                                "records are kept; run the same command again to resume"], err
    assert "Traceback" not in err


@pytest.fixture
def markers(tmp_path) -> Path:
    folder = tmp_path / "markers"
    folder.mkdir()
    return folder


@pytest.mark.slow
def test_two_runs_on_one_results_folder_never_run_a_job_twice(splits_root, tmp_path, markers, faulty, capsys):
    """The first run is a child process, the second this test's own process."""
    out = fresh_out(splits_root, tmp_path)
    first = start(run_args(out, "0,1", markers), tmp_path)
    wait_for(markers / "started-1", first)  # the first run is inside job 1, holding its lock
    code = main(run_args(out, "1,2", markers))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "1 jobs ran, 0 skipped (record exists; --force re-runs), 0 failed, 1 running elsewhere" in err
    elsewhere = [line for line in error_lines(err) if "running elsewhere" in line]
    assert len(elsewhere) == 1 and f"pid {first.pid}" in elsewhere[0] and "uni-class/1" in elsewhere[0], err
    (markers / "release").touch()
    code, err = finish(first)
    assert code == 0, err
    fits = Counter(line.split()[0] for line in (markers / "fits.log").read_text().splitlines())
    assert fits == {"0": 1, "1": 1, "2": 1}
    assert [r.split for r in load_records(out)] == ["0", "1", "2"]
    assert not [name for name in files_under(out) if name.endswith((".lock", ".tmp"))]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_mid_job_stops_cleanly_and_a_rerun_resumes(splits_root, tmp_path, markers, faulty, capsys,
                                                                 signum):
    out = fresh_out(splits_root, tmp_path)
    args = run_args(out, "0,1", markers)
    process = start(args, tmp_path)
    wait_for(markers / "started-1", process)  # job 0 finished, job 1 is in fit
    stop_and_check(process, signum, finished=1, total=2)
    kept = files_under(out)
    assert len(kept) == 2 and all(n.startswith("0__") for n in kept), kept  # job 0's record + scores only
    (markers / "release").touch()
    assert main(args) == 0
    assert "1 jobs ran, 1 skipped" in capsys.readouterr().err
    assert [r.split for r in load_records(out)] == ["0", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_of_a_parallel_run_stops_its_workers_cleanly(splits_root, tmp_path, markers, faulty, capsys,
                                                                   signum):
    """The signal goes to the parent alone (as `kill PID` sends it); it stops the workers."""
    out = fresh_out(splits_root, tmp_path)
    args = [*run_args(out, "0,1,2", markers), "--parallel", "2"]
    process = start(args, tmp_path)
    wait_for(markers / "started-1", process)  # one worker blocks in job 1; the other runs jobs 0 and 2
    deadline = time.monotonic() + PATIENCE_S
    while len([n for n in files_under(out) if n.endswith(".json")]) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.05)
    workers = [int(pid) for split, pid in (line.split() for line in (markers / "fits.log").read_text().splitlines())]
    stop_and_check(process, signum, finished=2, total=3)
    assert not [n for n in files_under(out) if n.endswith((".lock", ".tmp"))]
    for pid in set(workers):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    (markers / "release").touch()
    assert main(args) == 0
    assert "1 jobs ran, 2 skipped" in capsys.readouterr().err


@pytest.mark.slow
def test_workers_of_a_killed_parallel_run_finish_their_job_then_end(splits_root, tmp_path, markers, faulty):
    """kill -9 (or an out-of-memory kill) of the parent: its workers finish and record the job
    in hand, then end instead of waiting for the dead parent's next job forever."""
    out = fresh_out(splits_root, tmp_path)
    process = start([*run_args(out, "0,1,2", markers), "--parallel", "2"], tmp_path)
    wait_for(markers / "started-1", process)  # one worker waits in job 1; the other runs jobs 0 and 2
    deadline = time.monotonic() + PATIENCE_S
    while len([n for n in files_under(out) if n.endswith(".json")]) < 2:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.05)
    workers = {int(pid) for _, pid in (line.split() for line in (markers / "fits.log").read_text().splitlines())}
    process.kill()
    process.wait()  # its output pipes stay open, as a terminal would
    (markers / "release").touch()
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {sorted(workers)} outlived their parent"
        time.sleep(0.1)
    process.communicate()
    assert [r.split for r in load_records(out)] == ["0", "1", "2"]  # job 1 was finished and kept
    assert not [n for n in files_under(out) if n.endswith((".lock", ".tmp"))]


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


def limit_file_size(limit: int):
    """preexec_fn: files may not grow past `limit` bytes; writing more raises OSError EFBIG
    (SIGXFSZ, which would kill the process instead, is ignored)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_disk_during_a_record_write_is_one_line_and_leaves_nothing(splits_root, tmp_path, markers):
    out = fresh_out(splits_root, tmp_path)
    process = start(run_args(out, "0", markers, fault="none"), tmp_path, preexec_fn=limit_file_size(4096))
    code, err = finish(process)
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "cannot write" in lines[0] and "File too large" in lines[0], err
    assert "free disk space" in lines[0] and "Traceback" not in err
    assert files_under(out) == []  # no record, no scores, no temporary file, no lock


@pytest.mark.slow
def test_a_full_disk_during_split_building_is_one_line_and_leaves_nothing(splits_root, tmp_path):
    scenes = json.loads((splits_root / "embedded" / "index.json").read_text())["root"]
    out = tmp_path / "splits"
    process = start(["build-splits", "embedded", "--root", scenes, "--out", str(out)], tmp_path,
                    preexec_fn=limit_file_size(4096))
    code, err = finish(process)
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and "index.csv" in lines[0] and "File too large" in lines[0], err
    assert [p for p in out.rglob("*") if p.is_file()] == []
