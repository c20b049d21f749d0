"""Pareto fronts: the candidates no other beats on accuracy and cost at once."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pareto_front"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(cost, accuracy)`` points (lower cost, higher accuracy is
    better), by increasing cost. A point is dominated when another is at least as good on both and
    better on one; of identical points the first stays."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] > points[front[-1]][1]:
            front.append(i)
    return front
