"""Jobs side by side in worker processes on one machine (`--parallel N`).

Small models do not keep several CPU threads busy: on 2 cores, two one-thread jobs at once ran
the embedded demo's 40 jobs in 299 s against ~352 s one two-thread job at a time (warm cache).
Each worker process
runs one job at a time on `cpus // N` torch threads and no DataLoader workers of its own; the
parent keeps the job progress bar and prints each result as it arrives. Jobs whose records
exist are skipped in the parent, and no more workers start than jobs left to run: none when
every job is recorded.

Stopping: workers ignore SIGINT (a Ctrl-C reaches the whole process group) and the parent
sends each of them one SIGTERM, so every running job gets exactly one `Interrupted` and its
`finally` blocks remove its lock and temporary files. A worker process that dies (killed, out
of memory) fails the jobs it and its siblings were running, or tries them again with
`--retries`; the other jobs go on in a fresh pool.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from rich.console import Console

from datasets_builders.errors import NdbenchError, WriteFailure
from methods.base import resolve_device
from methods.registry import REGISTRY
from methods.runtime import available_cpus

from .interrupts import Interrupted
from .runner import (
    DONE,
    FAILED,
    Job,
    JobResult,
    RunOptions,
    build_detector,
    finished_record,
    index_built,
    interrupted_after,
    job_progress,
    job_record_path,
    print_notes,
    recorded_result,
    safe_run_job,
)

# Seconds stopped workers get to remove their locks and temporary files before they are killed.
STOP_GRACE_S = 10.0
# How often an idle worker checks that its parent is alive.
ORPHAN_POLL_S = 1.0
# Memory a worker process may peak at on CPU (the demo's uni-class workers peaked at 1.2 and
# 1.6 GB): `auto` starts no more workers than the available memory holds at this much each.
WORKER_MEMORY_BYTES = 2 * 2**30


def auto_parallel(device: str, jobs: int, cpus: int | None = None, memory: int | None = None) -> int:
    """Jobs to run at once for `--parallel auto`: one per CPU (each on one thread: small models
    gain more from this than from more threads per job), no more than the jobs, nor than the
    available memory holds; one on CUDA, where one job keeps the device busy."""
    if resolve_device(device).type != "cpu":
        return 1
    cpus = available_cpus() if cpus is None else cpus
    memory = available_memory() if memory is None else memory
    return max(1, min(cpus, jobs, memory // WORKER_MEMORY_BYTES))


def available_memory() -> int:
    """Bytes of memory available to new processes (MemAvailable), or a large number when unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def parse_parallel(value: str) -> int | None:
    """`--parallel`: a positive number, or None for `auto` (see `auto_parallel`)."""
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise NdbenchError(f"--parallel {value} is not a positive number or auto", "use e.g. --parallel 2 or auto")
    return number


def jobs_at_once(parallel: int | None, device: str, jobs: int) -> int:
    """The jobs to run at once: `parallel` (no more than there are jobs), or `auto_parallel` for None."""
    return auto_parallel(device, jobs) if parallel is None else max(1, min(parallel, jobs))


def start_order(jobs: list[Job], options: RunOptions) -> list[int]:
    """Job numbers in the order to start them: each method's first job first (it computes the
    frozen outputs that the method's other jobs then read from the feature cache, so two
    workers do not compute them at once), then the others; each group the costliest first by
    the methods' trained passes per image (so the run does not end waiting on one long job)."""
    device = resolve_device(options.device)
    # Passes per image follow the method's configuration and the dataset, not the split or the
    # seed: one cost model per configuration (building one may build the backbone, ~0.1 s).
    by_config: dict[Job, float] = {}
    cost = []
    for job in jobs:
        key = replace(job, split="", seed=0)
        if key not in by_config:
            model = build_detector(job, options).cost_model(device, job.split_id)
            by_config[key] = 0.0 if model is None else model.trained_per_train_image + model.trained_per_test_image
        cost.append(by_config[key])
    firsts: dict[str, int] = {}
    for number, job in enumerate(jobs):
        firsts.setdefault(job.method, number)
    leads = sorted(firsts.values(), key=lambda number: -cost[number])
    rest = sorted(set(range(len(jobs))) - set(leads), key=lambda number: (-cost[number], number))
    return leads + rest


# Set while a worker process runs a job. The worker's own state, shared by its orphan
# watchdog (started by the pool's initializer) and the job tasks the pool sends it.
_IN_JOB = threading.Event()


