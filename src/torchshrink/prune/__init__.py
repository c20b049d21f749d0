"""Pruning: importance criteria, unstructured masks, schedules, and structured channel removal."""

from torchshrink.prune.graph import Group, Member, StructureError, find_groups
from torchshrink.prune.importance import IMPORTANCE, Importance, make_importance
from torchshrink.prune.masks import MaskKeeper, compute_masks, prunable_weights
from torchshrink.prune.schedule import SCHEDULES, sparsity_at
from torchshrink.prune.structural import mask_channels, remove_channels

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
