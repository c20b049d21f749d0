"""B0: the float reference models trained by torchshrink's loop, and torch eager vs ONNX Runtime fp32.

Reproduces the plain-PyTorch reference points of BENCHMARKS.md (LeNet-300-100 94.7%, LeNet-5 97.8%
on MNIST-5k, 30 epochs Adam, 3 seeds) and times the same graph on both runtimes.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import machine_line, trained, write_section
from torchshrink.data import load_data
from torchshrink.measure import accuracy, interleaved_medians
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx

MODELS = ("lenet300", "lenet5")


def _time_runtimes(model: torch.nn.Module, ort: OnnxRuntimeModel, inputs: torch.Tensor) -> dict[str, float]:
    """Interleaved medians of torch eager and ONNX Runtime fp32 at batch 1 and 32."""
    x1, x32 = inputs[:1], inputs[:32]
    with torch.inference_mode():
        return interleaved_medians(
            {
                "torch_b1": lambda: model(x1),
                "ort_b1": lambda: ort(x1),
                "torch_b32": lambda: model(x32),
                "ort_b32": lambda: ort(x32),
            }
        )


def run(epochs: int = 30, seeds: tuple[int, ...] = (0, 1, 2), command: str = "make bench") -> dict:
    torch.set_num_threads(2)
    data = load_data("mnist5k")
    rows = {}
    for name in MODELS:
        accs, first = [], None
        for seed in seeds:
            model, _ = trained(name, data, epochs, seed)
            accs.append(accuracy(model, data.test))
            first = first or model
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            export_onnx(first, path, data.input_shape, check_inputs=data.test.tensors[0][:32])
            lat = _time_runtimes(first, OnnxRuntimeModel(path), data.test.tensors[0])
        rows[name] = {"accuracy": accs, "median": statistics.median(accs), **lat}
    lines = [
        "## B0  Float reference models (torchshrink's training loop)",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        f"MNIST-5k (4,000 / 1,000), {epochs} epochs Adam lr 1e-3 cosine, batch 64, seeds {list(seeds)}; latency: median of 30 interleaved rounds, 2 threads.",
        "",
        "| model | accuracy median [min, max] | BENCHMARKS.md reference | torch b1 (ms) | ORT fp32 b1 (ms) | torch b32 (ms) | ORT fp32 b32 (ms) | ORT / torch speed-up b32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference = {"lenet300": "94.7%", "lenet5": "97.8%"}
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median'] * 100:.1f}% [{min(r['accuracy']) * 100:.1f}, {max(r['accuracy']) * 100:.1f}] | {reference[name]} "
            f"| {r['torch_b1']:.3f} | {r['ort_b1']:.3f} | {r['torch_b32']:.3f} | {r['ort_b32']:.3f} | {r['torch_b32'] / r['ort_b32']:.2f}x |"
        )
    write_section(
        "b0_reference", "\n".join(lines), {"machine": machine_line(), "epochs": epochs, "rows": rows}
    )
    return rows
