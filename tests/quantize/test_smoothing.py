"""Activation smoothing (SmoothQuant): in float the smoothed model computes what the original did
(folded into a LayerNorm or through an input scale), and with outlier input channels it makes
static int8 closer to float; the int8 file runs on ONNX Runtime and a saved model reloads."""

from __future__ import annotations

import pytest
import torch
from testkit import PostNormBlock, PreNormBlock
from torch import nn

from torchshrink.measure import mean_cosine
from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.quantization.onnx_int8 import export_int8, needs_reduced_range
from torchshrink.quantization.prepare import QuantOptions, activation_quantizers, weight_quantizers
from torchshrink.quantization.ptq import quantize_model, uniform_plan
from torchshrink.quantization.smoothing import InputScale


def _data(n: int = 256) -> torch.Tensor:
    return torch.randn(n, 16, 32, generator=torch.Generator().manual_seed(0))


def _without_quantizers(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    quantizers = [*activation_quantizers(gm).values(), *weight_quantizers(gm).values()]
    for fq in quantizers:
        fq.enabled = False
    try:
        with torch.no_grad():
            return gm(x)
    finally:
        for fq in quantizers:
            fq.enabled = True


@pytest.mark.parametrize(("block", "scales"), [(PreNormBlock, 1), (PostNormBlock, 2)])
def test_smoothing_computes_the_same_in_float(block, scales) -> None:
    torch.manual_seed(0)
    model, x = block(outliers=20.0).eval(), _data()
    plan = uniform_plan(model, "static", 8, options=QuantOptions(smoothing=0.5))
    gm = quantize_model(model, x[:2], plan, [x[:64]])
    modules = [m for m in gm.modules() if isinstance(m, InputScale)]
    assert len(modules) == scales  # post-LN: one for fc_a/fc_b, one for out; pre-LN: only out's
    assert all(not torch.allclose(m.inverse, torch.ones_like(m.inverse)) for m in modules)
    smoothed_norm = gm.get_submodule("norm").weight
    assert torch.equal(smoothed_norm, model.norm.weight) == (block is PostNormBlock)
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(_without_quantizers(gm, x), expected, atol=1e-5, rtol=1e-4)


def test_smoothing_brings_int8_with_outlier_channels_closer_to_float() -> None:
    torch.manual_seed(0)
    model, x = PostNormBlock(outliers=30.0).eval(), _data()
    with torch.no_grad():
        expected = model(x[64:]).flatten(1)
    errors = {}
    for alpha in (None, 0.5):
        gm = quantize_model(
            model, x[:2], uniform_plan(model, "static", 8, options=QuantOptions(smoothing=alpha)), [x[:64]]
        )
        with torch.no_grad():
            errors[alpha] = float(((gm(x[64:]).flatten(1) - expected) ** 2).mean())
    assert errors[0.5] < 0.5 * errors[None]


def test_a_smoothed_int8_file_runs_int8_kernels_and_matches(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = PostNormBlock(outliers=30.0).eval(), _data()
    plan = uniform_plan(
        model, "static", 8, options=QuantOptions(smoothing=0.5, reduce_range=needs_reduced_range())
    )
    gm = quantize_model(model, x[:2], plan, [x[:64]])
    info = export_int8(gm, tmp_path / "block.int8.onnx", (16, 32), check_inputs=x[64:96])
    assert info["operators"].get("Mul", 0) >= 2  # the two input scales
    assert info["int8_kernels"] >= 3
    with torch.no_grad():
        reference = model(x[96:]).flatten(1)
    onnx_out = OnnxRuntimeModel(tmp_path / "block.int8.onnx")(x[96:]).flatten(1)
    assert mean_cosine(onnx_out, reference) > 0.99
