"""B1: the Deep Compression table: prune -> k-means weight sharing -> Huffman, in one packed file.

LeNet-300-100 and LeNet-5 trained 30 epochs on MNIST-5k (3 seeds). torchshrink runs a recipe on
each trained model (gradual global magnitude pruning, fine-tuning, the ``encode`` stage) and the
accuracy is that of the model loaded back from the ``.tshrink`` file. Peer: the plain-PyTorch
pipeline of BENCHMARKS.md: ``torch.nn.utils.prune`` global L1 to 95%, 5 fine-tune epochs, int8
weights per tensor (what dynamic int8 stores), ``torch.save`` and gzip.
"""

from __future__ import annotations

import copy
import gzip
import io
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from bench.common import finetune, machine_line, trained, write_section
from torchshrink import load_model, run
from torchshrink.data import DatasetBundle, load_data
from torchshrink.encoding.packfile import format_layer_table, read_packed
from torchshrink.measure import accuracy

TRAIN_EPOCHS = 30
# The recipe stages after training, per model (the same budget for every seed).
STAGES: dict[str, list[dict[str, Any]]] = {
    "lenet300": [
        {
            "prune": {
                "sparsity": 0.92,
                "l1_regularization": {"weight": 1e-5, "epochs": 10},
                "schedule": {"kind": "agp", "steps": 6, "epochs_between": 3},
            }
        },
        {"finetune": {"epochs": 15, "lr": 0.0005}},
        {"encode": {"bits": {"linear": 3}, "finetune_epochs": 4}},
    ],
    "lenet5": [
        {"prune": {"sparsity": 0.95, "schedule": {"kind": "agp", "steps": 6, "epochs_between": 3}}},
        {"finetune": {"epochs": 15, "lr": 0.0005}},
        {"encode": {"bits": {"conv": 6, "linear": 4}, "finetune_epochs": 4}},
    ],
}
# Han, Mao & Dally 2016, Table 1 (full MNIST): float and packed kB, top-1 error before -> after.
PAPER = {
    "lenet300": {"float_kB": 1070, "packed_kB": 27, "ratio": 40, "error": "1.64% -> 1.58%"},
    "lenet5": {"float_kB": 1720, "packed_kB": 44, "ratio": 39, "error": "0.80% -> 0.74%"},
}


def float_file_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the float file a user starts from."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def peer(model: nn.Module, data: DatasetBundle, seed: int) -> tuple[float, int]:
    """Plain PyTorch: global L1 95%, 5 fine-tune epochs, int8 weights per tensor, torch.save + gzip."""
    model = copy.deepcopy(model)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.95)
    finetune(model, data, 5, seed)
    stored: dict[str, torch.Tensor] = {}
    for m, name in layers:
        torch_prune.remove(m, name)
    for key, tensor in model.state_dict().items():
        if key.endswith("weight"):
            scale = tensor.abs().max() / 127
            codes = torch.round(tensor / scale).to(torch.int8)
            stored[key], stored[key + ".scale"] = codes, scale
            with torch.no_grad():
                tensor.copy_(codes.float() * scale)  # the model the file holds
        else:
            stored[key] = tensor
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    return accuracy(model.eval(), data.test), len(gzip.compress(buffer.getvalue(), 9))


def ours(name: str, base_file: Path, seed: int, out: Path) -> tuple[float, Path]:
    """Run the B1 recipe on a trained model; accuracy of the model loaded back from the packed file."""
    run(
        {
            "name": f"b1-{name}",
            "seed": seed,
            "model": {"path": str(base_file)},
            "data": {"name": "mnist5k"},
            "measure": {"latency_repeats": 3},
            "stages": STAGES[name],
        },
        out,
    )
    path = out / "model.tshrink"
    return accuracy(load_model(path).eval(), load_data("mnist5k").test), path


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}% [{min(values):.1f}, {max(values):.1f}]"


