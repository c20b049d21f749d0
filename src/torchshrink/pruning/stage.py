"""Recipe stage ``prune``: unstructured masks or structured channel removal, with importance
criteria, schedules, sparsity-inducing (L1) training and fine-tuning between steps."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from torchshrink.errors import StructureError
from torchshrink.inputs import ModelInput, spec_of, take
from torchshrink.measure import count_macs, count_params
from torchshrink.models import build_architecture
from torchshrink.pruning.allocation import sensitivity_plan
from torchshrink.pruning.config import (
    L1Config,
    PruneConfig,
    PruneOptions,
    ScheduleConfig,
    StructuredPruneConfig,
    UnstructuredPruneConfig,
)
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
from torchshrink.pruning.speedup import LATENCY_BATCH, check_speedup, replan_until_measured
from torchshrink.pruning.structural import (
    Plan,
    Size,
    model_size,
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


def _l1_penalty_params(model: nn.Module, cfg: PruneOptions) -> list[torch.Tensor]:
    if cfg.l1_regularization is not None and cfg.l1_regularization.target == "bn":
        return [
            m.weight
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
    return list(prunable_weights(model, cfg.ignore).values())


def sparsity_inducing_training(model: nn.Module, cfg: PruneOptions, ctx: RunContext) -> dict[str, Any]:
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
    model: nn.Module, cfg: PruneOptions, ctx: RunContext, step: int, keeper: MaskKeeper | None
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
    model: nn.Module, cfg: UnstructuredPruneConfig, target: float, batches: list, seed: int
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
    cfg: StructuredPruneConfig,
    fraction: float,
    base: Size,
    latency: LatencyModel | None,
    correction: float = 1.0,
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


def _channel_cap(cfg: StructuredPruneConfig, groups: Sequence[Group]) -> float:
    """The largest share of any group that may go.

    In a residual network a group stripped to a few channels starves its whole stage (B3: ResNet
    accuracy fell 1-2 points with the plain cap), so every group keeps at least half there.
    """
    residual = any(g.joined for g in groups)
    return min(cfg.max_channel_ratio, cfg.max_channel_ratio_residual) if residual else cfg.max_channel_ratio


TARGET_TOLERANCE = 0.98  # a plan this close to a MACs / parameter target counts as reaching it


def _check_target_reached(
    cfg: StructuredPruneConfig, base: Size, after: Size, latency: LatencyModel | None = None
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
    cfg: StructuredPruneConfig,
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

    def make_plan(correction: float) -> Plan:
        reached = _target_reached(cfg, fraction, base, latency, correction)
        return _plan(model, cfg, groups, scores, batches, example, reached, latency)

    rounds: list[dict[str, float]] = []
    if cfg.speedup is not None and original is not None and latency is not None and fraction >= 1.0:
        plan, rounds = replan_until_measured(
            make_plan, model, original, groups, latency, base, cfg.speedup, spec_of(example)
        )
    else:
        plan = make_plan(1.0)
    remove_channels(model, groups, plan)
    recalibrate_batchnorm(model, [x for x, _ in batches])
    return rounds


def _plan(
    model: nn.Module,
    cfg: StructuredPruneConfig,
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
            saves=cfg.cost,
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
    options = cfg.root
    if isinstance(options, StructuredPruneConfig):
        return _prune_structured(state, options, ctx)
    return _prune_unstructured(state, options, ctx)


def _prepare(model: nn.Module, cfg: PruneOptions, ctx: RunContext, structured: bool) -> list:
    """L1 training when asked, then the calibration batches the criteria and the structured
    allocation need (data-driven criteria score on them; structured pruning measures the
    sensitivity allocation's loss and re-estimates batch-norm statistics on them)."""
    if cfg.l1_regularization is not None:
        ctx.details.update(sparsity_inducing_training(model, cfg, ctx))
    needs_data = IMPORTANCE[cfg.importance].needs_data or structured
    return ctx.calibration_batches(cfg.calibration_batches, cfg.batch_size) if needs_data else []


def _scheduled(
    model: nn.Module,
    cfg: PruneOptions,
    ctx: RunContext,
    batches: list,
    prune_step: Callable[[int, float, list], None],
    keep_masks: bool,
) -> list[dict[str, int]]:
    """The schedule: ``prune_step(step, fraction, batches)`` per step, the size after each, and
    fine-tuning between steps (masked weights held at zero when ``keep_masks``)."""
    trajectory = []
    steps = cfg.schedule.steps
    for step in range(1, steps + 1):
        prune_step(step, SCHEDULES[cfg.schedule.kind](step, steps), batches)
        params, nonzero = count_params(model)
        macs = count_macs(model, ctx.data.inputs)
        trajectory.append({"step": step, "params": params, "nonzero_params": nonzero, "macs": macs})
        if step < steps and cfg.schedule.epochs_between > 0:
            names = list(prunable_weights(model, cfg.ignore)) if keep_masks else []
            _finetune(model, cfg, ctx, step, MaskKeeper(model, names) if names else None)
            if batches:
                batches = ctx.calibration_batches(cfg.calibration_batches, cfg.batch_size)
    return trajectory


def _prune_unstructured(state: ModelState, cfg: UnstructuredPruneConfig, ctx: RunContext) -> ModelState:
    """Masks on single weights to the sparsity target; the architecture stays as it is."""
    model = state.model
    base = model_size(model, ctx.data.inputs)
    batches = _prepare(model, cfg, ctx, structured=False)
    sparsity = cfg.sparsity
    assert sparsity is not None

    def step(index: int, fraction: float, batches: list) -> None:
        _prune_unstructured_step(model, cfg, sparsity * fraction, batches, ctx.seed + index)

    ctx.details["steps"] = _scheduled(model, cfg, ctx, batches, step, keep_masks=True)
    ctx.details["params_before"], ctx.details["macs_before"] = base.params, base.macs
    params = prunable_weights(model, cfg.ignore)
    ctx.details["weight_density"] = round(density(params), 6)
    ctx.details["layers"] = {n: round(density({n: p}), 4) for n, p in params.items()}
    return state.replace(
        model=model,
        artefact=None,
        pruned_weights=tuple(sorted({*state.pruned_weights, *params})),
        lineage=(*state.lineage, ctx.stage_name),
    )


def _prune_structured(state: ModelState, cfg: StructuredPruneConfig, ctx: RunContext) -> ModelState:
    """Layers, then channels / neurons / heads removed to the target: a smaller architecture."""
    model = state.model
    bake_parametrizations(model)  # channels are removed from plain weights
    example = take(ctx.data.train.tensors[0], slice(0, 2))
    inputs = ctx.data.inputs
    base = model_size(model, inputs)
    unpruned = copy.deepcopy(model).eval() if cfg.speedup is not None else None  # speed-ups' reference
    batches = _prepare(model, cfg, ctx, structured=True)
    latency = None
    groups = (
        find_groups(model, example, cfg.ignore) if cfg.speedup is not None or cfg.cost == "latency" else []
    )
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

    def step(index: int, fraction: float, batches: list) -> None:
        rounds = _prune_structured_step(
            model, cfg, fraction, batches, ctx.seed + index, example, base, latency, unpruned
        )
        if rounds:
            ctx.details["speedup_rounds"] = rounds

    # drop_layers alone: no channel steps
    ctx.details["steps"] = _scheduled(model, cfg, ctx, batches, step, keep_masks=False) if cfg.targets else []
    ctx.details["params_before"], ctx.details["macs_before"] = base.params, base.macs
    _check_target_reached(cfg, base, model_size(model, inputs), latency)
    if unpruned is not None and latency is not None:
        assert cfg.speedup is not None
        ctx.details.update(check_speedup(unpruned, model, latency, cfg.speedup, base, inputs))
    architecture = state.architecture
    if architecture is not None:
        original = build_architecture({k: v for k, v in architecture.items() if k != "resized"})
        architecture = dict(architecture, resized=resized_shapes(model, original))
        ctx.details["layers"] = architecture["resized"]
    return state.replace(
        model=model, architecture=architecture, artefact=None, lineage=(*state.lineage, ctx.stage_name)
    )


__all__ = [
    "PruneConfig",
    "UnstructuredPruneConfig",
    "StructuredPruneConfig",
    "ScheduleConfig",
    "L1Config",
    "prune_stage",
    "IMPORTANCE",
]
