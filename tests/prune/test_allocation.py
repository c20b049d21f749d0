"""Sensitivity allocation: the calibration loss decides how many channels each group loses."""

from __future__ import annotations

import pytest
import torch
from testkit import DIGITS_CNN
from torch import nn

from torchshrink.measure import count_macs, count_params
from torchshrink.models import open_model
from torchshrink.pruning.allocation import masked_loss, sensitivity_plan
from torchshrink.pruning.config import PruneConfig
from torchshrink.pruning.graph import find_groups
from torchshrink.pruning.latency_model import LatencyModel
from torchshrink.pruning.structural import plan_layer, rebuilt_size
from torchshrink.train import DatasetBatches, TrainConfig, fit


def _trained(model: nn.Module, data, epochs: int = 3) -> nn.Module:
    fit(
        model,
        DatasetBatches(data.train, 64, seed=0),
        config=TrainConfig(epochs=epochs, lr=3e-3, seed=0, progress=False),
    )
    return model.eval()


def _allocate(model: nn.Module, data, scores, **options):
    """Groups, scores (``scores(groups)``), calibration batches and the sensitivity plan on the digits."""
    x, y = data.train.tensors
    batches = [(x[i * 64 : (i + 1) * 64], y[i * 64 : (i + 1) * 64]) for i in range(4)]
    groups = find_groups(model, x[:2])
    group_scores = scores(groups)
    return (
        groups,
        group_scores,
        batches,
        sensitivity_plan(model, x[:2], groups, group_scores, batches, **options),
    )


def test_dead_channels_go_first_and_cost_nothing(digits):
    torch.manual_seed(0)
    model = _trained(
        nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
        ),
        digits,
    )
    with torch.no_grad():
        model[3].weight[:, :4] = 0  # hidden units 0-3 of the first layer now feed nothing
    base_params = count_params(model)[0]
    per_unit = 64 + 1 + 16  # a first-layer unit: its weight row, its bias, its consumer column
    groups, _, batches, plan = _allocate(
        model,
        digits,
        lambda groups: [torch.cat([torch.zeros(4), torch.ones(12)]), torch.rand(16)],
        max_ratio=0.9,
        reached=lambda size: size.params <= base_params - 4 * per_unit,
        saves="params",
    )
    assert [g.name for g in groups] == ["1", "3"]
    # Removing any second-layer units raises the loss; the dead ones cost nothing: they alone go.
    assert sorted(plan[0].tolist()) == [0, 1, 2, 3] and 1 not in plan
    assert masked_loss(model, groups, plan, batches) == pytest.approx(masked_loss(model, groups, {}, batches))


def test_sensitivity_loses_less_than_a_uniform_plan_at_the_same_macs(digits):
    torch.manual_seed(0)
    model = _trained(open_model(DIGITS_CNN).module, digits)
    shape = digits.input_shape
    goal = count_macs(model, shape) / 2
    groups, scores, batches, plan = _allocate(
        model,
        digits,
        lambda groups: [
            torch.rand(g.size, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(groups)
        ],
        max_ratio=0.75,
        reached=lambda size: size.macs <= goal,
    )

    def macs(p) -> int:
        return rebuilt_size(model, groups, p, shape)[1]

    assert macs(plan) <= goal
    # Trimmed: one channel fewer removed from any group misses the target.
    for gi, channels in plan.items():
        assert macs({**plan, gi: channels[:-1]}) > goal
    ratio = next(r / 100 for r in range(1, 100) if macs(plan_layer(groups, scores, r / 100, 0.75)) <= goal)
    uniform = plan_layer(groups, scores, ratio, 0.75)
    assert masked_loss(model, groups, plan, batches) < masked_loss(model, groups, uniform, batches)


@pytest.mark.parametrize(
    "options,expected",
    [
        (
            {"granularity": "unstructured", "sparsity": 0.5, "allocation": "sensitivity"},
            r"allocation applies to granularity: structured \(this stage is unstructured\)",
        ),
        (
            {"granularity": "structured", "scope": "layer", "macs_reduction": 2, "allocation": "ranking"},
            "'allocation' applies to structured pruning with scope: global",
        ),
    ],
)
def test_allocation_is_refused_where_it_does_not_apply(options, expected):
    with pytest.raises(ValueError, match=expected):
        PruneConfig.model_validate(options)


def test_latency_cost_prefers_the_channels_whose_time_their_macs_hide(monkeypatch):
    # Group 0 (the first conv, 8x8 maps) writes 4x the elements per channel of group 1 (4x4 maps)
    # for 1.5x its MACs. A loss rise of 1 per group-0 channel and 0.5 per group-1 channel makes
    # group 1 the cheaper removal per MAC and group 0 the cheaper one per element written.
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 2),
    )
    x, y = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    groups = find_groups(model, x[:2])
    weights = {0: 1.0, 1: 0.5}
    monkeypatch.setattr(
        "torchshrink.pruning.allocation.masked_loss",
        lambda model, groups, plan, batches: sum(weights[gi] * len(c) for gi, c in plan.items()),
    )
    base = rebuilt_size(model, groups, {}, (1, 8, 8))
    options = dict(max_ratio=0.9, reached=lambda size: size.macs < base.macs)
    scores = [torch.arange(g.size, dtype=torch.float) for g in groups]
    by_macs = sensitivity_plan(model, x[:2], groups, scores, [(x, y)], saves="macs", **options)
    elements_only = LatencyModel(ms_per_mac=0.0, ms_per_element=1e-3, overhead_ms=0.1, relative_error=0.0)
    by_time = sensitivity_plan(
        model, x[:2], groups, scores, [(x, y)], saves="latency", latency=elements_only, **options
    )
    assert {gi: c.tolist() for gi, c in by_macs.items()} == {1: [0]}
    assert {gi: c.tolist() for gi, c in by_time.items()} == {0: [0]}
    with pytest.raises(ValueError, match="needs a fitted latency model"):
        sensitivity_plan(model, x[:2], groups, scores, [(x, y)], saves="latency", **options)
