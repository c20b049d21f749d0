"""Measuring a model switches it to eval mode for the measurement only: afterwards every submodule
has its own mode back (a model whose parts are in different modes keeps them)."""

from __future__ import annotations

import torch
from torch import nn

from torchshrink.measure import count_macs, predict
from torchshrink.modes import switched
from torchshrink.pruning.structural import recalibrate_batchnorm


def _mixed() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # frozen batch-norm statistics inside a training model
    return model


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_switched_restores_each_submodule_mode() -> None:
    model = _mixed()
    before = _modes(model)
    with switched(model):
        assert not any(_modes(model))
    assert _modes(model) == before
    with switched(model, training=True):
        assert all(_modes(model))
    assert _modes(model) == before


def test_measurements_leave_mixed_modes_as_they_were() -> None:
    model, x = _mixed(), torch.randn(16, 4)
    before = _modes(model)
    first, second = predict(model, x), predict(model, x)
    assert torch.equal(first, second)  # dropout was off while predicting
    count_macs(model, (4,))
    assert _modes(model) == before


def test_batchnorm_recalibration_keeps_dropout_off() -> None:
    model = _mixed()
    model.eval()
    seen: list[bool] = []
    model[2].register_forward_hook(lambda module, args, out: seen.append(module.training))
    assert recalibrate_batchnorm(model, [torch.randn(16, 4)])
    assert seen == [False] and not model[1].training
    assert float(model[1].num_batches_tracked) == 1  # the statistics were re-estimated
