"""Preparing a model: batch-norm folding, quantizer placement, saved plans rebuilding the structure."""

from __future__ import annotations

import pytest
import torch
from testkit import randomise_bn
from torch import nn

from torchshrink.errors import QuantizationError
from torchshrink.quantization.prepare import (
    QuantOptions,
    QuantPlan,
    activation_quantizers,
    prepare,
    quantizable_layers,
    weight_quantizers,
)
from torchshrink.quantization.ptq import calibrate, uniform_plan
from torchshrink.zoo import build


def test_batchnorm_folds_exactly_into_convolutions() -> None:
    model = randomise_bn(build("resnet", width=4))
    x = torch.randn(4, 1, 28, 28)
    folded = prepare(model, x[:2], QuantPlan(mode="weight_only", layers={}))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_lenet5_points_sit_after_relu_and_are_reapplied_after_pooling() -> None:
    model = build("lenet5").eval()
    x = torch.rand(64, 1, 28, 28)
    gm = calibrate(prepare(model, x[:2], uniform_plan(model, "static", 8)), [x])
    points = activation_quantizers(gm)
    # the input, conv1+relu, conv2+relu, fc1+relu
    assert len(points) == 4
    code = gm.code
    for name in points:
        assert code.count(f"self.{name}(") >= 1
    # after a ReLU the range starts at 0: zero point 0 on the unsigned grid, no level wasted
    post_relu = [fq for n, fq in points.items() if "input" not in n]
    assert all(int(fq.zero_point) == 0 for fq in post_relu)
    # a point is re-applied after max-pool and flatten (codes pass through them): conv1's point runs
    # after ReLU and max-pool, conv2's after ReLU, max-pool and flatten
    assert [code.count(f"self.{n}(") for n in points] == [1, 2, 3, 1]
    assert set(weight_quantizers(gm)) == set(quantizable_layers(model))


def test_float_layers_keep_float_weights_and_no_input_point() -> None:
    model = build("lenet300", in_features=64).eval()
    layers = quantizable_layers(model)
    plan = QuantPlan(mode="static", layers={layers[0]: 8, layers[1]: None, layers[2]: 4})
    gm = prepare(model, torch.rand(2, 64), plan)
    assert set(weight_quantizers(gm)) == {layers[0], layers[2]}
    assert weight_quantizers(gm)[layers[2]].spec.bits == 4
    assert torch.equal(gm.get_submodule(layers[1]).weight, model.get_submodule(layers[1]).weight)


def test_weight_codes_stay_on_a_per_channel_grid() -> None:
    model = build("lenet5").eval()
    gm = prepare(model, torch.rand(2, 1, 28, 28), uniform_plan(model, "weight_only", 3))
    for name in quantizable_layers(model):
        w = gm.get_submodule(name).weight
        for row in w.reshape(w.shape[0], -1):
            assert len(torch.unique(row)) <= 8


def test_reduce_range_uses_seven_bit_weights() -> None:
    model = build("lenet300", in_features=64).eval()
    gm = prepare(
        model, torch.rand(2, 64), uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=True))
    )
    assert {fq.spec.bits for fq in weight_quantizers(gm).values()} == {7}


def test_stem_layer_is_a_first_conv_on_few_channels() -> None:
    from torchshrink.quantization.ptq import stem_layer

    assert stem_layer(build("lenet5")) is None  # its conv1 feeds a max-pool: int8 keeps it NHWC
    assert stem_layer(build("cnn1d")) == "0"
    assert stem_layer(build("resnet", width=4)) == "stem.0"
    assert stem_layer(build("resnet", width=4, in_channels=8)) is None  # wide input: int8 pays off
    assert stem_layer(build("lenet300")) is None  # a linear first layer


def test_quant_options_are_checked_and_plans_round_trip_flat():
    with pytest.raises(QuantizationError, match="activation_bits=9.*observer='max'"):
        QuantOptions(activation_bits=9, observer="max")
    with pytest.raises(QuantizationError, match="smoothing=1.5"):
        QuantPlan(layers={"fc": 8}).with_options(smoothing=1.5)
    plan = QuantPlan(mode="static", layers={"fc": 4, "out": None}, options=QuantOptions(reduce_range=True))
    record = plan.to_dict()
    assert record["reduce_range"] is True and "options" not in record  # the flat format saved models carry
    assert QuantPlan.from_dict(record) == plan
    old = {"mode": "static", "layers": {"fc": 8}, "per_channel": True}  # saved before matmuls / embeddings
    assert QuantPlan.from_dict(old).options == QuantOptions(matmuls=False, embeddings=False)