def _worker_started(threads: int, methods: dict[str, type]) -> None:
    """Set up a worker process: its torch threads, the parent's registered methods (those
    registered at run time too, not only the built-in and entry-point ones), SIGINT ignored
    (the parent forwards a stop as one SIGTERM; an idle worker just ends on it) and a
    watchdog that ends it once the parent has died."""
    import torch

    torch.set_num_threads(threads)
    for name, cls in methods.items():
        REGISTRY.register(name)(cls)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), name="ndbench-orphan-watchdog",
                     daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """End this worker once its parent has died (kill -9, out of memory), after the job in
    hand has finished and written its record: nothing else would, and it would wait for
    the dead parent's next job forever, holding its memory."""
    while True:
        time.sleep(ORPHAN_POLL_S)
        if os.getppid() != parent and not _IN_JOB.is_set():
            os._exit(0)


def _stop_job(signum: int, frame) -> None:
    # Once only: a second SIGTERM (a service manager's and the parent's) must not break the
    # clean-up the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def _run_in_worker(job: Job, options: RunOptions, threads: int) -> JobResult:
    signal.signal(signal.SIGTERM, _stop_job)
    _IN_JOB.set()
    try:
        return safe_run_job(job, options, None, cpus=threads)
    finally:
        _IN_JOB.clear()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _ready() -> None:
    """A task that only makes the pool start a worker."""


