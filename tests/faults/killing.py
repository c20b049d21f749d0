"""Fault injection by a real SIGKILL: run the ``torchshrink`` command in a child process and kill it
the moment a given file appears (a training checkpoint, say), as a power cut or an OOM killer would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "torchshrink.cli", *args]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TORCHSHRINK_PROGRESS="0", TQDM_DISABLE="1")
    return env


def kill_when(args: list[str], folder: Path, pattern: str, timeout: float = 300.0) -> None:
    """Run ``args``; SIGKILL it as soon as a file under ``folder`` matches ``pattern`` (recursive
    glob). Fails if the process ends first, so the test knows the fault really happened mid-run.
    The process and all its descendants are killed at once (torchrun's workers die with their
    launcher, as on a power cut)."""
    trigger = folder / "**" / pattern
    proc = subprocess.Popen(
        args,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if folder.is_dir() and any(folder.rglob(pattern)):
                _kill_tree(proc.pid)
                proc.wait()
                return
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run ended (exit {proc.returncode}) before {trigger} appeared:\n{proc.stderr.read()}"
                )
            time.sleep(0.01)
        raise AssertionError(f"{trigger} did not appear within {timeout} s")
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()


def _kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process descending from it (read from /proc: torchrun starts its
    workers in process groups of their own)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry.name)] = int(fields[1])
    doomed, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in doomed} - doomed
        doomed |= more
        grew = bool(more)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_or_die(recipe, out_dir, **options):
    """A pipeline runner (for ``run_tasks``) whose process kills itself outright for a task whose
    folder is named "doomed", as the OOM killer would; the other tasks run the real pipeline."""
    if Path(out_dir).name == "doomed":
        os.kill(os.getpid(), signal.SIGKILL)
    from torchshrink import run

    return run(recipe, out_dir, **options)
