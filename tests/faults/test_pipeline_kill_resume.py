"""Kill-and-resume of a pipeline-parallel training: both processes SIGKILLed mid-stage, then
``--resume`` under torchrun gives the uninterrupted run's weights, also when the kill fell between
the two ranks' saves (each rank keeps the save before; they resume at the newest step both hold)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from killing import child_env, kill_when, write_recipe

from torchshrink import load_model
from torchshrink.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, TrainCheckpoint

RECIPE = {
    "model": {"zoo": "lenet300", "kwargs": {"in_features": 64}},
    "data": {"name": "digits"},
    "measure": {"latency_repeats": 3, "onnx_fp32": False},
    "parallel": {"pipeline": {"stages": 2, "microbatches": 4}},
    "stages": [{"train": {"epochs": 6, "batch_size": 64, "lr": 0.003, "checkpoint_every": 7}}],
}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "torchshrink.cli", "-q", *args]  # fmt: skip


def _run(*args: str) -> None:
    done = subprocess.run(_torchrun(*args), env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_pipeline_resumes_to_the_uninterrupted_weights(tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", RECIPE)
    _run("run", str(path), "--out", str(tmp_path / "whole"))

    out = tmp_path / "killed"
    work = out / ".work" / "00-train"
    kill_when(_torchrun("run", str(path), "--out", str(out)), work / "rank1", PREVIOUS_NAME)  # >= 2 saves
    assert not (out / "report.json").exists()
    # the harder case: rank 0 died before writing a save rank 1 finished, so it holds one save less
    # (made so here when both hold two saves and rank 1 holds rank 0's older one)
    steps = {rank: TrainCheckpoint(work / f"rank{rank}", {}).steps() for rank in (0, 1)}
    if len(steps[0]) == 2 and min(steps[0]) in steps[1]:
        newest = max(steps[0])
        steps[0][newest].unlink()
        steps[0][min(steps[0])].rename(work / "rank0" / CHECKPOINT_NAME)
        del steps[0][newest]
    common = set(steps[0]) & set(steps[1])
    assert common, steps  # the kill came within a save of the other rank
    _run("run", str(path), "--out", str(out), "--resume")

    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["resume"] == "continued"
    assert report["stages"][0]["details"]["resumed_from_step"] == max(common)  # not started over
    a = load_model(tmp_path / "whole" / "model.safetensors").state_dict()
    b = load_model(out / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "resumed weights differ"
