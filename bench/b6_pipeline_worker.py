"""Trains a zoo model with torchshrink's one training loop: pipeline-parallel under torchrun (2
stages, 4 micro-batches), or in one process without it. Writes result.json (epoch losses, steps,
samples/s, training bytes and peak RSS per process) and weights.safetensors into OUT.

``python bench/b6_pipeline_worker.py OUT MODEL DATA EPOCHS [SPLIT ...]``; MODEL: mlp (LeNet-300-100
for 8x8 digits), lenet5, resnet (width 8); DATA: digits or mnist5k; SPLIT: module names, or
``balance=memory`` to split by parameter bytes (default: by measured time). B6 and the pipeline
tests use it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from torchshrink.data import DataSpec, load_data
from torchshrink.io import save_tensors
from torchshrink.measure import predict
from torchshrink.parallel import ddp, pipelining
from torchshrink.train import DatasetBatches, TrainConfig, classification_loss, fit, peak_rss_mb
from torchshrink.zoo import build

MODELS = {
    "mlp": ("lenet300", {"in_features": 64}),
    "lenet5": ("lenet5", {}),
    "resnet": ("resnet", {"width": 8}),
}
BATCH = 64
MICROBATCHES = 4


def main() -> None:
    out, name, data_name, epochs, *split = sys.argv[1:]
    balance = "memory" if split == ["balance=memory"] else "time"
    split = [] if balance == "memory" else split
    out_dir = Path(out)
    info = ddp.init_from_env()
    data = load_data(DataSpec(name=data_name))
    torch.manual_seed(0)
    zoo, kwargs = MODELS[name]
    model = build(zoo, **kwargs)
    settings = (
        pipelining.PipelineSettings(
            stages=info.world_size, microbatches=MICROBATCHES, split=tuple(split), balance=balance
        )
        if info.distributed
        else None
    )
    whole = len(data.train) // BATCH * BATCH  # whole batches, as the pipeline takes them
    with pipelining.pipelined(settings):
        batches = DatasetBatches(Subset(data.train, range(whole)), BATCH, seed=0)
        config = TrainConfig(epochs=int(epochs), lr=1e-3, seed=0, progress=False)
        result = fit(model, batches, classification_loss, config, checkpoint_dir=out_dir / "work")
    with pipelining.pipelined(settings):  # evaluation through the same stages (every rank takes part)
        staged = pipelining.predict(model, data.test.tensors[0])
    whole = predict(model, data.test.tensors[0])
    through = staged if staged is not None else whole
    if result.pipeline is None:  # one process: the whole model's parameters, gradients and Adam state
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        pipeline = {"split": [], "training_bytes": [4 * weights], "peak_rss_mb": [round(peak_rss_mb(), 1)]}
    else:
        pipeline = result.pipeline
    if info.is_main:
        save_tensors(out_dir / "weights.safetensors", model.state_dict())
        record = {
            "losses": [e["ce"] for e in result.epoch_losses],
            "steps": result.steps,
            "seconds": result.seconds,
            "samples_per_second": result.samples_per_second,
            "pipeline": pipeline,
            "pipelined_eval_max_diff": float((through - whole).abs().max()),
            "evaluated_through_stages": staged is not None,
            "accuracy": float((whole.argmax(1) == data.test.tensors[1]).float().mean()),
        }
        (out_dir / "result.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
