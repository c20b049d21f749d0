"""``python -m bench.profile_ops FILE.onnx [...] [--batch 32]``: per-operator time of ONNX Runtime.

Runs each file 100 times with ONNX Runtime's profiler (2 threads, all graph optimisations, as
torchshrink's runtime does) on random inputs and prints the median kernel time of every operator
after optimisation, slowest first. Used to find which layers int8 makes slower (docs/quantization.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np


def profile(path: Path, batch: int, runs: int = 100) -> list[tuple[str, str, float]]:
    """(operator, node, median microseconds) for every kernel of ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        meta = session.get_inputs()[0]
        shape = [batch, *[d if isinstance(d, int) else 1 for d in meta.shape[1:]]]
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        for _ in range(runs):
            session.run(None, {meta.name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times[(e["args"]["op_name"], e["name"].removesuffix("_kernel_time"))].append(e["dur"])
    rows = [(op, node, statistics.median(v)) for (op, node), v in times.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    for path in args.files:
        rows = profile(path, args.batch)
        print(f"{path} (batch {args.batch}): {sum(r[2] for r in rows):.0f} us in all")
        for op, node, us in rows:
            print(f"  {op:26s} {node[:48]:48s} {us:8.1f} us")


if __name__ == "__main__":
    main()
