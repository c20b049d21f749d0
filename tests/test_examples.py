"""Every example recipe validates, and the runnable ones run end to end in their quick form."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from torchshrink import run
from torchshrink.demo import quick_variant
from torchshrink.errors import MissingFileError
from torchshrink.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml"))


def test_there_are_examples():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages


@pytest.mark.parametrize(
    "name",
    [
        "deep_compression.yaml",
        "lenet5_basic.yaml",
        "mnist1d_cnn.yaml",
        "prune_structured.yaml",
        "prune_unstructured.yaml",
        "quantize_int8.yaml",
        "quantize_qat_mixed.yaml",
    ],
)
def test_example_runs_quick(name, tmp_path):
    path = next(p for p in RECIPES if p.name == name)
    data = quick_variant(yaml.safe_load(path.read_text()))
    report = run(parse_recipe(data, source=str(path), base_dir=path.parent), tmp_path)
    assert report.final["accuracy"] > 0.15  # one epoch on real data beats chance (0.10)
    assert (tmp_path / "model.safetensors").is_file()


def test_own_model_example_fails_clearly_without_the_package(tmp_path):
    path = next(p for p in RECIPES if p.name == "own_model.yaml")
    with pytest.raises(MissingFileError, match="examples/recipes/my_data.npz: npz data file not found"):
        run(load_recipe(path), tmp_path)


def test_readme_recipe_validates():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## A recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(yaml.safe_load(block), source="README.md")
    assert [s.kind for s in recipe.stages][:2] == ["ensemble", "distill"] and recipe.stages[4].branch


@pytest.mark.parametrize("name", ["int8.yaml", "prune-distill-int8.yaml", "int8-variants.yaml"])
def test_efficientnet_example_validates_and_finds_its_factory_beside_it(name):
    path = Path(__file__).parents[1] / "examples" / "efficientnet" / name
    recipe = load_recipe(path)
    assert recipe.model.import_path == path.parent.resolve()  # factory.py is found without installing it
    assert recipe.data.npz == path.parent / "photos.npz" and recipe.measure.batch_sizes == (1, 8)


def test_minilm_example_validates_with_its_paths_beside_it():
    path = Path(__file__).parents[1] / "examples" / "minilm" / "int8.yaml"
    recipe = load_recipe(path)
    assert recipe.model.hf == path.parent / "all-MiniLM-L6-v2" and recipe.model.task == "embedding"
    assert recipe.data.text == path.parent / "corpus.txt" and recipe.data.tokenizer == recipe.model.hf
    assert len((path.parent / "corpus.txt").read_text(encoding="utf-8").splitlines()) > 500
