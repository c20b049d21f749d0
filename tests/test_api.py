"""The one-call Python API on models that are not from the zoo: every capability returns the new
model, its metrics beside the original's and its files; the original is left untouched; options are
validated like a recipe's; an API call and the recipe stage give the same model."""

from __future__ import annotations

import copy

import onnx
import pytest
from testkit import DIGITS_MLP
from torch import nn

import torchshrink as ts
from torchshrink.api import apply_stage
from torchshrink.errors import RecipeError
from torchshrink.models import open_model, save_model
from torchshrink.pruning.config import StructuredPruneConfig
from torchshrink.quantization.stage import QuantizeConfig
from torchshrink.recipe import stage_config


class TwoTower(nn.Module):
    """A user's own model: not in the zoo, a body and a separate head."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 64), nn.ReLU()
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    return apply_stage("train", TwoTower(), digits, epochs=6, lr=3e-3, latency_repeats=3).model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)


def test_prune_then_quantize_a_user_model(trained, digits, tmp_path):
    before = copy.deepcopy(trained)
    pruned = ts.prune(trained, digits, granularity="structured", macs_reduction=2, latency_repeats=3)
    assert _same(trained, before)  # the caller's model is not touched
    assert pruned.metrics["macs"] <= pruned.baseline["macs"] / 2 + 1
    assert pruned.metrics["params"] < pruned.baseline["params"]
    assert pruned.model.body[1].out_features < 128  # physically smaller
    assert pruned.baseline["accuracy"] > 0.85 and pruned.metrics["accuracy"] > 0.5
    tuned = ts.finetune(pruned.model, digits, epochs=4, lr=2e-3, latency_repeats=3)
    assert tuned.metrics["macs"] == pruned.metrics["macs"] and tuned.metrics["accuracy"] > 0.85

    int8 = ts.quantize(tuned.model, digits, mode="static", out_dir=tmp_path / "q", latency_repeats=3)
    path = int8.artefacts["int8_onnx"]
    assert path == tmp_path / "q" / "model.int8.onnx" and path.is_file()
    assert any(n.op_type == "QLinearMatMul" or n.op_type.startswith("QLinear") or n.op_type == "MatMulInteger"
               or n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node)  # fmt: skip
    assert int8.metrics["size_bytes"] == path.stat().st_size < tuned.metrics["size_bytes"]
    assert abs(int8.metrics["accuracy"] - tuned.metrics["accuracy"]) < 0.03  # measured on ONNX Runtime
    assert int8.summary().startswith("accuracy 0.")


def test_distill_into_a_user_student(trained, digits):
    student = TwoTower(width=32)
    result = ts.distill(trained, digits, student=student, epochs=12, lr=3e-3, latency_repeats=3)
    assert result.baseline["accuracy"] > 0.85  # the teacher's
    assert result.metrics["params"] < result.baseline["params"] / 2
    assert result.metrics["accuracy"] > 0.8
    assert not _same(result.model, student)  # the student the caller gave is left as it was


def test_encode_export_and_evaluate(trained, digits, tmp_path):
    packed = ts.encode(trained, digits, bits=4, finetune_epochs=1, out_dir=tmp_path, latency_repeats=3)
    assert packed.artefacts["packed"].is_file()
    assert packed.metrics["size_bytes"] < packed.baseline["size_bytes"] / 4
    exported = ts.export(trained, digits, out_dir=tmp_path / "x", latency_repeats=3)
    assert exported.artefacts["onnx"].is_file() and exported.details["max_abs_diff_vs_torch"] < 1e-4
    scored = ts.evaluate(trained, digits, latency_repeats=3)
    assert len(scored.details["per_class_accuracy"]) == 10
    assert scored.metrics["accuracy"] == pytest.approx(scored.details["accuracy"])


def test_options_are_validated_like_a_recipe(trained, digits):
    with pytest.raises(RecipeError, match=r"ts\.prune: prune\.sparsty: unknown key"):
        ts.prune(trained, digits, sparsty=0.5)
    with pytest.raises(RecipeError, match=r"ts\.quantize: quantize\.bits"):
        ts.quantize(trained, digits, bits=12)
    with pytest.raises(RecipeError, match="macs_reduction applies to granularity: structured"):
        ts.prune(trained, digits, macs_reduction=2)
    with pytest.raises(RecipeError, match=r"a QuantizeConfig is not the config of stage 'prune'"):
        ts.prune(trained, digits, config=QuantizeConfig())


def test_a_config_part_object_is_accepted_as_the_stage_config():
    cfg = stage_config("prune", StructuredPruneConfig(macs_reduction=2))
    assert isinstance(cfg.root, StructuredPruneConfig) and cfg.root.macs_reduction == 2
    merged = stage_config("prune", {**cfg.model_dump(), "scope": "layer"})
    assert merged.root.scope == "layer" and merged.root.macs_reduction == 2


def test_an_api_call_is_the_recipe_stage(tmp_path, digits):
    """The same stage, options and seed through ts.prune and through a recipe: the same model."""
    loaded = open_model(DIGITS_MLP)
    weights = save_model(tmp_path / "w.safetensors", loaded.module, loaded.architecture)
    recipe = {
        "seed": 0,
        "model": {"path": str(weights)},
        "data": {"name": "digits"},
        "measure": {"latency_repeats": 3, "onnx_fp32": False},
        "stages": [{"prune": {"sparsity": 0.6, "importance": "taylor"}}],
    }
    report = ts.run(recipe, tmp_path / "run")
    called = ts.prune(
        weights, digits, sparsity=0.6, importance="taylor", seed=1, latency_repeats=3
    )  # stage 0: seed + 1
    assert called.metrics["nonzero_params"] == report.final["nonzero_params"]
    assert called.metrics["accuracy"] == report.final["accuracy"]
    assert _same(called.model, ts.load_model(tmp_path / "run" / "model.safetensors"))
