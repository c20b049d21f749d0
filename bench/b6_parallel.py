"""B6: the three kinds of parallelism, measured on this machine against one process.

* Data-parallel: fine-tune and distill LeNet-5 on MNIST-5k under ``torchrun --nproc_per_node 2``
  (gloo) vs one process, same global batch and seed: final accuracy and samples/s.
* Model (pipeline) parallel: LeNet-5 and the ResNet split in 2 stages, 4 micro-batches, trained by
  the one training loop vs one process: largest difference of the epoch losses, samples/s,
  training bytes (parameters + gradients + Adam state) and peak RSS per process.
* Task-parallel: a sweep of 4 recipes with ``--jobs 2`` (process pool, and Ray) vs ``--jobs 1``.
* Ensembles: 4 members trained ``parallel: 2`` vs one after another.

Every run is a fresh process (the CLI, or ``bench/b6_pipeline_worker.py``), timed by wall clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS, ROOT, machine_line, trained, write_section
from torchshrink.data import load_data

BASE_EPOCHS = 10  # the LeNet-5 every data-parallel and task row starts from (cached)
MEASURE = {"latency_repeats": 3, "onnx_fp32": False}
WORKER = ROOT / "bench" / "b6_pipeline_worker.py"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["TORCHSHRINK_PROGRESS"] = "0"
    return env


def _launch(args: list[str], nproc: int = 1, threads: int | None = None) -> float:
    """Run ``python ARGS`` (under torchrun with ``nproc`` processes); wall-clock seconds."""
    env = _env()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    started = time.perf_counter()
    done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: a sweep with a failed task (none here) still writes its summary
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def _recipe(folder: Path, name: str, model: dict, stages: list[dict]) -> Path:
    path = folder / f"{name}.yaml"
    data = {"name": name, "seed": 0, "model": model, "data": {"name": "mnist5k"}, "measure": MEASURE}
    path.write_text(yaml.safe_dump({**data, "stages": stages}))
    return path


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def data_parallel(work: Path, base: Path) -> list[dict[str, Any]]:
    """Fine-tune and distill under torchrun (2 gloo processes) vs one process."""
    student = {"zoo": "lenet5_half"}
    jobs = {
        "finetune": [{"finetune": {"epochs": 3, "lr": 3e-4, "batch_size": 64, "checkpoint_every": 0}}],
        "distill": [
            {
                "distill": {
                    "student": student,
                    "epochs": 3,
                    "lr": 2e-3,
                    "batch_size": 64,
                    "checkpoint_every": 0,
                }
            }
        ],
    }
    rows = []
    for kind, stages in jobs.items():
        recipe = _recipe(work, f"ddp-{kind}", {"path": str(base)}, stages)
        row: dict[str, Any] = {"job": kind}
        for label, nproc in (("one", 1), ("two", 2)):
            out = work / f"ddp-{kind}-{label}"
            threads = 2 if nproc == 1 else 1  # the two cores either way
            row[f"{label}_wall_s"] = _launch(
                ["-m", "torchshrink.cli", "-q", "run", str(recipe), "--out", str(out)], nproc, threads
            )
            report = _report(out)
            row[f"{label}_accuracy"] = report["final"]["accuracy"]
            row[f"{label}_samples_per_s"] = report["stages"][0]["details"].get("samples_per_second")
        rows.append(row)
    return rows


def pipeline_parallel(work: Path) -> list[dict[str, Any]]:
    """LeNet-5 and the ResNet, 2 stages x 4 micro-batches vs one process (2 epochs each)."""
    rows = []
    for model, balance in (("lenet5", "time"), ("lenet5", "memory"), ("resnet", "time")):
        results = {}
        for label, nproc, threads in (("one", 1, 2), ("two", 2, 1)):
            out = work / f"pp-{model}-{balance}-{label}"
            out.mkdir(parents=True, exist_ok=True)
            extra = ["balance=memory"] if balance == "memory" and nproc > 1 else []
            _launch([str(WORKER), str(out), model, "mnist5k", "2", *extra], nproc, threads)
            results[label] = json.loads((out / "result.json").read_text())
        one, two = results["one"], results["two"]
        rows.append(
            {
                "model": model,
                "balance": balance,
                "split": two["pipeline"]["split"],
                "loss_max_diff": max(abs(a - b) for a, b in zip(one["losses"], two["losses"], strict=True)),
                "losses_one": one["losses"],
                "losses_two": two["losses"],
                "one_samples_per_s": one["samples_per_second"],
                "two_samples_per_s": two["samples_per_second"],
                "one_training_bytes": one["pipeline"]["training_bytes"],
                "two_training_bytes": two["pipeline"]["training_bytes"],
                "one_peak_rss_mb": one["pipeline"]["peak_rss_mb"],
                "two_peak_rss_mb": two["pipeline"]["peak_rss_mb"],
                "one_accuracy": one["accuracy"],
                "two_accuracy": two["accuracy"],
                "eval_max_diff": two["pipelined_eval_max_diff"],
            }
        )
    return rows


def tasks(work: Path, base: Path) -> list[dict[str, Any]]:
    """A sweep of 4 fine-tuning recipes: one at a time, two at a time, two at a time on Ray."""
    recipes = [
        str(
            _recipe(
                work,
                f"sweep-lr{lr:g}",
                {"path": str(base)},
                [{"finetune": {"epochs": 2, "lr": lr, "checkpoint_every": 0}}],
            )
        )
        for lr in (1e-4, 3e-4, 1e-3, 3e-3)
    ]
    rows = []
    for label, options in (
        ("sequential (--jobs 1)", ["--jobs", "1"]),
        ("sequential, 1 thread per run (--jobs 1 --threads 1)", ["--jobs", "1", "--threads", "1"]),
        ("process pool (--jobs 2)", ["--jobs", "2"]),
        ("Ray, local (--jobs 2 --backend ray)", ["--jobs", "2", "--backend", "ray"]),
    ):
        out = work / f"sweep-{len(rows)}"
        seconds = _launch(["-m", "torchshrink.cli", "-q", "sweep", *recipes, "--out", str(out), *options])
        summary = json.loads((out / "sweep.json").read_text())
        accuracies = [round(t["final"]["accuracy"], 4) if t["ok"] else None for t in summary["tasks"]]
        rows.append({"how": label, "wall_s": seconds, "accuracies": accuracies})
    return rows


def ensembles(work: Path) -> list[dict[str, Any]]:
    """4 LeNet-5 members, 2 epochs each: parallel 2 vs one after another."""
    rows = []
    for parallel in (1, 2):
        stage = {"ensemble": {"members": 4, "epochs": 2, "parallel": parallel, "checkpoint_every": 0}}
        recipe = _recipe(work, f"ensemble-p{parallel}", {"zoo": "lenet5"}, [stage])
        out = work / f"ensemble-p{parallel}"
        wall = _launch(["-m", "torchshrink.cli", "-q", "run", str(recipe), "--out", str(out)])
        report = _report(out)
        rows.append(
            {
                "parallel": parallel,
                "stage_s": report["stages"][0]["seconds"],
                "wall_s": wall,
                "accuracy": report["final"]["accuracy"],
                "members": [m["accuracy"] for m in report["stages"][0]["details"]["members"]],
            }
        )
    return rows


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _mb(values: list[int]) -> str:
    return " / ".join(f"{v / 1e6:.2f}" for v in values)


def _markdown(command: str, ddp: list, pipe: list, sweep: list, ens: list) -> str:
    lines = [
        "## B6  Parallelism: data, model (pipeline), tasks, ensembles",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        "Every run is a fresh process, timed by wall clock; MNIST-5k; LeNet-5 trained "
        f"{BASE_EPOCHS} epochs is the starting model of the data-parallel and sweep rows.",
        "",
        "**Data-parallel** (`torchrun --nproc_per_node 2`, gloo, 1 thread each, vs one process with 2 "
        "threads; global batch 64, seed 0):",
        "",
        "| job | accuracy, 1 process | accuracy, 2 processes | difference (points) | samples/s, 1 | samples/s, 2 | wall s, 1 | wall s, 2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ddp:
        diff = (r["two_accuracy"] - r["one_accuracy"]) * 100
        lines.append(
            f"| {r['job']} | {r['one_accuracy'] * 100:.2f}% | {r['two_accuracy'] * 100:.2f}% | {diff:+.2f} | "
            f"{_rate(r['one_samples_per_s'])} | {_rate(r['two_samples_per_s'])} | {r['one_wall_s']:.1f} | {r['two_wall_s']:.1f} |"
        )
    worst = max(abs(r["two_accuracy"] - r["one_accuracy"]) * 100 for r in ddp)
    lines += [
        "",
        f"Target: final accuracy within 0.3 points: {'met' if worst <= 0.3 else 'missed'} (largest difference {worst:.2f}).",
        "",
        "**Model (pipeline) parallel** (2 stages, one process each with 1 thread, 4 micro-batches of 16, "
        "split balanced by measured block times or by parameter bytes; vs one process with 2 threads; "
        "2 epochs, Adam 1e-3, whole batches of 64):",
        "",
        "| model | balance | split at | largest epoch-loss difference | test accuracy, 1 / 2 stages | evaluation through the stages vs whole model (max abs diff) | samples/s, 1 | samples/s, 2 stages | training MB per process, 1 | training MB per process, 2 stages | peak RSS MB, 1 | peak RSS MB per process, 2 stages |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in pipe:
        lines.append(
            f"| {r['model']} | {r['balance']} | {', '.join(r['split'])} | {r['loss_max_diff']:.2e} | "
            f"{r['one_accuracy'] * 100:.2f}% / {r['two_accuracy'] * 100:.2f}% | {r['eval_max_diff']:.1e} | {r['one_samples_per_s']:,.0f} | "
            f"{r['two_samples_per_s']:,.0f} | {_mb(r['one_training_bytes'])} | {_mb(r['two_training_bytes'])} | "
            f"{' / '.join(map(str, r['one_peak_rss_mb']))} | {' / '.join(map(str, r['two_peak_rss_mb']))} |"
        )
    base = sweep[0]["wall_s"]
    lines += [
        "",
        "Training MB: the process's parameters, gradients and Adam state (what the split divides); peak "
        "RSS includes the Python interpreter, torch and the data (about 0.4 GB) in every process.",
        "",
        "**Tasks** (a sweep of 4 fine-tuning recipes, 2 epochs each):",
        "",
        "| how | wall s | faster than sequential | final accuracies |",
        "|---|---|---|---|",
    ]
    for r in sweep:
        lines.append(f"| {r['how']} | {r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | {r['accuracies']} |")
    pool = base / sweep[2]["wall_s"]
    alike = sweep[1]["wall_s"] / sweep[2]["wall_s"]
    lines += [
        "",
        f"Target: >= 1.7x with 2 jobs on 2 cores: {'met' if pool >= 1.7 else 'missed'} ({pool:.2f}x against "
        f"the sequential sweep whose runs use both cores; {alike:.2f}x against the sequential sweep at the "
        "same one thread per run, which is what task parallelism itself buys).",
        "",
        "**Ensembles** (4 LeNet-5 members, 2 epochs each):",
        "",
        "| members trained | stage s | wall s | faster | ensemble accuracy | member accuracies |",
        "|---|---|---|---|---|---|",
    ]
    for r in ens:
        label = "one after another" if r["parallel"] == 1 else f"{r['parallel']} at a time"
        lines.append(
            f"| {label} | {r['stage_s']:.1f} | {r['wall_s']:.1f} | {ens[0]['stage_s'] / r['stage_s']:.2f}x | "
            f"{r['accuracy'] * 100:.2f}% | {[round(a * 100, 2) for a in r['members']]} |"
        )
    lines += [
        "",
        f"Measured on 2 cores: the sweep gains {pool:.2f}x with two jobs and parallel ensemble members "
        f"take {ens[1]['stage_s'] / ens[0]['stage_s']:.2f}x the time of one after another. A single run "
        "already keeps both cores busy for most of its time (two torch threads), so two runs at one "
        "thread each gain little, and each worker process first starts Python and torch (seconds; "
        "workers are started once and reused, which also made the one-job sweep faster). Parallel "
        "tasks and members pay off when a run leaves cores idle: more cores than one run uses well, "
        "or runs dominated by single-threaded work. Data and pipeline parallelism cannot speed "
        "anything up here (both processes share the same 2 cores, and gloo or the pipeline's "
        "hand-offs add work): these rows show correctness and memory per process. On N GPUs the same "
        "commands put one process on each device: data parallelism divides the samples per step by "
        "N, the pipeline divides the model's training state by the stages (see docs/training.md).",
    ]
    return "\n".join(lines)


def run_all(command: str = "python -m bench b6") -> None:
    data = load_data("mnist5k")
    _, base = trained("lenet5", data, epochs=BASE_EPOCHS, seed=0)
    payload: dict[str, Any] = {"machine": machine_line()}
    partial = RESULTS / "b6_parallel.partial.json"  # kept as each part ends: a late failure loses nothing
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="b6-") as tmp:
        work = Path(tmp)
        parts = {
            "data_parallel": lambda: data_parallel(work, base),
            "pipeline": lambda: pipeline_parallel(work),
            "tasks": lambda: tasks(work, base),
            "ensembles": lambda: ensembles(work),
        }
        for key, part in parts.items():
            payload[key] = part()
            partial.write_text(json.dumps(payload, indent=2, default=float))
    markdown = _markdown(command, *(payload[k] for k in parts))
    write_section("b6_parallel", markdown, payload)
    partial.unlink()
    print(markdown)
