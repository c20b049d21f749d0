"""Hugging Face vision models (built from configs) through the pipeline: traced through their Python
control flow (shape checks, TensorFlow "same" padding computed from input shapes, optional-argument
branches), structurally pruned to the requested MACs target, then static int8 with every
convolution and matrix product on an ONNX Runtime int8 kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchshrink import run
from torchshrink.quantization.onnx_int8 import FLOAT_MATMUL_OPS, FLOAT_WEIGHTED_OPS, INT8_KERNELS

pytest.importorskip("transformers")
HERE = Path(__file__).parent

CASES = {  # factory: (MACs target, int8 kernels at least)
    "hf_resnet": (2.0, 7),
    "hf_mobilenet_v2_tf": (2.0, 53),
    "hf_vit": (1.5, 18),  # only the MLPs shrink (heads are pinned by the attention reshapes)
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_model_reaches_its_macs_target_and_runs_int8_everywhere(name, tmp_path) -> None:
    target, kernels = CASES[name]
    report = run(
        {
            "seed": 0,
            "model": {"factory": f"foreign_models:{name}", "import_path": str(HERE)},
            "data": {"name": "mnist5k", "train_limit": 256, "test_limit": 64},
            "measure": {"latency_repeats": 3, "onnx_fp32": False},
            "stages": [
                {"prune": {"granularity": "structured", "macs_reduction": target, "calibration_batches": 2}},
                {"quantize": {"mode": "static", "calibration_batches": 4}},
            ],
        },
        tmp_path,
    )
    pruned, quantized = report.stages[0]["metrics"], report.stages[1]
    assert report.baseline["macs"] / pruned["macs"] >= target * 0.98
    operators = quantized["details"]["operators"]
    assert not any(operators.get(op) for op in (*FLOAT_WEIGHTED_OPS, *FLOAT_MATMUL_OPS)), operators
    assert sum(n for op, n in operators.items() if op in INT8_KERNELS) >= kernels
    assert "Pad" not in operators  # the "same" pads merged into the int8 convolutions
