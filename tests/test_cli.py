"""The torchshrink command: demo, run, eval, inspect, export, and error exits."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from torchshrink import load_model
from torchshrink.cli import _print_report, main
from torchshrink.data import load_data
from torchshrink.demo import demo_recipe, demo_recipe_dict, quick_variant
from torchshrink.io import load_tensors
from torchshrink.measure import accuracy
from torchshrink.models import open_model, save_model
from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.report import read_report


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["-q", "demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_quick_writes_report_and_prints_table(quick_demo, capsys):
    for name in (
        "report.json",
        "report.md",
        "pareto.png",
        "model.safetensors",
        "model.onnx",
        "model.tshrink",
    ):
        assert (quick_demo / name).is_file()
    report = json.loads((quick_demo / "report.json").read_text())
    assert report["recipe"]["name"] == "demo-quick"
    assert report["final"]["accuracy"] > 0.3  # one epoch on 1,000 real digits beats chance (0.1) clearly
    assert (
        len(list((quick_demo / "cache").glob("ensemble-member*.safetensors"))) == 3
    )  # the teachers are cached
    distilled = report["stages"][1]["details"]["models"]
    assert set(distilled) == {"teacher 0", "teacher 1", "teacher 2", "ensemble", "student"}
    kinds = [(s["kind"], s["branch"]) for s in report["stages"]]
    assert ("quantize", True) in kinds and kinds[-2:] == [("encode", False), ("evaluate", False)]
    _print_report(read_report(quick_demo / "report.json"), quick_demo)  # what `torchshrink demo` printed
    out = capsys.readouterr().out
    assert "| encode | encode |" in out and "| quantize (branch) | quantize |" in out
    assert re.search(
        r"encode: [\d,]+ bytes packed, [\d.]+x smaller than the [\d,]+ bytes of float32 weights", out
    )
    assert f"files:  {quick_demo / 'model.onnx'}  ·  {quick_demo / 'model.tshrink'}" in out


def test_demo_recipe_is_valid_and_quick_variant_shrinks_it():
    full = demo_recipe()
    assert [s.kind for s in full.stages][:2] == ["ensemble", "distill"] and full.model.zoo == "lenet5"
    assert full.data.name == "mnist5k"
    quick = quick_variant(demo_recipe_dict())
    assert all(list(s.values())[0].get("epochs", 1) == 1 for s in quick["stages"])
    assert quick["data"]["train_limit"] == 1000


def test_eval_json_on_model_and_onnx(quick_demo, capsys):
    assert (
        main(["eval", str(quick_demo / "model.safetensors"), "--data", "mnist5k", "--json", "--repeats", "3"])
        == 0
    )
    torch_metrics = json.loads(capsys.readouterr().out)
    report = json.loads((quick_demo / "report.json").read_text())
    assert torch_metrics["params"] == report["final"]["params"] < 431_080  # the demo pruned LeNet-5
    assert (
        main(["eval", str(quick_demo / "model.onnx"), "--data", "mnist5k", "--json", "--repeats", "3"]) == 0
    )
    onnx_metrics = json.loads(capsys.readouterr().out)
    assert onnx_metrics["size_bytes"] == (quick_demo / "model.onnx").stat().st_size
    # the int8 file is the quantize branch's model; the report measured it on the quick demo's test split
    quick_data = load_data(quick_variant(demo_recipe_dict())["data"])
    branch = next(s for s in report["stages"] if s["kind"] == "quantize")
    assert (
        accuracy(OnnxRuntimeModel(quick_demo / "model.onnx"), quick_data.test)
        == branch["metrics"]["accuracy"]
    )
    assert (
        main(["eval", str(quick_demo / "model.tshrink"), "--data", "mnist5k", "--json", "--repeats", "3"])
        == 0
    )
    packed_metrics = json.loads(capsys.readouterr().out)
    assert packed_metrics["accuracy"] == torch_metrics["accuracy"]  # the same model, from the packed file
    assert accuracy(load_model(quick_demo / "model.tshrink"), quick_data.test) == report["final"]["accuracy"]
    assert packed_metrics["size_bytes"] == report["final"]["size_bytes"]


def test_eval_with_factory_and_weights(tmp_path, capsys, monkeypatch):
    (tmp_path / "usermodels.py").write_text(
        "from torch import nn\n"
        "def build(hidden=32):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = open_model({"factory": "usermodels:build"})
    from torchshrink.io import save_tensors

    save_tensors(tmp_path / "w.safetensors", loaded.module.state_dict())
    assert (
        main(
            [
                "eval",
                str(tmp_path / "w.safetensors"),
                "--factory",
                "usermodels:build",
                "--data",
                "digits",
                "--json",
                "--repeats",
                "3",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["params"] == 64 * 32 + 32 + 32 * 10 + 10


def test_inspect_files(quick_demo, capsys):
    assert main(["inspect", str(quick_demo / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    # the demo's final model is structurally pruned (resized layers), then sparse and weight-shared
    stored = sum(
        t.numel() for t in load_tensors(quick_demo / "model.safetensors").values()
    )  # sparse: values + masks
    assert '"zoo": "lenet5_half"' in out and '"resized"' in out and f"{stored:,} values" in out
    assert main(["inspect", str(quick_demo / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "Conv x2" in out and "input: input ['batch', 1, 28, 28]" in out
    assert main(["inspect", str(quick_demo / "report.json")]) == 0
    assert "| **baseline** |" in capsys.readouterr().out


def test_export_command(tmp_path, capsys):
    loaded = open_model({"zoo": "lenet300", "kwargs": {"in_features": 64}})
    save_model(tmp_path / "m.safetensors", loaded.module, loaded.architecture, (1, 8, 8))
    assert (
        main(
            ["export", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "m.onnx"), "--data", "digits"]
        )
        == 0
    )
    assert "max abs diff" in capsys.readouterr().out
    assert (
        main(["export", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "n.onnx")]) == 0
    )  # shape from metadata
    assert (tmp_path / "n.onnx").stat().st_size > 100_000
    # an --out that is a folder, or under a file, is named before the model is even opened
    (tmp_path / "folder.onnx").mkdir()
    for out, expected in (
        (tmp_path / "folder.onnx", "--out is a folder"),
        (tmp_path / "n.onnx" / "x.onnx", "the folder of --out is a file"),
    ):
        capsys.readouterr()
        assert main(["export", str(tmp_path / "m.safetensors"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
    assert not any((tmp_path / "folder.onnx").iterdir())


def test_run_recipe_file(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"zoo": "lenet300", "kwargs": {"in_features": 64}},
                "data": {"name": "digits"},
                "measure": {"latency_repeats": 3, "onnx_fp32": False},
                "stages": [{"train": {"epochs": 1}}],
            }
        )
    )
    assert main(["-q", "run", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "| train | train |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["eval", "/nonexistent/model.safetensors", "--data", "digits"],
            "/nonexistent/model.safetensors: model file not found",
        ),
        (["run", "/nonexistent/r.yaml", "--out", "x"], "/nonexistent/r.yaml: recipe file not found"),
        (["eval", "lenet5", "--data", "digits"], "cannot take inputs of shape (1, 8, 8)"),
        (["inspect", "/nonexistent.onnx"], "/nonexistent.onnx: model file not found"),
    ],
)
def test_errors_exit_2_with_a_specific_message(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "torchshrink: error:" in err and expected in err
    assert "Traceback" not in err


def test_pickled_module_needs_trust_pickle(tmp_path, capsys):
    import torch

    torch.save(open_model("lenet5").module, tmp_path / "whole.pt")
    assert main(["eval", str(tmp_path / "whole.pt"), "--data", "mnist5k", "--repeats", "3"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert (
        main(["eval", str(tmp_path / "whole.pt"), "--data", "mnist5k", "--repeats", "3", "--trust-pickle"])
        == 0
    )


@pytest.mark.parametrize("where", ["file", "under-file"])
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_out_that_is_or_lies_under_a_file_is_named_before_any_work(tmp_path, capsys, where, command):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"zoo": "lenet300", "kwargs": {"in_features": 64}},
                                      "data": {"name": "digits"}, "stages": [{"train": {"epochs": 1}}]}))  # fmt: skip
    blocker = tmp_path / "taken.txt"
    blocker.write_text("not a folder\n")
    out = blocker if where == "file" else blocker / "sub"
    assert main([command, str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = "--out is a file" if where == "file" else f"--out lies under {blocker}, which is a file"
    assert expected in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder\n"  # nothing written


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage that is not protobuf" * 40, "truncated"])
def test_inspect_of_a_bad_onnx_file_is_named(quick_demo, tmp_path, capsys, content):
    onnx_files = sorted(quick_demo.glob("*.onnx"))
    path = tmp_path / "bad.onnx"
    path.write_bytes(onnx_files[0].read_bytes()[:4000] if content == "truncated" else content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a readable ONNX model" in err and "Traceback" not in err
