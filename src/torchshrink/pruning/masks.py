"""Unstructured pruning: ``W_pruned = W * mask``, with a global or per-layer budget.

Masks are not stored separately: a pruned weight is an exact zero, and the masks are recovered
from the zeros (:func:`masks_from_zeros`) whenever training must keep them, so a checkpoint or a
saved model carries its masks by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["prunable_weights", "compute_masks", "apply_masks", "masks_from_zeros", "MaskKeeper", "density"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_weights(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Weights of conv and linear layers, except those of layers named in ``ignore`` (or inside them)."""
    ignored = tuple(ignore)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, _LAYERS) and not any(name == i or name.startswith(i + ".") for i in ignored):
            out[f"{name}.weight" if name else "weight"] = module.weight
    return out


def compute_masks(
    scores: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    min_density: float = 0.0,
    already_pruned: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing the lowest-scored fraction ``sparsity`` of all (or each) tensor.

    ``already_pruned`` masks stay pruned (their scores count as lowest); every tensor keeps at least
    ``min_density`` of its weights.
    """
    scores = {n: s.detach().float().clone() for n, s in scores.items()}
    if already_pruned:
        for n, keep in already_pruned.items():
            scores[n][~keep] = -1.0
    masks = {}
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        k = int(round(sparsity * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:k]] = False  # exactly k go, even when scores tie
        start = 0
        for n, s in scores.items():
            masks[n] = keep[start : start + s.numel()].reshape(s.shape)
            start += s.numel()
    else:
        for n, s in scores.items():
            k = int(round(sparsity * s.numel()))
            keep = torch.ones(s.numel(), dtype=torch.bool)
            if k > 0:
                keep[torch.argsort(s.reshape(-1), stable=True)[:k]] = False
            masks[n] = keep.reshape(s.shape)
    if already_pruned:
        for n, keep in already_pruned.items():
            masks[n] = masks[n] & keep  # pruned weights never come back, whatever the budget
    for n, s in scores.items():
        need = math.ceil(min_density * s.numel())
        if int(masks[n].sum()) < need:
            keep = torch.zeros(s.numel(), dtype=torch.bool)
            keep[torch.argsort(s.reshape(-1), descending=True)[:need]] = True
            masks[n] = keep.reshape(s.shape)
    return masks


def apply_masks(params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight in place."""
    with torch.no_grad():
        for n, keep in masks.items():
            params[n].mul_(keep.to(params[n].dtype))


def masks_from_zeros(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Keep-masks read back from the exact zeros of pruned weights."""
    return {n: p.detach() != 0 for n, p in params.items()}


class MaskKeeper:
    """An ``after_step`` hook for the training loop that keeps pruned weights at zero."""

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        named = dict(model.named_parameters())
        self.params = {n: named[n] for n in names}
        self.masks = masks_from_zeros(self.params)

    def __call__(self, model: nn.Module) -> None:
        apply_masks(self.params, self.masks)


def keeper_for(model: nn.Module, pruned_weights: Iterable[str]) -> MaskKeeper | None:
    """The hook that keeps ``model``'s unstructured-pruned weights (``ModelState.pruned_weights``) at
    zero while it trains (None when there are none)."""
    names = list(pruned_weights)
    return MaskKeeper(model, names) if names else None


def density(params: dict[str, nn.Parameter]) -> float:
    """Fraction of non-zero values over the given tensors."""
    total = sum(p.numel() for p in params.values())
    return sum(int(torch.count_nonzero(p)) for p in params.values()) / max(total, 1)
