"""Unstructured pruning at 90 / 95 / 98 % sparsity: torchshrink vs ``torch.nn.utils.prune`` global L1.

Both start from the same trained model and get the same 5 fine-tune epochs. The peer prunes once
(global L1) and fine-tunes 5 epochs with its masks. torchshrink runs its recipe: global magnitude
pruning on the AGP schedule (3 steps, 1 epoch between) then a 3-epoch finetune stage: 5 epochs in all.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from bench.common import finetune, machine_line, trained, write_section
from torchshrink import load_model, run
from torchshrink.data import load_data
from torchshrink.measure import accuracy, serialized_size

MODELS = ("lenet300", "lenet5")
SPARSITIES = (0.9, 0.95, 0.98)
TRAIN_EPOCHS = 30


def peer_prune(model: nn.Module, sparsity: float, data, seed: int) -> nn.Module:
    model = copy.deepcopy(model)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    finetune(model, data, 5, seed)
    for m, name in layers:
        torch_prune.remove(m, name)
    return model.eval()


def ours(base_file: Path, sparsity: float, seed: int) -> nn.Module:
    with tempfile.TemporaryDirectory() as out:
        run(
            {
                "name": "b3u",
                "seed": seed,
                "model": {"path": str(base_file)},
                "data": {"name": "mnist5k"},
                "measure": {"latency_repeats": 3},
                "stages": [
                    {
                        "prune": {
                            "sparsity": sparsity,
                            "schedule": {"kind": "agp", "steps": 3, "epochs_between": 1},
                        }
                    },
                    {"finetune": {"epochs": 3}},
                ],
            },
            out,
        )
        return load_model(Path(out) / "model.safetensors").eval()


def run_all(seeds: tuple[int, ...] = (0, 1, 2), command: str = "make bench") -> dict:
    torch.set_num_threads(2)
    data = load_data("mnist5k")
    results: dict = {}
    for name in MODELS:
        for sparsity in SPARSITIES:
            rows = []
            for seed in seeds:
                base, base_file = trained(name, data, TRAIN_EPOCHS, seed)
                peer, mine = peer_prune(base, sparsity, data, seed), ours(base_file, sparsity, seed)
                rows.append(
                    {
                        "float": accuracy(base, data.test),
                        "peer": accuracy(peer, data.test),
                        "torchshrink": accuracy(mine, data.test),
                        "float_bytes": serialized_size(base),
                        "torchshrink_bytes": serialized_size(mine),
                    }
                )
            results[f"{name}@{sparsity}"] = rows
    lines = [
        "## Unstructured pruning: torchshrink vs torch.nn.utils.prune",
        "",
        f"Command: `{command}`. Machine: {machine_line()}.",
        f"MNIST-5k; models trained {TRAIN_EPOCHS} epochs; every method gets 5 fine-tune epochs (Adam 3e-4, cosine). "
        "Peer: `global_unstructured(L1Unstructured)` once, then 5 epochs with its masks. torchshrink: global magnitude, "
        f"AGP schedule 3 steps with 1 epoch between, then a 3-epoch finetune stage. Seeds {list(seeds)}: median [min, max].",
        "",
        "| model | sparsity | float | torch.nn.utils.prune | torchshrink | torchshrink file (sparse) |",
        "|---|---|---|---|---|---|",
    ]
    for key, rows in results.items():
        name, sparsity = key.split("@")

        def cell(k: str, rows=rows) -> str:
            v = [r[k] * 100 for r in rows]
            return f"{statistics.median(v):.1f}% [{min(v):.1f}, {max(v):.1f}]"

        ratio = statistics.median(r["float_bytes"] / r["torchshrink_bytes"] for r in rows)
        size = statistics.median(r["torchshrink_bytes"] for r in rows)
        lines.append(
            f"| {name} | {float(sparsity) * 100:.0f}% | {cell('float')} | {cell('peer')} | {cell('torchshrink')} | {size / 1000:.0f} kB ({ratio:.1f}x smaller) |"
        )
    write_section("b3u_unstructured", "\n".join(lines), {"machine": machine_line(), "results": results})
    return results
