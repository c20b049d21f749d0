"""Cutting a model's torch.fx graph into consecutive pipeline stages that run the model's own modules.

Each stage is a small ``fx.GraphModule`` holding the nodes between two boundaries; it takes the
values that cross into it (the model's inputs for the first stage) and returns the values later
stages need, passing on what it does not use itself (a skip connection over a cut, the model's
input read again later). The stages call the model's own submodules (the same objects, so the same
parameters), eagerly: train / eval mode, fake-quant modules and custom autograd functions work as in
the whole model. That is why pipeline parallelism prefers this route and falls back on
``torch.export`` (:func:`torch.distributed.pipelining.pipeline`) only for models fx cannot trace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from torchshrink.errors import StructureError
from torchshrink.inputs import ModelInput, as_tuple
from torchshrink.modes import switched
from torchshrink.tracing import trace_model

log = logging.getLogger(__name__)

__all__ = ["GraphStage", "graph_stages"]


@dataclass(frozen=True)
class GraphStage:
    """One stage's module and its inputs and outputs on the example micro-batch: handed to
    ``PipelineStage`` so it need not infer shapes by running the module on uninitialised tensors
    (which, in training mode, pours garbage into batch-norm statistics)."""

    module: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    outputs: object


def graph_stages(model: nn.Module, example: ModelInput, split: Sequence[str]) -> list[GraphStage] | None:
    """``len(split) + 1`` stage modules whose chained outputs equal ``model``'s on ``example``, stage
    ``k + 1`` beginning at the first node that runs module ``split[k]`` (or one inside it); None when the
    model cannot be cut so (untraceable, a boundary it never reaches, a weight read on both sides of a
    cut, a value that is not a tensor crossing a cut), with the reason logged."""
    try:
        gm = (
            model
            if isinstance(model, fx.GraphModule)
            else trace_model(model, example, "pipeline parallelism", "")
        )
    except StructureError as exc:
        log.info("pipeline: the model cannot be traced by torch.fx (%s); splitting with torch.export", exc)
        return None
    nodes = list(gm.graph.nodes)
    stage_of = _assign(gm, nodes, split)
    if stage_of is None:
        return None
    stages = [_stage_module(gm, nodes, stage_of, k, len(split) + 1) for k in range(len(split) + 1)]
    return _run_chained(model, stages, example)


def _owner(node: fx.Node) -> str | None:
    """The module (or attribute) a node reads: what decides which stage it belongs to."""
    return str(node.target) if node.op in ("call_module", "get_attr") else None


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _assign(gm: fx.GraphModule, nodes: list[fx.Node], split: Sequence[str]) -> dict[fx.Node, int] | None:
    """Each node's stage: the count of boundaries reached so far in graph order. Every weight or buffer
    must be read in one stage only (a stateless module, a shared ReLU, may run in two)."""
    stage_of: dict[fx.Node, int] = {}
    stage = 0
    for node in nodes:
        owner = _owner(node)
        while stage < len(split) and owner is not None and _inside(owner, split[stage]):
            stage += 1
        if owner is not None and any(_inside(owner, name) for name in split[stage:]):
            log.info("pipeline: %s runs before an earlier boundary is reached; not a graph split", owner)
            return None
        stage_of[node] = 0 if node.op == "placeholder" else stage
    if stage != len(split):
        log.info("pipeline: the forward pass never reaches %s; not a graph split", list(split[stage:]))
        return None
    holders: dict[int, set[int]] = {}  # id of every parameter / buffer -> the stages that read it
    names: dict[int, str] = {}
    for node, k in stage_of.items():
        for name, tensor in _tensors(gm, node):
            holders.setdefault(id(tensor), set()).add(k)
            names.setdefault(id(tensor), name)
    shared = sorted(names[i] for i, ks in holders.items() if len(ks) > 1)
    if shared:
        log.info("pipeline: weights %s would be read in more than one stage; not a graph split", shared[:5])
        return None
    return stage_of


def _tensors(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers a node reads (a module's, tied ones included, or an attribute): a
    tensor read in two stages would be trained as two copies (tied weights), so it may not be."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return [
            (f"{node.target}.{n}", t)
            for n, t in (
                *module.named_parameters(remove_duplicate=False),
                *module.named_buffers(remove_duplicate=False),
            )
        ]
    if node.op == "get_attr":
        value = _attribute(gm, str(node.target))
        return [(str(node.target), value)] if isinstance(value, torch.Tensor) else []
    return []


def _attribute(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _crossing(nodes: list[fx.Node], stage_of: dict[fx.Node, int], k: int) -> list[fx.Node]:
    """Values made in stages <= k that a later stage (or the model's output, made by the last) reads."""
    return [
        node
        for node in nodes
        if node.op != "output" and stage_of[node] <= k and any(stage_of[user] > k for user in node.users)
    ]


def _stage_module(
    gm: fx.GraphModule, nodes: list[fx.Node], stage_of: dict[fx.Node, int], k: int, count: int
) -> fx.GraphModule:
    """Stage ``k``'s nodes as a module: its inputs as placeholders, what later stages need as output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if k == 0:
        for node in nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node)
    else:
        for node in _crossing(nodes, stage_of, k - 1):
            env[node] = graph.placeholder(node.name)
    for node in nodes:
        if node.op not in ("placeholder", "output") and stage_of[node] == k:
            env[node] = graph.node_copy(node, lambda n: env[n])
    if k == count - 1:
        output = next(node for node in nodes if node.op == "output")
        graph.output(fx.map_arg(output.args[0], lambda n: env[n]))
    else:
        passed = [env[node] for node in _crossing(nodes, stage_of, k)]
        graph.output(passed[0] if len(passed) == 1 else tuple(passed))
    return fx.GraphModule(gm, graph, class_name=f"PipelineStage{k}")


def _run_chained(
    model: nn.Module, stages: list[fx.GraphModule], example: ModelInput
) -> list[GraphStage] | None:
    """The stages chained on ``example`` with each one's inputs and outputs, if they give the model's
    output and only tensors cross the cuts. Run in eval mode (no batch-norm statistics move) with
    autograd on, so each value's ``requires_grad`` says whether a gradient flows back through it."""
    inputs = tuple(t.clone() for t in as_tuple(example))
    cut: list[GraphStage] = []
    try:
        with switched(model):
            with torch.no_grad():
                expected = tree_flatten(model(*inputs))[0]
            values: tuple[torch.Tensor, ...] = inputs
            for k, stage in enumerate(stages):
                out = stage(*values)
                if k < len(stages) - 1 and not all(isinstance(v, torch.Tensor) for v in as_tuple(out)):
                    log.info("pipeline: a value that is not a tensor crosses a cut; not a graph split")
                    return None
                cut.append(GraphStage(stage, tuple(_leaf(v) for v in values), _detached(out)))
                values = as_tuple(out) if k < len(stages) - 1 else values
            got = tree_flatten(out)[0]
    except Exception as exc:  # noqa: BLE001 - a cut graph that cannot run is no split
        log.info("pipeline: the cut graph does not run (%s: %s); not a graph split", type(exc).__name__, exc)
        return None
    same = len(expected) == len(got) and all(
        isinstance(e, torch.Tensor)
        and e.shape == g.shape
        and torch.allclose(e.float(), g.detach().float(), atol=1e-6)
        for e, g in zip(expected, got, strict=True)
    )
    if not same:
        log.info("pipeline: the cut graph's output differs from the model's; not a graph split")
        return None
    return cut


def _leaf(v: torch.Tensor) -> torch.Tensor:
    return v.detach().requires_grad_(v.requires_grad)


def _detached(out: object) -> object:
    return (
        tuple(_leaf(v) for v in out)
        if isinstance(out, tuple)
        else _leaf(out)
        if isinstance(out, torch.Tensor)
        else out
    )