def run_all(seeds: tuple[int, ...] = (0, 1, 2), command: str = "make bench") -> dict:
    torch.set_num_threads(2)
    data = load_data("mnist5k")
    results: dict[str, Any] = {}
    breakdown: dict[str, str] = {}
    for name in STAGES:
        rows = []
        for seed in seeds:
            base, base_file = trained(name, data, TRAIN_EPOCHS, seed)
            peer_acc, peer_bytes = peer(base, data, seed)
            with tempfile.TemporaryDirectory() as tmp:
                acc, path = ours(name, base_file, seed, Path(tmp))
                packed = read_packed(path)
                if seed == seeds[0]:
                    breakdown[name] = format_layer_table(packed)
            float_bytes = float_file_bytes(base)
            rows.append(
                {
                    "seed": seed,
                    "float_accuracy": accuracy(base, data.test),
                    "float_bytes": float_bytes,
                    "packed_bytes": packed.file_bytes,
                    "ratio": float_bytes / packed.file_bytes,
                    "accuracy": acc,
                    "kept": {r.name: r.kept / r.numel for r in packed.layers},
                    "bits": {r.name: r.bits for r in packed.layers},
                    "peer_accuracy": peer_acc,
                    "peer_bytes": peer_bytes,
                    "peer_ratio": float_bytes / peer_bytes,
                }
            )
        results[name] = rows
    lines = [
        "## B1  Deep Compression (prune -> k-means weight sharing -> Huffman, one packed file)",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        f"MNIST-5k; models trained {TRAIN_EPOCHS} epochs (seeds {list(seeds)}: median [min, max]). Float bytes: "
        "`torch.save(state_dict)`. torchshrink: the recipe stages below on each trained model; its accuracy is that "
        "of the model loaded back from `model.tshrink`. Plain PyTorch (the peer of BENCHMARKS.md): "
        "`torch.nn.utils.prune` global L1 95%, 5 fine-tune epochs, int8 weights per tensor, `torch.save` + gzip. "
        "Paper anchors: Han, Mao & Dally 2016 on full MNIST (60,000 training images).",
        "",
        "| model | row | float accuracy | accuracy | Δ (points) | float file | compressed file | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        base = [r["float_accuracy"] * 100 for r in rows]
        for label, acc_key, bytes_key in (
            ("torchshrink (.tshrink)", "accuracy", "packed_bytes"),
            ("plain PyTorch (prune + int8 + gzip)", "peer_accuracy", "peer_bytes"),
        ):
            acc = [r[acc_key] * 100 for r in rows]
            delta = [a - b for a, b in zip(acc, base, strict=True)]
            size = statistics.median(r[bytes_key] for r in rows)
            ratio = [r["float_bytes"] / r[bytes_key] for r in rows]
            lines.append(
                f"| {name} | {label} | {_cell(base)} | {_cell(acc)} | {statistics.median(delta):+.2f} "
                f"[{min(delta):+.2f}, {max(delta):+.2f}] | {statistics.median(r['float_bytes'] for r in rows) / 1000:,.0f} kB "
                f"| {size / 1000:.1f} kB | **{statistics.median(ratio):.1f}x** [{min(ratio):.1f}, {max(ratio):.1f}] |"
            )
        p = PAPER[name]
        lines.append(
            f"| {name} | paper (Deep Compression) | | error {p['error']} | | {p['float_kB']:,} kB | {p['packed_kB']} kB | {p['ratio']}x |"
        )
    lines += ["", "Recipe stages after training (YAML in `bench/b1_deep_compression.py`):", ""]
    for name, stages in STAGES.items():
        lines.append(f"- {name}: " + " -> ".join(f"`{s}`" for s in stages))
    for name, table in breakdown.items():
        lines += [
            "",
            f"Per-layer breakdown, {name}, seed {seeds[0]} (`torchshrink inspect model.tshrink`):",
            "",
            table,
        ]
    write_section("b1_deep_compression", "\n".join(lines), {"machine": machine_line(), "results": results})
    return results
