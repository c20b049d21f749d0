"""Structured pruning of transformers: attention heads and FFN neurons removed physically (the
layers shrink, head counts follow, the file reloads), layers dropped by measured loss, and a
recipe prune -> distill (hidden states, attention maps) -> static int8 scored by fidelity."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MAX_LENGTH, tiny_recipe

from torchshrink.cli import main
from torchshrink.errors import RecipeError, StructureError
from torchshrink.inputs import spec_of
from torchshrink.measure import count_macs
from torchshrink.models import load_model, save_model
from torchshrink.pipeline import run
from torchshrink.pruning.graph import find_groups
from torchshrink.pruning.importance import make_importance
from torchshrink.pruning.layers import drop_layers
from torchshrink.pruning.structural import mask_channels, rebind, remove_channels, resized_shapes

transformers = pytest.importorskip("transformers")

from torchshrink.hf import build_hf  # noqa: E402 - needs transformers

CONFIG = {
    "model_type": "bert",
    "vocab_size": 200,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 32,
}


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_hf(dict(CONFIG), "embedding")


def _tokens(n: int = 6, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 7:] = 0
    mask[3, 4:] = 0
    return ids, mask


def _layer(model: torch.nn.Module, i: int) -> torch.nn.Module:
    return model.encoder.encoder.layer[i]


def _outputs(model: torch.nn.Module, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(*x)


def test_heads_and_neurons_are_channel_groups_with_their_costs() -> None:
    model, x = _bert(), _tokens()
    groups = find_groups(model, x)
    heads = [g for g in groups if g.kind == "heads"]
    assert [g.name for g in heads] == [f"encoder.encoder.layer.{i}.attention.self heads" for i in range(3)]
    assert all(g.size == 4 and not g.joined for g in heads)
    neurons = [g for g in groups if "intermediate" in g.name]
    assert len(neurons) == 3 and all(g.size == 48 for g in neurons)
    # what one head or neuron costs is what removing it saves, as the MACs counter measures it
    before = count_macs(model, spec_of(x))
    for group in (heads[0], neurons[0]):
        smaller = copy.deepcopy(model)
        remove_channels(smaller, rebind([group], model, smaller), {0: torch.tensor([0])})
        assert before - count_macs(smaller, spec_of(x)) == group.macs


def test_removing_zero_importance_heads_and_neurons_leaves_the_outputs_unchanged(tmp_path) -> None:
    model, x = _bert(), _tokens()
    with torch.no_grad():  # head 2 of layer 0 and 10 FFN neurons of layer 1 contribute nothing
        attn = _layer(model, 0).attention
        for proj in (attn.self.query, attn.self.key, attn.self.value):
            proj.weight[16:24] = 0
            proj.bias[16:24] = 0
        attn.output.dense.weight[:, 16:24] = 0
        ffn = _layer(model, 1)
        ffn.intermediate.dense.weight[5:15] = 0
        ffn.intermediate.dense.bias[5:15] = 0
        ffn.output.dense.weight[:, 5:15] = 0
    before = _outputs(model, x)
    groups = find_groups(model, x)
    importance = make_importance("magnitude", model, [])
    plan = {}
    for gi, group in enumerate(groups):
        scores = importance(group)
        plan[gi] = torch.nonzero(scores == 0).flatten()
    assert sorted(len(p) for p in plan.values() if len(p)) == [1, 10]
    remove_channels(model, groups, plan)
    assert torch.allclose(_outputs(model, x), before, atol=1e-6)
    self_attention = _layer(model, 0).attention.self
    assert self_attention.num_attention_heads == 3 and self_attention.all_head_size == 24
    assert self_attention.query.weight.shape == (24, 32)
    assert _layer(model, 0).attention.output.dense.in_features == 24
    assert _layer(model, 1).intermediate.dense.out_features == 38
    assert _layer(model, 1).output.dense.in_features == 38
    # the smaller model rebuilds from its own file: shapes and head counts recorded as data
    architecture = {"hf": {"config": dict(CONFIG), "task": "embedding"}}
    architecture["resized"] = resized_shapes(model, build_hf(dict(CONFIG), "embedding"))
    assert architecture["resized"]["encoder.encoder.layer.0.attention.self"] == {"num_attention_heads": 3}
    again = load_model(save_model(tmp_path / "small.safetensors", model, architecture))
    assert torch.equal(_outputs(again, x), _outputs(model, x))


def test_the_masked_twin_computes_what_the_rebuilt_transformer_computes() -> None:
    model, x = _bert(), _tokens()
    groups = find_groups(model, x)
    gen = torch.Generator().manual_seed(0)
    plan = {gi: torch.randperm(g.size, generator=gen)[: g.size // 2] for gi, g in enumerate(groups)}
    twin = copy.deepcopy(model)
    mask_channels(twin, rebind(groups, model, twin), plan)
    remove_channels(model, groups, plan)
    assert torch.allclose(_outputs(twin, x), _outputs(model, x), atol=1e-5)
    assert [_layer(model, i).attention.self.num_attention_heads for i in range(3)] == [2, 2, 2]


def test_drop_layers_removes_the_layer_that_matters_least_and_the_file_reloads(tmp_path) -> None:
    model, x = _bert(), _tokens()
    with torch.no_grad():  # layer 1 adds nothing to its input: without it the outputs hardly move
        for block in (_layer(model, 1).attention.output.dense, _layer(model, 1).output.dense):
            block.weight.zero_()
            block.bias.zero_()
    targets = _outputs(model, x)
    records = drop_layers(model, 1, [(x, targets)])
    assert records[0]["layer"] == 1 and records[0]["loss"] < 1e-4
    assert len(model.encoder.encoder.layer) == 2
    architecture = {"hf": {"config": dict(CONFIG), "task": "embedding"}}
    architecture["resized"] = resized_shapes(model, build_hf(dict(CONFIG), "embedding"))
    assert architecture["resized"] == {"encoder.encoder.layer": {"length": 2}}
    again = load_model(save_model(tmp_path / "short.safetensors", model, architecture))
    assert torch.equal(_outputs(again, x), _outputs(model, x))
    with pytest.raises(StructureError, match="at least one stays: set drop_layers <= 1"):
        drop_layers(model, 2, [(x, targets)])


@pytest.mark.slow
def test_prune_distill_int8_recipe_on_a_transformer(tiny_bert, corpus, tmp_path, capsys) -> None:
    prune = {"granularity": "structured", "drop_layers": 1, "macs_reduction": 2.5, "batch_size": 16,
             "calibration_batches": 2}  # fmt: skip
    distill = {"student": "current", "epochs": 2, "batch_size": 16, "lr": 1e-3, "hidden_weight": 1.0,
               "attention_map_weight": 1.0}  # fmt: skip
    static = {"mode": "static", "calibration_batches": 2, "batch_size": 16}
    report = run(
        tiny_recipe(tiny_bert, corpus, {"prune": prune}, {"distill": distill}, {"quantize": static}),
        tmp_path / "out",
    )
    pruned, distilled, quantized = report.stages
    assert report.quality == "cosine"
    assert len(pruned["details"]["dropped_layers"]) == 1
    assert report.baseline["macs"] / pruned["metrics"]["macs"] >= 2.5 * 0.98
    assert pruned["details"]["layers"]["encoder.encoder.layer"] == {"length": 1}
    assert distilled["details"]["terms"] == ["attention_maps", "ce", "cosine", "hidden"]
    for stage in report.stages:
        assert 0.5 < stage["metrics"]["cosine"] <= 1.0
    ops = quantized["details"]["operators"]
    int8 = ops.get("MatMulIntegerToFloat", 0) + ops.get("QGemm", 0) + ops.get("QLinearMatMul", 0)
    assert int8 == 6 + 2  # the one layer left: its 6 linears and 2 attention products, all int8
    # the saved float model is the pruned architecture, rebuilt from its own file
    saved = dict(load_model(tmp_path / "out" / "model.safetensors").named_modules())
    layers = {name.split(".")[3] for name in saved if name.startswith("encoder.encoder.layer.")}
    assert layers == {"0"}
    assert saved["encoder.encoder.layer.0.intermediate.dense"].out_features < 64
    args = ["eval", str(tmp_path / "out" / "model.int8.onnx"), "--data", str(corpus), "--tokenizer",
            str(tiny_bert), "--max-length", str(MAX_LENGTH), "--reference", str(tiny_bert), "--json",
            "--repeats", "2"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["cosine"] == pytest.approx(
        quantized["metrics"]["cosine"], abs=0.02
    )


def test_distillation_options_that_do_not_fit_an_embedding_model_are_named(
    tiny_bert, corpus, tmp_path
) -> None:
    kd = tiny_recipe(tiny_bert, corpus, {"distill": {"student": "current", "match": "kd", "epochs": 1}})
    with pytest.raises(RecipeError, match="'kd' compares class logits.*'cosine'"):
        run(kd, tmp_path / "a")
    mapped = tiny_recipe(
        tiny_bert,
        corpus,
        {"distill": {"student": "current", "hidden_weight": 1.0, "layer_map": [0, 5], "epochs": 1}},
    )
    with pytest.raises(RecipeError, match=r"layer_map: \[0, 5\] must give one teacher layer in \[0, 1\]"):
        run(mapped, tmp_path / "b")
    for stage in ({"finetune": {"epochs": 1, "augment": {"shift": 2}}},
                  {"distill": {"student": "current", "epochs": 1, "augment": {"shift": 2}}}):  # fmt: skip
        with pytest.raises(RecipeError, match=r"\.augment: shifts and mixes image inputs.*token ids"):
            run(tiny_recipe(tiny_bert, corpus, stage), tmp_path / "c")
