"""Task parallelism: many calls side by side in worker processes (pipeline runs of a sweep,
ensemble members).

Each task is one recipe with its own output folder. ``jobs`` worker processes (spawned, so nothing
is shared with this one; started once and reused, since starting Python and torch costs seconds) run
the tasks ``jobs`` at a time; each gives torch ``threads`` threads, by default the cores divided by
the jobs, so two jobs on two cores do not oversubscribe them. A task that fails (bad input, an
exception) is recorded with its error and does not stop the others; a task whose worker dies
outright (killed, out of memory) is reported as failed with "worker died", the worker is replaced,
and the other tasks go on. Latencies measured inside parallel tasks
share the machine with the other tasks: compare models by accuracy and size there, time them alone.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from torchshrink.errors import TorchshrinkError

log = logging.getLogger(__name__)

__all__ = [
    "Task",
    "TaskResult",
    "Outcome",
    "run_tasks",
    "run_in_processes",
    "default_threads",
    "summary_table",
]


@dataclass(frozen=True)
class Task:
    """One pipeline run: a recipe (file or mapping) and the folder it writes."""

    recipe: str | Path | dict[str, Any]
    out_dir: Path
    resume: bool = False
    force: bool = False

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


def start_worker(threads: int) -> None:
    """Worker set-up: a fixed thread count, and no progress bars interleaving on the terminal."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["TORCHSHRINK_PROGRESS"] = "0"  # the training loop's bars
    os.environ["TQDM_DISABLE"] = "1"  # every other bar
    import torch

    torch.set_num_threads(threads)


Runner = Callable[..., Any]
"""``runner(recipe, out_dir, resume=..., force=...)`` -> a report with ``final`` and ``baseline`` metrics
(``torchshrink.pipeline.run``); module-level, so a spawned worker can import it."""


def run_task(task: Task, run: Runner) -> TaskResult:
    started = time.perf_counter()
    try:
        report = run(task.recipe, task.out_dir, resume=task.resume, force=task.force)
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


JOIN_SECONDS = 30.0
"""How long a worker process may take to exit after sending its result."""


@dataclass
class Outcome:
    """How one call in a worker process ended: its value, or the error (type and message) that
    stopped it, or how the process died."""

    ok: bool
    seconds: float
    value: Any = None
    error: str | None = None


