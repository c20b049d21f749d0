"""Fake quantization: values on the grid, straight-through gradients, LSQ scale gradients."""

from __future__ import annotations

import pytest
import torch

from torchshrink.quantization.affine import QuantSpec, fake_quantize
from torchshrink.quantization.fakequant import FakeQuantize

SPEC = QuantSpec(4, signed=False, symmetric=False)


def calibrated(values: torch.Tensor, spec: QuantSpec = SPEC) -> FakeQuantize:
    fq = FakeQuantize(spec)
    fq.calibrate()
    assert torch.equal(fq(values), values)  # calibration only observes
    fq.freeze()
    return fq


def test_frozen_quantizer_rounds_to_the_grid() -> None:
    fq = calibrated(torch.linspace(0, 1.5, 50))
    x = torch.rand(100) * 2 - 0.2
    out = fq(x)
    assert torch.equal(out, fake_quantize(x, fq.scale, fq.zero_point, SPEC))
    assert len(torch.unique(out)) <= 16


def test_straight_through_gradient_is_one_inside_and_zero_where_it_clips() -> None:
    fq = calibrated(torch.linspace(0, 1.5, 50))
    x = torch.tensor([-1.0, 0.3, 0.77, 1.2, 9.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_learns_the_scale_with_a_damped_gradient() -> None:
    fq = calibrated(torch.linspace(0, 1.5, 50))
    fq.learn_scale()
    assert fq.learned and fq.scale.requires_grad
    x = torch.rand(256) * 3  # half the values clip: a larger scale would lower the error
    loss = ((fq(x) - x) ** 2).mean()
    loss.backward()
    assert fq.scale.grad is not None and float(fq.scale.grad) < 0
    before = float(fq.scale.detach())
    with torch.no_grad():
        fq.scale -= 0.5 * fq.scale.grad
    assert float(fq.scale.detach()) > before
    # forward value with a learned scale is still exactly on its grid
    assert torch.allclose(fq(x), fake_quantize(x, fq.scale.detach(), fq.zero_point, SPEC))


def test_dynamic_quantizer_uses_each_batch_range() -> None:
    fq = FakeQuantize(QuantSpec(8, signed=False, symmetric=False))
    fq.set_dynamic()
    small, large = torch.rand(64) * 0.1, torch.rand(64) * 100
    assert (fq(small) - small).abs().max() <= 0.1 / 255
    assert (fq(large) - large).abs().max() <= 100 / 255


def test_dynamic_points_must_be_8_bit_unsigned() -> None:
    with pytest.raises(ValueError, match="8-bit unsigned"):
        FakeQuantize(QuantSpec(4)).set_dynamic()


def test_per_channel_quantizer_needs_channels() -> None:
    with pytest.raises(ValueError, match="channels"):
        FakeQuantize(QuantSpec(8, per_channel=True))


def test_a_learned_scale_that_crossed_zero_quantizes_by_its_magnitude() -> None:
    fq = FakeQuantize(QuantSpec(8, per_channel=True), channels=2)
    w = torch.tensor([[0.5, -1.0], [0.2, 0.1]])
    fq.calibrate()
    fq(w)
    fq.freeze()
    fq.learn_scale()
    expected = fq(w).detach()
    with torch.no_grad():
        fq.scale[1] = -fq.scale[1]  # an LSQ step overshot zero (seen in QAT at 8 bits)
    assert torch.allclose(fq(w), expected)
    assert torch.equal(fq.dequantized(w), expected)  # what export stores agrees with the forward pass
