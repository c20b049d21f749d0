"""Sensitivity allocation: the calibration loss decides how many channels each group loses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from testkit import DIGITS_CNN
from torch import nn

from torchshrink.measure import count_macs, count_params
from torchshrink.models import open_model
from torchshrink.prune.allocation import sensitivity_plan
from torchshrink.prune.graph import find_groups
from torchshrink.prune.stage import PruneConfig
from torchshrink.prune.structural import mask_channels, plan_layer, rebind, remove_channels
from torchshrink.train import DatasetBatches, TrainConfig, fit


def _masked_loss(model, groups, plan, batches) -> float:
    twin = copy.deepcopy(model).eval()
    mask_channels(twin, rebind(groups, model, twin), plan)
    with torch.no_grad():
        return sum(float(F.cross_entropy(twin(x), y)) for x, y in batches) / len(batches)


def _trained(model: nn.Module, data, epochs: int = 3) -> nn.Module:
    fit(
        model,
        DatasetBatches(data.train, 64, seed=0),
        config=TrainConfig(epochs=epochs, lr=3e-3, seed=0, progress=False),
    )
    return model.eval()


def _batches(data, n: int = 4):
    x, y = data.train.tensors
    return [(x[i * 64 : (i + 1) * 64], y[i * 64 : (i + 1) * 64]) for i in range(n)]


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
    example, batches = digits.train.tensors[0][:2], _batches(digits)
    groups = find_groups(model, example)
    assert [g.name for g in groups] == ["1", "3"]
    scores = [torch.cat([torch.zeros(4), torch.ones(12)]), torch.rand(16)]
    base_params = count_params(model)[0]
    per_unit = 64 + 1 + 16  # a first-layer unit: its weight row, its bias, its consumer column
    plan = sensitivity_plan(
        model,
        example,
        groups,
        scores,
        batches,
        max_ratio=0.9,
        reached=lambda params, macs: params <= base_params - 4 * per_unit,
        cost=lambda params, macs: params,
    )
    # Removing any second-layer units raises the loss; the dead ones cost nothing: they alone go.
    assert sorted(plan[0].tolist()) == [0, 1, 2, 3] and 1 not in plan
    assert _masked_loss(model, groups, plan, batches) == pytest.approx(
        _masked_loss(model, groups, {}, batches)
    )


def test_sensitivity_loses_less_than_a_uniform_plan_at_the_same_macs(digits):
    torch.manual_seed(0)
    model = _trained(open_model(DIGITS_CNN).module, digits)
    shape = digits.input_shape
    example, batches = digits.train.tensors[0][:2], _batches(digits)
    groups = find_groups(model, example)
    scores = [torch.rand(g.size, generator=torch.Generator().manual_seed(i)) for i, g in enumerate(groups)]
    goal = count_macs(model, shape) / 2
    plan = sensitivity_plan(
        model,
        example,
        groups,
        scores,
        batches,
        max_ratio=0.75,
        reached=lambda params, macs: macs <= goal,
        cost=lambda params, macs: macs,
    )
    assert _macs(model, groups, plan, shape) <= goal
    # The last step was trimmed: one channel fewer from any group misses the target.
    for gi, channels in plan.items():
        assert _macs(model, groups, {**plan, gi: channels[:-1]}, shape) > goal
    ratio = next(
        r / 100
        for r in range(1, 100)
        if _macs(model, groups, plan_layer(groups, scores, r / 100, 0.75), shape) <= goal
    )
    uniform = plan_layer(groups, scores, ratio, 0.75)
    assert _masked_loss(model, groups, plan, batches) < _masked_loss(model, groups, uniform, batches)


def _macs(model, groups, plan, shape) -> int:
    small = copy.deepcopy(model)
    remove_channels(small, rebind(groups, model, small), plan)
    return count_macs(small, shape)


@pytest.mark.parametrize(
    "options",
    [
        {"granularity": "unstructured", "sparsity": 0.5, "allocation": "sensitivity"},
        {"granularity": "structured", "scope": "layer", "macs_reduction": 2, "allocation": "ranking"},
    ],
)
def test_allocation_is_refused_where_it_does_not_apply(options):
    with pytest.raises(ValueError, match="'allocation' applies to structured pruning with scope: global"):
        PruneConfig(**options)
