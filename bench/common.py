"""Shared benchmark plumbing: the machine line, training reference models, fine-tuning, writing tables."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from torchshrink.augment import AugmentConfig
from torchshrink.data import DatasetBundle
from torchshrink.inputs import ModelInput, call
from torchshrink.io import write_text_atomic
from torchshrink.measure import interleaved_medians
from torchshrink.models import open_model, save_model
from torchshrink.stages.training import training_loss
from torchshrink.train import DatasetBatches, TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "out" / "bench-cache"
DOC = ROOT / "docs" / "benchmarks.md"


def int8_flags() -> str:
    """The CPU flags int8 speed depends on, as lscpu / /proc/cpuinfo name them."""
    try:
        flags = set(
            next(
                line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
            ).split()
        )
    except (OSError, StopIteration):
        return "flags unknown"
    names = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return "flags: " + ", ".join(f"{n} {'yes' if n in flags else 'no'}" for n in names)


def machine_line() -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu} ({int8_flags()}), {os.cpu_count()} cores, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def trained(
    name: str,
    data: DatasetBundle,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    shift: int = 0,
    mixup: float = 0.0,
) -> tuple[nn.Module, Path]:
    """A zoo model trained with torchshrink's loop (cached under out/bench-cache) and its file.

    ``shift``, ``mixup``: torchshrink's training augmentation (random shifts of up to that many pixels;
    mixup with blend weights ~ Beta(mixup, mixup)).
    """
    augmented = (f"-shift{shift}" if shift else "") + (f"-mixup{mixup:g}" if mixup else "")
    path = CACHE / f"{name}-{data.name}-e{epochs}-lr{lr:g}{augmented}-s{seed}.safetensors"
    if path.is_file():
        return open_model(path).module, path
    torch.manual_seed(seed)
    loaded = open_model({"zoo": name})

    fit(
        loaded.module,
        DatasetBatches(data.train, 64, seed=seed),
        training_loss(AugmentConfig(shift=shift, mixup=mixup), data.num_classes),
        config=TrainConfig(epochs=epochs, lr=lr, seed=seed, desc=f"{name} s{seed}"),
    )
    save_model(path, loaded.module, loaded.architecture, data.input_shape)
    return loaded.module, path


def finetune(
    model: nn.Module, data: DatasetBundle, epochs: int, seed: int, lr: float = 3e-4, after_step=None
) -> nn.Module:
    """The fine-tune budget every compared method gets: Adam, cosine, batch 64."""
    fit(
        model,
        DatasetBatches(data.train, 64, seed=seed),
        config=TrainConfig(epochs=epochs, lr=lr, seed=seed, desc="fine-tune"),
        after_step=after_step,
    )
    return model


def time_rows(
    rows: dict[str, dict], runners: dict[str, nn.Module], x: ModelInput, batch: int, repeats: int, warmup: int
) -> None:
    """Time every runner on ``x`` interleaved (medians) and add ``ms_b<batch>`` and the speed-ups
    against the rows ``torch fp32`` and ``ORT fp32`` (``vs_torch_b<batch>``, ``vs_ort_b<batch>``)."""
    with torch.inference_mode():
        times = interleaved_medians(
            {k: functools.partial(call, r, x) for k, r in runners.items()}, repeats=repeats, warmup=warmup
        )
    for key in runners:
        rows[key][f"ms_b{batch}"] = times[key]
        rows[key][f"vs_torch_b{batch}"] = times["torch fp32"] / times[key]
        rows[key][f"vs_ort_b{batch}"] = times["ORT fp32"] / times[key]


def write_section(key: str, markdown: str, payload: dict) -> None:
    """Store one table's JSON and replace its section (between markers) in docs/benchmarks.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{key}.json", json.dumps(payload, indent=2, default=float) + "\n")
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(DOC, text)  # a reader (or a table run beside this one) never sees half a file
