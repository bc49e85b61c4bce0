"""Executors map `run_job` over jobs: in this process (`local`) or over a Ray cluster (`ray`)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console

from datasets_builders.errors import NdbenchError

from .runner import Job, JobResult, RunOptions, job_progress, prepare, safe_run_job

EXECUTORS = ("local", "ray")


def run_local(jobs: list[Job], options: RunOptions, console: Console | None = None,
              on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Run jobs one after another in this process, with progress bars."""
    results = []
    progress = job_progress(console) if options.progress else None
    if progress is not None:
        progress.start()
    try:
        task = progress.add_task("jobs", total=len(jobs)) if progress else None
        for job in jobs:
            if progress is not None:
                progress.update(task, description=f"jobs: {job.describe()}")
            result = safe_run_job(job, options, progress)
            results.append(result)
            if on_result:
                on_result(result)
            if progress is not None:
                progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return results


def _ray_task(job: Job, options: RunOptions) -> JobResult:
    return safe_run_job(job, options, None)


def run_ray(jobs: list[Job], options: RunOptions, address: str | None = None,
            console: Console | None = None,
            on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Fan jobs out over a Ray cluster: one job per GPU when the cluster has GPUs, else one
    per CPU slot. Every node needs ndbench installed and the results folder shared."""
    try:
        import ray
    except ImportError as exc:
        raise NdbenchError("--executor ray needs Ray", 'install it with pip install "ndbench[ray]"') from exc
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise NdbenchError(f"cannot reach the Ray cluster at {address}: {exc}",
                               "check --ray-address (or omit it to start a local Ray)") from exc
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_ray_task)
        pending = {remote.remote(job, options): job for job in jobs}
        results: dict[Job, JobResult] = {}
        progress = job_progress(console) if options.progress else None
        if progress is not None:
            progress.start()
        try:
            task = progress.add_task(f"jobs on ray ({int(gpus)} GPUs)", total=len(jobs)) if progress else None
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    job = pending.pop(ref)
                    result = ray.get(ref)
                    results[job] = result
                    if on_result:
                        on_result(result)
                    if progress is not None:
                        progress.advance(task)
        finally:
            if progress is not None:
                progress.stop()
        return [results[job] for job in jobs]
    finally:
        if started_here:
            ray.shutdown()


def execute(jobs: list[Job], options: RunOptions, executor: str = "local", ray_address: str | None = None,
            console: Console | None = None,
            on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Prepare shared work once, then run the jobs with the chosen executor."""
    if executor not in EXECUTORS:
        raise NdbenchError(f"unknown executor {executor!r}", "use local or ray")
    prepare(jobs, options)
    if executor == "ray":
        return run_ray(jobs, options, ray_address, console, on_result)
    return run_local(jobs, options, console, on_result)
