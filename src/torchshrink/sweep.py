"""Several recipes side by side: ``torchshrink sweep`` and :func:`torchshrink.sweep`.

Each recipe runs through the one pipeline in a process of its own (the local pool, the default) or
as a Ray task (``backend="ray"``, the ``[ray]`` extra; a cluster with ``ray_address``); the folder
gets one sub-folder per recipe plus ``sweep.md`` (a summary table) and ``sweep.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torchshrink.errors import MissingFileError, RecipeError
from torchshrink.io import prepare_output_folder, write_json_atomic, write_text_atomic
from torchshrink.parallel.tasks import Task, TaskResult, run_tasks, summary_table
from torchshrink.pipeline import run

__all__ = ["SweepResult", "sweep"]

BACKENDS = ("processes", "ray")


@dataclass
class SweepResult:
    """Every recipe's outcome in the order given, the summary table and the wall-clock seconds."""

    results: list[TaskResult]
    table: str
    seconds: float
    out_dir: Path

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)


def sweep(
    recipes: Sequence[str | Path],
    out_dir: str | Path,
    *,
    jobs: int = 2,
    threads: int | None = None,
    backend: str = "processes",
    ray_address: str | None = None,
    resume: bool = False,
    force: bool = False,
) -> SweepResult:
    """Run recipe files side by side, ``jobs`` at a time; a recipe that fails (or whose process dies)
    fails alone. Each recipe gets ``threads`` torch threads (default: the cores shared out among the
    jobs). Folder names are the recipe files' stems (numbered where two share one)."""
    if backend not in BACKENDS:
        raise RecipeError(f"sweep backend {backend!r} is not one of {list(BACKENDS)}")
    missing = [str(r) for r in recipes if not Path(r).is_file()]
    if missing:
        raise MissingFileError(f"recipe file(s) not found: {', '.join(missing)}")
    out = prepare_output_folder(out_dir)
    stems = [Path(r).stem for r in recipes]
    names = [stem if stems.count(stem) == 1 else f"{i:02d}-{stem}" for i, stem in enumerate(stems)]
    tasks = [Task(r, out / name, resume=resume, force=force) for r, name in zip(recipes, names, strict=True)]
    started = time.perf_counter()
    if backend == "ray":
        from torchshrink.parallel.ray_tasks import run_tasks_on_ray

        results = run_tasks_on_ray(tasks, run, jobs=jobs, threads=threads, address=ray_address)
    else:
        results = run_tasks(tasks, run, jobs=jobs, threads=threads)
    seconds = time.perf_counter() - started
    table = summary_table(results)
    write_text_atomic(
        out / "sweep.md",
        f"# Sweep: {len(results)} recipes, {jobs} jobs ({backend}), {seconds:.0f} s\n\n{table}\n",
    )
    write_json_atomic(
        out / "sweep.json",
        {
            "jobs": jobs,
            "threads": threads,
            "backend": backend,
            "seconds": seconds,
            "tasks": [r.to_dict() for r in results],
        },
    )
    return SweepResult(results, table, seconds, out)
