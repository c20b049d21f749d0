"""The ``quantize`` recipe stage: int8 ONNX shipped and measured, saved models reload, resume, mixed
precision budgets, QAT through the one training loop, config errors."""

from __future__ import annotations

import functools

import pytest
import torch
from testkit import DIGITS_CNN, digits_recipe

from torchshrink import load_model, run
from torchshrink.errors import QuantizationError, RecipeError
from torchshrink.measure import accuracy
from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.recipe import parse_recipe

recipe = functools.partial(digits_recipe, model=DIGITS_CNN)


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    report = run(recipe({"train": {"epochs": 6, "lr": 0.003}}, {"quantize": {"mode": "static"}}), out)
    return out, report


def test_static_stage_ships_an_int8_file_measured_on_onnx_runtime(static, digits) -> None:
    out, report = static
    trained, quantized = report.stages
    details = quantized["details"]
    assert (out / "model.int8.onnx").is_file()
    assert details["int8_kernels"] >= 8 and details["operators"].get("QLinearAdd") == 3
    assert details["max_abs_diff_vs_fakequant"] <= details["tolerance"]
    metrics = quantized["metrics"]
    assert metrics["size_bytes"] == (out / "model.int8.onnx").stat().st_size
    assert metrics["size_bytes"] < 0.6 * trained["metrics"]["size_bytes"]  # int8 weights + graph overhead
    assert metrics["accuracy"] == accuracy(OnnxRuntimeModel(out / "model.int8.onnx"), digits.test)
    assert metrics["accuracy"] >= trained["metrics"]["accuracy"] - 0.02
    # every layer is 8-bit except the 1-channel stem conv, kept float because its int8 kernel is slower
    assert details["plan"]["stem.0"] == "float" and set(details["plan"].values()) == {8, "float"}
    assert details["operators"].get("Conv") == 1
    md = (out / "report.md").read_text()
    assert "## quantize: plan" in md and "8-bit" in md  # the chosen plan, as printed


def test_an_onnx_file_is_timed_against_the_baseline_on_onnx_runtime_fp32(static) -> None:
    out, report = static
    trained, quantized = report.stages
    for batch in (1, 32):
        # Both ratios come from one interleaved run: vs eager PyTorch and vs ONNX Runtime fp32.
        assert quantized["metrics"][f"speedup_onnx_fp32_b{batch}"] > 0
        assert quantized["metrics"][f"speedup_b{batch}"] > 0
        assert f"speedup_onnx_fp32_b{batch}" not in trained["metrics"]  # a torch model has no ONNX reference
    assert (out / ".work" / "timing" / "given.onnx").is_file()
    md = (out / "report.md").read_text()
    assert "faster b32 on ONNX Runtime vs given fp32" in md and "vs the baseline on ONNX Runtime fp32" in md


def test_saved_quantized_model_reloads_with_identical_outputs(static, digits) -> None:
    out, _ = static
    reloaded = load_model(out / "model.safetensors")
    runtime = OnnxRuntimeModel(out / "model.int8.onnx")
    x = digits.test.tensors[0][:64]
    with torch.no_grad():
        diff = (reloaded(x) - runtime(x)).abs().max()
    assert float(diff) < 0.05


def test_resume_restores_the_quantized_stage(static, tmp_path) -> None:
    out, first = static
    again = run(
        recipe({"train": {"epochs": 6, "lr": 0.003}}, {"quantize": {"mode": "static"}}), out, resume=True
    )
    assert [s["resumed"] for s in again.stages] == [True, True]
    assert again.final["accuracy"] == first.final["accuracy"]


def test_qat_and_mixed_precision_stages(tmp_path) -> None:
    report = run(
        recipe(
            {"train": {"epochs": 6, "lr": 0.003}},
            {"quantize": {"mode": "qat", "bits": 4, "activation_bits": 4, "epochs": 2, "lr": 0.001}},
        ),
        tmp_path / "qat",
    )
    trained, qat = report.stages
    assert set(qat["details"]["plan"].values()) == {4, "float"}  # the 72-weight stem stays float
    assert 4 < qat["details"]["average_weight_bits"] < 4.5
    assert qat["metrics"]["accuracy"] >= trained["metrics"]["accuracy"] - 0.05
    mixed = run(
        recipe(
            {"train": {"epochs": 6, "lr": 0.003}}, {"quantize": {"mixed": {"max_drop": 1.0, "samples": 5000}}}
        ),
        tmp_path / "mixed",
    )
    trained, quantized = mixed.stages
    assert quantized["details"]["average_weight_bits"] < 8
    assert any(b != 8 for b in quantized["details"]["plan"].values())
    # the budget was measured on the whole test split here; ONNX Runtime may differ by a sample or two
    assert quantized["metrics"]["accuracy"] >= trained["metrics"]["accuracy"] - 0.01 - 2 / 360


def test_avg_bits_budget_is_met_by_a_mixed_plan(tmp_path) -> None:
    report = run(
        recipe(
            {"train": {"epochs": 4, "lr": 0.003}},
            {
                "quantize": {
                    "mode": "weight_only",
                    "mixed": {"avg_bits": 4.5, "samples": 200},
                    "backend": "torch",
                }
            },
            model={"zoo": "lenet300", "kwargs": {"in_features": 64}},
        ),
        tmp_path,
    )
    details = report.stages[-1]["details"]
    # the budget is met, and the search stops there instead of dropping everything to 2 bits
    assert 3.0 < details["average_weight_bits"] <= 4.5
    assert len(set(details["plan"].values())) > 1
    assert report.final["size_bytes"] > 0 and "int8_onnx" not in report.artefacts


def test_config_errors_name_the_key() -> None:
    with pytest.raises(RecipeError, match="mixed"):
        parse_recipe(recipe({"quantize": {"mode": "qat", "mixed": {"avg_bits": 4}}}))
    with pytest.raises(RecipeError, match="exactly one budget"):
        parse_recipe(recipe({"quantize": {"mixed": {}}}))
    with pytest.raises(RecipeError, match="smoothing migrates activation ranges"):
        parse_recipe(recipe({"quantize": {"mode": "weight_only", "smoothing": 0.5}}))
    with pytest.raises(RecipeError, match="bits"):
        parse_recipe(recipe({"quantize": {"bits": 1}}))


def test_skipping_an_unknown_layer_names_the_real_ones(tmp_path) -> None:
    # no such layer: refused by the pipeline before any stage, with the model's layers
    with pytest.raises(RecipeError, match=r"stages\[0\]\.quantize\.skip: no layer named 'nope'.*stem\.0"):
        run(recipe({"quantize": {"skip": ["nope"]}}), tmp_path)
    # a layer that is not conv / linear: refused by the stage, with the quantizable ones
    with pytest.raises(QuantizationError, match=r"\['stem.1'\].*quantizable layers are \['stem.0'"):
        run(recipe({"quantize": {"skip": ["stem.1"]}}), tmp_path)
