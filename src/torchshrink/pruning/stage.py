"""Recipe stage ``prune``: unstructured masks or structured channel removal, with importance
criteria, schedules, sparsity-inducing (L1) training and fine-tuning between steps."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from torchshrink.errors import StructureError
from torchshrink.inputs import InputSpec, ModelInput, spec_of, take
from torchshrink.measure import count_macs, count_params, latencies_ms
from torchshrink.models import build_architecture
from torchshrink.pruning.allocation import sensitivity_plan
from torchshrink.pruning.graph import Group, find_groups
from torchshrink.pruning.importance import IMPORTANCE, make_importance
from torchshrink.pruning.latency_model import LatencyModel, fit_latency_model
from torchshrink.pruning.layers import drop_layers
from torchshrink.pruning.masks import (
    MaskKeeper,
    apply_masks,
    compute_masks,
    density,
    masks_from_zeros,
    prunable_weights,
)
from torchshrink.pruning.schedule import SCHEDULES
from torchshrink.pruning.structural import (
    Plan,
    Size,
    model_size,
    rebuilt,
    rebuilt_size,
    recalibrate_batchnorm,
    remove_channels,
    resized_shapes,
    search_plan,
)
from torchshrink.registry import register_stage
from torchshrink.state import ModelState, RunContext
from torchshrink.tracing import bake_parametrizations
from torchshrink.train import Batch, DatasetBatches, TrainConfig, fit, supervised_loss

log = logging.getLogger(__name__)

LATENCY_BATCH = 32  # the batch of the report's latency_ms_b32: what speed-up targets are about
SPEEDUP_ROUNDS = 3  # a speed-up target: the plan, then at most two re-plans from its measured speed-up
SPEEDUP_TOLERANCE = 0.98  # a plan measured within 2% of the target (timing noise) is accepted


class ScheduleConfig(BaseModel, extra="forbid"):
    """How the target is approached: at once, in equal steps, or on the AGP cubic curve."""

    kind: Literal["oneshot", "linear", "agp"] = "oneshot"
    steps: int = Field(1, ge=1)
    epochs_between: int = Field(1, ge=0, description="fine-tuning epochs after every step but the last")


class L1Config(BaseModel, extra="forbid"):
    """Sparsity-inducing training before pruning: loss + weight * sum|W| (or sum|gamma| of batch-norms)."""

    weight: float = Field(..., gt=0)
    epochs: int = Field(..., ge=1)
    target: Literal["weights", "bn"] = "weights"
    lr: float = Field(1e-3, gt=0)


class PruneConfig(BaseModel, extra="forbid"):
    """Options of the ``prune`` stage. Give exactly one target."""

    granularity: Literal["unstructured", "structured"] = "unstructured"
    scope: Literal["global", "layer"] = "global"
    importance: Literal["magnitude", "taylor", "snip", "entropy", "random", "bn_scale"] = "magnitude"
    norm: Literal["l1", "l2"] = "l1"
    sparsity: float | None = Field(
        None, gt=0, lt=1, description="fraction of weights (unstructured) or parameters (structured) removed"
    )
    macs_reduction: float | None = Field(None, gt=1, description="structured: MACs before / after")
    speedup: float | None = Field(
        None,
        gt=1,
        description="structured: batch-32 latency before / after, as predicted by a latency model fitted "
        "by timing shrunken copies on this machine (the stage then times the result and reports both)",
    )
    params_reduction: float | None = Field(None, gt=1, description="structured: parameters before / after")
    min_density: float = Field(
        0.02, ge=0, lt=1, description="unstructured: every layer keeps at least this fraction"
    )
    max_channel_ratio: float = Field(
        0.9, gt=0, lt=1, description="structured: at most this fraction of a group goes"
    )
    max_channel_ratio_residual: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="structured, models with residual adds: at most this fraction of any group goes",
    )
    allocation: Literal["sensitivity", "ranking"] | None = Field(
        None,
        description="structured, global scope: how many channels each group loses; 'sensitivity' (the "
        "default) measures the calibration loss of each candidate removal, 'ranking' compares "
        "normalised scores across groups",
    )
    allocation_cost: Literal["macs", "params", "latency"] | None = Field(
        None,
        description="structured, sensitivity allocation: what a removal's loss rise is divided by; "
        "default MACs for a macs_reduction target, parameters otherwise; 'latency' fits a latency model "
        "of this network on this machine (batch 32) and prefers the channels that cost more time than "
        "their MACs show",
    )
    cost_aware: bool = Field(
        True, description="structured, allocation 'ranking': rank channels by importance per MAC they cost"
    )
    drop_layers: int = Field(
        0,
        ge=0,
        description="structured, transformers: remove this many encoder layers first, the least harmful "
        "by measured loss; with a target, channels, heads and neurons then go until it holds",
    )
    ignore: list[str] = Field(default_factory=list, description="layer names never pruned")
    allow_partial: bool = Field(
        False,
        description="structured: accept a model short of the target (or unchanged, when nothing is "
        "prunable) instead of stopping with an error",
    )
    calibration_batches: int = Field(8, ge=1, description="batches for taylor / snip / entropy scores")
    batch_size: int = Field(64, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()
    finetune_lr: float = Field(3e-4, gt=0, description="learning rate of the fine-tuning between steps")
    l1_regularization: L1Config | None = None

    @property
    def targets(self) -> list[str]:
        """The size / speed targets given (drop_layers aside)."""
        return [
            k
            for k in ("sparsity", "macs_reduction", "params_reduction", "speedup")
            if getattr(self, k) is not None
        ]

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        targets = self.targets
        if self.drop_layers and self.granularity != "structured":
            raise ValueError("drop_layers removes whole layers: use granularity: structured")
        if len(targets) > 1 or (not targets and not self.drop_layers):
            raise ValueError(
                "give exactly one of sparsity, macs_reduction, params_reduction, speedup (structured: "
                f"or drop_layers alone); got {targets or 'none'}"
            )
        if self.granularity == "unstructured" and self.importance == "bn_scale":
            raise ValueError(
                "importance 'bn_scale' scores channels (batch-norm scales): use granularity: structured"
            )
        if self.granularity == "unstructured" and self.sparsity is None:
            raise ValueError(
                "unstructured pruning takes a 'sparsity' target (macs/params reductions and speedup need "
                "structured)"
            )
        if self.allocation is not None and (self.granularity != "structured" or self.scope != "global"):
            raise ValueError("'allocation' applies to structured pruning with scope: global")
        sensitivity = (
            self.granularity == "structured" and self.scope == "global" and self.allocation != "ranking"
        )
        if self.allocation_cost is not None and not sensitivity:
            raise ValueError(
                "'allocation_cost' applies to the sensitivity allocation (structured, scope: global, "
                "allocation: sensitivity)"
            )
        if self.schedule.kind == "oneshot" and self.schedule.steps != 1:
            raise ValueError("schedule kind 'oneshot' has exactly 1 step; use 'linear' or 'agp' for more")
        return self

    def layer_names(self) -> dict[str, list[str]]:
        """Layer names this config refers to (checked against the model before any stage runs)."""
        return {"ignore": list(self.ignore)}


def _l1_penalty_params(model: nn.Module, cfg: PruneConfig) -> list[torch.Tensor]:
    if cfg.l1_regularization is not None and cfg.l1_regularization.target == "bn":
        return [
            m.weight
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
    return list(prunable_weights(model, cfg.ignore).values())


def sparsity_inducing_training(model: nn.Module, cfg: PruneConfig, ctx: RunContext) -> dict[str, Any]:
    """Train with an L1 penalty so that unimportant weights (or channels) are driven towards zero."""
    l1 = cfg.l1_regularization
    assert l1 is not None
    penalised = _l1_penalty_params(model, cfg)

    task = supervised_loss(ctx.data.embedding)

    def loss_fn(net: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {**task(net, batch), "l1": l1.weight * sum(p.abs().sum() for p in penalised)}

    def mean_abs() -> float:
        with torch.no_grad():
            return float(sum(p.abs().sum() for p in penalised) / sum(p.numel() for p in penalised))

    before = mean_abs()
    result = fit(
        model,
        DatasetBatches(ctx.data.train, cfg.batch_size, seed=ctx.seed),
        loss_fn,
        TrainConfig(epochs=l1.epochs, lr=l1.lr, seed=ctx.seed, desc=f"{ctx.stage_name}: L1 training"),
        checkpoint_dir=ctx.work_dir / "l1",
    )
    return {
        "l1_final_loss": result.epoch_losses[-1],
        "l1_mean_abs_before": before,
        "l1_mean_abs_after": mean_abs(),
    }


def _finetune(
    model: nn.Module, cfg: PruneConfig, ctx: RunContext, step: int, keeper: MaskKeeper | None
) -> None:
    fit(
        model,
        DatasetBatches(ctx.data.train, cfg.batch_size, seed=ctx.seed + step),
        supervised_loss(ctx.data.embedding),
        TrainConfig(
            epochs=cfg.schedule.epochs_between,
            lr=cfg.finetune_lr,
            seed=ctx.seed + step,
            desc=f"{ctx.stage_name}: fine-tune {step}",
        ),
        checkpoint_dir=ctx.work_dir / f"finetune-{step}",
        after_step=keeper,
    )


def _prune_unstructured_step(
    model: nn.Module, cfg: PruneConfig, target: float, batches: list, seed: int
) -> None:
    params = prunable_weights(model, cfg.ignore)
    importance = make_importance(cfg.importance, model, batches, norm=cfg.norm, seed=seed)
    scores = {
        n: importance.elements(n) if n in importance.scores else torch.zeros_like(p)
        for n, p in params.items()
    }
    masks = compute_masks(scores, target, cfg.scope, cfg.min_density, already_pruned=masks_from_zeros(params))
    apply_masks(params, masks)


def _target_reached(
    cfg: PruneConfig, fraction: float, base: Size, latency: LatencyModel | None, correction: float = 1.0
) -> Callable[[Size], bool]:
    """``size -> bool``: has this step's share of the structured target been reached?

    ``correction`` scales a speed-up target's predicted goal after a plan measured short of it.
    """
    if cfg.speedup is not None:
        assert latency is not None
        ms_goal = latency.predict(base) / (cfg.speedup**fraction * correction)
        return lambda size: latency.predict(size) <= ms_goal
    if cfg.macs_reduction is not None:
        macs_goal = base.macs / cfg.macs_reduction**fraction
        return lambda size: size.macs <= macs_goal
    if cfg.params_reduction is not None:
        params_goal = base.params / cfg.params_reduction**fraction
    else:
        assert cfg.sparsity is not None
        params_goal = base.params * (1 - cfg.sparsity * fraction)
    return lambda size: size.params <= params_goal


def _channel_cap(cfg: PruneConfig, groups: Sequence[Group]) -> float:
    """The largest share of any group that may go.

    In a residual network a group stripped to a few channels starves its whole stage (B3: ResNet
    accuracy fell 1-2 points with the plain cap), so every group keeps at least half there.
    """
    residual = any(g.joined for g in groups)
    return min(cfg.max_channel_ratio, cfg.max_channel_ratio_residual) if residual else cfg.max_channel_ratio


def _allocation_cost(cfg: PruneConfig) -> Literal["macs", "params", "latency"]:
    """What the sensitivity allocation divides a loss rise by (the option, or the target's unit)."""
    if cfg.allocation_cost is not None:
        return cfg.allocation_cost
    if cfg.speedup is not None:
        return "latency"
    return "macs" if cfg.macs_reduction is not None else "params"


def measured_speedup(original: nn.Module, pruned: nn.Module, inputs: InputSpec | Sequence[int]) -> float:
    """Batch-32 latency of ``original`` over ``pruned``, timed interleaved on this machine."""
    timed = latencies_ms({"original": original, "pruned": pruned}, inputs, batch_size=LATENCY_BATCH)
    return timed["original"] / timed["pruned"]


def _check_speedup(
    original: nn.Module,
    pruned: nn.Module,
    latency: LatencyModel,
    target: float,
    base: Size,
    inputs: InputSpec | Sequence[int],
) -> dict[str, float]:
    """Time the pruned network against the original (batch 32, interleaved) next to the predicted
    speed-up, so a latency model that misjudged this machine shows in the report and the log."""
    measured = measured_speedup(original, pruned, inputs)
    predicted = latency.speedup(base, model_size(pruned, inputs))
    log.info("speed-up at batch %d: predicted %.2fx, measured %.2fx", LATENCY_BATCH, predicted, measured)
    if measured < 0.9 * target:
        log.warning(
            "measured speed-up %.2fx is below the target %.2fx (predicted %.2fx): the machine was busy "
            "while timing, or the latency model does not fit this network; raise 'speedup'",
            measured,
            target,
            predicted,
        )
    return {"speedup_predicted": round(predicted, 3), "speedup_measured": round(measured, 3)}


TARGET_TOLERANCE = 0.98  # a plan this close to a MACs / parameter target counts as reaching it


def _check_target_reached(
    cfg: PruneConfig, base: Size, after: Size, latency: LatencyModel | None = None
) -> None:
    """Stop with an error when the structured target was not reached (unless ``allow_partial``).

    MACs and parameter reductions and a structured ``sparsity`` (share of parameters removed) are
    counted exactly; a ``speedup`` target is judged on the latency model's prediction for the final
    plan (what the plan could reach; the measured speed-up depends on the load and is reported and
    logged next to it by ``_check_speedup``)."""
    checks: list[tuple[str, float, float, str]] = []
    if cfg.macs_reduction is not None:
        checks.append(("macs_reduction", base.macs / max(after.macs, 1), cfg.macs_reduction, "x"))
    if cfg.params_reduction is not None:
        checks.append(("params_reduction", base.params / max(after.params, 1), cfg.params_reduction, "x"))
    if cfg.sparsity is not None:
        checks.append(("sparsity", 1 - after.params / max(base.params, 1), cfg.sparsity, ""))
    if cfg.speedup is not None and latency is not None:
        checks.append(("speedup (predicted)", latency.speedup(base, after), cfg.speedup, "x"))
    for key, achieved, target, unit in checks:
        if achieved >= TARGET_TOLERANCE * target:
            continue
        message = (
            f"structured pruning reached {key} {achieved:.3g}{unit} of the {target:g}{unit} asked: the "
            f"prunable groups cannot lose more within max_channel_ratio {cfg.max_channel_ratio} (residual "
            f"{cfg.max_channel_ratio_residual}) and the layers that are pinned or kept whole"
        )
        if not cfg.allow_partial:
            raise StructureError(message + "; lower the target, raise the ratios, or set allow_partial: true")
        log.warning("%s; allow_partial: keeping the partial result", message)


def _prune_structured_step(
    model: nn.Module,
    cfg: PruneConfig,
    fraction: float,
    batches: list,
    seed: int,
    example: ModelInput,
    base: Size,
    latency: LatencyModel | None,
    original: nn.Module | None,
) -> list[dict[str, float]]:
    """Plan and remove one step's channels. For a ``speedup`` target, the last step's plan is timed
    against ``original`` and re-planned with a goal scaled by the shortfall (at most
    SPEEDUP_ROUNDS plans): the latency model is an estimate, the user asked for a measured speed-up.
    Returns the rounds (predicted and measured speed-up of each plan)."""
    groups = find_groups(model, example, cfg.ignore)
    if not groups:
        message = (
            f"structured pruning found no prunable channel group in {type(model).__name__}: every conv / "
            "linear is pinned (a model input or output, a layer in prune.ignore, or inside a module that "
            "cannot be traced and is kept whole: see the warnings above)"
        )
        if not cfg.allow_partial:
            raise StructureError(message + "; set allow_partial: true to go on with the model unchanged")
        log.warning("%s; allow_partial: the model goes on unchanged", message)
        return []
    importance = make_importance(cfg.importance, model, batches, norm=cfg.norm, seed=seed)
    scores = [importance(g) for g in groups]
    inputs = spec_of(example)
    rounds: list[dict[str, float]] = []
    correction = 1.0
    for _ in range(SPEEDUP_ROUNDS):
        reached = _target_reached(cfg, fraction, base, latency, correction)
        plan = _plan(model, cfg, groups, scores, batches, example, reached, latency)
        if cfg.speedup is None or original is None or fraction < 1.0:
            break
        assert latency is not None
        predicted = latency.speedup(base, rebuilt_size(model, groups, plan, inputs))
        measured = measured_speedup(original, rebuilt(model, groups, plan), inputs)
        rounds.append({"predicted": round(predicted, 3), "measured": round(measured, 3)})
        if measured >= SPEEDUP_TOLERANCE * cfg.speedup:
            break
        correction *= cfg.speedup / measured
        log.info(
            "plan measured %.2fx for a %.2fx target: re-planning for %.2fx predicted",
            measured,
            cfg.speedup,
            cfg.speedup * correction,
        )
    remove_channels(model, groups, plan)
    recalibrate_batchnorm(model, [x for x, _ in batches])
    return rounds


def _plan(
    model: nn.Module,
    cfg: PruneConfig,
    groups: Sequence[Group],
    scores: Sequence[torch.Tensor],
    batches: list,
    example: ModelInput,
    reached: Callable[[Size], bool],
    latency: LatencyModel | None,
) -> Plan:
    """The channels to remove until ``reached`` holds, by the configured allocation."""
    cap = _channel_cap(cfg, groups)
    if cfg.scope == "global" and cfg.allocation in (None, "sensitivity"):
        return sensitivity_plan(
            model,
            example,
            groups,
            scores,
            batches,
            max_ratio=cap,
            reached=reached,
            saves=_allocation_cost(cfg),
            latency=latency,
        )
    return search_plan(
        model,
        example,
        groups,
        scores,
        scope=cfg.scope,
        max_ratio=cap,
        reached=reached,
        cost_aware=cfg.cost_aware,
    )


@register_stage("prune", PruneConfig, role="transform", embeddings=True)
def prune_stage(state: ModelState, cfg: PruneConfig, ctx: RunContext) -> ModelState:
    """Prune ``state.model`` in place to the target; structured pruning returns a smaller architecture."""
    model = state.model
    if cfg.granularity == "structured":
        bake_parametrizations(model)  # channels are removed from plain weights
    example = take(ctx.data.train.tensors[0], slice(0, 2))
    inputs = ctx.data.inputs
    base = model_size(model, inputs)
    unpruned = (
        copy.deepcopy(model).eval() if cfg.speedup is not None else None
    )  # what speed-ups are timed against
    if cfg.l1_regularization is not None:
        ctx.details.update(sparsity_inducing_training(model, cfg, ctx))
    # data-driven criteria score on these batches; structured pruning measures the sensitivity
    # allocation's loss and re-estimates batch-norm statistics on them
    needs_data = IMPORTANCE[cfg.importance].needs_data or cfg.granularity == "structured"
    batches = ctx.calibration_batches(cfg.calibration_batches, cfg.batch_size) if needs_data else []
    steps = cfg.schedule.steps
    structured = cfg.granularity == "structured"
    trajectory = []
    latency = None
    needs_latency = structured and (cfg.speedup is not None or _allocation_cost(cfg) == "latency")
    groups = find_groups(model, example, cfg.ignore) if needs_latency else []
    if groups:
        # fitted once on the full network: the timed copies span the sizes every step reaches
        latency = fit_latency_model(
            model,
            groups,
            inputs,
            max_ratio=_channel_cap(cfg, groups),
            batch_size=LATENCY_BATCH,
            seed=ctx.seed,
        )
        ctx.details["latency_model"] = asdict(latency)
    if cfg.drop_layers:
        ctx.details["dropped_layers"] = drop_layers(model, cfg.drop_layers, batches)
    for step in range(1, steps + 1 if cfg.targets else 1):  # drop_layers alone: no channel steps
        fraction = SCHEDULES[cfg.schedule.kind](step, steps)
        if structured:
            rounds = _prune_structured_step(
                model, cfg, fraction, batches, ctx.seed + step, example, base, latency, unpruned
            )
            if rounds:
                ctx.details["speedup_rounds"] = rounds
        else:
            assert cfg.sparsity is not None
            _prune_unstructured_step(model, cfg, cfg.sparsity * fraction, batches, ctx.seed + step)
        params, nonzero = count_params(model)
        trajectory.append(
            {
                "step": step,
                "params": params,
                "nonzero_params": nonzero,
                "macs": count_macs(model, inputs),
            }
        )
        if step < steps and cfg.schedule.epochs_between > 0:
            names = list(prunable_weights(model, cfg.ignore)) if not structured else []
            _finetune(model, cfg, ctx, step, MaskKeeper(model, names) if names else None)
            if batches:
                batches = ctx.calibration_batches(cfg.calibration_batches, cfg.batch_size)
    ctx.details["steps"] = trajectory
    ctx.details["params_before"], ctx.details["macs_before"] = base.params, base.macs
    if structured:
        _check_target_reached(cfg, base, model_size(model, inputs), latency)
    if unpruned is not None and latency is not None:
        assert cfg.speedup is not None
        ctx.details.update(_check_speedup(unpruned, model, latency, cfg.speedup, base, inputs))
    architecture = state.architecture
    pruned_weights = state.pruned_weights
    if structured:
        if architecture is not None:
            original = build_architecture({k: v for k, v in architecture.items() if k != "resized"})
            architecture = dict(architecture, resized=resized_shapes(model, original))
            ctx.details["layers"] = architecture["resized"]
    else:
        params = prunable_weights(model, cfg.ignore)
        pruned_weights = tuple(sorted({*pruned_weights, *params}))
        ctx.details["weight_density"] = round(density(params), 6)
        ctx.details["layers"] = {n: round(density({n: p}), 4) for n, p in params.items()}
    return state.replace(
        model=model,
        architecture=architecture,
        artefact=None,
        pruned_weights=pruned_weights,
        lineage=(*state.lineage, ctx.stage_name),
    )


__all__ = ["PruneConfig", "ScheduleConfig", "L1Config", "prune_stage", "IMPORTANCE"]
