"""The whole pipeline under torchrun: 2 gloo processes, one set of outputs written by rank 0."""

from __future__ import annotations

import json

import pytest
import yaml


@pytest.mark.slow
def test_run_under_torchrun_writes_once(tmp_path, launch):
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
    done = launch(
        ["-m", "torchshrink.cli", "-q", "run", str(recipe), "--out", str(tmp_path / "out")], nproc=2
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| **baseline** |") == 1  # only rank 0 prints
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stages"][0]["details"]["steps"] == 2 * 23  # ceil(1437 / 64) global batches per epoch
    assert report["final"]["accuracy"] > 0.5
    assert (tmp_path / "out" / "model.onnx").is_file()
    assert not list((tmp_path / "out").glob(".*.tmp"))
