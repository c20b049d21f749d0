"""Structured pruning: remove whole channels/neurons and rebuild smaller dense layers.

The plan says, per group, which channels go. Removal slices every member tensor once per
(tensor, axis), so a consumer fed by several groups (after a concatenation) is cut consistently,
then updates the layers' shape attributes. The result is a plain ``nn.Module`` of the same classes,
smaller and faster, whose new shapes are recorded for rebuilding (:mod:`torchshrink.shapes`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from torchshrink.inputs import InputSpec, ModelInput, call, spec_of
from torchshrink.measure import count_activations, count_macs, count_params
from torchshrink.modes import switched
from torchshrink.pruning.groups import Group
from torchshrink.pruning.operators import BN, CONV
from torchshrink.shapes import is_resizable, module_shape
from torchshrink.transformer_blocks import sync_head_counts

log = logging.getLogger(__name__)

Plan = dict[int, torch.Tensor]  # group position -> channel indices to remove
# Cost-aware ranking divides importance by (relative MACs of a channel) ** COST_EXPONENT, i.e. it ranks
# per MAC saved. Without a cap it strips the costliest group (a ResNet's first stage) to a couple of
# channels and accuracy suffers; the prune stage's default max_channel_ratio 0.5 bounds that (B3).
COST_EXPONENT = 1.0
LAYER_STEPS = 1000  # resolution of the per-layer ratio search
__all__ = [
    "Plan",
    "remove_channels",
    "mask_channels",
    "plan_layer",
    "plan_global",
    "search_plan",
    "resized_shapes",
    "bounds",
    "rebind",
    "rebuilt",
    "rebuilt_size",
    "model_size",
    "Size",
]


def _positions(group: Group, channels: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    return {(m.name, m.dim): m.index[channels].reshape(-1) for m in group.members}


def recalibrate_batchnorm(model: nn.Module, inputs: Sequence[ModelInput]) -> bool:
    """Re-estimate every batch-norm's running statistics on ``inputs`` (weights untouched).

    Removing channels changes what each batch-norm sees; stale statistics can put a pruned ResNet
    at chance accuracy before fine-tuning. Returns whether the model had batch-norms.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms or not inputs:
        return False
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    with switched(model), torch.no_grad():
        for m in norms:  # only the batch-norms gather statistics; dropout stays off
            m.train()
        for x in inputs:
            call(model, x)
    for m, momentum in saved:
        m.momentum = momentum
    return True


def remove_channels(model: nn.Module, groups: Sequence[Group], plan: Plan) -> nn.Module:
    """Physically remove the planned channels from ``model`` (in place) and fix layer attributes."""
    removed: dict[tuple[str, int], list[torch.Tensor]] = {}
    owners: dict[str, tuple[nn.Module, str]] = {}
    for gi, channels in plan.items():
        if len(channels) == 0:
            continue
        for member in groups[gi].members:
            owners[member.name] = (member.module, member.attr)
        for key, pos in _positions(groups[gi], channels).items():
            removed.setdefault(key, []).append(pos)
    touched: set[nn.Module] = set()
    with torch.no_grad():
        for (name, dim), parts in removed.items():
            module, attr = owners[name]
            tensor = getattr(module, attr)
            drop = torch.unique(torch.cat(parts))
            keep = torch.ones(tensor.shape[dim], dtype=torch.bool)
            keep[drop] = False
            sliced = tensor.index_select(dim, keep.nonzero().squeeze(1)).clone()
            if isinstance(tensor, nn.Parameter):
                setattr(module, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
            else:
                setattr(module, attr, sliced)  # registered buffer: assignment keeps it a buffer
            touched.add(module)
    for module in touched:
        _fix_attributes(module)
    sync_head_counts(model)
    return model


def _fix_attributes(module: nn.Module) -> None:
    if isinstance(module, CONV):
        out_c, in_per_group = module.weight.shape[:2]
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = module.in_channels = module.out_channels = out_c  # depthwise stays depthwise
        else:
            module.out_channels, module.in_channels = out_c, in_per_group * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, BN):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]


def mask_channels(model: nn.Module, groups: Sequence[Group], plan: Plan) -> nn.Module:
    """Zero what :func:`remove_channels` would remove from producers (weights, biases, BN affine).

    The masked twin computes exactly what the rebuilt model computes: removed channels output 0.
    """
    with torch.no_grad():
        for gi, channels in plan.items():
            for member in groups[gi].members:
                if member.role in ("out", "pass") and member.attr in ("weight", "bias"):
                    getattr(member.module, member.attr).index_fill_(
                        member.dim, member.index[channels].reshape(-1), 0.0
                    )
    return model


def resized_shapes(model: nn.Module, reference: nn.Module) -> dict[str, dict]:
    """The layers of ``model`` whose shapes differ from ``reference`` (same module tree)."""
    ref = dict(reference.named_modules())
    out = {}
    for name, module in model.named_modules():
        if is_resizable(module) and name in ref and module_shape(module) != module_shape(ref[name]):
            out[name] = module_shape(module)
    return out


