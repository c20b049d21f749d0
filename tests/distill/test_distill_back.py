"""Distilling a compressed model back from the original: ``student: current`` trains the pipeline's
model (just pruned) against the baseline as teacher; its architecture, and pruned zeros, stay."""

from __future__ import annotations

import pytest
from testkit import digits_recipe

from torchshrink.pipeline import run

MLP = {"zoo": "lenet300", "kwargs": {"in_features": 64}}


def test_a_pruned_model_is_distilled_back_from_the_baseline(tmp_path) -> None:
    report = run(
        digits_recipe(
            {"train": {"epochs": 8}},
            {"prune": {"granularity": "structured", "macs_reduction": 4, "allocation": "ranking"}},
            {"distill": {"student": "current", "epochs": 4, "lr": 0.001}},
            model=MLP,
        ),
        tmp_path,
    )
    trained, pruned, distilled = (s["metrics"] for s in report.stages)
    details = report.stages[2]["details"]
    # The teacher is the trained baseline, not the pruned model the stage was handed.
    assert details["models"]["teacher (baseline)"]["accuracy"] == pytest.approx(trained["accuracy"])
    assert distilled["macs"] == pruned["macs"] and distilled["params"] == pruned["params"]
    assert distilled["accuracy"] > pruned["accuracy"]


def test_distilling_back_keeps_unstructured_zeros(tmp_path) -> None:
    report = run(
        digits_recipe(
            {"train": {"epochs": 4}},
            {"prune": {"sparsity": 0.8}},
            {"distill": {"student": "current", "epochs": 2}},
            model=MLP,
        ),
        tmp_path,
    )
    pruned, distilled = report.stages[1]["metrics"], report.stages[2]["metrics"]
    assert distilled["nonzero_params"] <= pruned["nonzero_params"]
    assert report.stages[2]["details"]["epoch_losses"]  # it trained
