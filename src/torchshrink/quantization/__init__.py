"""Quantization: the affine quantizer, observers, fake-quant/QAT, PTQ, mixed precision, int8 on ONNX Runtime."""

from torchshrink.quantization.affine import QuantSpec, dequantize, fake_quantize, qparams, quantize
from torchshrink.quantization.fakequant import FakeQuantize
from torchshrink.quantization.observers import OBSERVERS, make_observer
from torchshrink.quantization.prepare import QuantOptions, QuantPlan, prepare, quantizable_layers
from torchshrink.quantization.ptq import calibrate, quantize_model, uniform_plan

__all__ = [
    "QuantSpec",
    "qparams",
    "quantize",
    "dequantize",
    "fake_quantize",
    "FakeQuantize",
    "OBSERVERS",
    "make_observer",
    "QuantOptions",
    "QuantPlan",
    "prepare",
    "quantizable_layers",
    "calibrate",
    "quantize_model",
    "uniform_plan",
]
