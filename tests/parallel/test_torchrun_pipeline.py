"""The whole pipeline under torchrun: 2 gloo processes, one set of outputs written by rank 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_run_under_torchrun_writes_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"zoo": "lenet300", "kwargs": {"in_features": 64}},
                "data": {"name": "digits"},
                "measure": {"latency_repeats": 3},
                "stages": [{"train": {"epochs": 2, "batch_size": 64}}, {"export": {}}],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "torchshrink.cli",
            "-q",
            "run",
            str(recipe),
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| **baseline** |") == 1  # only rank 0 prints
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][0]["details"]["steps"] == 2 * 23  # ceil(1437 / 64) global batches per epoch
    assert report["final"]["accuracy"] > 0.5
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert not list((tmp_path / "out").glob(".*.tmp"))
