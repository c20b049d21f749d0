"""Resume is keyed by everything that determines a stage's result: a checkpoint or a half-done
training made from another recipe prefix, seed, model file or data file is never reused, and the
report says which stages were reused, continued or computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from killing import cli, kill_when, write_recipe
from safetensors.torch import load_file, save_file
from testkit import DIGITS_MLP, digits_recipe

from torchshrink import load_model, run
from torchshrink.checkpoint import CHECKPOINT_NAME
from torchshrink.errors import CorruptFileError
from torchshrink.io import read_safetensors_metadata, save_tensors
from torchshrink.models import open_model, save_model


def _pruned(sparsity: float) -> dict:
    return digits_recipe(
        {"train": {"epochs": 2, "lr": 0.003}},
        {"prune": {"sparsity": sparsity}},
        {"finetune": {"epochs": 6, "checkpoint_every": 4}},
        model=DIGITS_MLP,
    )


def _same_weights(a, b) -> bool:
    sa, sb = (
        load_model(a / "model.safetensors").state_dict(),
        load_model(b / "model.safetensors").state_dict(),
    )
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


@pytest.mark.slow
def test_a_recipe_change_discards_the_interrupted_training_of_a_later_stage(tmp_path):
    """Killed in finetune, the prune stage's sparsity changed, --resume: finetune starts afresh
    (it used to continue the old half-trained state 'at step 60 of 126')."""
    out = tmp_path / "out"
    kill_when(cli("run", str(write_recipe(tmp_path / "r.yaml", _pruned(0.5))), "--out", str(out)),
              out / ".work" / "02-finetune", CHECKPOINT_NAME)  # fmt: skip
    resumed = run(_pruned(0.8), out, resume=True)
    assert [s["resume"] for s in resumed.stages] == ["reused", "computed", "computed"]
    fresh = run(_pruned(0.8), tmp_path / "fresh")
    assert resumed.final["accuracy"] == fresh.final["accuracy"]
    assert resumed.final["nonzero_params"] == fresh.final["nonzero_params"]
    assert _same_weights(out, tmp_path / "fresh")
    md = (out / "report.md").read_text()
    assert "resumed" in md  # the reused train stage is marked in the table


def _npz(path, x, y) -> str:
    np.savez(path, x=x, y=y)
    return str(path)


def test_changed_data_content_recomputes_every_stage(tmp_path, digits):
    x = digits.train.tensors[0].numpy()
    y = digits.train.tensors[1].numpy()
    data = tmp_path / "d.npz"
    recipe = {
        "seed": 0,
        "model": DIGITS_MLP,
        "data": {"npz": _npz(data, x, y)},
        "measure": {"latency_repeats": 3, "onnx_fp32": False},
        "stages": [{"train": {"epochs": 1}}, {"evaluate": {}}],
    }
    run(recipe, tmp_path / "out")
    again = run(recipe, tmp_path / "out", resume=True)
    assert [s["resume"] for s in again.stages] == ["reused", "reused"]
    _npz(data, x[::-1].copy(), y[::-1].copy())  # same file, same recipe, other sample order
    changed = run(recipe, tmp_path / "out", resume=True)
    assert [s["resume"] for s in changed.stages] == ["computed", "computed"]


def test_changed_model_file_recomputes(tmp_path):
    loaded = open_model(DIGITS_MLP)
    weights = tmp_path / "w.safetensors"
    save_model(weights, loaded.module, loaded.architecture)
    recipe = digits_recipe({"finetune": {"epochs": 1}}, model={"path": str(weights)})
    run(recipe, tmp_path / "out")
    with torch.no_grad():
        loaded.module[1].weight.mul_(0.5)
    save_model(weights, loaded.module, loaded.architecture)
    again = run(recipe, tmp_path / "out", resume=True)
    assert [s["resume"] for s in again.stages] == ["computed"]


def test_a_changed_seed_recomputes(tmp_path):
    recipe = digits_recipe({"train": {"epochs": 1}}, model=DIGITS_MLP)
    run(recipe, tmp_path)
    again = run({**recipe, "seed": 7}, tmp_path, resume=True)
    assert [s["resume"] for s in again.stages] == ["computed"]


def test_a_checkpoint_edited_after_writing_is_refused(tmp_path):
    recipe = digits_recipe({"train": {"epochs": 1}}, {"evaluate": {}}, model=DIGITS_MLP)
    run(recipe, tmp_path)
    path = tmp_path / ".checkpoints" / "stage-00-train.safetensors"
    meta = read_safetensors_metadata(path)
    tensors = load_file(path)
    tensors["1.weight"] = torch.zeros_like(tensors["1.weight"])  # the fingerprint kept, the weights not
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CorruptFileError, match="do not match the digest"):
        run(recipe, tmp_path, resume=True)


def test_stale_work_of_ensemble_members_is_discarded(tmp_path):
    """Ensemble members train in folders beside the stage's (NN-ensemble-memberK): a planted,
    unreadable member checkpoint made by other inputs is discarded with the stage's, not resumed."""
    recipe = digits_recipe({"ensemble": {"members": 2, "epochs": 1}}, model=DIGITS_MLP)
    run(recipe, tmp_path)
    member = tmp_path / ".work" / "00-ensemble-member0"
    member.mkdir(parents=True, exist_ok=True)
    (member / CHECKPOINT_NAME).write_bytes(b"left by another run")
    again = run({**recipe, "seed": 5}, tmp_path, resume=True)
    assert [s["resume"] for s in again.stages] == ["computed"]
    assert not (member / CHECKPOINT_NAME).exists()


def test_stale_work_files_of_a_stage_are_discarded(tmp_path):
    """Files left in a stage's work folder by other inputs (here a planted training checkpoint) are
    removed before the stage runs; the result equals a fresh run's."""
    recipe = digits_recipe({"train": {"epochs": 1}}, {"finetune": {"epochs": 1}}, model=DIGITS_MLP)
    run(recipe, tmp_path / "a")
    work = tmp_path / "a" / ".work" / "01-finetune"
    (tmp_path / "a" / ".checkpoints" / "stage-01-finetune.safetensors").unlink()
    save_tensors(
        work / CHECKPOINT_NAME, {"w": torch.zeros(3)}, {"format": "torchshrink-train-state", "state": "{}"}
    )
    (work / ".key").write_text("someone-else")
    resumed = run(recipe, tmp_path / "a", resume=True)
    assert [s["resume"] for s in resumed.stages] == ["reused", "computed"]
    fresh = run(recipe, tmp_path / "b")
    assert resumed.final["accuracy"] == fresh.final["accuracy"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["stages"][1]["resume"] == "computed"
