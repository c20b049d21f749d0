"""Stage ``evaluate``: per-class accuracy and the confusion matrix (embedding models: cosine and
nearest-neighbour agreement with the original), recorded in the report."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel

from torchshrink.measure import fidelity, predict
from torchshrink.registry import register_stage
from torchshrink.state import ModelState, RunContext


class EvaluateConfig(BaseModel, extra="forbid"):
    """Options of the ``evaluate`` stage."""

    split: Literal["test", "train"] = "test"


@register_stage("evaluate", EvaluateConfig, role="observe", embeddings=True)
def evaluate_stage(state: ModelState, cfg: EvaluateConfig, ctx: RunContext) -> ModelState:
    """Record the confusion matrix and per-class accuracy of the current model on ``split``."""
    dataset = ctx.data.test if cfg.split == "test" else ctx.data.train
    if ctx.data.embedding:
        ctx.details.update(split=cfg.split, **fidelity(state.model, dataset, pipelined=True))
        return state.replace(lineage=(*state.lineage, ctx.stage_name))
    x, y = dataset.tensors[0], dataset.tensors[1]
    n = ctx.data.num_classes
    pred = predict(state.model, x, pipelined=True).argmax(1)  # through the stages of a pipelined job
    confusion = torch.bincount(y * n + pred, minlength=n * n).reshape(n, n)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    ctx.details.update(
        split=cfg.split,
        accuracy=float(confusion.diag().sum()) / max(len(y), 1),
        per_class_accuracy=[round(float(a), 4) for a in per_class],
        confusion=confusion.tolist(),
    )
    return state.replace(lineage=(*state.lineage, ctx.stage_name))
