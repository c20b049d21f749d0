"""Two "nodes" on this machine (torchrun --nnodes 2, c10d rendezvous on 127.0.0.1) give exactly the
result of two processes on one node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

RECIPE = {
    "model": {"zoo": "lenet300", "kwargs": {"in_features": 64}},
    "data": {"name": "digits"},
    "measure": {"latency_repeats": 3, "onnx_fp32": False},
    "stages": [{"train": {"epochs": 2, "batch_size": 64}}, {"finetune": {"epochs": 1, "batch_size": 64}}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_two_nodes_equal_two_processes_on_one_node(tmp_path, launch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    command = ["-m", "torchshrink.cli", "-q", "run", str(recipe), "--out"]
    one_node = launch([*command, str(tmp_path / "one")], nproc=2)
    assert one_node.returncode == 0, one_node.stderr[-2000:]

    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=torchshrink-test",
                *command,
                str(tmp_path / "two"),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-1500:] for _, err in outputs]
    assert sum(out.count("| **baseline** |") for out, _ in outputs) == 1  # one node's rank 0 reports

    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert (
        reports[0]["stages"][0]["details"]["steps"] == reports[1]["stages"][0]["details"]["steps"] == 2 * 23
    )
    assert reports[0]["final"]["accuracy"] == reports[1]["final"]["accuracy"]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