def _outcome(call: Callable[[], Any]) -> Outcome:
    """Call, and say how it ended (an error's type and message, not the exception object)."""
    started = time.perf_counter()
    try:
        outcome = Outcome(True, 0.0, value=call())
    except TorchshrinkError as exc:  # bad input or a stopped training: the message says what to fix
        outcome = Outcome(False, 0.0, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one call's crash must not take the others down
        tail = "".join(traceback.format_exception(exc)[-3:]).strip()
        outcome = Outcome(False, 0.0, error=f"{type(exc).__name__}: {tail}")
    outcome.seconds = time.perf_counter() - started
    return outcome


def _worker(conn: Connection, threads: int) -> None:
    """A worker process: set up once (torch imported, threads fixed), then run the calls it is sent
    until it is sent None. Messages are plain pickles as bytes: tensors travel inside them
    (Connection.send would share their storage through shared memory that dies with the sender)."""
    start_worker(threads)
    while True:
        try:
            call = pickle.loads(conn.recv_bytes())  # our own parent's message
        except EOFError:
            return
        if call is None:
            return
        conn.send_bytes(pickle.dumps(_outcome(call)))


def _died(process: BaseProcess, seconds: float) -> Outcome:
    code = process.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return Outcome(False, seconds, error=f"worker died ({how}) before reporting a result")


@dataclass
class _Slot:
    """One worker process and the call it is running (None: idle)."""

    process: BaseProcess
    conn: Connection
    index: int | None = None
    started: float = 0.0


def run_in_processes(
    calls: Sequence[Callable[[], Any]],
    jobs: int = 2,
    threads: int | None = None,
    names: Sequence[str] | None = None,
    desc: str = "tasks",
) -> list[Outcome]:
    """Call each of ``calls`` (picklable: module-level functions or partials of them) in ``jobs``
    spawned worker processes, each with ``threads`` torch threads (default: the cores shared out);
    outcomes come back in the order of ``calls``. Workers are started once and reused (starting
    Python and torch costs seconds); a call that raises fails alone, and a worker that dies
    (killed, out of memory) fails the call it was running and is replaced for the rest."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    threads = threads or default_threads(jobs)
    names = list(names) if names is not None else [str(i) for i in range(len(calls))]
    results: list[Outcome | None] = [None] * len(calls)
    context = multiprocessing.get_context("spawn")
    waiting = list(range(len(calls)))
    messages = [
        pickle.dumps(call) for call in calls
    ]  # a call that cannot travel fails here, before any start
    starts_left = len(calls) + jobs  # workers that die before taking a call must not respawn forever

    def start() -> _Slot:
        nonlocal starts_left
        starts_left -= 1
        if starts_left < 0:
            raise RuntimeError(f"worker processes keep dying before they take a call ({desc})")
        mine, theirs = context.Pipe(duplex=True)
        process = context.Process(target=_worker, args=(theirs, threads))
        process.start()
        theirs.close()  # the child holds the only other end: EOF once it is gone
        return _Slot(process, mine)

    def give(slot: _Slot) -> None:
        """The next waiting call to ``slot``'s worker, or None (it exits) when none waits."""
        slot.index = waiting.pop(0) if waiting else None
        slot.started = time.perf_counter()
        try:
            slot.conn.send_bytes(messages[slot.index] if slot.index is not None else pickle.dumps(None))
        except (BrokenPipeError, OSError):  # it died while idle: the call goes back to the queue
            if slot.index is not None:
                waiting.insert(0, slot.index)
            slot.index = None

    def finish(slot: _Slot, outcome: Outcome) -> None:
        assert slot.index is not None
        results[slot.index] = outcome
        bar.update(1)
        log.info(
            "%s: %s in %.0fs",
            names[slot.index],
            "done" if outcome.ok else f"failed: {outcome.error}",
            outcome.seconds,
        )
        slot.index = None

    slots: list[_Slot] = []
    with tqdm(total=len(calls), desc=desc, leave=False) as bar:
        try:
            for _ in range(min(jobs, len(calls))):
                slots.append(start())
                give(slots[-1])
            while any(slot.index is not None for slot in slots) or waiting:
                busy = [slot for slot in slots if slot.index is not None]
                if not busy:  # every worker died while idle: start one for the waiting calls
                    slots.append(start())
                    give(slots[-1])
                    continue
                wait([obj for slot in busy for obj in (slot.conn, slot.process.sentinel)])
                for slot in busy:
                    if slot.conn.poll():
                        try:
                            outcome = pickle.loads(slot.conn.recv_bytes())  # our own child's message
                        except (EOFError, OSError):
                            slot.process.join(timeout=JOIN_SECONDS)
                            outcome = _died(slot.process, time.perf_counter() - slot.started)
                        except Exception as exc:  # noqa: BLE001 - a result that does not unpickle
                            seconds = time.perf_counter() - slot.started
                            outcome = Outcome(False, seconds, error=f"its result could not be read: {exc!r}")
                        finish(slot, outcome)
                    elif slot.process.exitcode is not None:
                        finish(slot, _died(slot.process, time.perf_counter() - slot.started))
                    else:
                        continue
                    if slot.process.exitcode is None and slot.process.is_alive():
                        give(slot)
                    elif waiting:  # a dead worker is replaced for the calls still waiting
                        slot.conn.close()
                        slots[slots.index(slot)] = replacement = start()
                        give(replacement)
        finally:
            for slot in slots:
                with contextlib.suppress(OSError):
                    slot.conn.send_bytes(pickle.dumps(None))
                slot.process.join(timeout=JOIN_SECONDS)
                if slot.process.is_alive():  # hangs on exit (a stray thread): do not wait
                    slot.process.kill()
                    slot.process.join()
                slot.conn.close()
    return [r for r in results if r is not None]


def run_tasks(
    tasks: Sequence[Task], run: Runner, jobs: int = 2, threads: int | None = None
) -> list[TaskResult]:
    """Run each task through ``run`` (the pipeline), each in a process of its own, ``jobs`` at a time;
    results come back in the order of ``tasks``. A process that dies (killed, out of memory) fails
    its own task only."""
    names = [t.out_dir.resolve() for t in tasks]
    if len(set(names)) != len(names):
        clash = sorted({str(n) for n in names if names.count(n) > 1})
        raise ValueError(f"two tasks would write the same folder: {clash}")
    outcomes = run_in_processes(
        [functools.partial(run_task, task, run) for task in tasks], jobs, threads, [t.name for t in tasks]
    )
    return [
        o.value if o.ok else TaskResult(t.name, str(t.out_dir), False, o.seconds, error=o.error)
        for t, o in zip(tasks, outcomes, strict=True)
    ]


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
