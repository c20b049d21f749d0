"""Pruning schedules: a plain function ``(step, steps) -> fraction of the final target reached``.

* ``oneshot``: everything at once.
* ``linear``: equal increments.
* ``agp``: the gradual cubic schedule of Zhu & Gupta 2017,
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` with ``s_i = 0``, ``t0 = 0``, ``dt = 1``:
  large steps early while many redundant weights remain, small steps near the end.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["SCHEDULES", "sparsity_at"]


def oneshot(step: int, steps: int) -> float:
    return 1.0


def linear(step: int, steps: int) -> float:
    return step / steps


def agp(step: int, steps: int) -> float:
    return 1.0 - (1.0 - step / steps) ** 3


SCHEDULES: dict[str, Callable[[int, int], float]] = {"oneshot": oneshot, "linear": linear, "agp": agp}


def sparsity_at(kind: str, step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Target sparsity after ``step`` of ``steps`` (1-based) going from ``initial`` to ``final``."""
    return initial + (final - initial) * SCHEDULES[kind](step, steps)
