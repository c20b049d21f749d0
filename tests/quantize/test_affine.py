"""The affine quantizer against hand-computed values, and its round-trip error bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchshrink.quantization.affine import QuantSpec, dequantize, fake_quantize, qparams, quantize


def test_ranges_of_each_spec() -> None:
    assert (QuantSpec(8).qmin, QuantSpec(8).qmax) == (-128, 127)
    assert (QuantSpec(8, signed=False).qmin, QuantSpec(8, signed=False).qmax) == (0, 255)
    assert (QuantSpec(4).qmin, QuantSpec(4).qmax) == (-8, 7)
    assert (QuantSpec(2, signed=False).qmin, QuantSpec(2, signed=False).qmax) == (0, 3)
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(1)


def test_asymmetric_uint8_by_hand() -> None:
    spec = QuantSpec(8, signed=False, symmetric=False)
    scale, zp = qparams(torch.tensor(-1.0), torch.tensor(2.0), spec)
    assert float(scale) == pytest.approx(3.0 / 255)
    assert int(zp) == 85  # 0 - round(-1 / (3/255)) = round(85.0)
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0, 5.0, -3.0])
    q = quantize(x, scale, zp, spec)
    # round(x * 85) + 85, clamped to [0, 255]; 0.5 * 85 = 42.5 rounds half to even (as ONNX does) -> 42
    assert q.tolist() == [0, 85, 127, 255, 255, 0]
    assert float(dequantize(q, scale, zp, spec)[1]) == 0.0  # zero is exact


def test_symmetric_int4_by_hand() -> None:
    spec = QuantSpec(4, signed=True, symmetric=True)
    scale, zp = qparams(torch.tensor(-0.3), torch.tensor(1.5), spec)
    assert float(scale) == pytest.approx(1.5 / 7.5)
    assert int(zp) == 0
    q = quantize(torch.tensor([1.5, -1.5, 0.3, 0.1, -2.0]), scale, zp, spec)
    assert q.tolist() == [7, -8, 2, 0, -8]  # 0.3/0.2 = 1.5 rounds half to even -> 2; 0.1/0.2 = 0.5 -> 0


def test_range_always_contains_zero() -> None:
    spec = QuantSpec(8, signed=False, symmetric=False)
    scale, zp = qparams(torch.tensor(2.0), torch.tensor(4.0), spec)
    assert int(zp) == 0 and float(scale) == pytest.approx(4.0 / 255)


def test_per_channel_parameters_apply_along_the_axis() -> None:
    spec = QuantSpec(8, per_channel=True, axis=0)
    w = torch.tensor([[1.0, -0.5], [100.0, 50.0]])
    scale, zp = qparams(w.amin(1), w.amax(1), spec)
    assert scale.tolist() == pytest.approx([1 / 127.5, 100 / 127.5])
    q = quantize(w, scale, zp, spec)
    assert q[0].tolist() == [127, -64] and q[1].tolist() == [127, 64]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    lo=st.floats(-50, 0),
    width=st.floats(1e-3, 100),
)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits, signed, symmetric, lo, width) -> None:
    spec = QuantSpec(bits, signed=signed, symmetric=symmetric)
    hi = lo + width
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), spec)
    lo_q = (spec.qmin - float(zp)) * float(scale)
    hi_q = (spec.qmax - float(zp)) * float(scale)
    x = torch.linspace(max(lo, lo_q), min(hi, hi_q), 257)
    err = (fake_quantize(x, scale, zp, spec) - x).abs().max()
    assert float(err) <= float(scale) / 2 * (1 + 1e-4) + 1e-7
