"""Layer dropping: remove whole transformer layers, the least harmful first, as measured.

Each layer of a transformer encoder is a residual block, so without it the hidden states go on
to the next layer unchanged. Which layers matter is measured, not guessed: every candidate
removal is tried on a copy and scored by the task loss on calibration batches (cross-entropy, or
cosine distance to an embedding model's vectors); the one that raises it least goes, and the
search repeats for the next. The kept layers are renumbered, and the layer list's new length is
recorded as data (:mod:`torchshrink.shapes`), so the smaller model rebuilds from its own file.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from torchshrink.errors import StructureError
from torchshrink.inputs import ModelInput, call
from torchshrink.train import task_loss
from torchshrink.transformer_blocks import layer_lists

log = logging.getLogger(__name__)

__all__ = ["drop_layers", "calibration_loss"]


def calibration_loss(model: nn.Module, batches: Sequence[tuple[ModelInput, torch.Tensor]]) -> float:
    """Mean task loss of ``model`` (eval mode, no gradients) over labelled calibration batches."""
    model.eval()
    with torch.no_grad():
        return sum(float(task_loss(call(model, x), y)) for x, y in batches) / len(batches)


def _without(model: nn.Module, list_name: str, index: int) -> nn.Module:
    candidate = copy.deepcopy(model)
    del candidate.get_submodule(list_name)[index]
    return candidate


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
        losses = [calibration_loss(_without(model, list_name, i), batches) for i in range(len(original))]
        best = min(range(len(losses)), key=losses.__getitem__)
        del model.get_submodule(list_name)[best]
        records.append({"layer": original.pop(best), "loss": round(losses[best], 6)})
        log.info(
            "dropped layer %d of %s (calibration loss %.4f)", records[-1]["layer"], list_name, losses[best]
        )
    return records
