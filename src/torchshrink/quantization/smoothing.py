"""Activation smoothing (SmoothQuant, Xiao et al. 2023): move a linear layer's outlier input channels
into its weights, so that one int8 scale per activation tensor loses less.

Transformers' LayerNorm outputs carry a few channels tens of times larger than the rest; a per-tensor
int8 scale sized for them leaves the other channels a handful of levels. For the linear layers that
read one tensor ``X`` (a transformer's query, key and value read the same one), input channel ``j``
gets the factor

    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)

(``max|W[:, j]|`` over every reader), the readers' weight columns are multiplied by ``s`` and ``X`` is
divided by it: in float the layers compute exactly what they did. The division is folded into the
LayerNorm that produces ``X`` when only these linears read it (no extra operator); otherwise (a
post-LN BERT's LayerNorm also feeds the residual) an :class:`InputScale` on the branch to the
linears does it (one ``Mul`` in the ONNX file). ``alpha`` trades activation range against weight
range: 0 leaves activations alone, 1 moves all of their range into the weights.

The groups are a function of the traced graph and the plan, so a saved model rebuilds the same
``InputScale`` modules; their factors and the smoothed weights come from its weights file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from torchshrink.inputs import ModelInput, call

log = logging.getLogger(__name__)

__all__ = ["InputScale", "SmoothGroup", "smoothing_groups", "insert_input_scales", "smooth"]

_MIN = 1e-5


class InputScale(nn.Module):
    """Multiplies the last axis by ``inverse`` (one factor per channel): a smoothed input's division."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("inverse", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inverse


@dataclass
class SmoothGroup:
    """Linear layers reading one tensor, and where that tensor's division goes."""

    source: fx.Node
    readers: list[str]
    channels: int
    layer_norm: str | None = None  # fold into this LayerNorm's affine parameters
    scale: str | None = None  # or an InputScale module of this name


def _float_node(node: object) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return hasattr(meta, "shape") and meta.dtype.is_floating_point


def smoothing_groups(gm: fx.GraphModule, quantized: Iterable[str]) -> list[SmoothGroup]:
    """The groups of quantized ``nn.Linear`` layers that read the same float tensor, in graph order."""
    modules = dict(gm.named_modules())
    wanted = set(quantized)
    by_source: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        if not isinstance(modules[node.target], nn.Linear) or not node.args:
            continue
        source = node.args[0]
        if isinstance(source, fx.Node) and _float_node(source):
            by_source.setdefault(source, []).append(node)
    groups = []
    for source, readers in by_source.items():
        channels = {modules[r.target].in_features for r in readers}
        if len(channels) != 1:
            continue
        group = SmoothGroup(source, [str(r.target) for r in readers], channels.pop())
        norm = modules.get(source.target) if source.op == "call_module" else None
        if (
            type(norm) is nn.LayerNorm
            and norm.elementwise_affine
            and norm.bias is not None
            and tuple(norm.normalized_shape) == (group.channels,)
            and set(source.users) == set(readers)
        ):
            group.layer_norm = str(source.target)
        groups.append(group)
    return groups


def insert_input_scales(gm: fx.GraphModule, groups: Sequence[SmoothGroup]) -> None:
    """An :class:`InputScale` (factors 1) in front of each group not folded into a LayerNorm."""
    for group in groups:
        if group.layer_norm is not None:
            continue
        group.scale = f"smooth_{group.source.name}"
        gm.add_submodule(group.scale, InputScale(group.channels))
        with gm.graph.inserting_after(group.source):
            node = gm.graph.call_module(group.scale, (group.source,))
        node.meta = dict(group.source.meta)
        for user in list(group.source.users):
            if user.op == "call_module" and user.target in group.readers:
                user.replace_input_with(group.source, node)
    gm.graph.lint()
    gm.recompile()


def _input_maxima(
    gm: fx.GraphModule, groups: Sequence[SmoothGroup], batches: Iterable[ModelInput]
) -> list[torch.Tensor]:
    """Per group, the largest absolute value of each input channel over ``batches``."""
    maxima = [torch.zeros(g.channels) for g in groups]

    def hook_for(i: int):  # noqa: ANN202 - a forward pre-hook
        def hook(_: nn.Module, args: tuple) -> None:
            x = args[0].detach().abs().reshape(-1, groups[i].channels)
            maxima[i] = torch.maximum(maxima[i], x.amax(0).float())

        return hook

    handles = [
        gm.get_submodule(g.readers[0]).register_forward_pre_hook(hook_for(i)) for i, g in enumerate(groups)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                call(gm, batch)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smooth(
    gm: fx.GraphModule, groups: Sequence[SmoothGroup], batches: Iterable[ModelInput], alpha: float
) -> list[float]:
    """Measure each group's input channels on ``batches`` and migrate their range into the weights
    (see the module docstring); returns, per group, the input's range ratio largest / median channel
    before smoothing (what the outliers were)."""
    maxima = _input_maxima(gm, groups, batches)
    ratios = []
    with torch.no_grad():
        for group, act in zip(groups, maxima, strict=True):
            weights = [gm.get_submodule(r).weight for r in group.readers]
            w_max = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).float()
            factor = act.clamp_min(_MIN) ** alpha / w_max.clamp_min(_MIN) ** (1 - alpha)
            factor = factor.clamp_min(_MIN)
            for w in weights:
                w.mul_(factor.to(w.dtype))
            if group.layer_norm is not None:
                norm = gm.get_submodule(group.layer_norm)
                norm.weight.div_(factor.to(norm.weight.dtype))
                norm.bias.div_(factor.to(norm.bias.dtype))
            else:
                gm.get_submodule(group.scale).inverse.copy_(1 / factor)
            ratios.append(float(act.max() / act.median().clamp_min(_MIN)))
    log.info(
        "smoothing (alpha %.2f): %d input(s) of %d linear layer(s), %d folded into a LayerNorm; "
        "largest / median input channel up to %.1fx before",
        alpha,
        len(groups),
        sum(len(g.readers) for g in groups),
        sum(g.layer_norm is not None for g in groups),
        max(ratios, default=1.0),
    )
    return ratios
