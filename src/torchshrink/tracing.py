"""Tracing a model into a torch.fx graph with recorded tensor shapes: the view of a model that
structured pruning and quantization both work on.

torch.nn's own layers stay leaves; user modules are traced through. A submodule that cannot be
traced is kept as one opaque call, so one odd block does not stop the whole model.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from torchshrink.errors import StructureError
from torchshrink.inputs import ModelInput, as_tuple
from torchshrink.modes import switched

log = logging.getLogger(__name__)

__all__ = ["trace_model", "torch_layer_type", "bake_parametrizations"]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def torch_layer_type(m: nn.Module) -> type[nn.Module] | None:
    """The torch.nn layer class ``m`` is, or derives from (a "same"-padding ``nn.Conv2d`` subclass
    from another package is a Conv2d); None for plain user modules and containers."""
    if isinstance(m, _CONTAINERS):
        return None
    for cls in type(m).__mro__:
        if cls is nn.Module:
            return None
        if cls.__module__.startswith("torch.nn") and cls.__module__ != parametrize.__name__:
            return cls  # (the Parametrized* classes parametrize makes on the fly are skipped)
    return None


def bake_parametrizations(model: nn.Module) -> list[str]:
    """Replace every parametrized tensor (weight norm, spectral norm, orthogonal, ...) by its current
    value, in place: pruning and quantization then see plain layers. Returns the baked tensor names."""
    baked = []
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        # By hand rather than parametrize.remove_parametrizations, which deletes the property from the
        # Parametrized* class that every deep copy of the module shares: the caller's own model would break.
        values = {tensor: getattr(module, tensor).detach().clone() for tensor in module.parametrizations}
        trainable = {t: any(p.requires_grad for p in module.parametrizations[t].parameters()) for t in values}
        del module._modules["parametrizations"]
        module.__class__ = module.__class__.__bases__[0]
        for tensor, value in values.items():
            module.register_parameter(tensor, nn.Parameter(value, requires_grad=trainable[tensor]))
            baked.append(f"{name}.{tensor}" if name else tensor)
    if baked:
        log.info("parametrized tensors baked into plain weights: %s", ", ".join(baked))
    return baked


_CONCRETE_ATTRIBUTES = frozenset(
    {"dtype", "ndim", "is_sparse", "is_quantized", "layout", "requires_grad", "is_meta"}
)
"""Tensor attributes a traced proxy answers with the example's value: they do not change with the
batch (``device`` stays a graph node: the traced model may later run on another device)."""


_READS_VALUES = frozenset({"item", "tolist", "numpy", "any", "all", "nonzero", "unique", "__bool__"})
"""Tensor methods whose result depends on the tensor's values, not only its shape."""

_VALUE_FUNCTIONS = frozenset(
    {
        torch.nonzero, torch.masked_select, torch.unique, torch.equal, torch.allclose, torch.is_nonzero,
        torch.bincount, torch.any, torch.all, torch.argwhere, torch.unique_consecutive,
    }
)  # fmt: skip
"""Functions whose result (its shape or its truth) depends on tensor values."""


class _ConcreteProxy(fx.Proxy):
    """A proxy that also knows the value its operation produced on the example inputs, so that
    Python control flow on it (``if x.shape[1] != c``, ``len(x.shape)``, ``for h in heads``)
    follows the example instead of failing. Shapes stay graph nodes; only the branch taken is fixed."""

    def __getattr__(self, k: str) -> Any:
        if k in _CONCRETE_ATTRIBUTES:
            return getattr(self.tracer.value_of(self), k)
        return _ConcreteAttribute(self, k)

    def __len__(self) -> int:
        return len(self.tracer.static_value(self))  # a shape's or tuple's length; a tensor's is its batch

    def __int__(self) -> int:
        return int(self.tracer.static_value(self))

    def __float__(self) -> float:
        return float(self.tracer.static_value(self))

    def __index__(self) -> int:
        return operator.index(self.tracer.static_value(self))


class _ConcreteAttribute(fx.proxy.Attribute, _ConcreteProxy):
    """``proxy.attr`` of a :class:`_ConcreteProxy`: a method call or a value, both traced."""


