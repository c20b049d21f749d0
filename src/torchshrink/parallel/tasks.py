"""Task parallelism: many pipeline runs (recipes) side by side in worker processes.

Each task is one recipe with its own output folder. ``jobs`` worker processes (spawned, so no state
is shared) take tasks in turn; each worker gives torch ``threads`` threads, by default the cores
divided by the jobs, so two jobs on two cores do not oversubscribe them. A task that fails
(bad input, an exception) is recorded with its error and does not stop the others; a worker process
that dies outright (killed, out of memory) breaks the pool, and the tasks not finished by then are
reported as failed with "worker died". Latencies measured inside parallel tasks
share the machine with the other tasks: compare models by accuracy and size there, time them alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from torchshrink.errors import TorchshrinkError

log = logging.getLogger(__name__)

__all__ = ["Task", "TaskResult", "run_tasks", "default_threads", "summary_table"]


@dataclass(frozen=True)
class Task:
    """One pipeline run: a recipe (file or mapping) and the folder it writes."""

    recipe: str | Path | dict[str, Any]
    out_dir: Path
    resume: bool = False

    @property
    def name(self) -> str:
        return self.out_dir.name


@dataclass
class TaskResult:
    """How one task ended: its final metrics and baseline, or the error that stopped it."""

    name: str
    out_dir: str
    ok: bool
    seconds: float
    final: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_threads(jobs: int) -> int:
    """Torch threads per worker: the cores shared out among the jobs (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(jobs, 1))


def _start_worker(threads: int) -> None:
    """Worker set-up: a fixed thread count, and no progress bars interleaving on the terminal."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["TORCHSHRINK_PROGRESS"] = "0"  # the training loop's bars
    os.environ["TQDM_DISABLE"] = "1"  # every other bar
    import torch

    torch.set_num_threads(threads)


Runner = Callable[..., Any]
"""``runner(recipe, out_dir, resume=...)`` -> a report with ``final`` and ``baseline`` metrics
(``torchshrink.pipeline.run``); module-level, so a spawned worker can import it."""


def _run_task(task: Task, run: Runner) -> TaskResult:
    started = time.perf_counter()
    try:
        report = run(task.recipe, task.out_dir, resume=task.resume)
    except TorchshrinkError as exc:  # bad input: the message says what to fix
        return TaskResult(task.name, str(task.out_dir), False, time.perf_counter() - started, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one task's crash must not take the others down
        tail = "".join(traceback.format_exception(exc)[-3:]).strip()
        return TaskResult(
            task.name,
            str(task.out_dir),
            False,
            time.perf_counter() - started,
            error=f"{type(exc).__name__}: {tail}",
        )
    return TaskResult(
        task.name,
        str(task.out_dir),
        True,
        time.perf_counter() - started,
        final=dict(report.final),
        baseline=dict(report.baseline),
    )


def run_tasks(
    tasks: Sequence[Task], run: Runner, jobs: int = 2, threads: int | None = None
) -> list[TaskResult]:
    """Run each task through ``run`` (the pipeline) in ``jobs`` worker processes; results come back
    in the order of ``tasks``."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    names = [t.out_dir.resolve() for t in tasks]
    if len(set(names)) != len(names):
        clash = sorted({str(n) for n in names if names.count(n) > 1})
        raise ValueError(f"two tasks would write the same folder: {clash}")
    threads = threads or default_threads(jobs)
    results: list[TaskResult | None] = [None] * len(tasks)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(tasks)) or 1,
        mp_context=context,
        initializer=_start_worker,
        initargs=(threads,),
    ) as pool:
        futures = {pool.submit(_run_task, task, run): i for i, task in enumerate(tasks)}
        for future in tqdm(as_completed(futures), total=len(futures), desc="tasks", leave=False):
            i = futures[future]
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 - the worker process itself died (e.g. out of memory)
                done = TaskResult(
                    tasks[i].name, str(tasks[i].out_dir), False, 0.0, error=f"worker died: {exc!r}"
                )
            results[i] = done
            log.info(
                "%s: %s in %.0fs", done.name, "done" if done.ok else f"failed: {done.error}", done.seconds
            )
    return [r for r in results if r is not None]


def summary_table(results: Sequence[TaskResult]) -> str:
    """A Markdown table of the tasks: status, final accuracy, size and compute against their baselines."""
    from torchshrink.tables import markdown_table

    rows = []
    for r in results:
        if not r.ok or not r.final:
            rows.append([r.name, "failed", "-", "-", "-", f"{r.seconds:.0f}", r.error or ""])
            continue
        base, final = r.baseline or {}, r.final
        size = f"{final.get('size_bytes', 0) / 1000:,.1f} kB"
        smaller = base.get("size_bytes", 0) / final["size_bytes"] if final.get("size_bytes") else float("nan")
        rows.append([r.name, "ok", f"{final.get('accuracy', float('nan')) * 100:.2f}%", size, f"{smaller:.2f}x",
                     f"{r.seconds:.0f}", ""])  # fmt: skip
    return markdown_table(["task", "status", "accuracy", "size", "smaller", "seconds", "error"], rows)
