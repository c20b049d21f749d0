"""Sensitivity allocation: how many channels each group loses, decided by measured loss.

A global ranking compares channel scores across layers, which only works if the scores are on one
scale; dividing them by each channel's MACs (cost-aware ranking) strips the layers whose channels
cost the most MACs to a handful of channels (B3: LeNet-5's first conv kept 3 of 20 channels at 3x
fewer MACs and lost 1.4 points more than Torch-Pruning's uniform plan). Sensitivity allocation instead *measures*:
starting from the full model, it considers removing one more chunk (1/8) of every group's
lowest-scored channels, evaluates the calibration loss of each candidate (channels zeroed in a
copy), and takes the chunk that raises the loss least per MAC (or parameter) saved, until the
target holds (lazily: only the best candidate is re-measured after a step). Which channels go
inside a group is still the importance criterion's choice.
"""

from __future__ import annotations

import copy
import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from torchshrink.inputs import ModelInput, call, spec_of
from torchshrink.pruning.graph import Group
from torchshrink.pruning.latency_model import LatencyModel
from torchshrink.pruning.structural import Plan, Size, bounds, mask_channels, rebind, rebuilt_size
from torchshrink.train import task_loss

log = logging.getLogger(__name__)

__all__ = ["sensitivity_plan", "masked_loss", "calibration_loss", "CHUNKS"]

CHUNKS = 8  # a group loses at most 1/CHUNKS of its channels per greedy step


def masked_loss(model: nn.Module, groups: Sequence[Group], plan: Plan, batches: Sequence) -> float:
    """Mean task loss (cross-entropy, or cosine distance to target vectors) of ``model`` with the
    planned channels zeroed (in a copy).

    Batch-norms use the batch's statistics, as re-estimating them after removal would: stale running
    statistics make a pruned residual network look far worse than it is after recalibration.
    """
    candidate = copy.deepcopy(model).eval()
    mask_channels(candidate, rebind(groups, model, candidate), plan)
    for module in candidate.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return calibration_loss(candidate, batches)


def calibration_loss(model: nn.Module, batches: Sequence[tuple[ModelInput, torch.Tensor]]) -> float:
    """Mean task loss of ``model`` over labelled calibration batches, without gradients, in the
    modes its modules are in (the caller chooses them)."""
    with torch.no_grad():
        return sum(float(task_loss(call(model, x), y)) for x, y in batches) / len(batches)


def sensitivity_plan(
    model: nn.Module,
    example: ModelInput,
    groups: Sequence[Group],
    scores: Sequence[torch.Tensor],
    batches: Sequence[tuple[ModelInput, torch.Tensor]],
    *,
    max_ratio: float,
    reached: Callable[[Size], bool],
    saves: Literal["macs", "params", "latency"] = "macs",
    latency: LatencyModel | None = None,
) -> Plan:
    """Greedy, loss-measured allocation of the removals until ``reached(size)`` holds.

    ``scores`` order the channels inside each group (lowest first); ``saves`` is what a step's loss
    rise is divided by: MACs, parameters, or the milliseconds ``latency`` predicts (which prefers
    the channels that cost more time than their MACs show). Once the target holds, every group gives
    back the removals it does not need. ``batches`` are labelled calibration batches.
    """
    if saves == "latency" and latency is None:
        raise ValueError("saves='latency' needs a fitted latency model (fit_latency_model)")

    def cost(size: Size) -> float:
        if saves == "latency":
            assert latency is not None
            return latency.predict(size)
        return size.macs if saves == "macs" else size.params

    if not batches:
        raise ValueError("sensitivity allocation needs labelled calibration batches")
    inputs = spec_of(example)
    orders = [torch.argsort(s) for s in scores]
    limits = [bounds(g, max_ratio) for g in groups]
    counts = [0] * len(groups)

    def plan_of(c: Sequence[int]) -> Plan:
        return {gi: orders[gi][:n] for gi, n in enumerate(c) if n}

    loss = masked_loss(model, groups, {}, batches)
    spent = cost(rebuilt_size(model, groups, {}, inputs))
    version = 0  # bumped whenever a step is taken: rates measured before are stale

    def candidate(gi: int) -> tuple[float, int, int, list[int], float, Size] | None:
        """One more chunk of group ``gi``: (loss rise per unit saved, gi, version, counts, loss, size)."""
        n = min(counts[gi] + max(1, round(groups[gi].size / CHUNKS)), limits[gi])
        if n <= counts[gi]:
            return None
        trial = [*counts[:gi], n, *counts[gi + 1 :]]
        trial_loss = masked_loss(model, groups, plan_of(trial), batches)
        size = rebuilt_size(model, groups, plan_of(trial), inputs)
        return (trial_loss - loss) / max(spent - cost(size), 1e-9), gi, version, trial, trial_loss, size

    # Lazy greedy: a chunk's rate rarely falls when other groups shrink, so only the best stale
    # candidate is re-measured; it is taken if it still beats every other (stale) rate.
    heap = [c for c in map(candidate, range(len(groups))) if c is not None]
    heapq.heapify(heap)
    with tqdm(desc="sensitivity allocation", total=sum(limits), leave=False, disable=None) as bar:
        while heap:
            best = heapq.heappop(heap)
            _, gi, measured_at, trial, trial_loss, size = best
            if measured_at != version:
                fresh = candidate(gi)
                if fresh is not None:
                    heapq.heappush(heap, fresh)
                continue
            bar.update(sum(trial) - sum(counts))
            if reached(size):
                size_of = lambda c: rebuilt_size(model, groups, plan_of(c), inputs)  # noqa: E731
                return plan_of(_trim(trial, counts, reached, size_of))
            counts, loss, spent, version = trial, trial_loss, cost(size), version + 1
            follow = candidate(gi)
            if follow is not None:
                heapq.heappush(heap, follow)
    log.warning("target not reachable within max_channel_ratio=%.2f; pruning the maximum", max_ratio)
    return plan_of(counts)


def _trim(
    trial: list[int],
    counts: list[int],
    reached: Callable[[Size], bool],
    size_of: Callable[[list[int]], Size],
) -> list[int]:
    """Give back what the last step overshot: per group (the one just grown first, then the others),
    the fewest removals that still reach the target. One step can remove a lot: in the demo's
    LeNet-5-half a conv1 channel is 6% of the MACs, and its last step overshot a 1.5x target to 1.64x.
    """
    grown = next(i for i, (a, b) in enumerate(zip(trial, counts, strict=True)) if a != b)
    counts = list(trial)
    for gi in [grown, *(i for i in range(len(counts)) if i != grown)]:
        lo, hi = 0, counts[gi]
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(size_of([*counts[:gi], mid, *counts[gi + 1 :]])):
                hi = mid
            else:
                lo = mid + 1
        counts[gi] = hi
    return counts
