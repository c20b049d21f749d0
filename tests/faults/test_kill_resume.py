"""Kill-and-resume for every kind of training stage: a real SIGKILL at a training checkpoint, then
``--resume``, gives the uninterrupted run's exact numbers and weights, and the report says the stage
continued from its work files. Seeds pick each case's checkpoint interval, so the step killed at varies."""

from __future__ import annotations

import random

import pytest
from killing import cli, kill_when, write_recipe
from testkit import DIGITS_MLP, digits_recipe

from torchshrink import load_model, run
from torchshrink.checkpoint import CHECKPOINT_NAME

STUDENT = DIGITS_MLP
TEACHER = {"train": {"epochs": 2, "lr": 0.003}}


def _every(kind: str) -> int:
    return random.Random(kind).randint(3, 9)


CASES = {
    "train": [{"train": {"epochs": 4, "lr": 0.003, "checkpoint_every": _every("train")}}],
    "finetune": [
        TEACHER,
        {"prune": {"sparsity": 0.5}},
        {"finetune": {"epochs": 4, "checkpoint_every": _every("finetune")}},
    ],
    "distill": [
        TEACHER,
        {"distill": {"student": STUDENT, "epochs": 4, "checkpoint_every": _every("distill")}},
    ],
    "datafree": [
        TEACHER,
        {
            "datafree": {
                "student": STUDENT,
                "generator": "adversarial",
                "epochs": 4,
                "steps_per_epoch": 10,
                "batch_size": 32,
                "checkpoint_every": _every("datafree"),
            }
        },
    ],
    "qat": [
        TEACHER,
        {
            "quantize": {
                "mode": "qat",
                "bits": 4,
                "epochs": 3,
                "lr": 0.0005,
                "checkpoint_every": _every("qat"),
            }
        },
    ],
    "encode": [
        TEACHER,
        {"encode": {"bits": 4, "finetune_epochs": 4, "lr": 0.001, "checkpoint_every": _every("encode")}},
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_killed_training_resumes_to_the_uninterrupted_result(kind, tmp_path):
    recipe = digits_recipe(*CASES[kind], model=DIGITS_MLP)
    stage_index = len(CASES[kind]) - 1
    stage_name = next(iter(CASES[kind][-1]))
    whole = run(recipe, tmp_path / "whole")

    out = tmp_path / "killed"
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    kill_when(
        cli("run", str(path), "--out", str(out)),
        out / ".work" / f"{stage_index:02d}-{stage_name}",
        CHECKPOINT_NAME,
    )
    assert not (out / "report.json").exists()
    resumed = run(recipe, out, resume=True)

    assert [s["resume"] for s in resumed.stages] == ["reused"] * stage_index + ["continued"]
    for key in ("accuracy", "size_bytes", "params", "nonzero_params", "macs"):
        assert resumed.final[key] == whole.final[key], key
    a = load_model(tmp_path / "whole" / "model.safetensors").state_dict()
    b = load_model(out / "model.safetensors").state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
