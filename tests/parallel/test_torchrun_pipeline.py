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
                "measure": {"latency_repeats": 3, "onnx_fp32": False},
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


@pytest.mark.slow
def test_datafree_distillation_under_torchrun(tmp_path, launch):
    recipe = tmp_path / "r.yaml"
    student = {"zoo": "lenet300", "kwargs": {"in_features": 64}}
    datafree = {"student": student, "epochs": 4, "steps_per_epoch": 20, "batch_size": 64, "lr": 0.003}
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"zoo": "resnet", "kwargs": {"width": 8}},
                "data": {"name": "digits"},
                "measure": {"latency_repeats": 3, "onnx_fp32": False},
                "stages": [{"train": {"epochs": 6, "lr": 0.003}}, {"datafree": datafree}],
            }
        )
    )
    done = launch(
        ["-m", "torchshrink.cli", "-q", "run", str(recipe), "--out", str(tmp_path / "out")], nproc=2
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    details = report["stages"][1]["details"]
    assert details["training_inputs"] == "none: generated only"
    assert len(details["epoch_losses"]) == 4 and "generator_entropy" in details["epoch_losses"][0]
    assert report["final"]["accuracy"] > 0.2  # two processes, one generator and student: it learns
