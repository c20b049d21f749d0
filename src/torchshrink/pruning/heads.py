"""Attention heads and feed-forward neurons of a transformer as channel groups.

The graph tracer pins what it cannot follow, and the head split (a view to ``(..., heads, size)``)
is such a place. The transformer's structure is regular enough to state directly
(:mod:`torchshrink.transformer_blocks`): a head is ``attention_head_size`` rows of q, k and v
(weights and biases) plus as many input columns of the output projection; a neuron is a row of
the FFN's first linear layer plus a column of its second. Removing a group's channels with
:func:`~torchshrink.pruning.structural.remove_channels` then shrinks the layers, and the head counts
are brought in line afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from torchshrink.inputs import ModelInput, call
from torchshrink.pruning.groups import Group, Member
from torchshrink.transformer_blocks import attention_blocks, feed_forward_blocks

__all__ = ["transformer_groups"]


def _rows(channels: int, width: int) -> torch.Tensor:
    """Channel c owns positions ``c * width ... (c + 1) * width - 1``."""
    return torch.arange(channels * width).reshape(channels, width)


def _tokens_per_sample(model: nn.Module, example: ModelInput, layers: list[nn.Linear]) -> dict[int, int]:
    """How many positions (tokens, patches) each linear layer sees per sample, from one forward pass."""
    seen: dict[int, int] = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        seen[id(module)] = int(x.numel() // (x.shape[0] * x.shape[-1]))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            call(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    return any(name == i or name.startswith(i + ".") for i in ignore)


def transformer_groups(
    model: nn.Module, example: ModelInput, ignore: Iterable[str] = (), taken: Iterable[str] = ()
) -> list[Group]:
    """One group of heads per attention block and one group of neurons per feed-forward block.

    Blocks with a layer in ``ignore`` (or inside it) and layers already in a traced group
    (``taken``: module names) are left out. ``macs`` per channel counts the linear weights a
    channel owns times the positions they see, plus a head's share of the attention products.
    """
    ignored, busy = tuple(ignore), set(taken)
    attentions = [
        a
        for a in attention_blocks(model)
        if not any(_ignored(n, ignored) or n in busy for n in (a.name, a.output_name))
    ]
    ffns = [
        f
        for f in feed_forward_blocks(model)
        if not any(_ignored(n, ignored) or n in busy for n in (f.up_name, f.down_name))
    ]
    if not attentions and not ffns:
        return []
    tokens = _tokens_per_sample(
        model, example, [a.attention.query for a in attentions] + [f.up for f in ffns]
    )
    groups = []
    for a in attentions:
        heads, size = a.heads, a.head_size
        index = _rows(heads, size)
        members = [
            Member(f"{a.name}.{proj}", getattr(a.attention, proj), attr, 0, index, "out")
            for proj in ("query", "key", "value")
            for attr in ("weight", "bias")
            if getattr(getattr(a.attention, proj), attr) is not None
        ]
        members.append(Member(a.output_name, a.output, "weight", 1, index, "in"))
        length = tokens.get(id(a.attention.query), 0)
        hidden = a.attention.query.in_features
        # q, k, v rows and projection columns per token, plus QK^T and attention x V per head
        macs = (3 * size * hidden + size * a.output.out_features) * length + 2 * length * length * size
        groups.append(Group(heads, members, float(macs), kind="heads", title=f"{a.name} heads"))
    for f in ffns:
        index = _rows(f.neurons, 1)
        members = [Member(f.up_name, f.up, "weight", 0, index, "out")]
        if f.up.bias is not None:
            members.append(Member(f.up_name, f.up, "bias", 0, index, "out"))
        members.append(Member(f.down_name, f.down, "weight", 1, index, "in"))
        length = tokens.get(id(f.up), 0)
        macs = (f.up.in_features + f.down.out_features) * length
        groups.append(Group(f.neurons, members, float(macs), kind="neurons", title=f"{f.up_name} neurons"))
    return groups
