"""Stages ``train`` (produces the reference model) and ``finetune`` (recovers accuracy after a change).

Both run the one training loop with the data's loss (cross-entropy on class labels; cosine distance
to the original's vectors for an embedding model, which only ``finetune`` takes: ``train`` makes a
reference from labels); they differ only in defaults and in their role for the report's baseline.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from torchshrink.augment import AugmentConfig, augment_batch
from torchshrink.errors import RecipeError
from torchshrink.io import load_tensors, save_tensors
from torchshrink.models import load_weights_into
from torchshrink.parallel import ddp
from torchshrink.pruning.masks import keeper_for
from torchshrink.registry import register_stage
from torchshrink.state import ModelState, RunContext
from torchshrink.train import (
    Batch,
    DatasetBatches,
    LossFn,
    TrainConfig,
    classification_loss,
    fit,
    supervised_loss,
)


class TrainStageConfig(BaseModel, extra="forbid"):
    """Options of the ``train`` stage."""

    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = Field(None, gt=0)
    divergence: float | None = Field(
        1e3,
        gt=1,
        description="stop when the loss exceeds this multiple of its first value (at least 1); null: never",
    )
    checkpoint_every: int = Field(200, ge=0, description="steps between training checkpoints (0: none)")
    cache: bool = Field(False, description="reuse the result from the output folder's cache/ when present")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="training-input augmentation")


class FinetuneStageConfig(TrainStageConfig):
    """Options of the ``finetune`` stage: the same as ``train`` with shorter, gentler defaults."""

    epochs: int = Field(2, ge=1)
    lr: float = Field(3e-4, gt=0)


def check_augment(augment: AugmentConfig, embedding: bool, source: str) -> None:
    """Image augmentation shifts and mixes inputs for class labels: an embedding model's token
    inputs are not augmented (a named error, not a shifted token id)."""
    if embedding and augment.active:
        raise RecipeError(
            f"{source}.augment: shifts and mixes image inputs for class labels; an embedding model's "
            "inputs (token ids) are not augmented: remove the augment options"
        )


def training_loss(
    augment: AugmentConfig, num_classes: int, embedding: bool = False, source: str = "train"
) -> LossFn:
    """The loss for the data's targets (cross-entropy, or cosine distance to an embedding model's
    vectors), on batches augmented as ``augment`` says (image augmentation: class labels only)."""
    check_augment(augment, embedding, source)
    if not augment.active:
        return supervised_loss(embedding)

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return classification_loss(model, augment_batch(batch[0], batch[1], augment, num_classes))

    return loss_fn


def train_config(cfg: TrainStageConfig, ctx: RunContext) -> TrainConfig:
    """The training loop's settings from a stage's options (every stage that trains shares them)."""
    return TrainConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        grad_clip=cfg.grad_clip,
        divergence=cfg.divergence,
        checkpoint_every=cfg.checkpoint_every,
        seed=ctx.seed,
        desc=ctx.stage_name,
        num_classes=None if ctx.data.embedding else ctx.data.num_classes,
    )


def run_training(state: ModelState, cfg: TrainStageConfig, ctx: RunContext) -> ModelState:
    """Train ``state.model`` on the training split with cross-entropy, or reuse a cached result."""
    cache_file = ctx.cache_dir / f"{ctx.stage_name}-{ctx.fingerprint}.safetensors"
    if cfg.cache and cache_file.is_file():
        load_weights_into(state.model, load_tensors(cache_file), str(cache_file))
        ctx.details["cached"] = str(cache_file.relative_to(ctx.out_dir))
        return state.replace(artefact=None, lineage=(*state.lineage, ctx.stage_name))
    train_cfg = train_config(cfg, ctx)
    batches = DatasetBatches(ctx.data.train, cfg.batch_size, seed=ctx.seed)
    keeper = keeper_for(state.model, state.pruned_weights)  # unstructured pruning: pruned weights stay zero
    loss_fn = training_loss(cfg.augment, ctx.data.num_classes, ctx.data.embedding, ctx.stage_name)
    result = fit(state.model, batches, loss_fn, train_cfg, checkpoint_dir=ctx.work_dir, after_step=keeper)
    ctx.details.update(
        steps=result.steps,
        samples_per_second=round(result.samples_per_second, 1),
        final_loss=result.epoch_losses[-1] if result.epoch_losses else None,
    )
    if result.pipeline is not None:
        ctx.details["pipeline"] = result.pipeline
    if result.resumed_from_step:
        ctx.details["resumed_from_step"] = result.resumed_from_step
    if cfg.cache and ctx.dist.is_main:
        save_tensors(cache_file, state.model.state_dict())
    ddp.barrier()
    return state.replace(artefact=None, lineage=(*state.lineage, ctx.stage_name))


register_stage("train", TrainStageConfig, role="reference")(run_training)
register_stage("finetune", FinetuneStageConfig, role="transform", embeddings=True)(run_training)
