"""torchshrink: make trained PyTorch models smaller and faster, and prove it with measured numbers.

Public API::

    import torchshrink as ts
    report = ts.run("examples/recipes/lenet5_basic.yaml", out_dir="out/lenet5")
    model = ts.load_model("out/lenet5/model.safetensors")
    print(ts.measure(model, ts.load_data("mnist5k").test))
"""

from __future__ import annotations

from torchshrink._version import __version__
from torchshrink.data import DataSpec, load_data  # noqa: E402
from torchshrink.measure import measure  # noqa: E402
from torchshrink.models import ModelSpec, load_model, save_model  # noqa: E402
from torchshrink.pipeline import run  # noqa: E402
from torchshrink.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from torchshrink.train import DatasetBatches, TrainConfig, fit  # noqa: E402

__all__ = [
    "__version__",
    "DataSpec",
    "ModelSpec",
    "Recipe",
    "TrainConfig",
    "DatasetBatches",
    "fit",
    "load_data",
    "load_model",
    "save_model",
    "load_recipe",
    "parse_recipe",
    "measure",
    "run",
]
