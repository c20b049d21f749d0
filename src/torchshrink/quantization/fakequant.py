"""Fake quantization: float tensors rounded to the integer grid in the forward pass, so training and
evaluation see exactly what int8 kernels will compute, while gradients flow (straight-through).

:class:`FakeQuantize` is one quantization point (a weight or an activation). Its life:
``calibrate`` (observe ranges, pass values through) -> ``freeze`` (fix scale and zero point from
the observer) -> optionally ``learn_scale`` (LSQ, Esser et al. 2020: the scale is a trained
parameter with a damped gradient) for quantization-aware training. ``dynamic`` points compute
their range from each batch at run time (dynamic quantization). Under ``torch.onnx.export`` a point
writes ONNX ``QuantizeLinear``/``DequantizeLinear`` with its own scale and zero point.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from torchshrink.quantization.affine import QuantSpec, dequantize, fake_quantize, qparams, quantize
from torchshrink.quantization.observers import make_observer

__all__ = ["FakeQuantize"]

_ONNX_INT8 = 3  # onnx.TensorProto.INT8
_ONNX_UINT8 = 2  # onnx.TensorProto.UINT8
_ONNX_INT32 = 6  # onnx.TensorProto.INT32
_MIN_SCALE = 1e-8


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _scaled_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    return x * factor + (x - x * factor).detach()


class _ExportQDQ(torch.autograd.Function):
    """Writes Q/DQ nodes into an ONNX graph; used only while exporting (values equal fake_quantize)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: list, zero_point: list, bits: int, signed: bool
    ) -> torch.Tensor:  # noqa: ARG004
        return x.clone()  # only shapes matter while tracing for export

    @staticmethod
    def symbolic(g, x, scale: list, zero_point: list, bits: int, signed: bool):  # noqa: ANN001, ANN205
        spec = QuantSpec(bits, signed)
        s, zp = float(scale[0]), int(zero_point[0])
        if bits < 8:  # ONNX codes are 8-bit: clip first so the codes stay on the narrower grid
            lo = g.op("Constant", value_t=torch.tensor((spec.qmin - zp) * s, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor((spec.qmax - zp) * s, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        s_node = g.op("Constant", value_t=torch.tensor(s, dtype=torch.float32))
        zp_node = g.op("Constant", value_t=torch.tensor(zp, dtype=torch.int8 if signed else torch.uint8))
        q = g.op("QuantizeLinear", x, s_node, zp_node)
        return g.op("DequantizeLinear", q, s_node, zp_node)


class _ExportDynamicQDQ(torch.autograd.Function):
    """ONNX ``DynamicQuantizeLinear`` (uint8, range of each batch) followed by ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        spec = QuantSpec(8, signed=False, symmetric=False)
        return fake_quantize(x, *qparams(x.min(), x.max(), spec), spec)

    @staticmethod
    def symbolic(g, x):  # noqa: ANN001, ANN205
        q, s, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        return g.op("DequantizeLinear", q, s, zp)


# Integer constants waiting to be written by _ExportConstDQ.symbolic, by key (exporting passes only
# Python values to a symbolic function, so the tensors travel through this table).
_EXPORT_CONSTANTS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]] = {}


@contextmanager
def untraced() -> Iterator[None]:
    """Compute export-time constants without the ONNX tracer recording them (it cannot map tensors
    that come from outside the traced module, such as another layer's scale)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def export_constant_dq(
    value: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    dtype: int,
) -> torch.Tensor:
    """While exporting: ``value`` written as integer ``codes`` + ``DequantizeLinear`` (int8 weights, int32 biases)."""
    key = f"c{id(value)}-{len(_EXPORT_CONSTANTS)}"
    _EXPORT_CONSTANTS[key] = (codes.detach(), scale.detach().float(), zero_point.detach(), axis, dtype)
    return _ExportConstDQ.apply(value, key)


class _ExportConstDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, key: str) -> torch.Tensor:  # noqa: ARG004
        # Only shapes matter while tracing for export, and the tracer must not see the stored
        # constants (tensors from outside the traced inputs break it): pass the value through.
        return value.clone()

    @staticmethod
    def symbolic(g, value, key: str):  # noqa: ANN001, ANN205, ARG004
        codes, scale, zero_point, axis, dtype = _EXPORT_CONSTANTS.pop(key)
        torch_dtype = {_ONNX_INT8: torch.int8, _ONNX_UINT8: torch.uint8, _ONNX_INT32: torch.int32}[dtype]
        c = g.op("Constant", value_t=codes.to(torch_dtype))
        s = g.op("Constant", value_t=scale)
        zp = g.op("Constant", value_t=zero_point.to(torch_dtype))
        if scale.dim():
            return g.op("DequantizeLinear", c, s, zp, axis_i=axis)
        return g.op("DequantizeLinear", c, s, zp)


class FakeQuantize(nn.Module):
    """One quantization point: observe, then round to ``spec``'s grid with a straight-through gradient.

    ``channels`` sizes per-channel parameters (weights); activations are per-tensor. State kept in
    the state dict: ``scale`` and ``zero_point``; the observer is calibration-time only.
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and channels is None:
            raise ValueError("a per-channel quantizer needs the number of channels")
        shape = (channels,) if spec.per_channel else ()
        self.spec = spec
        self.observer_name = observer
        self.observer = make_observer(observer, spec)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.observing = False
        self.enabled = False
        self.dynamic = False
        self.last_scale = 0.0

    def extra_repr(self) -> str:
        s = self.spec
        mode = (
            "dynamic" if self.dynamic else "observing" if self.observing else "on" if self.enabled else "off"
        )
        return (
            f"bits={s.bits}, signed={s.signed}, symmetric={s.symmetric}, per_channel={s.per_channel}, {mode}"
        )

    # --- life cycle -------------------------------------------------------------------------------
    def calibrate(self) -> None:
        """Observe what passes (values unchanged) until :meth:`freeze`."""
        self.observer = make_observer(self.observer_name, self.spec)
        self.observing, self.enabled, self.dynamic = True, False, False

    def freeze(self) -> None:
        """Fix scale and zero point from what the observer saw, and start quantizing."""
        scale, zero_point = self.observer.qparams()
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.observing, self.enabled = False, True

    def set_dynamic(self) -> None:
        """Quantize each batch with its own range (8-bit unsigned, as ONNX DynamicQuantizeLinear)."""
        if self.spec.bits != 8 or self.spec.signed or self.spec.per_channel:
            raise ValueError("dynamic quantization points are 8-bit unsigned per-tensor")
        self.observing, self.enabled, self.dynamic = False, True, True

    def learn_scale(self) -> None:
        """Make the scale a trained parameter (LSQ); it starts from the frozen value."""
        if not isinstance(self.scale, nn.Parameter):
            value = self.scale.detach().clone()
            del self.scale
            self.scale = nn.Parameter(value)

    @property
    def learned(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def step(self) -> torch.Tensor:
        """The scale in use, without gradient. A learned scale may cross zero during training; its
        magnitude is what quantizes (forward, export and stored codes alike)."""
        return self.scale.detach().abs().clamp_min(_MIN_SCALE)

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observer.update(x)
        if not self.enabled:
            return x
        if torch.onnx.is_in_onnx_export():
            if self.dynamic:
                return _ExportDynamicQDQ.apply(x)
            with untraced():
                scale, zero_point = (
                    self.step().reshape(-1).tolist(),
                    self.zero_point.reshape(-1).tolist(),
                )
            return _ExportQDQ.apply(x, scale, zero_point, self.spec.bits, self.spec.signed)
        if self.dynamic:
            spec = self.spec
            with torch.no_grad():
                scale, zero_point = qparams(x.min(), x.max(), QuantSpec(8, signed=False, symmetric=False))
            self.last_scale = float(scale)  # the step of the latest batch (export checks compare within it)
            return self._ste(
                x, scale, zero_point, QuantSpec(8, signed=False, symmetric=False, axis=spec.axis)
            )
        if self.learned:
            return self._lsq(x)
        return self._ste(x, self.step(), self.zero_point, self.spec)

    def _ste(
        self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
    ) -> torch.Tensor:
        """Quantized values forward; gradient 1 inside the representable range, 0 where it clips."""
        shape = self._broadcast_shape(x)
        s, zp = scale.detach().reshape(shape), zero_point.reshape(shape).float()
        clipped = torch.maximum(torch.minimum(x, (spec.qmax - zp) * s), (spec.qmin - zp) * s)
        return clipped + (fake_quantize(x.detach(), scale.detach(), zero_point, spec) - clipped).detach()

    def _lsq(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ: ``(clamp(round_ste(x / s) + zp) - zp) * s`` with the scale gradient damped by 1/sqrt(n * qmax)."""
        shape = self._broadcast_shape(x)
        per_scale = x.numel() / self.scale.numel()
        s = _scaled_grad(
            self.scale.abs().clamp_min(_MIN_SCALE), 1.0 / math.sqrt(per_scale * max(self.spec.qmax, 1))
        ).reshape(shape)
        zp = self.zero_point.reshape(shape).float()
        v = torch.clamp(x / s + zp, self.spec.qmin, self.spec.qmax)
        return (_round_ste(v) - zp) * s

    def _broadcast_shape(self, x: torch.Tensor) -> list[int]:
        shape = [1] * x.dim()
        if self.spec.per_channel:
            shape[self.spec.axis] = -1
        return shape

    # --- integer view (export, storage) -----------------------------------------------------------
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` under the frozen (or learned) parameters."""
        return quantize(x.detach(), self.step(), self.zero_point, self.spec)

    def constant_dq(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as it will be stored: int8 codes + DequantizeLinear when exporting, fake-quant otherwise."""
        if not torch.onnx.is_in_onnx_export():
            return self(x)
        with untraced():
            codes = self.codes(x)
        dtype = _ONNX_INT8 if self.spec.signed else _ONNX_UINT8
        return export_constant_dq(x, codes, self.step(), self.zero_point, self.spec.axis, dtype)

    def dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """Float values of ``x`` on the grid, without autograd (for folding into plain layers)."""
        return dequantize(self.codes(x), self.step(), self.zero_point, self.spec)
