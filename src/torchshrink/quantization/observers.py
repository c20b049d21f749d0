"""Observers: watch a tensor over calibration batches and choose its quantization range.

``minmax`` keeps the extremes (no value clips, but one outlier spreads the grid); ``moving_average``
smooths per-batch extremes (QAT's usual choice); ``percentile`` ignores the rarest outliers;
``mse`` searches the clipping range that minimises the quantization error on the values seen.
Per-channel observers reduce over every axis except ``spec.axis``.
"""

from __future__ import annotations

from typing import Literal

import torch

from torchshrink.quantization.affine import QuantSpec, qparams, quant_error

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageObserver",
    "PercentileObserver",
    "MSEObserver",
    "OBSERVERS",
    "make_observer",
    "ObserverName",
]

ObserverName = Literal["minmax", "moving_average", "percentile", "mse"]


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as a 2-D [channels, values] view (one row when per-tensor)."""
    x = x.detach().float()
    if spec.per_channel:
        return x.transpose(0, spec.axis).reshape(x.shape[spec.axis], -1)
    return x.reshape(1, -1)


def _squeeze(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return t if spec.per_channel else t.reshape(())


class Observer:
    """Base class: ``update`` with tensors, then ``bounds`` / ``qparams`` give the range."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    @property
    def seen(self) -> bool:
        return self.lo is not None

    def update(self, x: torch.Tensor) -> None:
        rows = _rows(x, self.spec)
        lo, hi = rows.min(1).values, rows.max(1).values
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None or self.hi is None:
            raise RuntimeError("observer saw no data: run calibration batches through the model first")
        return _squeeze(self.lo, self.spec), _squeeze(self.hi, self.spec)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams(*self.bounds(), self.spec)


class MinMaxObserver(Observer):
    """The smallest and largest value ever seen."""


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum`` weight on the new batch)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.1) -> None:
        super().__init__(spec)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        rows = _rows(x, self.spec)
        lo, hi = rows.min(1).values, rows.max(1).values
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = (1 - m) * self.lo + m * lo, (1 - m) * self.hi + m * hi


class _SamplingObserver(Observer):
    """Keeps a seeded random sample of the values (at most ``max_samples`` per channel)."""

    def __init__(self, spec: QuantSpec, max_samples: int = 1 << 18, seed: int = 0) -> None:
        super().__init__(spec)
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        rows = _rows(x, self.spec)
        if rows.shape[1] > self.max_samples:
            pick = torch.randperm(rows.shape[1], generator=self.generator)[: self.max_samples]
            rows = rows[:, pick]
        merged = rows if self.samples is None else torch.cat([self.samples, rows], 1)
        if merged.shape[1] > self.max_samples:
            keep = torch.randperm(merged.shape[1], generator=self.generator)[: self.max_samples]
            merged = merged[:, keep]
        self.samples = merged


class PercentileObserver(_SamplingObserver):
    """The ``percentile`` / ``100 - percentile`` quantiles of the sampled values (clips rare outliers)."""

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.percentile = percentile

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().bounds()
        assert self.samples is not None
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(self.samples, q, dim=1)
        return _squeeze(lo, self.spec), _squeeze(hi, self.spec)


class MSEObserver(_SamplingObserver):
    """The clipping of the min-max range (a fraction ``alpha`` of it) with the least squared error."""

    def __init__(self, spec: QuantSpec, steps: int = 50, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self.steps = steps

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().bounds()
        assert self.samples is not None
        values = self.samples if self.spec.per_channel else self.samples.reshape(-1)
        row_spec = QuantSpec(self.spec.bits, self.spec.signed, self.spec.symmetric, self.spec.per_channel, 0)
        best_err = best_lo = best_hi = None
        for alpha in torch.linspace(1.0 / self.steps, 1.0, self.steps):
            c_lo, c_hi = lo * alpha, hi * alpha
            err = quant_error(values, *qparams(c_lo, c_hi, row_spec), row_spec)
            if best_err is None:
                best_err, best_lo, best_hi = err, c_lo, c_hi
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        assert best_lo is not None and best_hi is not None
        return best_lo, best_hi


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, spec: QuantSpec) -> Observer:
    """An observer by recipe name; an unknown name lists the known ones."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    return OBSERVERS[name](spec)
