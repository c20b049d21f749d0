"""The affine quantizer ``Q(x) = clamp(round(x * s + b), qmin, qmax)`` and its inverse.

torchshrink stores the step ``scale = 1 / s`` and the integer ``zero_point = b`` (the convention of
ONNX ``QuantizeLinear``, so exported files carry the very same numbers): ``q = clamp(round(x / scale)
+ zero_point)`` and ``x ~ (q - zero_point) * scale``. Rounding is half-to-even in both torch and ONNX
Runtime, so the two agree bit for bit. Per-channel parameters are 1-D tensors along ``axis``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantSpec", "qparams", "quantize", "dequantize", "fake_quantize", "quant_error"]

_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized: bit width, signedness, symmetry and per-channel axis.

    Signed symmetric suits weights (zero point 0, which ONNX Runtime's int8 kernels require);
    unsigned asymmetric suits activations (after ReLU the range starts at 0, so no level is wasted).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False
    axis: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits


def _along(t: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape per-channel parameters so they broadcast along ``spec.axis`` of ``x``."""
    if t.dim() == 0 or not spec.per_channel:
        return t
    shape = [1] * x.dim()
    shape[spec.axis] = -1
    return t.reshape(shape)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map the range ``[lo, hi]`` onto ``[qmin, qmax]``.

    The range is widened to contain 0 so that zero (padding, ReLU) is represented exactly.
    Symmetric ranges use ``max(|lo|, |hi|)`` and put the zero point in the middle of the grid.
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    if spec.symmetric:
        bound = torch.maximum(-lo, hi)
        scale = (bound / ((spec.qmax - spec.qmin) / 2)).clamp_min(_EPS)
        middle = 0 if spec.signed else (spec.qmin + spec.qmax + 1) // 2
        zero_point = torch.full_like(scale, float(middle))
    else:
        scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(_EPS)
        zero_point = (spec.qmin - torch.round(lo / scale)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point.to(torch.int32)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (int32 tensor)."""
    q = torch.round(x / _along(scale, x, spec)) + _along(zero_point, x, spec)
    return q.clamp(spec.qmin, spec.qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Float values ``(q - zero_point) * scale`` of integer codes."""
    return (q.to(torch.float32) - _along(zero_point, q, spec)) * _along(scale, q, spec)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float: the value an int8 kernel would see. No gradient."""
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)


def quant_error(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Mean squared error of fake-quantizing ``x`` (per channel when ``spec.per_channel``)."""
    err = (fake_quantize(x, scale, zero_point, spec) - x) ** 2
    if spec.per_channel:
        return err.transpose(0, spec.axis).reshape(err.shape[spec.axis], -1).mean(1)
    return err.mean()
