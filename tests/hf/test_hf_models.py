"""Hugging Face models from a local directory: the embedding wrapper pools as sentence-transformers
does, the saved model rebuilds from its own file (config as data, no code), and a recipe quantizes
it to int8 with fidelity in the report. Bad inputs get named errors and exit 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import MAX_LENGTH, tiny_recipe

from torchshrink.cli import main
from torchshrink.errors import ModelLoadError, RecipeError, ShapeMismatchError
from torchshrink.models import load_model, open_model, save_model
from torchshrink.pipeline import run

transformers = pytest.importorskip("transformers")


def _tokens(n: int = 3, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_the_embedding_is_the_masked_mean_normalised(tiny_bert) -> None:
    loaded = open_model({"hf": tiny_bert, "task": "embedding"})
    ids, mask = _tokens()
    with torch.no_grad():
        out = loaded.module(ids, mask)
        hidden = transformers.BertModel.from_pretrained(tiny_bert)(input_ids=ids, attention_mask=mask)
    m = mask.unsqueeze(-1).float()
    expected = F.normalize((hidden.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(out, expected, atol=1e-5)
    assert loaded.task == "embedding" and loaded.architecture["hf"]["config"]["hidden_size"] == 32


def test_a_saved_hf_model_reloads_from_its_own_file(tiny_bert, tmp_path) -> None:
    loaded = open_model({"hf": tiny_bert, "task": "embedding"})
    path = save_model(tmp_path / "m.safetensors", loaded.module, loaded.architecture)
    again = load_model(path)
    ids, mask = _tokens()
    with torch.no_grad():
        assert torch.equal(again(ids, mask), loaded.module(ids, mask))


def test_missing_model_files_are_named(tmp_path, tiny_bert) -> None:
    with pytest.raises(ModelLoadError, match="is not a directory"):
        open_model({"hf": tmp_path / "nowhere", "task": "embedding"})
    (tmp_path / "config.json").write_text((tiny_bert / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickled weights")
    with pytest.raises(ModelLoadError, match="no model.safetensors .*pytorch_model.bin found.*never pickled"):
        open_model({"hf": tmp_path, "task": "embedding"})
    with pytest.raises(ValueError, match="'hf' .* and 'task' .* go together"):
        open_model({"hf": tiny_bert})


def test_int8_of_a_transformer_reports_fidelity(tiny_bert, corpus, tmp_path, capsys) -> None:
    recipe = tiny_recipe(
        tiny_bert,
        corpus,
        {"quantize": {"mode": "dynamic"}, "branch": True},
        {"quantize": {"mode": "static", "calibration_batches": 2, "batch_size": 16}},
    )
    report = run(recipe, tmp_path / "out")
    assert report.quality == "cosine" and report.baseline["cosine"] == pytest.approx(1.0, abs=1e-5)
    dynamic, static = (s["metrics"] for s in report.stages)
    for metrics in (dynamic, static):
        assert 0.95 < metrics["cosine"] < 1.0 and 0.5 < metrics["nn_agreement"] <= 1.0
        assert metrics["accuracy"] == metrics["cosine"]
    ops = report.stages[1]["details"]["operators"]
    # per layer 6 linears and 2 attention matmuls, all on int8 kernels; the mask add stays float
    int8 = ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0)
    assert int8 == 2 * (6 + 2) and ops.get("QLinearMatMul", 0) >= 2
    assert not ops.get("QLinearAdd") and not ops.get("MatMul") and not ops.get("Gemm")
    graph = onnx.load(tmp_path / "out" / "model.int8.onnx").graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert "cosine" in (tmp_path / "out" / "report.md").read_text()
    # the int8 file, scored by `torchshrink eval` against the original model
    args = ["eval", str(tmp_path / "out" / "model.int8.onnx"), "--data", str(corpus), "--tokenizer",
            str(tiny_bert), "--max-length", str(MAX_LENGTH), "--reference", str(tiny_bert), "--json",
            "--repeats", "2"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["cosine"] == pytest.approx(static["cosine"], abs=0.02)


@pytest.mark.parametrize("stage", [{"train": {"epochs": 1}}, {"ensemble": {"members": 2, "epochs": 1}}])
def test_stages_that_need_class_labels_refuse_an_embedding_model(stage, tiny_bert, corpus, tmp_path) -> None:
    recipe = tiny_recipe(tiny_bert, corpus, {"quantize": {"mode": "dynamic"}, "branch": True}, stage)
    name = next(iter(stage))
    with pytest.raises(
        RecipeError,
        match=f"stage '{name}' trains or scores with class labels.*distill, evaluate, export, finetune, prune, "
        "quantize",
    ):
        run(recipe, tmp_path / "a")
    assert not (tmp_path / "a" / "model.int8.onnx").exists()  # refused before any stage ran


def test_inputs_the_model_cannot_take_are_named(tiny_bert, corpus, tmp_path, capsys) -> None:
    too_long = tiny_recipe(tiny_bert, corpus, {"quantize": {"mode": "dynamic"}}, max_length=100)
    with pytest.raises(ShapeMismatchError, match="100 tokens per text but the model has 64 positions"):
        run(too_long, tmp_path / "a")
    floats = tmp_path / "floats.npz"
    np.savez(
        floats, input_ids=np.random.rand(20, 8).astype(np.float32), attention_mask=np.ones((20, 8), np.int64)
    )
    recipe = tiny_recipe(tiny_bert, corpus, {"quantize": {"mode": "dynamic"}})
    recipe["data"] = {"npz": str(floats), "inputs": ["input_ids", "attention_mask"]}
    with pytest.raises(
        ShapeMismatchError, match="'input_ids' must be integer token ids; the data gives float32"
    ):
        run(recipe, tmp_path / "b")
    recipe["data"] = {"npz": str(floats), "inputs": ["attention_mask", "input_ids"]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "list data.inputs in forward's order" in err and "Traceback" not in err


def test_a_half_precision_checkpoint_computes_in_float32(tiny_bert, tmp_path) -> None:
    import shutil

    half = tmp_path / "half"
    transformers.BertModel.from_pretrained(tiny_bert).half().save_pretrained(half, safe_serialization=True)
    shutil.copy(tiny_bert / "tokenizer.json", half / "tokenizer.json")
    loaded = open_model({"hf": half, "task": "embedding"})
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    ids, mask = _tokens()
    with torch.no_grad():  # the same model as the one rebuilt from its own file
        path = save_model(tmp_path / "m.safetensors", loaded.module, loaded.architecture)
        assert torch.equal(load_model(path)(ids, mask), loaded.module(ids, mask))
