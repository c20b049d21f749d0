"""The latency model (ms = a * MACs + b * elements + c, fitted by timing shrunken copies) and the
prune stage's ``speedup`` target, which plans against it and then times the result."""

from __future__ import annotations

import pytest
import torch
from testkit import DIGITS_CNN, digits_recipe

from torchshrink import run
from torchshrink.measure import count_activations, count_macs
from torchshrink.models import load_model
from torchshrink.prune import latency_model, stage
from torchshrink.prune.graph import find_groups
from torchshrink.prune.latency_model import LatencyModel, fit_latency_model
from torchshrink.prune.stage import PruneConfig
from torchshrink.zoo import build

SHAPE = (1, 28, 28)
TRUE = LatencyModel(ms_per_mac=2e-6, ms_per_element=5e-5, overhead_ms=0.3, relative_error=0.0)


def _linear_clock(models, input_shape, **_):
    """Timings that follow TRUE exactly: what fitting must recover."""
    return {
        name: TRUE.predict(count_macs(m, input_shape), count_activations(m, input_shape))
        for name, m in models.items()
    }


def test_fit_recovers_the_coefficients_from_copies_of_every_size(monkeypatch):
    seen = []

    def clock(models, input_shape, **kwargs):
        seen.extend(count_macs(m, input_shape) for m in models.values())
        return _linear_clock(models, input_shape)

    monkeypatch.setattr(latency_model, "latencies_ms", clock)
    model = build("lenet5")
    groups = find_groups(model, torch.zeros(2, *SHAPE))
    fitted = fit_latency_model(model, groups, SHAPE, max_ratio=0.9, samples=8)
    assert fitted.ms_per_mac == pytest.approx(TRUE.ms_per_mac, rel=1e-4)
    assert fitted.ms_per_element == pytest.approx(TRUE.ms_per_element, rel=1e-4)
    assert fitted.overhead_ms == pytest.approx(TRUE.overhead_ms, rel=1e-3)
    assert fitted.relative_error < 1e-4
    full = count_macs(model, SHAPE)
    assert seen[0] == full and len(set(seen)) == 9 and max(seen[1:]) < full  # the original, 8 distinct copies
    assert all(p.shape[0] in (20, 50, 500, 10) for n, p in model.named_parameters() if n.endswith("weight"))


def test_a_real_fit_orders_networks_by_size():
    model = build("lenet5")
    groups = find_groups(model, torch.zeros(2, *SHAPE))
    fitted = fit_latency_model(model, groups, SHAPE, max_ratio=0.9, samples=6, repeats=5)
    assert min(fitted.ms_per_mac, fitted.ms_per_element, fitted.overhead_ms) >= 0
    half = build("lenet5", conv1=10, conv2=25, fc=250)
    assert fitted.predict(count_macs(half, SHAPE), count_activations(half, SHAPE)) < fitted.predict(
        count_macs(model, SHAPE), count_activations(model, SHAPE)
    )


def test_speedup_target_plans_against_the_model_and_times_the_result(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "fit_latency_model", lambda *a, **k: TRUE)
    report = run(
        digits_recipe(
            {"train": {"epochs": 2, "lr": 0.003}},
            {"prune": {"granularity": "structured", "speedup": 1.5}},
            model=DIGITS_CNN,
        ),
        tmp_path,
    )
    details = report.stages[1]["details"]
    assert details["latency_model"]["ms_per_mac"] == TRUE.ms_per_mac
    pruned, shape = load_model(tmp_path / "model.safetensors"), (1, 8, 8)
    before = TRUE.predict(details["macs_before"], count_activations(build("resnet", width=8), shape))
    after = TRUE.predict(count_macs(pruned, shape), count_activations(pruned, shape))
    assert 1.5 <= before / after < 1.7  # reached, and not by pruning far more
    assert details["speedup_predicted"] == pytest.approx(before / after, rel=1e-3)
    assert details["speedup_measured"] > 0


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"speedup": 2.0}, "unstructured pruning takes a 'sparsity' target"),
        ({"granularity": "structured", "speedup": 2.0, "macs_reduction": 2.0}, "exactly one of"),
        (
            {
                "granularity": "structured",
                "macs_reduction": 2.0,
                "allocation": "ranking",
                "allocation_cost": "latency",
            },
            "'allocation_cost' applies to the sensitivity allocation",
        ),
    ],
)
def test_speedup_and_allocation_cost_errors(options, expected):
    with pytest.raises(ValueError, match=expected):
        PruneConfig(**options)
