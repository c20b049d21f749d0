"""torchshrink: make trained PyTorch models smaller and faster, and prove it with measured numbers.

Public API::

    import torchshrink as ts
    data = ts.load_data("digits")
    pruned = ts.prune(my_model, data, granularity="structured", macs_reduction=2, finetune_lr=1e-3)
    int8 = ts.quantize(pruned.model, data, mode="static")     # int8 ONNX file in int8.artefacts
    print(int8.summary())                                       # quality, size, MACs before -> after
    report = ts.run("examples/recipes/lenet5_basic.yaml", out_dir="out/lenet5")  # a whole recipe
    done = ts.sweep(["a.yaml", "b.yaml"], "out/sweep", jobs=2)   # recipes side by side (or on Ray)
    best = ts.search(my_model, data, max_drop=0.5, objective="latency")  # the fastest within 0.5 points
"""

from __future__ import annotations

from torchshrink._version import __version__
from torchshrink.api import (  # noqa: E402
    Result,
    apply_stage,
    distill,
    encode,
    evaluate,
    export,
    finetune,
    prune,
    quantize,
    search,
)
from torchshrink.data import DataSpec, load_data  # noqa: E402
from torchshrink.measure import measure  # noqa: E402
from torchshrink.models import ModelSpec, load_model, save_model  # noqa: E402
from torchshrink.pipeline import run  # noqa: E402
from torchshrink.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from torchshrink.sweep import SweepResult, sweep  # noqa: E402
from torchshrink.train import DatasetBatches, TrainConfig, fit  # noqa: E402

__all__ = [
    "__version__",
    "Result",
    "apply_stage",
    "distill",
    "encode",
    "evaluate",
    "export",
    "finetune",
    "prune",
    "quantize",
    "search",
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
    "sweep",
    "SweepResult",
]
