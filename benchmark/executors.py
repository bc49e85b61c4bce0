"""Executors map `run_job` over jobs: in this process (`local`) or over a Ray cluster (`ray`).

Both print each result's warning lines as it arrives, stop at once on a write failure (disk
full: every later job would fail too) and, when interrupted, add to the `Interrupted` how many
jobs had finished. On Ray a job whose worker process died fails alone (or is retried).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console

from datasets_builders.errors import NdbenchError, WriteFailure

from .interrupts import Interrupted, signals_raise_keyboard_interrupt
from .parallel import WorkerPool, run_parallel
from .runner import (
    FAILED,
    Job,
    JobResult,
    RunOptions,
    SplitReader,
    interrupted_after,
    job_progress,
    prepare,
    print_notes,
    safe_run_job,
)

EXECUTORS = ("local", "ray")
# Seconds a cancelled Ray job gets to remove its lock and temporary files after an interrupt.
RAY_CANCEL_GRACE_S = 10.0


def run_local(jobs: list[Job], options: RunOptions, console: Console | None = None,
              on_result: Callable[[JobResult], None] | None = None,
              splits: SplitReader | None = None) -> list[JobResult]:
    """Run jobs one after another in this process, with progress bars (each index and split
    manifest read once for them all, by `splits` when given)."""
    results = []
    splits = splits or SplitReader(options.splits)
    progress = job_progress(console) if options.progress else None
    if progress is not None:
        progress.start()
    try:
        task = progress.add_task("jobs", total=len(jobs)) if progress else None
        for job in jobs:
            if progress is not None:
                progress.update(task, description=f"jobs: {job.describe()}")
            result = safe_run_job(job, options, progress, splits=splits)
            results.append(result)
            print_notes(result, progress, console)
            if on_result:
                on_result(result)
            if progress is not None:
                progress.advance(task)
    except Interrupted as exc:
        raise interrupted_after(exc, results, len(jobs)) from None
    finally:
        if progress is not None:
            progress.stop()
    return results


@dataclass(frozen=True)
class RayResources:
    """What each Ray task reserves; None picks by cluster: with GPUs, one GPU and the CPUs that
    come with it (cluster CPUs / GPUs); without, one CPU. Fractions pack small jobs on a GPU."""

    cpus_per_job: float | None = None
    gpus_per_job: float | None = None

    def __post_init__(self) -> None:
        if self.cpus_per_job is not None and self.cpus_per_job <= 0:
            raise NdbenchError(f"--ray-cpus-per-job {self.cpus_per_job} is not positive", "give e.g. 1 or 0.5")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            raise NdbenchError(f"--ray-gpus-per-job {self.gpus_per_job} is negative", "give e.g. 1, 0.25 or 0")

    def resolve(self, cluster: dict) -> tuple[float, float]:
        """(CPUs, GPUs) per task on a cluster with resources `cluster`."""
        gpus_total, cpus_total = cluster.get("GPU", 0), cluster.get("CPU", 1)
        gpus = self.gpus_per_job if self.gpus_per_job is not None else (1.0 if gpus_total else 0.0)
        if self.cpus_per_job is not None:
            cpus = self.cpus_per_job
        elif gpus_total and gpus:
            cpus = max(1.0, float(int(cpus_total / (gpus_total / gpus))))
        else:
            cpus = 1.0
        if gpus > gpus_total:
            raise NdbenchError(f"each job asks for {gpus:g} GPUs but the Ray cluster has {gpus_total:g}",
                               "lower --ray-gpus-per-job (fractions such as 0.5 share a GPU)")
        if cpus > cpus_total:
            raise NdbenchError(f"each job asks for {cpus:g} CPUs but the Ray cluster has {cpus_total:g}",
                               "lower --ray-cpus-per-job")
        return cpus, gpus


def task_threads(cpus: float) -> int:
    """Torch threads of a task that reserved `cpus` CPUs: as many as it reserved, at least one
    (more would make tasks sharing a node slow each other down)."""
    return max(1, int(cpus))


def _ray_task(job: Job, options: RunOptions, cpus: float) -> JobResult:
    import torch

    threads = task_threads(cpus)
    torch.set_num_threads(threads)
    return safe_run_job(job, options, None, cpus=threads)


def _ray_result(ray, ref, job: Job) -> JobResult:
    """The result of a finished Ray job; a dead worker or lost node makes a failed result, a
    write failure is raised."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, WriteFailure):
            raise exc.cause from None
        return JobResult(job, FAILED, error=f"{type(exc.cause).__name__}: {exc.cause}")
    except ray.exceptions.RayError as exc:  # the worker process died, its node was lost, ...
        return JobResult(job, FAILED, error=f"the Ray worker running it died ({type(exc).__name__}); run the "
                         "same command again to re-run it, or pass --retries 1")


