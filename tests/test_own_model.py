"""A user's own model: a factory module beside the recipe, a model with more outputs than the
data's classes, unlabelled data (quality = agreement with the original model), and the errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import yaml

from torchshrink.cli import main
from torchshrink.data import load_data
from torchshrink.errors import DataError, ModelLoadError, RecipeError
from torchshrink.models import open_model
from torchshrink.pipeline import run
from torchshrink.recipe import load_recipe

FACTORY = """
import torch
from torch import nn


def wide_mlp(outputs: int = 20) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, outputs))
"""


def _recipe(folder, model, data, *stages, batch_sizes=(1, 32)) -> object:
    path = folder / "recipe.yaml"
    measure = {"latency_repeats": 3, "batch_sizes": list(batch_sizes)}
    path.write_text(
        yaml.safe_dump({"model": model, "data": data, "measure": measure, "stages": list(stages)})
    )
    return path


def test_factory_beside_the_recipe_is_imported_and_a_wider_model_keeps_its_width(tmp_path) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    path = _recipe(tmp_path, {"factory": "my_models:wide_mlp"}, {"name": "digits"}, {"train": {"epochs": 1}})
    before = list(sys.path)
    report = run(load_recipe(path), tmp_path / "out")
    assert sys.path == before  # the recipe's folder is on the path only while the factory is imported
    assert report.quality == "accuracy" and 0 < report.final["accuracy"] <= 1
    # The saved file rebuilds through the same factory (named by the user, never by the file).
    model = open_model(
        {
            "factory": "my_models:wide_mlp",
            "import_path": str(tmp_path),
            "weights": str(tmp_path / "out" / "model.safetensors"),
        }
    ).module
    assert model[-1].out_features == 20


def test_unlabelled_data_is_measured_as_agreement_with_the_original(tmp_path) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    digits = load_data("digits")
    np.savez(
        tmp_path / "photos.npz", x=digits.train.tensors[0].numpy(), x_test=digits.test.tensors[0].numpy()
    )
    path = _recipe(
        tmp_path,
        {"factory": "my_models:wide_mlp"},
        {"npz": "photos.npz"},
        {"quantize": {"mode": "dynamic"}},
        batch_sizes=(1, 4),
    )
    report = run(load_recipe(path), tmp_path / "out")
    assert report.quality == "agreement"
    assert report.baseline["accuracy"] == 1.0  # the original agrees with itself
    assert 0.5 < report.final["accuracy"] <= 1.0
    assert "latency_ms_b4" in report.final and "latency_ms_b32" not in report.final
    md = (tmp_path / "out" / "report.md").read_text()
    assert "agreement" in md and "latency b4 ms (IQR)" in md


def test_unlabelled_data_cannot_train(tmp_path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((20, 64), np.float32))
    path = _recipe(
        tmp_path, {"zoo": "lenet300", "kwargs": {"in_features": 64}}, {"npz": "x.npz"}, {"train": {}}
    )
    with pytest.raises(DataError, match="no labels"):
        run(load_recipe(path), tmp_path / "out")


def test_missing_factory_module_says_where_it_looked(tmp_path, capsys) -> None:
    path = _recipe(tmp_path, {"factory": "nowhere_to_be_found:net"}, {"name": "digits"}, {"evaluate": {}})
    with pytest.raises(ModelLoadError, match=str(tmp_path.resolve())):
        open_model(load_recipe(path).model)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nowhere_to_be_found" in err and str(tmp_path.resolve()) in err and "Traceback" not in err


def test_factory_without_the_function_lists_what_the_module_has(tmp_path) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    with pytest.raises(ModelLoadError, match="no attribute 'resnet'.*wide_mlp"):
        open_model({"factory": "my_models:resnet", "import_path": str(tmp_path)})


def test_model_narrower_than_the_data_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    path = _recipe(
        tmp_path,
        {"factory": "my_models:wide_mlp", "kwargs": {"outputs": 4}},
        {"name": "digits"},
        {"evaluate": {}},
    )
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "outputs 4 classes" in err and "num_classes" in err and "Traceback" not in err


def test_data_of_the_wrong_shape_exits_2(tmp_path, capsys) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    np.savez(tmp_path / "x.npz", x=np.zeros((20, 3, 5, 5), np.float32))
    path = _recipe(tmp_path, {"factory": "my_models:wide_mlp"}, {"npz": "x.npz"}, {"evaluate": {}})
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "(3, 5, 5)" in err and "Traceback" not in err


def test_batch_sizes_must_be_small_then_large(tmp_path) -> None:
    path = _recipe(tmp_path, {"zoo": "lenet5"}, {"name": "digits"}, {"evaluate": {}}, batch_sizes=(8, 1))
    with pytest.raises(RecipeError, match="measure.batch_sizes.*small then large"):
        load_recipe(path)
    one = _recipe(tmp_path, {"zoo": "lenet5"}, {"name": "digits"}, {"evaluate": {}}, batch_sizes=(32,))
    with pytest.raises(RecipeError, match=r"measure.batch_sizes.*give two batch sizes.*got \[32\]"):
        load_recipe(one)


WEIGHT_NORMED = """
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        weight_norm(nn.Conv2d(1, 16, 3, padding=1)), nn.ReLU(), weight_norm(nn.Conv2d(16, 16, 3, padding=1)),
        nn.ReLU(), nn.Flatten(), weight_norm(nn.Linear(16 * 64, 10)),
    )
"""


def test_parametrized_model_is_pruned_structurally_saved_and_rebuilt(tmp_path) -> None:
    (tmp_path / "wn_models.py").write_text(WEIGHT_NORMED)
    path = _recipe(
        tmp_path,
        {"factory": "wn_models:net"},
        {"name": "digits"},
        {"train": {"epochs": 1}},
        {"prune": {"granularity": "structured", "macs_reduction": 2}},
        {"finetune": {"epochs": 1}},
    )
    report = run(load_recipe(path), tmp_path / "out")
    assert report.baseline["macs"] / report.final["macs"] >= 1.96
    again = run(
        load_recipe(path), tmp_path / "out", resume=True
    )  # checkpoints rebuild the baked, smaller model
    assert all(s["resumed"] for s in again.stages)
    model = open_model(
        {
            "factory": "wn_models:net",
            "import_path": str(tmp_path),
            "weights": str(tmp_path / "out" / "model.safetensors"),
        }
    ).module
    assert model[0].out_channels < 16 and "0.weight" in model.state_dict()  # plain, smaller weights


def test_two_recipes_with_same_named_factory_modules_get_their_own(tmp_path) -> None:
    for width in (12, 14):
        folder = tmp_path / f"w{width}"
        folder.mkdir()
        (folder / "my_models.py").write_text(FACTORY.replace("outputs: int = 20", f"outputs: int = {width}"))
        model = open_model({"factory": "my_models:wide_mlp", "import_path": str(folder)}).module
        assert model[-1].out_features == width


def test_unlabelled_data_cannot_train_in_a_later_stage_either(tmp_path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((20, 64), np.float32))
    model = {"zoo": "lenet300", "kwargs": {"in_features": 64}}
    path = _recipe(tmp_path, model, {"npz": "x.npz"}, {"evaluate": {}}, {"train": {}})
    with pytest.raises(DataError, match="no labels, so stage 'train'"):
        run(load_recipe(path), tmp_path / "out")
