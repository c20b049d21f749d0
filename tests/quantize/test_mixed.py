"""Mixed precision's measurements: layers that share an activation point go float together, the
units whose float copy helps most come first, and a fidelity budget (min_cosine) is met by leaving
the fewest units in float."""

from __future__ import annotations

import pytest
import torch
from testkit import PostNormBlock

from torchshrink.data.bundle import DatasetBundle
from torchshrink.inputs import samples
from torchshrink.measure import mean_cosine, predict
from torchshrink.quantization.mixed import OPTION_UNITS, MixedConfig, _float_units, choose_plan, float_gains
from torchshrink.quantization.ptq import quantize_model, uniform_plan


def _block_and_data() -> tuple[PostNormBlock, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(192, 16, 32, generator=torch.Generator().manual_seed(0))
    return PostNormBlock(outliers=30.0).eval(), x


def test_layers_reading_one_point_form_one_unit() -> None:
    model, x = _block_and_data()
    gm = quantize_model(model, x[:2], uniform_plan(model, "static"), [x[:64]])
    units = sorted(sorted(layers) for layers, _ in _float_units(gm, ["fc_a", "fc_b", "out"]))
    assert units == [["fc_a", "fc_b"], ["out"]]


def test_the_unit_reading_the_outliers_gains_most_in_float() -> None:
    model, x = _block_and_data()
    gains = float_gains(model, x[:2], [x[:64]], uniform_plan(model, "static"), x[64:])
    # the block has no product of two activations: switching that option off changes nothing
    assert (["(activation products)"], 0.0) in gains
    (first, first_gain), (second, second_gain) = [g for g in gains if g[0][0] not in OPTION_UNITS]
    assert sorted(first) == ["fc_a", "fc_b"] and first_gain > second_gain > 0


def _bundle(model: PostNormBlock, x: torch.Tensor) -> DatasetBundle:
    """Inputs with the model's own outputs as targets (the fidelity view an embedding model gets)."""
    y = predict(model, x).flatten(1)
    return DatasetBundle(
        "block", samples(x[:64], y[:64]), samples(x[64:], y[64:]), num_classes=1, labelled=False
    )


@pytest.mark.parametrize("target", [0.9992, 0.9999])
def test_a_cosine_target_is_met_with_the_fewest_float_layers(target) -> None:
    model, x = _block_and_data()
    calibration = [x[:64]]
    reference = predict(model, x[64:])

    def cosine(plan) -> float:
        return mean_cosine(
            predict(quantize_model(model, x[:2], plan, calibration), x[64:]).flatten(1), reference.flatten(1)
        )

    uniform = uniform_plan(model, "static")
    assert cosine(uniform) < 0.9991  # the outliers cost fidelity: the budget has work to do
    cfg = MixedConfig(min_cosine=target, candidates=[8], samples=128)
    plan = choose_plan(model, x[:2], calibration, _bundle(model, x), cfg, mode="static", bits=8)
    assert cosine(plan) >= target
    floated = {n for n, b in plan.layers.items() if b is None}
    assert {"fc_a", "fc_b"} <= floated  # the outlier readers first
    if target == 0.9992:  # one unit in float is enough (measured: 0.99948)
        assert plan.layers["out"] == 8  # and no more than the budget needs


def test_a_config_takes_exactly_one_budget() -> None:
    with pytest.raises(ValueError, match="exactly one budget"):
        MixedConfig(min_cosine=0.99, max_drop=1.0)
    with pytest.raises(ValueError, match="min_cosine"):
        MixedConfig(min_cosine=1.5)
