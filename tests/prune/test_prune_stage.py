"""The ``prune`` recipe stage: targets reached, masks kept through fine-tuning, schedules,
L1 training, sparse files, resume of a pruned architecture, config errors."""

from __future__ import annotations

import functools

import pytest
import torch
from testkit import DIGITS_CNN, DIGITS_MLP, digits_recipe, untimed

from torchshrink import load_model, run
from torchshrink.errors import RecipeError
from torchshrink.measure import accuracy
from torchshrink.recipe import parse_recipe

recipe = functools.partial(digits_recipe, model=DIGITS_MLP)


@pytest.fixture(scope="module")
def unstructured(tmp_path_factory):
    out = tmp_path_factory.mktemp("unstructured")
    report = run(
        recipe(
            {"train": {"epochs": 4, "lr": 0.003}},
            {"prune": {"sparsity": 0.9, "schedule": {"kind": "agp", "steps": 3, "epochs_between": 1}}},
            {"finetune": {"epochs": 2, "lr": 0.001}},
        ),
        out,
    )
    return out, report


def test_unstructured_reaches_sparsity_and_keeps_it_through_finetuning(unstructured):
    out, report = unstructured
    train, prune, finetune = report.stages
    weights = 64 * 300 + 300 * 100 + 100 * 10
    assert prune["details"]["weight_density"] == pytest.approx(0.1, abs=0.002)
    assert [s["nonzero_params"] for s in prune["details"]["steps"]] == sorted(
        [s["nonzero_params"] for s in prune["details"]["steps"]], reverse=True
    )  # AGP: more zeros each step
    nonzero_weights = prune["metrics"]["nonzero_params"] - (300 + 100 + 10)
    assert nonzero_weights <= 0.101 * weights
    assert finetune["metrics"]["nonzero_params"] <= prune["metrics"]["nonzero_params"]  # masks kept
    assert finetune["metrics"]["accuracy"] > 0.85  # fine-tuned 90%-sparse DIGITS_MLP still classifies digits
    assert finetune["metrics"]["size_bytes"] < 0.25 * train["metrics"]["size_bytes"]  # sparse storage
    saved = load_model(out / "model.safetensors")
    assert (out / "model.safetensors").stat().st_size < 0.25 * train["metrics"]["size_bytes"]
    assert (
        sum(int(torch.count_nonzero(p)) for p in saved.parameters()) == finetune["metrics"]["nonzero_params"]
    )


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "snip", "entropy", "random"])
def test_structured_every_criterion_halves_macs(importance, tmp_path, digits):
    report = run(
        recipe(
            {"train": {"epochs": 3, "lr": 0.003}},
            {"prune": {"granularity": "structured", "macs_reduction": 2.0, "importance": importance}},
        ),
        tmp_path,
    )
    base, pruned = report.baseline, report.final
    assert pruned["macs"] <= base["macs"] / 2
    assert pruned["params"] < base["params"]
    model = load_model(tmp_path / "model.safetensors")  # rebuilt from the recorded layer shapes
    assert sum(p.numel() for p in model.parameters()) == pruned["params"]
    assert accuracy(model, digits.test) == pytest.approx(pruned["accuracy"])


def test_random_is_worse_than_magnitude_before_finetuning(tmp_path):
    accs = {}
    for importance in ("magnitude", "random"):
        report = run(
            recipe(
                {"train": {"epochs": 4, "lr": 0.003, "cache": True}},
                {"prune": {"sparsity": 0.85, "importance": importance, "scope": "layer"}},
            ),
            tmp_path,
        )
        accs[importance] = report.final["accuracy"]
    assert accs["magnitude"] > accs["random"] + 0.1


def test_structured_resnet_with_schedule_and_resume(tmp_path):
    stages = (
        {"train": {"epochs": 2, "lr": 0.003}},
        {
            "prune": {
                "granularity": "structured",
                "params_reduction": 2.0,
                "scope": "layer",
                "schedule": {"kind": "linear", "steps": 2, "epochs_between": 1},
            }
        },
        {"evaluate": {}},
    )
    first = run(recipe(*stages, model=DIGITS_CNN), tmp_path)
    assert first.final["params"] <= first.baseline["params"] / 2
    steps = first.stages[1]["details"]["steps"]
    assert steps[0]["params"] > steps[1]["params"]  # the first step went halfway
    again = run(
        recipe(*stages, model=DIGITS_CNN), tmp_path, resume=True
    )  # checkpoint holds a smaller architecture
    assert all(s["resumed"] for s in again.stages)
    assert untimed(again.final) == untimed(first.final)


@pytest.mark.parametrize("target", ["weights", "bn"])
def test_l1_training_shrinks_the_penalised_tensors(tmp_path, target):
    # Adam moves a weight by at most ~lr per step, so batch-norm scales near 1 need a larger lr to shrink in 46 steps.
    l1 = {
        "weight": 3e-4 if target == "weights" else 1e-2,
        "epochs": 2,
        "lr": 0.003 if target == "weights" else 0.02,
        "target": target,
    }
    model = DIGITS_MLP if target == "weights" else DIGITS_CNN
    prune = (
        {"sparsity": 0.5, "l1_regularization": l1}
        if target == "weights"
        else {
            "granularity": "structured",
            "params_reduction": 1.5,
            "importance": "bn_scale",
            "l1_regularization": l1,
        }
    )
    report = run(recipe({"train": {"epochs": 2, "lr": 0.003}}, {"prune": prune}, model=model), tmp_path)
    details = report.stages[1]["details"]
    assert details["l1_mean_abs_after"] < 0.8 * details["l1_mean_abs_before"]
    assert set(details["l1_final_loss"]) == {"ce", "l1", "train_accuracy"}  # accuracy: monitored only


@pytest.mark.parametrize(
    "prune,expected",
    [
        ({}, "unstructured pruning takes a 'sparsity' target"),
        ({"granularity": "structured"}, "exactly one of sparsity, macs_reduction, params_reduction"),
        ({"granularity": "structured", "sparsity": 0.5, "macs_reduction": 2}, "exactly one of"),
        ({"macs_reduction": 2}, "macs_reduction applies to granularity: structured"),
        ({"sparsity": 1.5}, r"stages\[0\].prune.sparsity = 1.5"),
        (
            {"sparsity": 0.5, "importance": "hessian"},
            r"'magnitude', 'taylor', 'snip', 'entropy', 'random' or 'bn_scale'",
        ),
        (
            {"sparsity": 0.5, "schedule": {"kind": "oneshot", "steps": 3}},
            r"prune.schedule = .*oneshot' has exactly 1 step",
        ),
    ],
)
def test_prune_config_errors(prune, expected):
    with pytest.raises(RecipeError, match=expected):
        parse_recipe(recipe({"prune": prune}))
