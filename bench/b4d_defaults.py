"""B4 defaults rows: does the ``distill`` stage with its defaults beat the same student trained alone
for the same epochs, as a new user would try it?

The setting of issue 20: a 3-member ensemble of the teacher architecture trained E epochs (the
``ensemble`` stage's defaults), a half-width student, E epochs each, every other option at its
default. Rows per seed: the student alone (``train``); ``distill`` with the settings the issue tried
(T 4, alpha 0.7, no augmentation: the teacher's cached outputs on its own training images); ``distill``
with its defaults (``augment: auto``: shifted views the teacher scores live; alpha 0.5, T 1); the teacher
ensemble. MNIST-5k at 6 and 30 epochs (LeNet-5 -> LeNet-5-half),
MNIST-1D at 30 epochs (1-D CNN, 25 -> 12 channels).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import machine_line, write_section
from torchshrink import run
from torchshrink.distillation.stage import DistillConfig

SETTINGS = (
    ("mnist5k", 6, {"zoo": "lenet5"}, {"zoo": "lenet5_half"}),
    ("mnist5k", 30, {"zoo": "lenet5"}, {"zoo": "lenet5_half"}),
    ("mnist1d", 30, {"zoo": "cnn1d"}, {"zoo": "cnn1d", "kwargs": {"channels": 12}}),
)
TRIED = {"temperature": 4.0, "alpha": 0.7, "augment": {}}  # what issue 20's user tried
MEASURE = {"latency_repeats": 3, "onnx_fp32": False}


def _accuracy(out: Path, seed: int, data: str, model: dict, stage: dict) -> float:
    recipe = {"name": "b4d", "seed": seed, "model": model, "data": {"name": data}, "measure": MEASURE}
    return run({**recipe, "stages": [stage]}, out).final["accuracy"]


def run_setting(
    work: Path, seed: int, data: str, epochs: int, teacher: dict, student: dict
) -> dict[str, Any]:
    """One seed of one setting: the teacher ensemble, then the three students."""
    folder = work / f"{data}-{epochs}-s{seed}"
    ensemble = _accuracy(
        folder / "teacher", seed, data, teacher, {"ensemble": {"members": 3, "epochs": epochs}}
    )
    teachers = [{"path": str(folder / "teacher" / "model.safetensors")}]
    distill = {"student": student, "teachers": teachers, "epochs": epochs}
    return {
        "alone": _accuracy(folder / "alone", seed, data, student, {"train": {"epochs": epochs}}),
        "tried": _accuracy(folder / "tried", seed, data, teacher, {"distill": {**distill, **TRIED}}),
        "defaults": _accuracy(folder / "defaults", seed, data, teacher, {"distill": distill}),
        "ensemble": ensemble,
    }


def _default(option: str) -> Any:
    return DistillConfig.model_fields[option].default


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values) * 100:.2f}% [{min(values) * 100:.2f}, {max(values) * 100:.2f}]"


def run_all(seeds: tuple[int, ...] = (0, 1, 2), command: str = "python -m bench b4d") -> dict:
    torch.set_num_threads(2)
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="b4d-") as tmp:
        for data, epochs, teacher, student in SETTINGS:
            key = f"{data}/{epochs}"
            results[key] = [run_setting(Path(tmp), s, data, epochs, teacher, student) for s in seeds]
    labels = {
        "alone": "student alone (`train`, defaults)",
        "tried": "distill as tried in issue 20 (T 4, alpha 0.7, no augmentation)",
        "defaults": f"distill with its defaults (augment auto, alpha {_default('alpha'):g}, T {_default('temperature'):g})",
        "ensemble": "teacher: 3-member ensemble (`ensemble`, defaults)",
    }
    lines = [
        "## B4 defaults  Distillation as a new user runs it",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        "Teacher: a 3-member ensemble (`ensemble` stage, defaults) trained E epochs; student half as wide, E "
        "epochs; every option at its default unless the row says otherwise. MNIST-5k: LeNet-5 -> LeNet-5-half; "
        f"MNIST-1D: 1-D CNN 25 -> 12 channels. Seeds {list(seeds)}: median [min, max]; 'vs alone' is the "
        "median of the per-seed differences, then the per-seed differences.",
        "",
        "| data, epochs | row | test accuracy | vs alone (points) | per seed |",
        "|---|---|---|---|---|",
    ]
    for key, rows in results.items():
        for name, label in labels.items():
            deltas = [(r[name] - r["alone"]) * 100 for r in rows]
            lines.append(
                f"| {key} | {label} | {_cell([r[name] for r in rows])} | {statistics.median(deltas):+.2f} | "
                f"{', '.join(f'{d:+.1f}' for d in deltas)} |"
            )
    verdicts = []
    for key, rows in results.items():
        gain = statistics.median((r["defaults"] - r["alone"]) * 100 for r in rows)
        verdicts.append(f"{key}: {'met' if gain >= 0 else 'missed'} ({gain:+.2f})")
    lines += [
        "",
        "Target: the defaults at least as good as the student alone (median): " + "; ".join(verdicts) + ".",
    ]
    write_section("b4_defaults", "\n".join(lines), {"machine": machine_line(), "results": results})
    return results
