"""Coupled-channel groups of a model, found by tracing it with torch.fx.

Every conv/linear output opens a *channel space*. Channel spaces flow through the traced graph:
element-wise ops, activations, pooling, batch-norm and depthwise convs pass them on; a residual
add merges the spaces it adds; a concatenation lays several spaces side by side; a flatten turns
each channel into a block of features for the next linear layer. Whatever the tracker does not
understand (reshapes with constants, slicing, attention head splits, the model's outputs, norms
over the channel axis) *pins* the spaces it touches: they are never pruned. Each unpinned space
becomes a :class:`Group`: every tensor slice (weights, biases, batch-norm statistics, consumer
columns) indexed by its channels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from torchshrink.errors import StructureError
from torchshrink.pruning.groups import Group, Member
from torchshrink.pruning.heads import transformer_groups
from torchshrink.pruning.operators import (
    BN,
    CHANNEL_NORMS,
    CONV,
    ELEMENTWISE,
    ELEMENTWISE_METHODS,
    PASS_FUNCTIONS,
    PASS_METHODS,
    PASS_MODULES,
    REDUCE_FUNCTIONS,
    REDUCE_METHODS,
)
from torchshrink.tracing import trace_model

log = logging.getLogger(__name__)

__all__ = ["Member", "Group", "StructureError", "trace_model", "find_groups"]


# --- channel spaces -------------------------------------------------------------------------------


class _Spaces:
    """Union-find over channel spaces; a merged set is pinned if any part is."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.pinned: list[bool] = []

    def new(self, size: int, pinned: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.pinned.append(pinned)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.pinned[ra] = self.pinned[rb] = True
            return
        self.parent[rb] = ra
        self.pinned[ra] = self.pinned[ra] or self.pinned[rb]

    def pin(self, s: int) -> None:
        self.pinned[self.find(s)] = True


@dataclass(frozen=True)
class _Layout:
    """Where a tensor's tracked channels live: axis ``dim``, made of (space, expand) segments."""

    dim: int
    segs: tuple[tuple[int, int], ...]

    def width(self, spaces: _Spaces) -> int:
        return sum(spaces.size[s] * e for s, e in self.segs)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Analysis:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = _Spaces()
        self.layout: dict[fx.Node, _Layout | None] = {}
        self.members: list[tuple[str, str, int, _Layout, str]] = []  # module, attr, dim, layout, role
        self.module_out_space: dict[str, int] = {}
        self.module_in_layout: dict[str, _Layout] = {}
        self.positions: dict[str, int] = {}  # output positions per sample of each conv/linear layer

    # helpers
    def pin_layout(self, layout: _Layout | None) -> None:
        if layout is not None:
            for s, _ in layout.segs:
                self.spaces.pin(s)

    def pin_inputs(self, node: fx.Node) -> None:
        for arg in node.all_input_nodes:
            self.pin_layout(self.layout.get(arg))

    def same(self, a: _Layout, b: _Layout) -> bool:
        """Unify two layouts that must carry the same channels; pin both if impossible."""
        if (
            a.dim != b.dim
            or len(a.segs) != len(b.segs)
            or any(ea != eb for (_, ea), (_, eb) in zip(a.segs, b.segs, strict=True))
        ):
            self.pin_layout(a)
            self.pin_layout(b)
            return False
        for (sa, _), (sb, _) in zip(a.segs, b.segs, strict=True):
            self.spaces.union(sa, sb)
        return True

    def producer(
        self, name: str, module: nn.Module, out_dim: int, attrs: Iterable[str], size: int
    ) -> _Layout:
        if name in self.module_out_space:  # a layer called twice produces the same channels
            space = self.module_out_space[name]
        else:
            space = self.spaces.new(size)
            self.module_out_space[name] = space
            for attr in attrs:
                if getattr(module, attr, None) is not None:
                    self.members.append((name, attr, 0, _Layout(0, ((space, 1),)), "out"))
        return _Layout(out_dim, ((space, 1),))

    def consumer(self, name: str, layout: _Layout | None, dim: int, weight_dim: int = 1) -> None:
        if layout is None:
            return
        if layout.dim != dim:
            self.pin_layout(layout)
            return
        if name in self.module_in_layout:
            self.same(self.module_in_layout[name], layout)
            return
        self.module_in_layout[name] = layout
        self.members.append((name, "weight", weight_dim, layout, "in"))

    # node handlers
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.layout[node] = self.visit(node)

    def visit(self, node: fx.Node) -> _Layout | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            for arg in node.all_input_nodes:
                self.pin_layout(self.layout.get(arg))
            return None
        if node.op == "call_module":
            return self.visit_module(node)
        if node.op == "call_function":
            return self.visit_function(node, node.target)
        if node.op == "call_method":
            return self.visit_method(node)
        self.pin_inputs(node)
        return None

    def arg_layout(self, node: fx.Node) -> _Layout | None:
        first = node.args[0] if node.args else None
        return self.layout.get(first) if isinstance(first, fx.Node) else None

    def visit_module(self, node: fx.Node) -> _Layout | None:
        name = str(node.target)
        m = self.modules[name]
        inp = self.arg_layout(node)
        out_shape = _shape(node)
        if isinstance(m, (*CONV, nn.Linear)) and out_shape is not None:
            positions = math.prod(out_shape[2:]) if isinstance(m, CONV) else math.prod(out_shape[1:-1])
            self.positions[name] = self.positions.get(name, 0) + positions
        if isinstance(m, CONV):
            if m.groups == 1:
                self.consumer(name, inp, 1)
                return self.producer(name, m, 1, ("weight", "bias"), m.out_channels)
            if m.groups == m.in_channels == m.out_channels and inp is not None and inp.dim == 1:
                for attr in ("weight", "bias"):  # depthwise: each filter belongs to its channel
                    if getattr(m, attr, None) is not None:
                        self.members.append((name, attr, 0, _Layout(0, inp.segs), "pass"))
                return inp
            self.pin_layout(inp)  # grouped conv: channels are tied within groups
            layout = self.producer(name, m, 1, (), m.out_channels)
            self.spaces.pin(layout.segs[0][0])
            return layout
        if isinstance(m, nn.Linear):
            ndim = len(out_shape) if out_shape else 2
            self.consumer(name, inp, ndim - 1)
            return self.producer(name, m, ndim - 1, ("weight", "bias"), m.out_features)
        if isinstance(m, BN):
            if inp is None:
                return None
            if inp.dim != 1:
                self.pin_layout(inp)
                return inp
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, attr, None) is not None:
                    self.members.append((name, attr, 0, _Layout(0, inp.segs), "pass"))
            return inp
        if isinstance(m, CHANNEL_NORMS):
            if inp is not None and out_shape is not None:
                normalized = len(getattr(m, "normalized_shape", ())) or len(out_shape) - 1
                if inp.dim >= len(out_shape) - normalized or isinstance(m, nn.GroupNorm):
                    self.pin_layout(inp)  # removing channels would change the statistics
            return inp
        if isinstance(m, nn.Flatten):
            return self.flatten(node, inp, m.start_dim, m.end_dim)
        if isinstance(m, nn.Softmax | nn.LogSoftmax):
            if inp is not None and out_shape is not None and inp.dim == (m.dim % len(out_shape)):
                self.pin_layout(inp)
            return inp
        if isinstance(m, PASS_MODULES):
            return inp
        self.pin_inputs(node)
        return None

    def flatten(self, node: fx.Node, inp: _Layout | None, start: int, end: int) -> _Layout | None:
        in_node = node.args[0]
        in_shape = _shape(in_node) if isinstance(in_node, fx.Node) else None
        if inp is None or in_shape is None:
            return None
        nd = len(in_shape)
        start, end = start % nd, end % nd
        if inp.dim < start:
            return inp
        if inp.dim == start and end == nd - 1:
            expand = math.prod(in_shape[start + 1 :])
            return _Layout(start, tuple((s, e * expand) for s, e in inp.segs))
        self.pin_layout(inp)
        return None

    def visit_function(self, node: fx.Node, fn: object) -> _Layout | None:
        inp = self.arg_layout(node)
        if fn in PASS_FUNCTIONS:
            return inp
        if fn in ELEMENTWISE:
            return self.elementwise(node)
        if fn in (torch.cat, torch.concat):
            return self.cat(node)
        if fn is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, inp, start, end)
        if fn in REDUCE_FUNCTIONS:
            return self.reduce(node, inp)
        if fn in (F.pad, torch._C._nn.pad):
            return self.pad(node, inp)
        if fn is getattr:
            return None  # x.shape and friends: not a tensor
        self.pin_inputs(node)
        return None

    def visit_method(self, node: fx.Node) -> _Layout | None:
        method = str(node.target)
        inp = self.arg_layout(node)
        if method in PASS_METHODS:
            return inp
        if method in ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if method == "size" or method == "dim":
            return None
        if method in ("view", "reshape"):
            return self.reshape(node, inp)
        if method == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, inp, start, end)
        if method in REDUCE_METHODS:
            return self.reduce(node, inp)
        self.pin_inputs(node)
        return None

    def elementwise(self, node: fx.Node) -> _Layout | None:
        out_shape = _shape(node)
        tracked = [a for a in node.args if isinstance(a, fx.Node) and self.layout.get(a) is not None]
        if not tracked:
            self.pin_inputs(node)
            return None
        result = self.layout[tracked[0]]
        for other in tracked[1:]:
            self.same(result, self.layout[other])
        for a in node.args:  # an untracked tensor must broadcast along the channel axis
            if isinstance(a, fx.Node) and self.layout.get(a) is None:
                shape = _shape(a)
                if shape is not None and out_shape is not None and len(shape) > 0:
                    axis = result.dim - (len(out_shape) - len(shape))
                    if 0 <= axis < len(shape) and shape[axis] != 1:
                        self.pin_layout(result)
        return result

    def cat(self, node: fx.Node) -> _Layout | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = _shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None:
            self.pin_inputs(node)
            return None
        dim %= len(out_shape)
        layouts = [self.layout.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if any(lay is None for lay in layouts) or any(lay.dim != layouts[0].dim for lay in layouts):
            for lay in layouts:
                self.pin_layout(lay)
            return None
        if layouts[0].dim == dim:
            return _Layout(dim, tuple(seg for lay in layouts for seg in lay.segs))
        for lay in layouts[1:]:
            self.same(layouts[0], lay)
        return layouts[0]

    def reduce(self, node: fx.Node, inp: _Layout | None) -> _Layout | None:
        in_node = node.args[0]
        in_shape = _shape(in_node) if isinstance(in_node, fx.Node) else None
        if inp is None or in_shape is None:
            return None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            self.pin_layout(inp)
            return None
        dims = [d % len(in_shape) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if inp.dim in dims:
            self.pin_layout(inp)
            return None
        shift = 0 if keepdim else sum(1 for d in dims if d < inp.dim)
        return _Layout(inp.dim - shift, inp.segs)

    def pad(self, node: fx.Node, inp: _Layout | None) -> _Layout | None:
        """``F.pad`` keeps the channels when it pads only the trailing (spatial) axes below them."""
        out_shape = _shape(node)
        amounts = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        if inp is None or out_shape is None or not isinstance(amounts, (list, tuple)):
            self.pin_inputs(node)
            return None
        padded_from = len(out_shape) - len(amounts) // 2  # the first axis the pad touches
        if inp.dim >= padded_from and any(
            amounts[2 * (len(out_shape) - 1 - inp.dim) : 2 * (len(out_shape) - inp.dim)]
        ):
            self.pin_layout(inp)
            return None
        return inp

    def reshape(self, node: fx.Node, inp: _Layout | None) -> _Layout | None:
        in_node = node.args[0]
        in_shape, out_shape = (_shape(in_node) if isinstance(in_node, fx.Node) else None), _shape(node)
        if inp is None:
            return None
        if in_shape is None or out_shape is None:
            self.pin_layout(inp)
            return None
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = tuple(sizes[0])
        literal = [s for s in sizes if isinstance(s, int) and s != -1]
        d = inp.dim
        flattens_from_d = out_shape == (*in_shape[:d], math.prod(in_shape[d:]))
        # A literal size other than the leading batch dims would break once channels are removed.
        if (
            flattens_from_d
            and all(s in in_shape[:d] for s in literal)
            and not (literal and len(literal) >= len(sizes))
        ):
            expand = math.prod(in_shape[d + 1 :])
            return _Layout(d, tuple((s, e * expand) for s, e in inp.segs))
        if out_shape == in_shape and not literal:
            return inp
        self.pin_layout(inp)
        return None


def _index_for(layout: _Layout, space_root: int, spaces: _Spaces) -> torch.Tensor | None:
    """For each channel of ``space_root``, its positions along the layout's axis (None if absent)."""
    offset = 0
    rows = []
    for s, e in layout.segs:
        size = spaces.size[s]
        if spaces.find(s) == space_root:
            rows.append(offset + torch.arange(size).unsqueeze(1) * e + torch.arange(e).unsqueeze(0))
        offset += size * e
    return torch.cat(rows, dim=1) if rows else None


def find_groups(model: nn.Module, example: torch.Tensor, ignore: Iterable[str] = ()) -> list[Group]:
    """Trace ``model`` on ``example`` and return its prunable channel groups, then the attention
    heads and feed-forward neurons of its transformer blocks that the trace left pinned.

    Layers named in ``ignore`` (or inside them) keep all their output channels.
    """
    gm = trace_model(model, example)
    analysis = _Analysis(gm)
    analysis.run()
    spaces = analysis.spaces
    ignored = tuple(ignore)
    for name, space in analysis.module_out_space.items():
        if any(name == i or name.startswith(i + ".") for i in ignored):
            spaces.pin(space)
    modules = dict(model.named_modules())
    groups: dict[int, Group] = {}
    for module_name, attr, dim, layout, role in analysis.members:
        roots = {spaces.find(s) for s, _ in layout.segs}
        for root in roots:
            if spaces.pinned[root]:
                continue
            index = _index_for(layout, root, spaces)
            if index is None:
                continue
            group = groups.setdefault(root, Group(size=spaces.size[root]))
            group.members.append(Member(module_name, modules[module_name], attr, dim, index, role))
            if attr == "weight" and module_name in analysis.positions:
                weight = modules[module_name].weight
                per_position = weight.numel() / weight.shape[dim]
                group.macs += per_position * index.shape[1] * analysis.positions[module_name]
    traced = [g for g in groups.values() if any(m.role == "out" for m in g.members)]
    taken = {m.module_name for g in traced for m in g.members}
    return traced + transformer_groups(model, example, ignored, taken)
