"""Channel groups: the unit structured pruning removes, whatever found them (the graph tracer for
conv / linear channels, the transformer block finder for attention heads and FFN neurons)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

__all__ = ["Member", "Group"]


@dataclass
class Member:
    """One tensor slice coupled to a group: ``module.<attr>`` indexed along ``dim``.

    ``index[c]`` holds the positions along ``dim`` that belong to the group's channel ``c``
    (several for a consumer after a flatten). ``role`` is "out" (producer rows), "in" (consumer
    columns) or "pass" (batch-norm, depthwise conv: indexed like the channels themselves).
    """

    module_name: str
    module: nn.Module
    attr: str
    dim: int
    index: torch.Tensor
    role: str

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


@dataclass
class Group:
    """Channels that must be removed together, and every tensor slice they index.

    ``macs`` is what one channel costs per sample: the multiply-accumulates of every conv/linear
    weight slice it owns (producer rows and consumer columns) times that layer's output positions.
    """

    size: int
    members: list[Member] = field(default_factory=list)
    macs: float = 0.0
    kind: Literal["channels", "heads", "neurons"] = "channels"
    title: str = ""

    @property
    def producers(self) -> list[str]:
        """The layers whose outputs are these channels."""
        return [m.module_name for m in self.members if m.role == "out" and m.attr == "weight"]

    @property
    def joined(self) -> bool:
        """Several layers write into these channels (a residual stream joined by adds); the q/k/v
        layers that share an attention head are one producer, not a join."""
        return self.kind == "channels" and len(self.producers) > 1

    @property
    def name(self) -> str:
        return self.title or "+".join(self.producers) or self.members[0].module_name
