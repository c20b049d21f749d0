"""Real int8 execution: export a fake-quant model as ONNX QDQ and run it on ONNX Runtime's int8 kernels.

The exported file carries torchshrink's own scales and zero points (see
:mod:`torchshrink.quantization.fakequant`); ONNX Runtime's graph optimiser fuses each
``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into ``QLinearConv`` / ``QGemm`` and keeps
max-pool and reshapes in int8; a transformer's residual adds and LayerNorms become
``SkipLayerNormalization`` (:func:`torchshrink.onnx_passes.fuse_transformer_blocks`) and embedding
tables on an int8 grid are stored as int8 (``GatherBlockQuantized``). The check
after export runs the optimised session and compares it with the fake-quant model in PyTorch.

Activations are u8 and weights s8. x86 CPUs without VNNI multiply u8 x s8 pairs with an
instruction whose 16-bit sums saturate, so ONNX Runtime's results drift from exact int8 maths
there; :func:`needs_reduced_range` detects this and 8-bit weights then use 7 bits (no saturation, the
same speed). CPUs with AVX-512 VNNI / AVX-VNNI (and ARM) use the full 8 bits.
"""

from __future__ import annotations

import collections
import logging
import platform
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from torch import nn

from torchshrink.errors import ExportError
from torchshrink.inputs import InputSpec, ModelInput, call
from torchshrink.onnx_export import export_onnx
from torchshrink.quantization.prepare import activation_quantizers, weight_quantizers

log = logging.getLogger(__name__)

__all__ = [
    "needs_reduced_range",
    "export_int8",
    "int8_kernel_counts",
    "INT8_KERNELS",
    "FLOAT_WEIGHTED_OPS",
    "FLOAT_MATMUL_OPS",
]

INT8_KERNELS = (
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QLinearAdd",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "NhwcMaxPool",
    "ConvInteger",
    "MatMulInteger",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
)

# ONNX Runtime's float kernels of a conv / linear layer after its graph optimisation (fusions included).
FLOAT_WEIGHTED_OPS = ("Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm")
FLOAT_MATMUL_OPS = ("MatMul", "FusedMatMul")
"""Float matrix products: a linear layer on (batch, tokens, features) inputs, or two activations."""


@cache
def needs_reduced_range() -> bool:
    """True on x86 CPUs without VNNI, where ONNX Runtime's u8 x s8 kernels can saturate."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown x86: the safe choice costs at most one bit of weight precision
    return not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def int8_kernel_counts(path: str | Path) -> dict[str, int]:
    """Which operators ONNX Runtime runs after graph optimisation (int8 kernels and the rest)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    return dict(collections.Counter(n.op_type for n in nodes))


def _quantization_error(model: nn.Module, x: ModelInput) -> float:
    """Largest absolute difference between the fake-quant model and the same model with every
    quantizer off (float weights and activations), on ``x``."""
    quantizers = [*activation_quantizers(model).values(), *weight_quantizers(model).values()]
    enabled = [fq.enabled for fq in quantizers]
    model.eval()
    with torch.no_grad():
        quantized = call(model, x)
        for fq in quantizers:
            fq.enabled = False
        try:
            floating = call(model, x)
        finally:
            for fq, on in zip(quantizers, enabled, strict=True):
                fq.enabled = on
    return float((quantized - floating).abs().max())


def export_int8(
    model: nn.Module,
    path: str | Path,
    inputs: InputSpec | Sequence[int],
    check_inputs: ModelInput | None = None,
) -> dict[str, float | int | dict[str, int]]:
    """Export the fake-quant ``model`` as ONNX QDQ and, with ``check_inputs``, verify ONNX Runtime.

    The check requires at least one int8 kernel, and ONNX Runtime's optimised int8 run to match the
    fake-quant model within two quantization steps (of the largest activation step of the model) or
    a quarter of the quantization error itself (fake-quant vs the same model in float on the check
    inputs), whichever is larger. In a deep network, int8 kernels and fake-quant round a few values
    differently at every layer and those differences add up (a small residual CNN on the digits was
    seen 1.25 steps apart with one calibration sample, within one with another); a file that computes
    something else (an operator translated wrongly) differs by more than the quantization does.
    """
    points = [fq for fq in activation_quantizers(model).values() if fq.enabled]
    if check_inputs is not None and any(fq.dynamic for fq in points):
        model.eval()
        with torch.no_grad():
            call(model, check_inputs)  # dynamic points record the step of this very batch
    steps = [fq.last_scale if fq.dynamic else float(fq.step().max()) for fq in points]
    step = max(steps, default=1e-3)
    error = _quantization_error(model, check_inputs) if check_inputs is not None else 0.0
    tolerance = max(2 * step, 0.25 * error)
    diff = export_onnx(model, path, inputs, check_inputs=check_inputs, atol=tolerance, int8=True)
    kernels = int8_kernel_counts(path)
    int8_ops = sum(n for op, n in kernels.items() if op in INT8_KERNELS)
    if any(not fq.dynamic for fq in points) and int8_ops == 0:
        raise ExportError(
            f"{path}: ONNX Runtime fused no int8 kernel (operators after optimisation: {kernels}); "
            "the model's layers may not be supported by its QDQ fusion"
        )
    log.info(
        "int8 ONNX %s: %d int8 kernel(s), max diff vs fake-quant %.3g (tolerance %.3g)",
        path,
        int8_ops,
        diff or 0.0,
        tolerance,
    )
    return {
        "max_abs_diff_vs_fakequant": diff if diff is not None else float("nan"),
        "tolerance": tolerance,
        "quantization_error": error,
        "int8_kernels": int8_ops,
        "operators": kernels,
    }
