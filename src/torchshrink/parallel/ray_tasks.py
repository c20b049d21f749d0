"""Task parallelism beyond one machine: the sweep's tasks as Ray tasks (optional extra ``[ray]``).

Each task runs the same function as in the local process pool (:func:`tasks.run_task`) inside a
Ray worker that asks for ``threads`` CPUs, so the results and the summary are the same. Without an
``address`` a local Ray instance is started with the cores this machine has (no dashboard, nothing
reached outside it); with one (``ray://host:10001`` or ``auto``) the tasks go to that cluster, whose
nodes must have torchshrink installed and see the recipe files and the output folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torchshrink.errors import TorchshrinkError
from torchshrink.parallel.tasks import Runner, Task, TaskResult, default_threads, run_task, start_worker

log = logging.getLogger(__name__)

__all__ = ["MissingExtraError", "run_tasks_on_ray"]


class MissingExtraError(TorchshrinkError, ImportError):
    """An optional extra a feature needs is not installed: names the ``pip install`` line."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError(
            "--backend ray needs Ray: pip install 'torchshrink[ray]' (or use the default local process pool)"
        ) from None
    return ray


def _in_ray_worker(task: Task, run: Runner, threads: int) -> TaskResult:
    start_worker(threads)
    return run_task(task, run)


def run_tasks_on_ray(
    tasks: Sequence[Task],
    run: Runner,
    jobs: int = 2,
    threads: int | None = None,
    address: str | None = None,
) -> list[TaskResult]:
    """Run each task through ``run`` as a Ray task with ``threads`` CPUs (local: ``jobs`` at a time);
    results in the order of ``tasks``. A task whose worker dies fails alone."""
    ray = _import_ray()
    threads = threads or default_threads(jobs)
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            ray.init(
                num_cpus=jobs * threads,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                runtime_env={"env_vars": {"TORCHSHRINK_PROGRESS": "0", "TQDM_DISABLE": "1"}},
            )
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        remote = ray.remote(num_cpus=threads, max_retries=0)(_in_ray_worker)
        refs = [remote.remote(task, run, threads) for task in tasks]
        results = []
        for task, ref in zip(tasks, refs, strict=True):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:  # the worker died or the task could not run
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                results.append(
                    TaskResult(
                        task.name, str(task.out_dir), False, 0.0, error=f"Ray: {type(exc).__name__}: {first}"
                    )
                )
            log.info("%s: %s", task.name, "done" if results[-1].ok else f"failed: {results[-1].error}")
        return results
    finally:
        if started_here:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
