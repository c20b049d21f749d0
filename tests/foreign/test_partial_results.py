"""A stage that cannot do what the recipe asks says so and exits 2, unless the recipe allows a
partial result: nothing prunable, a MACs or sparsity target out of reach, layers left float in an int8 file."""

from __future__ import annotations

import pytest
import yaml
from testkit import digits_recipe

from torchshrink.cli import main
from torchshrink.errors import QuantizationError, StructureError
from torchshrink.pipeline import run

FACTORY = '''
import torch
from torch import nn


class Untraceable(nn.Module):
    """A check on the input's values: no trace holds for every input, so it is kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 64, 10)

    def forward(self, x):
        if x.abs().max() > 1e6:  # control flow on tensor values
            raise ValueError("inputs out of range")
        x = torch.relu(self.conv(x))
        return self.fc(x.flatten(1))


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Untraceable()

    def forward(self, x):
        return self.inner(x)


def opaque_net() -> nn.Module:
    torch.manual_seed(0)
    return Outer()
'''


@pytest.fixture()
def opaque(tmp_path, monkeypatch) -> dict:
    (tmp_path / "opaque_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return {"factory": "opaque_models:opaque_net"}


def test_nothing_prunable_is_an_error(opaque, tmp_path) -> None:
    stage = {"prune": {"granularity": "structured", "macs_reduction": 2}}
    with pytest.raises(StructureError, match="no prunable channel group.*allow_partial"):
        run(digits_recipe(stage, model=opaque), tmp_path / "a")
    stage["prune"]["allow_partial"] = True
    report = run(digits_recipe(stage, model=opaque), tmp_path / "b")
    assert report.final["macs"] == report.baseline["macs"]  # allowed, and visibly unchanged


def test_nothing_prunable_exits_2_on_the_command_line(opaque, tmp_path, capsys) -> None:
    recipe = digits_recipe({"prune": {"granularity": "structured", "macs_reduction": 2}}, model=opaque)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no prunable channel group" in err and "Traceback" not in err


def _macs_reduction(report) -> float:
    return report.baseline["macs"] / report.final["macs"]


def _params_removed(report) -> float:
    return 1 - report.final["params"] / report.baseline["params"]


@pytest.mark.parametrize(
    ("target", "message", "reached", "bounds"),
    [
        ({"macs_reduction": 40}, r"reached macs_reduction \d+\.\d+x of the 40x", _macs_reduction, (1.5, 40)),
        ({"sparsity": 0.95}, r"reached sparsity 0\.\d+ of the 0\.95 asked", _params_removed, (0.3, 0.95)),
    ],
)
def test_an_unreachable_structured_target_is_an_error(target, message, reached, bounds, tmp_path) -> None:
    model = {"zoo": "lenet300", "kwargs": {"in_features": 64}}
    stage = {"prune": {"granularity": "structured", "max_channel_ratio": 0.5, **target}}
    with pytest.raises(StructureError, match=message):
        run(digits_recipe(stage, model=model), tmp_path / "a")
    stage["prune"]["allow_partial"] = True
    report = run(digits_recipe(stage, model=model), tmp_path / "b")
    assert bounds[0] < reached(report) < bounds[1]  # allowed: partial, and the report shows how far


def test_layers_left_float_in_an_int8_file_are_an_error(opaque, tmp_path) -> None:
    with pytest.raises(QuantizationError, match="runs 2 convolution / linear / matmul operator"):
        run(digits_recipe({"quantize": {"mode": "static"}}, model=opaque), tmp_path / "a")
    report = run(
        digits_recipe({"quantize": {"mode": "static", "allow_partial": True}}, model=opaque), tmp_path / "b"
    )
    ops = report.stages[0]["details"]["operators"]
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 1 and ops.get("Gemm") == 1


def test_a_fully_traced_model_passes_the_int8_check(tmp_path) -> None:
    model = {"zoo": "lenet300", "kwargs": {"in_features": 64}}
    report = run(digits_recipe({"quantize": {"mode": "static"}}, model=model), tmp_path)
    ops = report.stages[0]["details"]["operators"]
    assert ops.get("QGemm") == 3 and not ops.get("Gemm")
