"""Stage ``ensemble``: train several members and combine them into one model (the reference).

Members differ by initialisation seed (``vary: seed``), by a bootstrap resample of the training
set too (``bootstrap``, i.e. bagging), or by architecture (``arch``, one model spec per member).
Each is trained by the one training loop with the stage's options, in its own work folder (an
interrupted member continues from its checkpoint; with ``cache: true`` finished members are reused). With ``combine: weighted`` a held-out part of the
training set is kept from the members and used to fit the combination weights.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink.distillation.ensemble import Combine, Ensemble, ensemble_architecture, fit_weights
from torchshrink.errors import RecipeError, TrainingError
from torchshrink.inputs import samples, take
from torchshrink.measure import accuracy, count_params
from torchshrink.models import ModelSpec, build_architecture, open_model
from torchshrink.parallel.tasks import default_threads, run_in_processes
from torchshrink.registry import register_stage
from torchshrink.stages.training import TrainStageConfig, run_training
from torchshrink.state import ModelState, RunContext
from torchshrink.tables import markdown_table

log = logging.getLogger(__name__)

__all__ = ["EnsembleConfig", "ensemble_stage", "split_holdout", "bootstrap"]


class EnsembleConfig(TrainStageConfig):
    """Options of the ``ensemble`` stage: the ``train`` options for every member, plus how they differ."""

    members: int = Field(3, ge=2, description="how many members (vary: arch: the number of archs)")
    vary: Literal["seed", "bootstrap", "arch"] = "seed"
    archs: list[ModelSpec] = Field(default_factory=list, description="vary: arch: one model spec per member")
    combine: Combine = "mean_logits"
    holdout: float = Field(
        0.1, gt=0, lt=0.5, description="weighted: training fraction kept out to fit weights"
    )
    parallel: int = Field(
        1,
        ge=1,
        description="members trained at once, each in a process of its own with the cores shared out "
        "(1: one after another); the members are those trained one after another with as many threads",
    )

    @model_validator(mode="after")
    def _archs_match(self) -> EnsembleConfig:
        if self.vary == "arch":
            if len(self.archs) < 2:
                raise ValueError("vary: arch needs 'archs', a list of at least two model specs ({zoo: ...})")
            self.members = len(self.archs)
        elif self.archs:
            raise ValueError(f"'archs' is only used with vary: arch (vary is {self.vary!r})")
        return self

    def replaces_model(self) -> bool:
        """The ensemble replaces the pipeline's model."""
        return True


