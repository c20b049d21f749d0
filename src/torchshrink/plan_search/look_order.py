"""The order in which the search's look takes plans: a seeded random sample first (an even start
over the knobs, not only the first values of the first one), then in turn the plan that a cost
model, fitted to what the look has measured so far, predicts to be cheapest on the objective and
the next of the random order. Once a plan has passed, the look leaves out plans predicted to cost
well above it (``MARGIN``).

The model is log-additive: ``log cost = b + sum of one effect per knob value + slopes on the log
of the share of MACs, of weights and of bits a plan keeps``. Size multiplies (weights kept times
bits per weight), and latency and MACs shrink by factors per step, so this fits them well; the
slopes carry the fit to knob values no measured plan had. It is refitted after every look, so
each measurement sharpens the next pick. It only orders and skips plans: every plan the search
judges is measured, never predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from torchshrink.plan_search.space import Plan

__all__ = ["EXPLORE", "MARGIN", "CostModel", "at_least_as_hard", "kept_shares", "knob_values", "next_to_look"]

EXPLORE = 8
"""Plans the look takes in seeded random order before the cost model picks."""

MARGIN = 1.25
"""Once a plan passed, the look skips plans predicted to cost more than this times its cost: they
could only win if the prediction were off by that much."""

RIDGE = 0.1
"""Shrinks the effects of single knob values, so the slopes on the kept shares explain what they can
(and carry to values no measured plan had); the effects take the rest."""

SLOPE_RIDGE = 1e-6
"""Hardly shrinks the intercept and the slopes."""


def kept_shares(plan: Plan) -> list[float]:
    """The log of the shares a plan keeps: of the MACs, of the weights, of the bits per weight."""
    bits = plan.encode_bits or plan.bits or 32
    return [-math.log(plan.macs_reduction), math.log(1 - plan.sparsity), math.log(bits / 32)]


def knob_values(plan: Plan) -> list[str]:
    """The knob values that shape a plan's cost at the look (distilling changes none of it)."""
    return [
        f"macs_reduction={plan.macs_reduction:g}",
        f"sparsity={plan.sparsity:g}",
        f"bits={plan.bits}",
        f"quantize={plan.quantize if plan.bits is not None else 'none'}",
        f"encode_bits={plan.encode_bits}",
    ]


def at_least_as_hard(plan: Plan, other: Plan) -> bool:
    """Whether ``plan`` keeps no more MACs, weights or bits than ``other`` and recovers the same way
    (distilling or not, the same quantization kind): if ``other`` loses too much, so will it."""
    return (
        plan.distill == other.distill
        and plan.quantize == other.quantize
        and all(a <= b for a, b in zip(kept_shares(plan), kept_shares(other), strict=True))
    )


def _fittable(measured: Sequence[tuple[Plan, float]]) -> list[tuple[Plan, float]]:
    """The measurements a log can be taken of (finite, positive costs)."""
    return [(plan, cost) for plan, cost in measured if math.isfinite(cost) and cost > 0]


class CostModel:
    """``log cost`` fitted as an intercept, a sum of knob-value effects and slopes on the kept shares
    (ridge least squares); a value no measured plan had adds no effect of its own, only its slopes.
    Costs that are not finite and positive are left out of the fit."""

    def __init__(self, measured: Sequence[tuple[Plan, float]]) -> None:
        measured = _fittable(measured)
        if not measured:
            raise ValueError("CostModel: fit it on at least one plan with a finite, positive cost")
        self.names = sorted({v for plan, _ in measured for v in knob_values(plan)})
        x = np.stack([self._row(plan) for plan, _ in measured])
        y = np.array([math.log(cost) for _, cost in measured])
        penalty = np.diag([RIDGE] * len(self.names) + [SLOPE_RIDGE] * (x.shape[1] - len(self.names)))
        self.effects = np.linalg.solve(x.T @ x + penalty, x.T @ y)

    def _row(self, plan: Plan) -> np.ndarray:
        values = set(knob_values(plan))
        one_hot = [1.0 if name in values else 0.0 for name in self.names]
        return np.array(one_hot + [1.0, *kept_shares(plan)])  # the intercept, then the slopes

    def predict(self, plan: Plan) -> float:
        """The predicted cost of ``plan`` (in the objective's unit)."""
        return math.exp(float(self._row(plan) @ self.effects))


def next_to_look(
    waiting: Sequence[Plan], measured: Sequence[tuple[Plan, float]], best: float | None = None
) -> Plan | None:
    """The next plan for the look: the first of ``waiting`` (seeded random order) while fewer than
    ``EXPLORE`` plans are measured; after that, in turn, the one predicted cheapest (ties: the
    earlier one) and the next in the random order, so half the look stays an even sample (the
    cheapest plans are the most compressed, and often all miss the accuracy budget). Once a plan
    costing ``best`` has passed, only plans predicted within ``MARGIN`` times that, and None when
    there are none (nothing left to look at could win)."""
    usable = _fittable(measured)
    if len(usable) < EXPLORE:
        return waiting[0]
    model = CostModel(usable)
    predicted = [model.predict(plan) for plan in waiting]
    if not all(map(math.isfinite, predicted)):
        return waiting[0]
    within = [i for i in range(len(waiting)) if best is None or predicted[i] <= MARGIN * best]
    if not within:
        return None
    if len(measured) % 2:  # the random order's turn
        return waiting[within[0]]
    return waiting[min(within, key=predicted.__getitem__)]  # min keeps the first of equals
