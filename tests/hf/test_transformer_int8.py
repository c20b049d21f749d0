"""Transformer int8 options through a recipe on a tiny BERT: smoothing (SmoothQuant) places its input
scales, keeps every linear on an int8 kernel, the int8 file gets ONNX Runtime's skip-layer-norm
fusion, and the saved model reloads to the same outputs; a
fidelity budget (mixed.min_cosine) leaves layers in float until the cosine target is met."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from torchshrink.measure import mean_cosine
from torchshrink.models import load_model
from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.pipeline import run
from torchshrink.quantization.prepare import weight_quantizers
from torchshrink.quantization.smoothing import InputScale

pytest.importorskip("transformers")


def _tokens(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(1000, 2000, (n, 12), generator=g), torch.ones(n, 12, dtype=torch.long)


def test_smoothed_static_int8_reloads_and_keeps_int8_kernels(tiny_bert, corpus, tmp_path) -> None:
    quantize = {"mode": "static", "calibration_batches": 2, "batch_size": 16, "smoothing": 0.5}
    report = run(tiny_recipe(tiny_bert, corpus, {"quantize": quantize}), tmp_path / "out")
    (stage,) = report.stages
    ops = stage["details"]["operators"]
    # per layer 6 linears and 2 attention matmuls, all still on int8 kernels
    int8 = ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0)
    assert int8 == 2 * (6 + 2) and not ops.get("MatMul") and not ops.get("Gemm")
    # post-LN BERT: the LayerNorms also feed the residual, so every linear input gets a scale (a Mul):
    # per layer q/k/v share one, then attention output, intermediate and output dense
    assert ops.get("Mul", 0) >= 2 * 4
    # ONNX Runtime's transformer fusions on the int8 graph: each residual add + LayerNorm is one
    # SkipLayerNormalization (two per layer); only the embeddings' LayerNorm stays plain
    assert ops.get("SkipLayerNormalization") == 2 * 2 and ops.get("LayerNormalization") == 1
    # the word-embedding table (30,522 x 32) is stored as int8 and looked up by GatherBlockQuantized
    assert ops.get("GatherBlockQuantized") == 1
    assert stage["metrics"]["size_bytes"] < 0.4 * report.baseline["size_bytes"]
    assert 0.95 < stage["metrics"]["cosine"] <= 1.0
    reloaded = load_model(tmp_path / "out" / "model.safetensors")
    scales = [m for m in reloaded.modules() if isinstance(m, InputScale)]
    assert len(scales) == 2 * 4 and not all(torch.all(m.inverse == 1) for m in scales)
    # the reloaded fake-quant model (smoothed weights, scales from the file) computes what the int8 file does
    ids, mask = _tokens()
    with torch.no_grad():
        got = reloaded(ids, mask)
    int8 = OnnxRuntimeModel(tmp_path / "out" / "model.int8.onnx")(ids, mask)
    assert mean_cosine(got, int8) > 0.999


def test_a_cosine_budget_leaves_layers_float_until_met(tiny_bert, corpus, tmp_path) -> None:
    static = {"mode": "static", "calibration_batches": 2, "batch_size": 16}
    uniform = run(tiny_recipe(tiny_bert, corpus, {"quantize": static}), tmp_path / "uniform")
    low = uniform.stages[0]["metrics"]["cosine"]
    target = round(low + 0.5 * (1 - low), 6)
    mixed = {**static, "mixed": {"min_cosine": target, "candidates": [8], "samples": 64}}
    report = run(tiny_recipe(tiny_bert, corpus, {"quantize": mixed}), tmp_path / "mixed")
    (stage,) = report.stages
    plan = stage["details"]["plan"]
    kept = [n for n, b in plan.items() if b == "float"]
    assert kept and len(kept) < len(plan)  # some layers float, not all of them
    # the budget is measured on 64 held-out texts in fake-quant; the report scores every text on ONNX Runtime
    assert stage["metrics"]["cosine"] >= target - (target - low) / 2
    # the file reloads with the same layers in float (no weight quantizer on them)
    loaded = load_model(tmp_path / "mixed" / "model.safetensors")
    assert sorted(weight_quantizers(loaded)) == sorted(n for n, b in plan.items() if b != "float")
