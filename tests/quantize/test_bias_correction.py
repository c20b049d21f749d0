"""Empirical bias correction: biases absorb the mean output shift that weight rounding causes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from testkit import randomise_bn

from torchshrink.quantization.prepare import QuantOptions, weight_quantizers
from torchshrink.quantization.ptq import correct_bias, quantize_model, uniform_plan

sys.path.insert(0, str(Path(__file__).parents[1] / "foreign"))
from same_padding import same_pad_net  # noqa: E402


def _error(model, reference, x) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).pow(2).mean())


def test_bias_correction_removes_the_mean_shift_and_brings_outputs_closer() -> None:
    model = randomise_bn(same_pad_net())
    gen = torch.Generator().manual_seed(0)
    calibration, held_out = (
        torch.rand(64, 3, 16, 16, generator=gen) * 2 - 1,
        torch.rand(64, 3, 16, 16, generator=gen) * 2 - 1,
    )
    plan = uniform_plan(
        model, "static", 4, options=QuantOptions(reduce_range=True)
    )  # 4-bit weights: a large, visible shift
    plain = quantize_model(model, calibration[:2], plan, [calibration])
    corrected = quantize_model(model, calibration[:2], plan, [calibration], bias_correction=True)
    assert _error(corrected, model, held_out) < 0.8 * _error(plain, model, held_out)
    # The stem reads the same quantized input in both: measured against the float stem (the plain
    # copy with its weight quantizer off), its per-channel mean error is gone after correction.
    fq = weight_quantizers(plain)["stem"]
    with torch.no_grad():
        quantized_plain = plain.get_submodule("stem")(calibration)
        quantized_corrected = corrected.get_submodule("stem")(calibration)
        fq.enabled = False
        exact = plain.get_submodule("stem")(calibration)
        fq.enabled = True
    before = (quantized_plain - exact).mean(dim=(0, 2, 3)).abs().max()
    after = (quantized_corrected - exact).mean(dim=(0, 2, 3)).abs().max()
    assert before > 0 and after < 0.5 * before  # what is left is the int32 rounding of the bias itself


def test_layers_without_bias_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4, bias=False)).eval()
    x = torch.rand(16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    gm = quantize_model(model, x[:2], uniform_plan(model, "static", 8), [x])
    assert correct_bias(gm, [x]) == 0


def test_linear_layers_on_token_inputs_are_corrected_per_feature() -> None:
    # (batch, tokens, features): the features are on the last axis, not axis 1.
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    x = torch.rand(16, 7, 6, generator=torch.Generator().manual_seed(0))
    gm = quantize_model(model, x[:2], uniform_plan(model, "static", 4), [x], bias_correction=True)
    assert gm(x).shape == (16, 7, 3)
