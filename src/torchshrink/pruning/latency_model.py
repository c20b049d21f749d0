"""A latency model of one network on this machine: ``ms = a * MACs + b * elements + c``, fitted by timing.

MACs alone predict a small model's CPU latency poorly: the elements every operator writes (a conv's
output, the ReLU and pooling over it) cost time too, and per-operator overhead is a constant. Timing a
few randomly shrunken copies of the network and fitting the three non-negative coefficients gives a
smooth, per-machine estimate the sensitivity allocation can divide a loss rise by (NetAdapt, Yang
et al. 2018, measures latency the same way, with per-layer tables).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn
from tqdm.auto import tqdm

from torchshrink.inputs import InputSpec
from torchshrink.measure import latencies_ms
from torchshrink.pruning.graph import Group
from torchshrink.pruning.structural import Size, bounds, model_size, rebuilt

log = logging.getLogger(__name__)

__all__ = ["LatencyModel", "fit_latency_model"]


@dataclass(frozen=True)
class LatencyModel:
    """Milliseconds of one batch as ``ms_per_mac * MACs + ms_per_element * elements + overhead_ms``
    (MACs and elements per sample); ``relative_error`` is the median error on the timed copies."""

    ms_per_mac: float
    ms_per_element: float
    overhead_ms: float
    relative_error: float

    def predict(self, size: Size) -> float:
        """Estimated milliseconds of a batch for a network of this per-sample size."""
        return self.ms_per_mac * size.macs + self.ms_per_element * size.elements + self.overhead_ms

    def speedup(self, before: Size, after: Size) -> float:
        """Predicted latency of ``before`` over that of ``after``."""
        return self.predict(before) / self.predict(after)


def fit_latency_model(
    model: nn.Module,
    groups: Sequence[Group],
    inputs: InputSpec | Sequence[int],
    *,
    max_ratio: float,
    batch_size: int = 32,
    samples: int = 16,
    repeats: int = 15,
    seed: int = 0,
) -> LatencyModel:
    """Time ``model`` and ``samples`` copies with a random share (up to ``max_ratio``) of every
    group's channels removed, interleaved, and fit the non-negative coefficients by least squares."""
    generator = torch.Generator().manual_seed(seed)
    variants: dict[str, nn.Module] = {"full": model}
    for i in tqdm(range(samples), desc="latency model: building copies", leave=False, disable=None):
        plan = {}
        for gi, group in enumerate(groups):
            share = float(torch.rand((), generator=generator)) * max_ratio
            n = min(int(group.size * share), bounds(group, max_ratio))
            if n:
                plan[gi] = torch.arange(n)
        variants[f"copy{i}"] = rebuilt(model, groups, plan)
    timed = latencies_ms(variants, inputs, batch_size=batch_size, repeats=repeats)
    sizes = [model_size(m, inputs) for m in variants.values()]
    features = np.array([[s.macs, s.elements, 1.0] for s in sizes], dtype=np.float64)
    ms = np.array([timed[name] for name in variants], dtype=np.float64)
    # Scale the columns to one magnitude so the solver's tolerance treats them alike.
    scale = features.max(axis=0)
    coef, _ = nnls(features / scale, ms)
    coef = coef / scale
    error = float(np.median(np.abs(features @ coef - ms) / ms))
    fitted = LatencyModel(float(coef[0]), float(coef[1]), float(coef[2]), error)
    log.info(
        "latency model (batch %d): %.3g ms/MMAC, %.3g ms/M elements, %.3f ms overhead; median error %.1f%%",
        batch_size,
        fitted.ms_per_mac * 1e6,
        fitted.ms_per_element * 1e6,
        fitted.overhead_ms,
        100 * error,
    )
    return fitted
