"""A model with two inputs (token ids and an attention mask): the data's description of them drives
MACs, latency, tracing, export (named int64 inputs, dynamic batch and sequence axes), training,
pruning and the errors a user meets when data and model disagree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from token_model import CLASSES, DIM, HIDDEN, VOCAB, make, token_data

from torchshrink.cli import main
from torchshrink.data import load_data
from torchshrink.errors import DataError, ShapeMismatchError
from torchshrink.inputs import InputField, InputSpec, call
from torchshrink.measure import check_model_fits, count_macs, latencies_ms
from torchshrink.models import open_model
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.pipeline import run
from torchshrink.recipe import load_recipe

LENGTH = 12


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    np.savez(path, **token_data(length=LENGTH))
    return str(path)


@pytest.fixture(scope="module")
def data(npz):
    return load_data({"npz": npz, "inputs": ["tokens", "mask"]})


def test_the_description_comes_from_the_data(data, npz) -> None:
    spec = data.inputs
    assert spec.names == ("tokens", "mask")
    tokens, mask = spec.fields
    assert (tokens.dtype, tokens.shape, tokens.dynamic) == ("int64", (LENGTH,), (0,))
    assert tokens.low >= 0 and tokens.high <= VOCAB  # the range the data spans
    assert (mask.low, mask.high) == (0, 2)
    declared = load_data({"npz": npz, "inputs": ["tokens", "mask"], "input_ranges": {"tokens": [0, 1000]}})
    assert declared.inputs.fields[0].high == 1000  # a vocabulary larger than the data shows
    with pytest.raises(DataError, match=r"values span \[0, \d+\) but input_ranges declares \[5, 10\)"):
        load_data({"npz": npz, "inputs": ["tokens", "mask"], "input_ranges": {"tokens": [5, 10]}})
    with pytest.raises(DataError, match="data.inputs names \\['ids'\\], which the file does not hold"):
        load_data({"npz": npz, "inputs": ["ids", "mask"]})
    x, y = data.train.tensors
    assert isinstance(x, tuple) and x[0].dtype == torch.int64 and len(x[1]) == len(y)
    assert spec.example(4, seed=1)[0].max() < tokens.high  # stand-ins stay in range
    assert torch.equal(spec.example(4, seed=1)[0], spec.example(4, seed=1)[0])


def test_macs_and_latency_follow_the_described_inputs() -> None:
    model = make().eval()
    for length in (8, 20):
        spec = InputSpec(
            (
                InputField("tokens", "int64", (length,), 0, VOCAB, (0,)),
                InputField("mask", "int64", (length,), 0, 2, (0,)),
            )
        )
        # per token: fc1 (DIM x HIDDEN); once: fc2 (HIDDEN x CLASSES)
        assert count_macs(model, spec) == length * DIM * HIDDEN + HIDDEN * CLASSES
    timed = latencies_ms({"a": model, "b": make().eval()}, spec, batch_size=4, repeats=3, warmup=1)
    assert set(timed) == {"a", "b"} and all(t > 0 for t in timed.values())


def test_export_names_both_inputs_with_dynamic_batch_and_sequence(tmp_path, data) -> None:
    model = make().eval()
    path = tmp_path / "m.onnx"
    check = tuple(t[:16] for t in data.test.tensors[0])
    assert export_onnx(model, path, data.inputs, check_inputs=check) < 1e-5
    graph = onnx.load(str(path)).graph
    inputs = {i.name: i for i in graph.input}
    assert list(inputs) == ["tokens", "mask"]
    assert inputs["tokens"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    dims = [d.dim_param for d in inputs["tokens"].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    # Another batch size and another sequence length run on the same file and agree with torch.
    longer = (torch.randint(1, VOCAB, (3, 30)), torch.ones(3, 30, dtype=torch.int64))
    with torch.no_grad():
        expected = call(model, longer)
    assert torch.allclose(call(OnnxRuntimeModel(path), longer), expected, atol=1e-5)


def test_inputs_out_of_forward_order_or_missing_are_named_errors() -> None:
    model = make()
    spec = InputSpec((InputField("mask", "int64", (4,), 0, 2), InputField("tokens", "int64", (4,), 0, VOCAB)))
    with pytest.raises(
        ShapeMismatchError, match=r"takes \['tokens', 'mask'\] first; the data gives \['mask', 'tokens'\]"
    ):
        check_model_fits(model, spec, CLASSES, source="m")
    wrong = InputSpec(
        (InputField("tokens", "int64", (4,), 0, VOCAB), InputField("extra", "int64", (4,), 0, 2))
    )
    with pytest.raises(ShapeMismatchError, match=r"no parameter for input\(s\) \['extra'\]"):
        check_model_fits(model, wrong, CLASSES, source="m")
    only = InputSpec((InputField("tokens", "int64", (4,), 0, VOCAB),))  # one input: forward needs two
    with pytest.raises(ShapeMismatchError, match="cannot take inputs tokens int64"):
        check_model_fits(model, only, CLASSES, source="m")


class _Rest(torch.nn.Module):
    """``forward(tokens, *rest)``: the mask arrives through *rest under any name."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make()

    def forward(self, tokens, *rest):
        return self.inner(tokens, *rest)