def run_ray(jobs: list[Job], options: RunOptions, address: str | None = None,
            console: Console | None = None,
            on_result: Callable[[JobResult], None] | None = None,
            resources: RayResources = RayResources()) -> list[JobResult]:
    """Fan jobs out over a Ray cluster, each task reserving `resources` (by default one job per
    GPU when the cluster has GPUs, else one per CPU) and running torch on as many threads as
    CPUs it reserved. Every node needs ndbench installed and the results folder shared; the
    image store and feature cache are per node, shared by its tasks."""
    try:
        import ray
    except ImportError as exc:
        raise NdbenchError("--executor ray needs Ray", 'install it with pip install "ndbench[ray]"') from exc
    started_here = not ray.is_initialized()
    if started_here:
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise NdbenchError(f"cannot reach the Ray cluster at {address}: {exc}",
                               "check --ray-address (or omit it to start a local Ray)") from exc
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # ray.init installs a plain exit; keep the clean stop
    pending: dict = {}
    results: dict[Job, JobResult] = {}
    # Ray's blocking calls only stop cleanly for KeyboardInterrupt, so signals raise that here.
    with signals_raise_keyboard_interrupt() as received:
        try:
            cluster = ray.cluster_resources()
            gpus = cluster.get("GPU", 0)
            cpus_per_job, gpus_per_job = resources.resolve(cluster)
            # max_retries: Ray runs a job again when its worker process dies.
            remote = ray.remote(num_gpus=gpus_per_job, num_cpus=cpus_per_job,
                                max_retries=options.retries)(_ray_task)
            pending = {remote.remote(job, options, cpus_per_job): job for job in jobs}
            progress = job_progress(console) if options.progress else None
            if progress is not None:
                progress.start()
            try:
                task = progress.add_task(f"jobs on ray ({int(gpus)} GPUs)", total=len(jobs)) if progress else None
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        job = pending.pop(ref)
                        result = _ray_result(ray, ref, job)
                        results[job] = result
                        print_notes(result, progress, console)
                        if on_result:
                            on_result(result)
                        if progress is not None:
                            progress.advance(task)
            finally:
                if progress is not None:
                    progress.stop()
            return [results[job] for job in jobs]
        except (KeyboardInterrupt, Interrupted) as exc:
            late = _cancel(ray, pending)
            signum = exc.signum if isinstance(exc, Interrupted) else received[-1] if received else signal.SIGINT
            raise interrupted_after(Interrupted(signum), [*results.values(), *late], len(jobs)) from None
        except WriteFailure:
            _cancel(ray, pending)
            raise
        finally:
            if started_here:
                ray.shutdown()


def _cancel(ray, pending: dict) -> list[JobResult]:
    """Cancel unfinished Ray jobs and give them a moment to remove their locks and temporary
    files (a cancelled job gets a KeyboardInterrupt, so its `finally` blocks run). Returns the
    results of jobs that finished all the same."""
    for ref in pending:
        ray.cancel(ref)
    if not pending:
        return []
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=RAY_CANCEL_GRACE_S)
    finished = []
    for ref in ready:
        try:
            finished.append(ray.get(ref, timeout=0))
        except Exception:  # noqa: BLE001 - cancelled or failed: not finished
            pass
    return finished


def execute(jobs: list[Job], options: RunOptions, executor: str = "local", ray_address: str | None = None,
            console: Console | None = None,
            on_result: Callable[[JobResult], None] | None = None,
            resources: RayResources = RayResources(), parallel: int = 1,
            pool: WorkerPool | None = None, splits: SplitReader | None = None) -> list[JobResult]:
    """Prepare shared work once, then run the jobs with the chosen executor; `local` runs
    `parallel` jobs at a time (in worker processes when more than one: those of `pool`, when
    started early by `parallel.early_workers`), one at a time reading indexes and manifests
    with `splits` when given (workers and Ray tasks read their own)."""
    if executor not in EXECUTORS:
        raise NdbenchError(f"unknown executor {executor!r}", "use local or ray")
    try:
        if executor == "local" and parallel > 1 and len(jobs) > 1:
            return run_parallel(jobs, options, parallel, console, on_result,
                                before=lambda: prepare(jobs, options, splits), pool=pool)
        prepare(jobs, options, splits)
        if executor == "ray":
            return run_ray(jobs, options, ray_address, console, on_result, resources)
        return run_local(jobs, options, console, on_result, splits)
    except Interrupted as exc:
        exc.forced = options.force  # the same command would run every job again, not resume
        raise
