"""Relative positions of the non-zero weights, as in Deep Compression: gaps with filler entries.

A tensor's kept weights (in row-major order) are stored as the number of zeros before each one.
Gaps are symbols of ``width`` bits; the largest symbol ``M = 2^width - 1`` is a filler that skips M
positions without a weight, so any gap fits: gap 5 at width 2 (M = 3) is [filler, 2]. Fillers live
only in the position stream (the paper stores a zero weight instead), so the index stream keeps
exactly one entry per kept weight. ``width`` 1 is a bitmask (0 = weight here, 1 = skip one).
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_WIDTH", "to_gaps", "from_gaps", "gap_histogram"]

MAX_WIDTH = 16


def _filler(width: int) -> int:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"gap width must be 1..{MAX_WIDTH} bits, got {width}")
    return (1 << width) - 1


def _raw_gaps(mask: np.ndarray) -> np.ndarray:
    positions = np.flatnonzero(mask.reshape(-1))
    return np.diff(positions, prepend=-1) - 1


def to_gaps(mask: np.ndarray, width: int) -> np.ndarray:
    """The gap symbols (fillers included) that locate the True entries of ``mask`` (row-major)."""
    filler = _filler(width)
    gaps = _raw_gaps(mask)
    fillers, rest = np.divmod(gaps, filler)
    ends = np.cumsum(fillers + 1) - 1  # where each kept weight's own symbol goes
    symbols = np.full(int(ends[-1]) + 1 if len(ends) else 0, filler, dtype=np.int64)
    symbols[ends] = rest
    return symbols


def from_gaps(symbols: np.ndarray, width: int, numel: int) -> np.ndarray:
    """Undo :func:`to_gaps`: a flat boolean mask of ``numel`` entries. ValueError if they do not fit."""
    filler = _filler(width)
    symbols = np.asarray(symbols, dtype=np.int64)
    if len(symbols) and (symbols.min() < 0 or symbols.max() > filler):
        raise ValueError(f"gap symbols must lie in 0..{filler} at width {width}")
    advance = np.where(symbols == filler, filler, symbols + 1)
    positions = (np.cumsum(advance) - 1)[symbols != filler]
    if len(positions) and positions[-1] >= numel:
        raise ValueError(f"the gaps point past the end of the tensor ({positions[-1]} >= {numel})")
    mask = np.zeros(numel, dtype=bool)
    mask[positions] = True
    return mask


def gap_histogram(mask: np.ndarray, width: int) -> np.ndarray:
    """Symbol counts of :func:`to_gaps` without building the stream (to choose the cheapest width)."""
    filler = _filler(width)
    fillers, rest = np.divmod(_raw_gaps(mask), filler)
    counts = np.bincount(rest, minlength=filler + 1).astype(np.int64)
    counts[filler] += int(fillers.sum())
    return counts