@dataclass
class WorkerPool:
    """A process pool of `size` workers on `threads` torch threads each, and the jobs (by
    number) it is running."""

    size: int
    threads: int
    executor: ProcessPoolExecutor = field(init=False)
    running: dict[Future, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        REGISTRY.load()
        self.executor = ProcessPoolExecutor(self.size, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_started,
                                            initargs=(self.threads, dict(REGISTRY.classes)))

    def start(self) -> None:
        """Start every worker now (each imports torch for seconds), not at its first job."""
        for _ in range(self.size):
            self.executor.submit(_ready)

    def submit(self, number: int, job: Job, options: RunOptions) -> None:
        self.running[self.executor.submit(_run_in_worker, job, options, self.threads)] = number

    def processes(self) -> list[multiprocessing.Process]:
        """The worker processes started so far."""
        # The executor has no public way to list or signal its workers (Python 3.14 adds one).
        return list((getattr(self.executor, "_processes", None) or {}).values())

    def stop(self) -> list[JobResult]:
        """Stop every worker (one SIGTERM each), wait for them, and return the results of
        jobs that finished meanwhile."""
        processes = self.processes()
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        done, _ = wait(self.running, timeout=STOP_GRACE_S)
        for process in processes:
            process.join(timeout=STOP_GRACE_S)
            if process.is_alive():
                process.kill()
        return [f.result() for f in done if not f.cancelled() and f.exception() is None]


def new_pool(parallel: int, workers: int | None = None) -> WorkerPool:
    """A pool of `workers` (default `parallel`) worker processes, each on `cpus // parallel`
    torch threads, started now."""
    pool = WorkerPool(parallel if workers is None else workers, max(1, available_cpus() // parallel))
    pool.start()
    return pool


@contextmanager
def early_workers(parallel: int, options: RunOptions, dataset: str) -> Iterator[WorkerPool | None]:
    """Worker processes started before the jobs are known, for `run_parallel` to use, while the
    dataset's index is not built yet: each spends seconds importing torch, which overlaps
    building it (generating the embedded scenes: ~13 s on one core, the other one idle). None
    once it is built (the jobs are then known in moments, and `run_parallel` starts workers
    only for those not recorded yet), and for one job at a time. The pool is stopped on leaving."""
    pool = new_pool(parallel) if parallel > 1 and not index_built(dataset, options) else None
    try:
        yield pool
    except BaseException:
        if pool is not None:
            pool.stop()
        raise
    finally:
        if pool is not None:
            pool.executor.shutdown(wait=True)


def recorded_jobs(jobs: list[Job], options: RunOptions, numbers: Iterable[int]) -> dict[int, JobResult]:
    """Of the jobs numbered `numbers`, those `run_job` would skip now (see `recorded_result`), by
    number. A job whose check fails is left out: its worker meets the failure and reports it."""
    found = {}
    for number in numbers:
        try:
            result = recorded_result(jobs[number], options)
        except Exception:  # noqa: BLE001 - left to the job's worker, which reports it
            continue
        if result is not None:
            found[number] = result
    return found


def _split_built(job: Job, options: RunOptions) -> bool:
    """Whether the job's split and its dataset's index are built: `prepare` then leaves them
    as they are (it builds only what is missing)."""
    split = options.splits / job.dataset / job.setting / f"{job.split}.json"
    return index_built(job.dataset, options) and split.is_file()


def _sized(pool: WorkerPool | None, parallel: int, jobs: int) -> WorkerPool | None:
    """A pool of as many workers as `parallel` and `jobs` allow (None for no jobs): `pool` when
    it has that many, else a new one, `pool` stopped."""
    size = min(parallel, jobs)
    if pool is not None and pool.size != size:
        pool.stop()
        pool = None
    return new_pool(parallel, size) if pool is None and size else pool


def run_parallel(jobs: list[Job], options: RunOptions, parallel: int, console: Console | None = None,
                 on_result: Callable[[JobResult], None] | None = None,
                 before: Callable[[], None] = lambda: None, pool: WorkerPool | None = None) -> list[JobResult]:
    """Run jobs `parallel` at a time in worker processes, each on `cpus // parallel` torch
    threads; return their results in job order. The jobs `run_job` would skip (their records
    exist) are skipped here, and no more workers run than the other jobs: none when every job
    is recorded. `before` runs in this process (the run's shared preparation) while the workers
    start: those of `pool` when given (one from `early_workers`; stopped, or replaced by a
    smaller one, when fewer jobs need to run)."""
    results: dict[int, JobResult] = {}
    tries = [0] * len(jobs)
    submitted = [0.0] * len(jobs)
    try:
        # Jobs on splits `before` leaves as they are can be told recorded or not before it runs.
        known = [number for number, job in enumerate(jobs) if _split_built(job, options)]
        results.update(recorded_jobs(jobs, options, known))
        if pool is None and len(results) < len(jobs):
            pool = new_pool(parallel, min(parallel, len(jobs) - len(results)))
        before()
        results.update(recorded_jobs(jobs, options, sorted(set(range(len(jobs))) - set(known))))
        pending = [number for number in range(len(jobs)) if number not in results]
        pool = _sized(pool, parallel, len(pending))
        waiting = [pending[number] for number in start_order([jobs[number] for number in pending], options)]
    except BaseException:
        if pool is not None:
            pool.stop()
        raise
    progress = job_progress(console) if options.progress else None
    if progress is not None:
        progress.start()
    try:
        task = progress.add_task(_progress_label(pool), total=len(jobs)) if progress else None

        def report(result: JobResult) -> None:
            print_notes(result, progress, console)
            if on_result:
                on_result(result)
            if progress is not None:
                progress.advance(task)

        def settle(future: Future) -> bool:
            """Take a finished job's result, or queue it again after its worker died when
            retries are left; True when its pool broke."""
            number = pool.running.pop(future)
            try:
                result = future.result()
            except BrokenProcessPool:
                result = _written_before_break(jobs[number], options, submitted[number])
                if result is None and tries[number] <= options.retries:
                    waiting.insert(0, number)
                    return True
                result = result or _died(jobs[number], tries[number])
                results[number] = result
                report(result)
                return True
            results[number] = result
            report(result)
            return False

        for number in sorted(results):
            report(results[number])
        while pool is not None and (waiting or pool.running):
            while waiting and len(pool.running) < pool.size:
                number = waiting.pop(0)
                tries[number] += 1
                submitted[number] = time.time()
                pool.submit(number, jobs[number], options)
            done, _ = wait(pool.running, timeout=0.5, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                broken |= settle(future)
            if broken:  # a fresh pool for the jobs still to run
                pool.executor.shutdown(wait=True)
                # The broken pool fails its other jobs too, possibly after `wait` returned.
                for future in list(pool.running):
                    settle(future)
                pool = WorkerPool(min(pool.size, max(1, len(waiting))), pool.threads)
        return [results[number] for number in range(len(jobs))]
    except (Interrupted, KeyboardInterrupt) as exc:
        late = pool.stop() if pool is not None else []
        stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        raise interrupted_after(stop, [*results.values(), *late], len(jobs)) from None
    except WriteFailure:
        if pool is not None:
            pool.stop()
        raise
    finally:
        if progress is not None:
            progress.stop()
        if pool is not None:
            pool.executor.shutdown(wait=True)


def _progress_label(pool: WorkerPool | None) -> str:
    """The job bar's label: the jobs run at once and each one's threads (none run: every job is recorded)."""
    if pool is None:
        return "jobs"
    return f"jobs ({pool.size} at once, {pool.threads} thread{'s' * (pool.threads > 1)} each)"


def _written_before_break(job: Job, options: RunOptions, since: float) -> JobResult | None:
    """The job as done when its worker wrote its record (after `since`, the time it was
    submitted) before the pool broke: a sibling worker's death fails every running future,
    finished or not, and a retry would report such a job as skipped."""
    path = job_record_path(job, options)
    record, _ = finished_record(path)
    if record is None or path.stat().st_mtime < since:
        return None
    return JobResult(job, DONE, path, record.metrics["auroc"])


def _died(job: Job, tries: int) -> JobResult:
    note = f" (tried {tries} times)" if tries > 1 else ""
    return JobResult(job, FAILED, error=f"the worker process running it died (killed, out of memory?){note}; "
                     "run the same command again to re-run it, or pass --retries 1")