class _LeafTracer(fx.Tracer):
    """Trace through user modules; stop at torch.nn's layers (and their subclasses from other
    packages, whose forward may add padding but keeps the layer's weights and meaning) and at
    modules known to be opaque.

    Every traced operation is also run on the example inputs (no gradients, eval mode), so that
    control flow on shapes, ranks and dtypes takes the branch the example takes, as torch.export
    does for static shapes. Control flow on tensor *values* (``if x.sum() > 0``, ``.item()``) would
    hold for this example only: it stays an error, and the module being traced when something fails
    is recorded in ``failed_in`` (the caller keeps it whole).
    """

    def __init__(
        self, example: tuple[torch.Tensor, ...], opaque: frozenset[str] = frozenset(), concrete: bool = True
    ) -> None:
        super().__init__()
        self.concrete = concrete  # False: plain symbolic tracing, every branch on a traced value fails
        self.opaque = opaque
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.data_dependent: set[fx.Node] = set()
        self.placeholders = 0
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or torch_layer_type(m) is not None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def value_of(self, proxy: fx.Proxy) -> Any:
        return self._value(proxy.node)

    def static_value(self, proxy: fx.Proxy) -> Any:
        """The example's value of ``proxy`` for Python to branch on, when it does not depend on tensor
        values (shapes, sizes, flags); a TraceError otherwise (and always in plain symbolic mode).
        A tensor itself is refused: its truth is its values, its length and items its batch."""
        if not self.concrete:
            raise fx.proxy.TraceError(
                f"symbolically traced value {proxy.node.format_node()} used in control flow"
            )
        value = self.value_of(proxy)
        if isinstance(value, torch.Tensor) or proxy.node in self.data_dependent:
            raise fx.proxy.TraceError(
                f"control flow on tensor values ({proxy.node.format_node()}) holds for one input only"
            )
        return value

    def _value(self, node: fx.Node) -> Any:
        if node not in self.values and node.op == "get_attr":
            value: Any = self.root
            with _symbolic_trace._maybe_revert_all_patches():  # the real tensor, not a proxy of it
                for part in str(node.target).split("."):
                    value = getattr(value, part)
            self.values[node] = value
        return self.values.get(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[no-untyped-def,override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if node.op == "placeholder":
            index, self.placeholders = self.placeholders, self.placeholders + 1
            default = node.args[0] if node.args else None
            if str(node.target).startswith("**"):
                self.values[node] = {}
            elif str(node.target).startswith("*"):
                self.values[node] = tuple(self.example[index:])
            else:
                self.values[node] = self.example[index] if index < len(self.example) else default
        elif node.op in ("call_module", "call_function", "call_method"):
            if (
                (node.op == "call_method" and node.target in _READS_VALUES)
                or (node.op == "call_function" and node.target in _VALUE_FUNCTIONS)
                or any(n in self.data_dependent for n in node.all_input_nodes)
                or _boolean_index(node, self._value)
            ):
                self.data_dependent.add(node)
            args_, kwargs_ = fx.node.map_arg((node.args, node.kwargs), self._value)
            # fx patches Module.__call__ / __getattr__ while tracing: run the example without them
            with torch.no_grad(), _symbolic_trace._maybe_revert_all_patches():
                if node.op == "call_module":
                    self.values[node] = self.root.get_submodule(str(node.target))(*args_, **kwargs_)
                elif node.op == "call_function":
                    self.values[node] = node.target(*args_, **kwargs_)  # type: ignore[operator]
                else:
                    self.values[node] = getattr(args_[0], str(node.target))(*args_[1:], **kwargs_)
        return proxy

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.static_value(obj))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        value = self.static_value(obj)  # a shape, tuple or list: never a tensor's batch
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        return list(self.static_value(obj).keys())

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None and not self.is_leaf_module(m, path):
                self.failed_in = path  # the innermost traced-through module that failed
            raise


def _root_defaults(model: nn.Module, given: int) -> dict[str, Any]:
    """``forward``'s parameters after the ``given`` inputs, fixed to their defaults (so that
    ``if labels is not None`` sees None, not a proxy)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    rest = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][given:]
    simple = (type(None), bool, int, float, str)  # (fx flattens containers into several placeholders)
    return {p.name: p.default for p in rest if isinstance(p.default, simple)}


def _boolean_index(node: fx.Node, value_of: Any) -> bool:
    """``x[mask]`` with a boolean tensor: its shape depends on the mask's values."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) < 2:
        return False
    index = node.args[1]
    parts = index if isinstance(index, (tuple, list)) else (index,)
    for part in parts:
        value = value_of(part) if isinstance(part, fx.Node) else part
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            return True
    return False


def _agrees(gm: fx.GraphModule, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the traced graph computes what the model does on another batch (another size, the
    samples in another order): a trace that fixed the example's batch size or values does not."""
    batch = len(inputs[0])
    order = torch.tensor([1, 0, 1] if batch >= 2 else [0, 0, 0])
    other = tuple(t[order] for t in inputs)
    try:
        with torch.no_grad():
            expected, got = tree_flatten(model(*other))[0], tree_flatten(gm(*other))[0]
    except Exception:  # noqa: BLE001 - a graph that cannot run another batch does not agree
        return False
    return len(expected) == len(got) and all(_same_output(e, g) for e, g in zip(expected, got, strict=True))


def _same_output(expected: Any, got: Any) -> bool:
    """Tensors equal within float tolerance; anything else (a count, a flag) equal."""
    if isinstance(expected, torch.Tensor) != isinstance(got, torch.Tensor):
        return False
    if not isinstance(expected, torch.Tensor):
        return bool(expected == got)
    return expected.shape == got.shape and torch.allclose(expected.float(), got.float(), rtol=1e-4, atol=1e-5)


def trace_model(
    model: nn.Module,
    example: ModelInput,
    purpose: str = "structured pruning",
    advice: str = " or use unstructured pruning",
) -> fx.GraphModule:
    """Trace ``model`` into a torch.fx graph on ``example`` and record every node's output shape.

    Python control flow is followed on the example's values (see :class:`_LeafTracer`), so Hugging
    Face blocks that check shapes or branch on options trace through. A submodule that still cannot
    be traced is kept as one opaque call: its inputs and outputs are pinned, everything around it
    stays prunable. Only a top-level ``forward`` that cannot be traced is an error.
    """
    inputs = tuple(t.clone() for t in as_tuple(example))  # in-place ops of the model must not reach the data
    with switched(model):  # leaf modules run on the example: batch-norm statistics must not move
        gm = _trace(model, inputs, purpose, advice, concrete=True)
        if not _agrees(gm, model, inputs):
            log.warning(
                "the trace of %s that follows the example's control flow does not reproduce the model on "
                "another batch (it depends on the batch size or on values); traced again without it",
                type(model).__name__,
            )
            gm = _trace(model, inputs, purpose, advice, concrete=False)
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    return gm


def _trace(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], purpose: str, advice: str, concrete: bool
) -> fx.GraphModule:
    """One tracing pass (see :func:`trace_model`), keeping untraceable submodules whole."""
    defaults = _root_defaults(model, len(inputs)) or None
    opaque: frozenset[str] = frozenset()
    while True:
        tracer = _LeafTracer(inputs, opaque, concrete)
        try:
            graph = tracer.trace(model, concrete_args=defaults)
            break
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
            culprit = tracer.failed_in
            if not culprit or culprit in opaque:
                raise StructureError(
                    f"{purpose} needs a traceable model; the forward() of {type(model).__name__} itself "
                    f"cannot be traced: {type(exc).__name__}: {exc}. Move the code that fails into a "
                    f"submodule (which is then kept whole){advice}"
                ) from exc
            log.warning(
                "module %r (%s) cannot be traced (%s: %s); it is kept whole (%s leaves it alone)",
                culprit,
                type(model.get_submodule(culprit)).__name__,
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
                purpose,
            )
            opaque = opaque | {culprit}
    return fx.GraphModule(model, graph)
