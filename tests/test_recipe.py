"""Recipe validation: good recipes parse with defaults, bad ones name key path, value and allowed values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torchshrink.errors import MissingFileError, RecipeError, UnknownStageError
from torchshrink.recipe import load_recipe, parse_recipe

GOOD = {
    "seed": 3,
    "model": {"zoo": "lenet5"},
    "data": {"name": "mnist5k"},
    "stages": [{"train": {"epochs": 2}}, {"finetune": {"epochs": 1}}, {"finetune": None}, {"evaluate": {}}],
}


def test_good_recipe_fills_defaults_and_names_repeated_stages():
    recipe = parse_recipe(GOOD)
    assert recipe.seed == 3
    assert [s.name for s in recipe.stages] == ["train", "finetune", "finetune-2", "evaluate"]
    assert recipe.stages[0].config.lr == 1e-3  # train default
    assert recipe.stages[1].config.lr == 3e-4  # finetune default
    assert recipe.to_dict()["stages"][0]["train"]["batch_size"] == 64


def test_fingerprint_depends_only_on_the_prefix():
    a = parse_recipe(GOOD)
    changed_last = parse_recipe({**GOOD, "stages": GOOD["stages"][:3] + [{"evaluate": {"split": "train"}}]})
    changed_first = parse_recipe({**GOOD, "stages": [{"train": {"epochs": 3}}] + GOOD["stages"][1:]})
    assert a.fingerprint(2) == changed_last.fingerprint(2)
    assert a.fingerprint(3) != changed_last.fingerprint(3)
    assert a.fingerprint(0) != changed_first.fingerprint(0)
    assert a.fingerprint(0) != parse_recipe({**GOOD, "seed": 4}).fingerprint(0)


def test_bad_option_value_names_path_value_and_allowed():
    bad = {**GOOD, "stages": [{"train": {"optimizer": "adamw"}}]}
    with pytest.raises(RecipeError) as err:
        parse_recipe(bad, source="r.yaml")
    msg = str(err.value)
    assert (
        "r.yaml" in msg
        and "stages[0].train.optimizer = 'adamw'" in msg
        and "'adam'" in msg
        and "'sgd'" in msg
    )


def test_out_of_range_value():
    with pytest.raises(RecipeError, match=re.escape("stages[0].train.lr = -1")):
        parse_recipe({**GOOD, "stages": [{"train": {"lr": -1}}]})


def test_unknown_option_lists_allowed_keys():
    with pytest.raises(
        RecipeError, match=r"stages\[1\]\.finetune\.epoch: unknown key; allowed keys here: epochs, lr"
    ):
        parse_recipe({**GOOD, "stages": [{"train": {}}, {"finetune": {"epoch": 2}}]})


def test_unknown_stage_kind_lists_known_kinds():
    with pytest.raises(
        UnknownStageError,
        match=r"stages\[0\].*'shrinkify'.*known kinds: datafree, distill, encode, ensemble, evaluate, export, finetune, (.*, )?train",
    ):
        parse_recipe({**GOOD, "stages": [{"shrinkify": {}}]})


@pytest.mark.parametrize(
    "patch,expected",
    [
        (
            {"model": {"zoo": "lenet6"}},
            r"model = \{'zoo': 'lenet6'\}: unknown zoo model 'lenet6'; known: cnn1d, lenet300",
        ),
        ({"model": {"zoo": "lenet5", "factory": "a:b"}}, "exactly one of 'zoo'"),
        ({"data": {"name": "cifar10"}}, r"data.name = 'cifar10'.*'mnist5k', 'digits' or 'mnist1d'"),
        ({"data": {"name": "digits", "test_fraction": 1.5}}, r"data.test_fraction = 1.5"),
        ({"stages": []}, "stages: the list is empty"),
        ({"stages": [{"train": {}, "evaluate": {}}]}, "one-key mapping"),
        ({"stages": [{"train": 5}]}, r"stages\[0\].train = 5: stage options must be a mapping"),
        (
            {"colour": "blue"},
            "colour: unknown key; allowed keys here: name, seed, model, data, measure, parallel, stages",
        ),
        (
            {"model": {"zoo": "lenet5", "wieghts": "x"}},
            r"model.wieghts: unknown key; allowed keys here: zoo, factory",
        ),
    ],
)
def test_bad_recipes(patch, expected):
    with pytest.raises(RecipeError, match=expected):
        parse_recipe({**GOOD, **patch})


def test_missing_required_key():
    with pytest.raises(RecipeError, match="model: required key is missing"):
        parse_recipe({"data": {"name": "digits"}, "stages": [{"evaluate": {}}]})


def test_yaml_file_errors_and_relative_paths(tmp_path):
    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "none.yaml"))):
        load_recipe(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [train: {epochs: 2}\n")
    with pytest.raises(RecipeError, match=re.escape(str(broken)) + ": not valid YAML"):
        load_recipe(broken)
    ok = tmp_path / "sub" / "r.yaml"
    ok.parent.mkdir()
    ok.write_text(
        "model: {zoo: lenet5, weights: w.safetensors}\ndata: {npz: d.npz}\nstages: [evaluate: {}]\n"
    )
    recipe = load_recipe(ok)
    assert recipe.model.weights == tmp_path / "sub" / "w.safetensors"
    assert recipe.data.npz == tmp_path / "sub" / "d.npz"


@pytest.mark.parametrize(
    "text",
    [
        "model: {zoo: lenet5}\ndata: {name: digits}\nstages: [train: {epochs: 2, epochs: 3}]\n",
        "model: {zoo: lenet5}\ndata: {name: digits}\nstages: [evaluate: {}]\nstages: [train: {}]\n",
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(str(path)) + r": not valid YAML: .*appears twice"):
        load_recipe(path)


def test_branch_key_is_validated():
    from torchshrink.errors import RecipeError
    from torchshrink.recipe import parse_recipe

    base = {"model": {"zoo": "lenet5"}, "data": {"name": "digits"}}
    recipe = parse_recipe(base | {"stages": [{"train": {}}, {"prune": {"sparsity": 0.5}, "branch": True}]})
    assert [s.branch for s in recipe.stages] == [False, True]
    assert parse_recipe(recipe.to_dict()).stages[1].branch  # survives the round trip (and the fingerprint)
    assert recipe.fingerprint(1) != parse_recipe(
        base | {"stages": [{"train": {}}, {"prune": {"sparsity": 0.5}}]}
    ).fingerprint(1)
    with pytest.raises(RecipeError, match=r"stages\[1\].branch = 'yes': must be true or false"):
        parse_recipe(base | {"stages": [{"train": {}}, {"prune": {}, "branch": "yes"}]})
    with pytest.raises(RecipeError, match="makes the reference model; it cannot branch"):
        parse_recipe(base | {"stages": [{"train": {}, "branch": True}]})
    with pytest.raises(RecipeError, match="one-key mapping"):
        parse_recipe(base | {"stages": [{"train": {}, "prune": {}}]})


def test_model_specs_inside_stages_take_paths_from_the_recipe_folder(tmp_path):
    path = tmp_path / "recipes" / "kd.yaml"
    path.parent.mkdir()
    path.write_text(
        "model: {zoo: lenet5}\ndata: {name: digits}\nstages:\n"
        "  - distill: {student: {zoo: lenet5_half}, teachers: [{path: teachers/t0.safetensors}, {path: /abs/t1.safetensors}]}\n"
    )
    teachers = load_recipe(path).stages[0].config.teachers
    assert [t.path for t in teachers] == [
        path.parent / "teachers" / "t0.safetensors",
        Path("/abs/t1.safetensors"),
    ]


@pytest.mark.parametrize(
    "options,expected",
    [
        (
            {"sparsity": 0.5, "macs_reduction": 2},
            r"stages\[1\]\.prune = \{.*\}: macs_reduction applies to granularity: structured "
            r"\(this stage is unstructured\)",
        ),
        (
            {"granularity": "structured", "macs_reduction": 2, "min_density": 0.1},
            r"min_density applies to granularity: unstructured",
        ),
        (
            {"granularity": "channels"},
            r"stages\[1\]\.prune: 'channels' is not one of 'unstructured', 'structured'",
        ),
        (
            {"granularity": "structured", "macs_reduction": 2, "bogus": 1},
            r"stages\[1\]\.prune\.bogus: unknown key; allowed keys here: scope, .*, allow_partial$",
        ),
    ],
)
def test_prune_options_are_checked_by_the_part_their_granularity_names(options, expected):
    with pytest.raises(RecipeError, match=expected):
        parse_recipe({**GOOD, "stages": [{"train": {}}, {"prune": options}]})


def test_prune_config_parts_are_what_the_stage_and_the_recipe_carry():
    from torchshrink.pruning.config import StructuredPruneConfig, UnstructuredPruneConfig

    recipe = parse_recipe({**GOOD, "stages": [{"prune": {"granularity": "structured", "macs_reduction": 2}}]})
    assert isinstance(recipe.stages[0].config.root, StructuredPruneConfig)
    assert recipe.to_dict()["stages"][0]["prune"]["macs_reduction"] == 2  # still written flat
    assert "min_density" not in recipe.to_dict()["stages"][0]["prune"]
    unstructured = parse_recipe({**GOOD, "stages": [{"prune": {"sparsity": 0.5}}]}).stages[0].config.root
    assert isinstance(unstructured, UnstructuredPruneConfig) and unstructured.min_density == 0.02
