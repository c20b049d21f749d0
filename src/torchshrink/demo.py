"""The built-in demo recipe and its seconds-long ``--quick`` variant."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from torchshrink.recipe import Recipe, parse_recipe

QUICK_TRAIN_SAMPLES = 1000
QUICK_TEST_SAMPLES = 500


def demo_recipe_dict() -> dict[str, Any]:
    """The default demo recipe (``torchshrink/recipes/demo.yaml``) as a dict."""
    text = resources.files("torchshrink").joinpath("recipes/demo.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def quick_variant(data: dict[str, Any]) -> dict[str, Any]:
    """Shrink a recipe to a smoke test: one epoch per training stage, a data subset, few latency repeats."""
    quick = dict(data, name=f"{data.get('name', 'recipe')}-quick")
    quick["data"] = dict(data["data"], train_limit=QUICK_TRAIN_SAMPLES, test_limit=QUICK_TEST_SAMPLES)
    quick["measure"] = dict(data.get("measure") or {}, latency_repeats=5)
    stages = []
    for item in data["stages"]:
        kind = next(k for k in item if k != "branch")
        options = dict(item[kind] or {})
        if "epochs" in options or kind in ("train", "finetune"):
            options["epochs"] = 1
        if options.get("finetune_epochs"):
            options["finetune_epochs"] = 1
        if isinstance(options.get("schedule"), dict):
            options["schedule"] = dict(
                options["schedule"], epochs_between=min(1, options["schedule"].get("epochs_between", 1))
            )
        stages.append({**item, kind: options})
    quick["stages"] = stages
    return quick


def demo_recipe(quick: bool = False) -> Recipe:
    """The validated demo recipe (quick: the smoke-test variant)."""
    data = demo_recipe_dict()
    return parse_recipe(quick_variant(data) if quick else data, source="built-in demo recipe")
