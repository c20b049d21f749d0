"""Pruning: importance criteria, unstructured masks, schedules, and structured channel removal."""

from torchshrink.pruning.graph import Group, Member, StructureError, find_groups
from torchshrink.pruning.importance import IMPORTANCE, Importance, make_importance
from torchshrink.pruning.masks import MaskKeeper, compute_masks, prunable_weights
from torchshrink.pruning.schedule import SCHEDULES, sparsity_at
from torchshrink.pruning.structural import mask_channels, remove_channels

__all__ = [
    "Group",
    "Member",
    "StructureError",
    "find_groups",
    "IMPORTANCE",
    "Importance",
    "make_importance",
    "MaskKeeper",
    "compute_masks",
    "prunable_weights",
    "SCHEDULES",
    "sparsity_at",
    "mask_channels",
    "remove_channels",
]