def bounds(group: Group, max_ratio: float) -> int:
    """How many channels of ``group`` may go at most (at least one always stays)."""
    return min(group.size - 1, int(group.size * max_ratio))


def plan_layer(
    groups: Sequence[Group], scores: Sequence[torch.Tensor], ratio: float, max_ratio: float
) -> Plan:
    """Remove the same fraction of channels from every group, the lowest-scored first."""
    plan: Plan = {}
    for gi, (group, s) in enumerate(zip(groups, scores, strict=True)):
        n = min(int(round(group.size * ratio)), bounds(group, max_ratio))
        plan[gi] = torch.argsort(s)[:n]
    return plan


def plan_global(
    groups: Sequence[Group],
    scores: Sequence[torch.Tensor],
    count: int,
    max_ratio: float,
    cost_aware: bool = False,
) -> Plan:
    """Remove the ``count`` globally lowest channels; scores are divided by their group's mean so
    groups of different scale compete fairly; no group loses more than ``max_ratio``.

    ``cost_aware`` ranks by importance per MAC a channel costs (relative to the mean channel), so
    the same MACs reduction removes less importance and more of the expensive, wide layers.
    """
    mean_macs = sum(g.macs for g in groups) / max(len(groups), 1) or 1.0
    entries = []
    for gi, s in enumerate(scores):
        norm = s / s.mean().clamp_min(1e-12)
        if cost_aware and groups[gi].macs > 0:
            norm = norm / (groups[gi].macs / mean_macs) ** COST_EXPONENT
        order = torch.argsort(norm)
        entries.extend((float(norm[c]), gi, int(c)) for c in order[: bounds(groups[gi], max_ratio)])
    entries.sort()
    chosen: dict[int, list[int]] = {}
    for _, gi, c in entries[:count]:
        chosen.setdefault(gi, []).append(c)
    return {gi: torch.tensor(cs, dtype=torch.long) for gi, cs in chosen.items()}


def search_plan(
    model: nn.Module,
    example: ModelInput,
    groups: Sequence[Group],
    scores: Sequence[torch.Tensor],
    *,
    scope: str,
    max_ratio: float,
    reached: Callable[[Size], bool],
    cost_aware: bool = False,
) -> Plan:
    """Binary-search the smallest pruning amount whose rebuilt model satisfies ``reached(size)``.

    Each candidate is applied to a copy of the model and measured, so the target holds for the
    real rebuilt architecture, not an estimate.
    """
    inputs = spec_of(example)
    # One integer search for both scopes: global removes `amount` channels; layer removes the
    # fraction amount / LAYER_STEPS * max_ratio of every group.
    total = LAYER_STEPS if scope == "layer" else sum(bounds(g, max_ratio) for g in groups)

    def trial(amount: int) -> tuple[Plan, bool]:
        if scope == "layer":
            plan = plan_layer(groups, scores, amount / LAYER_STEPS * max_ratio, max_ratio)
        else:
            plan = plan_global(groups, scores, amount, max_ratio, cost_aware)
        return plan, reached(rebuilt_size(model, groups, plan, inputs))

    best, ok = trial(total)
    if not ok:
        log.warning("target not reachable within max_channel_ratio=%.2f; pruning the maximum", max_ratio)
        return best
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        plan, ok = trial(mid)
        if ok:
            hi, best = mid, plan
        else:
            lo = mid + 1
    return best


class Size(NamedTuple):
    """Per-sample size of a network: parameters, MACs and elements written (see count_activations)."""

    params: int
    macs: int
    elements: int


def rebuilt(model: nn.Module, groups: Sequence[Group], plan: Plan) -> nn.Module:
    """A copy of ``model`` with ``plan``'s channels removed (``model`` itself is untouched)."""
    candidate = copy.deepcopy(model)
    remove_channels(candidate, rebind(groups, model, candidate), plan)
    return candidate


def model_size(model: nn.Module, inputs: InputSpec | Sequence[int]) -> Size:
    """Parameters, MACs and elements written per sample of ``model``, counted."""
    return Size(count_params(model)[0], count_macs(model, inputs), count_activations(model, inputs))


def rebuilt_size(
    model: nn.Module, groups: Sequence[Group], plan: Plan, inputs: InputSpec | Sequence[int]
) -> Size:
    """The size of ``model`` rebuilt with ``plan`` (on a copy): measured, not estimated."""
    return model_size(rebuilt(model, groups, plan), inputs)


def rebind(groups: Sequence[Group], source: nn.Module, target: nn.Module) -> list[Group]:
    """The same groups with members pointing at ``target``'s modules (a deep copy of ``source``)."""
    modules = dict(target.named_modules())
    return [
        dataclasses.replace(
            g, members=[dataclasses.replace(m, module=modules[m.module_name]) for m in g.members]
        )
        for g in groups
    ]
