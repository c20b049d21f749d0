"""Speed-up targets of structured pruning: the latency model predicts, the machine decides.

A plan made for a predicted speed-up is rebuilt and timed against the unpruned network (batch 32,
interleaved); when it measures short, the goal is scaled by the shortfall and the plan made again,
at most ``SPEEDUP_ROUNDS`` times. The user asked for a measured speed-up, not a predicted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from torch import nn

from torchshrink.inputs import InputSpec
from torchshrink.measure import latencies_ms
from torchshrink.pruning.graph import Group
from torchshrink.pruning.latency_model import LatencyModel
from torchshrink.pruning.structural import Plan, Size, model_size, rebuilt, rebuilt_size

log = logging.getLogger(__name__)

__all__ = ["LATENCY_BATCH", "measured_speedup", "replan_until_measured", "check_speedup"]

LATENCY_BATCH = 32  # the batch of the report's latency_ms_b32: what speed-up targets are about
SPEEDUP_ROUNDS = 3  # a speed-up target: the plan, then at most two re-plans from its measured speed-up
SPEEDUP_TOLERANCE = 0.98  # a plan measured within 2% of the target (timing noise) is accepted


def measured_speedup(original: nn.Module, pruned: nn.Module, inputs: InputSpec | Sequence[int]) -> float:
    """Batch-32 latency of ``original`` over ``pruned``, timed interleaved on this machine."""
    timed = latencies_ms({"original": original, "pruned": pruned}, inputs, batch_size=LATENCY_BATCH)
    return timed["original"] / timed["pruned"]


def replan_until_measured(
    make_plan: Callable[[float], Plan],
    model: nn.Module,
    original: nn.Module,
    groups: Sequence[Group],
    latency: LatencyModel,
    base: Size,
    target: float,
    inputs: InputSpec,
) -> tuple[Plan, list[dict[str, float]]]:
    """``make_plan(correction)`` (a plan for ``target * correction`` predicted) until the rebuilt
    model measures the target; returns the last plan and every round's predicted / measured
    speed-up."""
    rounds: list[dict[str, float]] = []
    correction = 1.0
    for _ in range(SPEEDUP_ROUNDS):
        plan = make_plan(correction)
        predicted = latency.speedup(base, rebuilt_size(model, groups, plan, inputs))
        measured = measured_speedup(original, rebuilt(model, groups, plan), inputs)
        rounds.append({"predicted": round(predicted, 3), "measured": round(measured, 3)})
        if measured >= SPEEDUP_TOLERANCE * target:
            break
        correction *= target / measured
        log.info(
            "plan measured %.2fx for a %.2fx target: re-planning for %.2fx predicted",
            measured,
            target,
            target * correction,
        )
    return plan, rounds


def check_speedup(
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
