"""Trains a model with the one training loop, pipeline-parallel under torchrun (argv: model, split
names...) or in one process; writes its epoch losses, weights and pipeline details (for the tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from torchshrink.data import DataSpec, load_data
from torchshrink.io import save_tensors
from torchshrink.parallel import ddp, pipelining
from torchshrink.train import DatasetBatches, TrainConfig, classification_loss, fit
from torchshrink.zoo import build

MODELS = {"mlp": ("lenet300", {"in_features": 64}), "resnet": ("resnet", {"width": 8})}


def main() -> None:
    out, name, *split = sys.argv[1:]
    info = ddp.init_from_env()
    data = load_data(DataSpec(name="digits"))
    torch.manual_seed(0)
    zoo, kwargs = MODELS[name]
    model = build(zoo, **kwargs)
    settings = (
        pipelining.PipelineSettings(stages=2, microbatches=4, split=tuple(split))
        if info.distributed
        else None
    )
    with pipelining.pipelined(settings):
        batches = DatasetBatches(Subset(data.train, range(1024)), 64, seed=0)
        result = fit(model, batches, classification_loss, TrainConfig(epochs=3, lr=1e-3, seed=0, progress=False),
                     checkpoint_dir=Path(out) / "work")  # fmt: skip
    if info.is_main:
        save_tensors(Path(out) / "weights.safetensors", model.state_dict())
        record = {"losses": [e["ce"] for e in result.epoch_losses], "pipeline": result.pipeline,
                  "steps": result.steps, "samples_per_second": result.samples_per_second}  # fmt: skip
        (Path(out) / "result.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
