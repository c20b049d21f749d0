"""The order in which the search's look takes plans: a seeded random sample first (so a look the
budget cuts short still sees every part of the space), then the plans that a cost model, fitted to
what the look has measured so far, predicts to be cheapest on the objective.

The model is log-additive in the knob values: ``log cost = b + sum of one effect per knob value``.
Size multiplies (zeros kept times bits per weight), and latency and MACs shrink by factors per
step, so one effect per value fits them well; it is refitted after every look, so each
measurement sharpens the next pick. It only orders plans: every plan the search judges is
measured, never predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from torchshrink.plan_search.space import Plan

__all__ = ["EXPLORE", "CostModel", "knob_values", "next_to_look"]

EXPLORE = 8
"""Plans the look takes in seeded random order before the cost model picks."""

RIDGE = 1e-3
"""Shrinks the effects of knob values seen rarely (a few looks, many values)."""


def knob_values(plan: Plan) -> list[str]:
    """The knob values that shape a plan's cost at the look (distilling changes none of it)."""
    return [
        f"macs_reduction={plan.macs_reduction:g}",
        f"sparsity={plan.sparsity:g}",
        f"bits={plan.bits}",
        f"quantize={plan.quantize if plan.bits is not None else 'none'}",
        f"encode_bits={plan.encode_bits}",
    ]


class CostModel:
    """``log cost`` fitted as a sum of knob-value effects (ridge least squares); a value no measured
    plan had counts as the average."""

    def __init__(self, measured: Sequence[tuple[Plan, float]]) -> None:
        if not measured:
            raise ValueError("CostModel: fit it on at least one measured plan")
        self.names = sorted({v for plan, _ in measured for v in knob_values(plan)})
        x = np.stack([self._row(plan) for plan, _ in measured])
        y = np.array([math.log(max(cost, 1e-12)) for _, cost in measured])
        self.mean = float(y.mean())
        penalty = RIDGE * np.eye(len(self.names))
        self.effects = np.linalg.solve(x.T @ x + penalty, x.T @ (y - self.mean))

    def _row(self, plan: Plan) -> np.ndarray:
        values = set(knob_values(plan))
        return np.array([1.0 if name in values else 0.0 for name in self.names])

    def predict(self, plan: Plan) -> float:
        """The predicted cost of ``plan`` (in the objective's unit)."""
        return math.exp(self.mean + float(self._row(plan) @ self.effects))


def next_to_look(waiting: Sequence[Plan], measured: Sequence[tuple[Plan, float]]) -> Plan:
    """The next plan for the look: the first of ``waiting`` (seeded random order) while fewer than
    ``EXPLORE`` plans are measured, else the one predicted cheapest (ties: the earlier one)."""
    if len(measured) < EXPLORE:
        return waiting[0]
    model = CostModel(measured)
    return min(waiting, key=model.predict)  # min keeps the first of equal predictions