def test_inputs_past_the_named_parameters_go_to_varargs() -> None:
    spec = InputSpec((InputField("tokens", "int64", (4,), 0, VOCAB), InputField("mask", "int64", (4,), 0, 2)))
    spec.check_order(_Rest(), "m")  # no error: mask is taken by *rest
    swapped = InputSpec(tuple(reversed(spec.fields)))
    with pytest.raises(ShapeMismatchError, match=r"takes \['tokens'\] before \*args"):
        swapped.check_order(_Rest(), "m")

    class TwoThenRest(torch.nn.Module):
        def forward(self, tokens, mask, *rest):
            return tokens

    other = InputSpec((spec.fields[0], InputField("extra", "int64", (4,), 0, 2)))
    with pytest.raises(ShapeMismatchError, match=r"takes \['tokens', 'mask'\] before \*args"):
        other.check_order(TwoThenRest(), "m")  # 'extra' would land in 'mask'
    anonymous = InputSpec((InputField("a", "int64", (4,), 0, 9), InputField("b", "int64", (4,), 0, 2)))
    anonymous.check_order(TwoThenRest(), "m")  # names of none of its parameters: taken as they come


def _recipe(folder, npz, *stages) -> str:
    shutil.copy(Path(__file__).with_name("token_model.py"), folder / "token_models.py")  # the user's module
    path = folder / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"factory": "token_models:make"},
                "data": {"npz": npz, "inputs": ["tokens", "mask"]},
                "measure": {"latency_repeats": 3, "onnx_fp32": False},
                "stages": list(stages),
            }
        )
    )
    return str(path)


@pytest.mark.slow
def test_train_prune_and_export_a_two_input_model_through_a_recipe(tmp_path, npz) -> None:
    recipe = _recipe(
        tmp_path,
        npz,
        {"train": {"epochs": 6, "lr": 0.01}},
        {"prune": {"granularity": "structured", "macs_reduction": 2.0}},
        {"finetune": {"epochs": 3, "lr": 0.003}},
        {"export": {}},
    )
    report = run(load_recipe(recipe), tmp_path / "out")
    trained, pruned = report.stages[0]["metrics"], report.stages[2]["metrics"]
    assert trained["accuracy"] > 0.8  # the class is learnable from the tokens the mask keeps
    assert trained["macs"] == LENGTH * DIM * HIDDEN + HIDDEN * CLASSES
    assert pruned["macs"] <= trained["macs"] / 2 * 1.02
    assert pruned["accuracy"] > 0.7
    # The model file records the inputs; the exported file takes them by name.
    loaded = open_model(
        {
            "factory": "token_models:make",
            "import_path": str(tmp_path),
            "weights": str(tmp_path / "out" / "model.safetensors"),
        }
    )
    assert loaded.inputs is not None and loaded.inputs.names == ("tokens", "mask")
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["tokens", "mask"]
    assert (
        json.loads((tmp_path / "out" / "report.json").read_text())["stages"][2]["metrics"]["macs"]
        == pruned["macs"]
    )


def test_a_recipe_whose_inputs_are_out_of_order_exits_2(tmp_path, npz, capsys) -> None:
    recipe = _recipe(tmp_path, npz, {"train": {"epochs": 1}})
    text = yaml.safe_load(Path(recipe).read_text())
    text["data"]["inputs"] = ["mask", "tokens"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(text))
    assert main(["run", recipe, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "list data.inputs in forward's order" in err and "Traceback" not in err
