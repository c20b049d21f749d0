"""Observers: which range each one picks from the values it saw."""

from __future__ import annotations

import pytest
import torch

from torchshrink.quantization.affine import QuantSpec, qparams, quant_error
from torchshrink.quantization.observers import make_observer

SPEC = QuantSpec(8, signed=False, symmetric=False)


def test_minmax_keeps_the_extremes_over_batches() -> None:
    obs = make_observer("minmax", SPEC)
    obs.update(torch.tensor([0.0, 1.0, 2.0]))
    obs.update(torch.tensor([-1.0, 0.5]))
    lo, hi = obs.bounds()
    assert (float(lo), float(hi)) == (-1.0, 2.0)


def test_moving_average_weights_new_batches_by_momentum() -> None:
    obs = make_observer("moving_average", SPEC)
    obs.update(torch.tensor([0.0, 10.0]))
    obs.update(torch.tensor([0.0, 20.0]))
    assert float(obs.bounds()[1]) == pytest.approx(0.9 * 10 + 0.1 * 20)


def test_percentile_ignores_a_rare_outlier() -> None:
    x = torch.cat([torch.rand(100_000), torch.tensor([1000.0])])
    pct = make_observer("percentile", SPEC)
    mm = make_observer("minmax", SPEC)
    pct.update(x)
    mm.update(x)
    assert float(mm.bounds()[1]) == 1000.0
    assert float(pct.bounds()[1]) < 1.01


def test_mse_range_has_lower_error_than_minmax_on_heavy_tails() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=gen) ** 3  # heavy tails: a few huge values
    spec = QuantSpec(4, signed=True, symmetric=True)
    errors = {}
    for name in ("minmax", "mse"):
        obs = make_observer(name, spec)
        obs.update(x)
        errors[name] = float(quant_error(x, *qparams(*obs.bounds(), spec), spec))
    assert errors["mse"] < 0.5 * errors["minmax"]


def test_per_channel_observer_gives_one_range_per_channel() -> None:
    spec = QuantSpec(8, per_channel=True, axis=0)
    w = torch.stack([torch.linspace(-1, 1, 10), torch.linspace(-5, 3, 10)])
    obs = make_observer("minmax", spec)
    obs.update(w)
    lo, hi = obs.bounds()
    assert lo.tolist() == [-1.0, -5.0] and hi.tolist() == [1.0, 3.0]


def test_unknown_observer_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="minmax, moving_average, percentile, mse"):
        make_observer("kl", SPEC)


def test_an_observer_that_saw_nothing_says_so() -> None:
    with pytest.raises(RuntimeError, match="calibration"):
        make_observer("minmax", SPEC).bounds()
