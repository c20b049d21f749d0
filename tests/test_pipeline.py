"""The pipeline: stages in order, report contents, baseline choice, checkpoints, resume, caching."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from testkit import DIGITS_CNN, DIGITS_MLP, untimed

from torchshrink import load_model, run
from torchshrink.errors import ModelLoadError, ShapeMismatchError
from torchshrink.io import read_safetensors_metadata
from torchshrink.measure import METRIC_NAMES, accuracy
from torchshrink.models import open_model, save_model
from torchshrink.registry import register_stage
from torchshrink.report import read_report

FAST = {"latency_repeats": 3, "onnx_fp32": False}


def recipe(*stages, model=DIGITS_MLP, **extra):
    return {
        "seed": 1,
        "model": model,
        "data": {"name": "digits"},
        "measure": FAST,
        "stages": list(stages),
        **extra,
    }


class BoomConfig(BaseModel, extra="forbid"):
    flag: str


@register_stage("test_boom_once", BoomConfig, role="transform")
def boom_once(state, cfg, ctx):
    """Fails the first time (a crash mid-pipeline), passes once the flag file exists."""
    flag = Path(cfg.flag)
    if not flag.exists():
        flag.write_text("crashed once")
        raise RuntimeError("simulated crash")
    return state


FULL_STAGES = (
    {"train": {"epochs": 3, "lr": 0.003}},
    {"finetune": {"epochs": 1}},
    {"evaluate": {}},
    {"export": {}},
)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = run(
        recipe(*FULL_STAGES),
        out,
    )
    return out, report


def test_report_files_and_schema(full_run):
    out, report = full_run
    for name in ("model.safetensors", "model.onnx", "report.json", "report.md", "pareto.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report.json").read_text())
    assert set(data) >= {"torchshrink_version", "recipe", "seed", "baseline", "stages", "final", "artefacts"}
    assert [s["name"] for s in data["stages"]] == ["train", "finetune", "evaluate", "export"]
    timing = {"latency_iqr_ms_b1", "latency_iqr_ms_b32", "speedup_b1", "speedup_b32"}
    assert set(data["baseline"]) == {*METRIC_NAMES, *timing}  # the train stage, timed against the given model
    for stage in data["stages"]:  # one timing pass with the model as given
        assert set(stage["metrics"]) == {*METRIC_NAMES, *timing}
        assert stage["metrics"]["speedup_b32"] > 0
    assert data["timing"]["rounds"] >= 3 and set(data["timing"]["rows"]) == {"(given)", "train", "finetune"}
    assert data["stages"][2]["metrics"]["latency_ms_b32"] == data["stages"][1]["metrics"]["latency_ms_b32"]
    for metrics in [data["baseline"], data["final"], *(s["metrics"] for s in data["stages"])]:
        assert 0.0 <= metrics["accuracy"] <= 1.0
    assert all(s["seconds"] >= 0 for s in data["stages"])
    assert data["artefacts"]["onnx"] == "model.onnx" and data["artefacts"]["model"] == "model.safetensors"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in ("train", "finetune", "evaluate", "export", "**baseline**"))
    assert data["recipe"]["stages"][0]["train"]["epochs"] == 3


def test_baseline_is_trained_model_and_metrics_are_real(full_run, digits):
    out, report = full_run
    assert report.baseline == report.stages[0]["metrics"]  # the trained model entering the compression
    assert report.final == report.stages[-1]["metrics"]
    assert report.baseline["accuracy"] > 0.85  # 3 real epochs on digits
    assert report.baseline["params"] == 784 * 0 + 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    model = load_model(out / "model.safetensors")
    assert accuracy(model, digits.test) == pytest.approx(report.final["accuracy"])
    export = report.stages[-1]
    assert export["details"]["max_abs_diff_vs_torch"] < 1e-4
    assert export["metrics"]["size_bytes"] == (out / "model.onnx").stat().st_size  # shipped artefact counted
    evaluate = report.stages[2]["details"]
    assert len(evaluate["per_class_accuracy"]) == 10
    assert sum(map(sum, evaluate["confusion"])) == len(digits.test)
    assert evaluate["accuracy"] == pytest.approx(report.stages[2]["metrics"]["accuracy"])


def test_baseline_is_loaded_model_without_a_train_stage(tmp_path, digits):
    loaded = open_model(DIGITS_MLP)
    save_model(tmp_path / "w.safetensors", loaded.module, loaded.architecture)
    report = run(
        recipe({"finetune": {"epochs": 1, "lr": 0.003}}, model={"path": str(tmp_path / "w.safetensors")}),
        tmp_path / "o",
    )
    assert report.baseline["accuracy"] == pytest.approx(accuracy(loaded.module, digits.test))
    assert report.final["accuracy"] > report.baseline["accuracy"]


def test_resume_skips_finished_stages(full_run):
    out, report = full_run
    again = run(
        recipe(*FULL_STAGES),
        out,
        resume=True,
    )
    assert all(s["resumed"] for s in again.stages)
    assert again.final["accuracy"] == report.final["accuracy"]
    assert again.stages[0]["seconds"] == report.stages[0]["seconds"]  # read back, not re-run
    changed = run(
        recipe(
            {"train": {"epochs": 3, "lr": 0.003}},
            {"finetune": {"epochs": 1}},
            {"evaluate": {"split": "train"}},
        ),
        out,
        resume=True,
    )
    assert [s["resumed"] for s in changed.stages] == [True, True, False]
    assert changed.stages[2]["details"]["split"] == "train"


def test_crash_then_resume(tmp_path):
    out = tmp_path / "out"
    flag = tmp_path / "flag"
    stages = ({"train": {"epochs": 2}}, {"test_boom_once": {"flag": str(flag)}}, {"evaluate": {}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(recipe(*stages), out)
    assert not (out / "report.json").exists()  # nothing half-written
    assert any((out / ".checkpoints").glob("stage-00-train*"))
    report = run(recipe(*stages), out, resume=True)
    assert [s["resumed"] for s in report.stages] == [True, False, False]
    assert read_report(out / "report.json").final == report.final


def test_without_resume_everything_reruns(tmp_path):
    stages = ({"train": {"epochs": 1}}, {"evaluate": {}})
    run(recipe(*stages), tmp_path)
    again = run(recipe(*stages), tmp_path)
    assert not any(s["resumed"] for s in again.stages)


def test_train_cache_reuses_the_trained_model(tmp_path):
    stages = ({"train": {"epochs": 2, "cache": True}}, {"evaluate": {}})
    first = run(recipe(*stages), tmp_path)
    assert "cached" not in first.stages[0]["details"]
    assert list((tmp_path / "cache").glob("train-*.safetensors"))
    second = run(recipe(*stages), tmp_path)
    assert second.stages[0]["details"]["cached"].startswith("cache/train-")
    assert second.final["accuracy"] == first.final["accuracy"]


def test_same_seed_same_report_numbers(tmp_path):
    stages = ({"train": {"epochs": 1}},)
    a = run(recipe(*stages), tmp_path / "a")
    b = run(recipe(*stages), tmp_path / "b")
    assert a.final["accuracy"] == b.final["accuracy"]
    assert (
        load_model(tmp_path / "a" / "model.safetensors").state_dict()["1.weight"]
        == load_model(tmp_path / "b" / "model.safetensors").state_dict()["1.weight"]
    ).all()


def test_model_data_shape_mismatch_names_both(tmp_path):
    with pytest.raises(ShapeMismatchError, match=r"shape \(1, 8, 8\)"):
        run(recipe({"evaluate": {}}, model={"zoo": "lenet5"}), tmp_path)
    with pytest.raises(ShapeMismatchError, match=r"labels exceed.*up to 9.*outputs 3 classes.*\(1, 10\)"):
        run(
            recipe(
                {"evaluate": {}}, model={"zoo": "lenet300", "kwargs": {"in_features": 64, "num_classes": 3}}
            ),
            tmp_path,
        )


def test_branch_stage_is_reported_but_the_model_goes_on_unchanged(tmp_path, digits):
    branched = recipe(
        {"train": {"epochs": 3, "lr": 0.003}},
        {"prune": {"sparsity": 0.9}, "branch": True},
        {"finetune": {"epochs": 1}},
    )
    report = run(branched, tmp_path / "a")
    train, prune, finetune = report.stages
    assert prune["branch"] and not finetune["branch"]
    assert prune["metrics"]["nonzero_params"] < 0.2 * train["metrics"]["nonzero_params"]
    # the fine-tune started from the trained (unpruned) model, exactly as with an observing stage there
    run(
        recipe({"train": {"epochs": 3, "lr": 0.003}}, {"evaluate": {}}, {"finetune": {"epochs": 1}}),
        tmp_path / "b",
    )
    assert finetune["metrics"]["nonzero_params"] == train["metrics"]["nonzero_params"]
    a, b = load_model(tmp_path / "a" / "model.safetensors"), load_model(tmp_path / "b" / "model.safetensors")
    assert all(t.equal(b.state_dict()[k]) for k, t in a.state_dict().items())
    assert report.final == finetune["metrics"]
    assert "| prune (branch) | prune |" in (tmp_path / "a" / "report.md").read_text()
    # resume restores the continuing model, not the branch's
    resumed = run(branched, tmp_path / "a", resume=True)
    assert [s["resumed"] for s in resumed.stages] == [True, True, True]
    assert untimed(resumed.final) == untimed(report.final)


def test_branch_ending_a_recipe_leaves_the_final_model_before_it(tmp_path):
    report = run(
        recipe({"train": {"epochs": 2, "lr": 0.003}}, {"prune": {"sparsity": 0.9}, "branch": True}), tmp_path
    )
    assert report.final == report.stages[0]["metrics"]


def test_a_planted_checkpoint_naming_code_is_refused_on_resume(full_run, tmp_path):
    """A between-stage checkpoint whose metadata names a factory the recipe does not (here os:system)
    is refused with a named error on --resume; the code never runs."""
    out, _ = full_run
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    path = sorted((planted / ".checkpoints").glob("stage-00-*.safetensors"))[0]
    meta = read_safetensors_metadata(path)
    marker = tmp_path / "ran"
    meta["architecture"] = json.dumps({"factory": "os:system", "kwargs": {"command": f"touch {marker}"}})
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(ModelLoadError, match="names factory 'os:system', which the recipe does not"):
        run(recipe(*FULL_STAGES), planted, resume=True)
    assert not marker.exists()


@pytest.mark.slow
def test_identical_models_time_alike_beside_a_cpu_hog(tmp_path):
    """Three stages leave models of one architecture; with a process spinning on a core beside the
    run, the final timing pass still gives them latencies within 25 % of each other, and says the
    machine was busy. Twice, so one lucky pass does not pass the test."""
    stages = ({"train": {"epochs": 1}}, {"finetune": {"epochs": 1}}, {"finetune": {"epochs": 1}})
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for attempt in ("a", "b"):
            report = run(
                recipe(*stages, model=DIGITS_CNN, measure={"latency_repeats": 30, "onnx_fp32": False}),
                tmp_path / attempt,
            )
            for batch in (1, 32):
                times = [s["metrics"][f"latency_ms_b{batch}"] for s in report.stages]
                assert max(times) <= 1.25 * min(times), (batch, times)
            assert report.timing["busy"] and report.timing["other_load_cores"] > 0.5
            assert "the machine was busy while timing" in (tmp_path / attempt / "report.md").read_text()
    finally:
        hog.kill()
        hog.wait()


def test_every_float_model_is_also_timed_on_onnx_runtime(tmp_path):
    """With ``measure.onnx_fp32`` (the default) the model as given and every stage's float result are
    exported once and timed on ONNX Runtime in the same pass: their own columns beside PyTorch's."""
    stages = ({"train": {"epochs": 1}}, {"prune": {"granularity": "structured", "macs_reduction": 2}})
    report = run(recipe(*stages, measure={**FAST, "onnx_fp32": True}), tmp_path)
    for metrics in (report.baseline, *(s["metrics"] for s in report.stages)):
        for batch in (1, 32):
            assert metrics[f"onnx_latency_ms_b{batch}"] > 0 and metrics[f"onnx_latency_iqr_ms_b{batch}"] >= 0
            assert "torch_latency_ms_b{batch}" not in metrics  # PyTorch is what these rows ship on
    pruned = report.stages[1]["metrics"]
    assert pruned["speedup_onnx_fp32_b32"] > 0 and pruned["latency_ms_b32"] != pruned["onnx_latency_ms_b32"]
    assert set(report.timing["rows"]["prune"]) == {"torch", "onnx"}
    assert sorted(p.name for p in (tmp_path / ".work" / "timing").iterdir()) == [
        "given.onnx",
        "prune.onnx",
        "train.onnx",
    ]
    md = (tmp_path / "report.md").read_text()
    assert "ONNX Runtime b32 ms (IQR)" in md and "faster b32 on ONNX Runtime vs given fp32" in md


def test_a_recipe_that_only_evaluates_reports_the_given_models_latency(tmp_path) -> None:
    recipe = {
        "seed": 0,
        "model": DIGITS_MLP,
        "data": {"name": "digits"},
        "measure": {"latency_repeats": 3, "onnx_fp32": False},
        "stages": [{"evaluate": {}}],
    }
    report = run(recipe, tmp_path)  # the report's plot needs every stage's latency
    stage = report.stages[0]["metrics"]
    assert stage["latency_ms_b32"] == report.baseline["latency_ms_b32"] > 0  # the model it looked at
    assert (tmp_path / "pareto.png").is_file() and (tmp_path / "report.md").is_file()