def split_holdout(train: TensorDataset, fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(rest, held-out) random split of a training set."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    cut = int(round(fraction * len(train)))
    return (
        samples(*(take(t, order[cut:]) for t in train.tensors)),
        samples(*(take(t, order[:cut]) for t in train.tensors)),
    )


def bootstrap(train: TensorDataset, seed: int) -> TensorDataset:
    """A bootstrap resample: as many samples as ``train``, drawn with replacement."""
    picks = torch.randint(len(train), (len(train),), generator=torch.Generator().manual_seed(seed))
    return samples(*(take(t, picks) for t in train.tensors))


def _member_architectures(state: ModelState, cfg: EnsembleConfig) -> list[dict[str, Any]]:
    if cfg.vary == "arch":
        return [open_model(spec).architecture for spec in cfg.archs]
    if state.architecture is None:
        raise RecipeError(
            "ensemble: the recipe's model has no architecture reference (TorchScript or pickled module), "
            "so no fresh members can be built; give the model as {zoo: ...} or {factory: ...}, or use vary: arch"
        )
    return [state.architecture] * cfg.members


@register_stage("ensemble", EnsembleConfig, role="reference")
def ensemble_stage(state: ModelState, cfg: EnsembleConfig, ctx: RunContext) -> ModelState:
    """Train ``cfg.members`` fresh members and continue with their :class:`Ensemble`."""
    architectures = _member_architectures(state, cfg)
    train, held_out = ctx.data.train, None
    if cfg.combine == "weighted":
        train, held_out = split_holdout(train, cfg.holdout, ctx.seed)
    contexts = [_member_context(ctx, cfg, train, i) for i in range(len(architectures))]
    jobs = min(cfg.parallel, len(architectures))
    if jobs > 1 and ctx.dist.distributed:
        log.warning(
            "ensemble: parallel members under torchrun: trained one after another, each across the ranks"
        )
        jobs = 1
    if jobs > 1:
        members = _train_in_processes(architectures, cfg, contexts, jobs)
    else:
        members = [_train_member(a, cfg, c) for a, c in zip(architectures, contexts, strict=True)]
    rows = [
        {
            "member": i,
            "model": architecture.get("zoo") or architecture.get("factory"),
            "params": count_params(model)[0],
            "accuracy": accuracy(model, ctx.data.test),
        }
        for i, (architecture, model) in enumerate(zip(architectures, members, strict=True))
    ]
    ensemble = Ensemble(members, cfg.combine).eval()
    if held_out is not None:
        fit_weights(ensemble, *held_out.tensors)
        for row, weight in zip(rows, ensemble.weights.tolist(), strict=True):
            row["weight"] = round(weight, 4)
    ensemble_accuracy = accuracy(ensemble, ctx.data.test)
    ctx.details.update(
        members=rows, ensemble_accuracy=ensemble_accuracy, members_table=_table(rows, ensemble_accuracy)
    )
    return ModelState(
        model=ensemble,
        architecture=ensemble_architecture(architectures, cfg.combine),
        lineage=(*state.lineage, ctx.stage_name),
    )


def _member_context(ctx: RunContext, cfg: EnsembleConfig, train: TensorDataset, index: int) -> RunContext:
    """Member ``index``'s own seed, training data (a bootstrap resample with vary: bootstrap) and
    work folder beside the stage's (``NN-ensemble-memberK``)."""
    seed = ctx.seed * 1000 + index
    data = bootstrap(train, seed) if cfg.vary == "bootstrap" else train
    return dataclasses.replace(
        ctx,
        stage_name=f"{ctx.stage_name}-member{index}",
        seed=seed,
        data=dataclasses.replace(ctx.data, train=data),
        fingerprint=f"{ctx.fingerprint}-m{index}",
        details={},
        baseline=None,
    )


def _train_member(architecture: dict[str, Any], cfg: EnsembleConfig, ctx: RunContext) -> nn.Module:
    """A fresh member from its seed, trained by the one training loop."""
    torch.manual_seed(ctx.seed)
    model = build_architecture(architecture)
    log.info("%s (%s)", ctx.stage_name, architecture.get("zoo", "model"))
    run_training(ModelState(model=model, architecture=architecture), cfg, ctx)
    return model.eval()


def _member_weights(
    architecture: dict[str, Any], cfg: EnsembleConfig, ctx: RunContext
) -> dict[str, torch.Tensor]:
    """:func:`_train_member` in a worker process: the weights travel back."""
    return _train_member(architecture, cfg, ctx).state_dict()


def _train_in_processes(
    architectures: list[dict[str, Any]], cfg: EnsembleConfig, contexts: list[RunContext], jobs: int
) -> list[nn.Module]:
    """Members trained ``jobs`` at a time in processes of their own (the cores shared out)."""
    log.info(
        "ensemble: %d members, %d at a time, %d thread(s) each",
        len(architectures),
        jobs,
        default_threads(jobs),
    )
    calls = [
        functools.partial(_member_weights, a, cfg, c) for a, c in zip(architectures, contexts, strict=True)
    ]
    outcomes = run_in_processes(calls, jobs, names=[c.stage_name for c in contexts], desc="ensemble members")
    members = []
    for architecture, context, outcome in zip(architectures, contexts, outcomes, strict=True):
        if not outcome.ok:
            raise TrainingError(f"{context.stage_name}: {outcome.error}")
        model = build_architecture(architecture)
        model.load_state_dict(outcome.value)
        members.append(model.eval())
    return members


def _table(rows: list[dict[str, Any]], ensemble_accuracy: float) -> str:
    cells = [
        [r["member"], r["model"], f"{r['params']:,}", r.get("weight", "-"), f"{r['accuracy'] * 100:.2f}%"]
        for r in rows
    ]
    total = sum(r["params"] for r in rows)
    cells.append(["**ensemble**", "", f"{total:,}", "", f"**{ensemble_accuracy * 100:.2f}%**"])
    return markdown_table(["member", "model", "params", "weight", "test accuracy"], cells)
