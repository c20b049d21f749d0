"""Layer dropping: remove whole transformer layers, the least harmful first, as measured.

Each layer of a transformer encoder is a residual block, so without it the hidden states go on
to the next layer unchanged. Which layers matter is measured, not guessed: every candidate
removal is tried (the layer taken out of the list and put back) and scored by the task loss on calibration batches (cross-entropy, or
cosine distance to an embedding model's vectors); the one that raises it least goes, and the
search repeats for the next. The kept layers are renumbered, and the layer list's new length is
recorded as data (:mod:`torchshrink.shapes`), so the smaller model rebuilds from its own file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from torchshrink.errors import StructureError
from torchshrink.inputs import ModelInput
from torchshrink.modes import switched
from torchshrink.pruning.allocation import calibration_loss
from torchshrink.transformer_blocks import layer_lists

log = logging.getLogger(__name__)

__all__ = ["drop_layers"]


def _loss_without(layers: nn.ModuleList, index: int, model: nn.Module, batches: Sequence) -> float:
    """The calibration loss of ``model`` with entry ``index`` of ``layers`` taken out (then put back)."""
    layer = layers[index]
    del layers[index]
    try:
        return calibration_loss(model, batches)
    finally:
        layers.insert(index, layer)


def drop_layers(
    model: nn.Module, count: int, batches: Sequence[tuple[ModelInput, torch.Tensor]]
) -> list[dict[str, float | int]]:
    """Remove ``count`` layers of ``model``'s encoder in place, greedily by measured loss.

    Returns one record per removal: the original index of the layer that went and the calibration
    loss after it. At least one layer always stays.
    """
    lists = layer_lists(model)
    if not lists:
        raise StructureError(
            f"prune.drop_layers: {type(model).__name__} has no transformer layer list (a ModuleList "
            "whose entries each hold one attention block with query / key / value layers)"
        )
    if len(lists) > 1:
        names = [n for n, _ in lists]
        raise StructureError(f"prune.drop_layers: {type(model).__name__} has several layer lists {names}")
    list_name, layers = lists[0]
    if count >= len(layers):
        raise StructureError(
            f"prune.drop_layers: {count} of the {len(layers)} layers of {list_name!r} would go; at least "
            f"one stays: set drop_layers <= {len(layers) - 1}"
        )
    original = list(range(len(layers)))  # original index of each remaining entry
    records: list[dict[str, float | int]] = []
    for _ in range(count):
        with switched(model):
            losses = [_loss_without(layers, i, model, batches) for i in range(len(original))]
        best = min(range(len(losses)), key=losses.__getitem__)
        del layers[best]
        records.append({"layer": original.pop(best), "loss": round(losses[best], 6)})
        log.info(
            "dropped layer %d of %s (calibration loss %.4f)", records[-1]["layer"], list_name, losses[best]
        )
    return records
