"""Tracing a model into a torch.fx graph with recorded tensor shapes: the view of a model that
structured pruning and quantization both work on.

torch.nn's own layers stay leaves; user modules are traced through. A submodule that cannot be
traced is kept as one opaque call, so one odd block does not stop the whole model.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from torchshrink.errors import StructureError
from torchshrink.inputs import ModelInput, as_tuple

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


class _LeafTracer(fx.Tracer):
    """Trace through user modules; stop at torch.nn's layers (and their subclasses from other
    packages, whose forward may add padding but keeps the layer's weights and meaning) and at
    modules known to be opaque."""

    def __init__(self, opaque: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or torch_layer_type(m) is not None


def _first_untraceable(model: nn.Module, opaque: frozenset[str], prefix: str = "") -> str:
    """The deepest submodule whose tracing fails (``prefix`` itself when no child is to blame)."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if path in opaque or torch_layer_type(child) is not None:
            continue
        inner = frozenset(o[len(path) + 1 :] for o in opaque if o.startswith(path + "."))
        try:
            _LeafTracer(inner).trace(child)
        except Exception:  # noqa: BLE001 - any tracing failure marks the culprit
            return _first_untraceable(child, opaque, path)
    return prefix


def trace_model(
    model: nn.Module,
    example: ModelInput,
    purpose: str = "structured pruning",
    advice: str = " or use unstructured pruning",
) -> fx.GraphModule:
    """Trace ``model`` with torch.fx and record every node's output shape for ``example``.

    A submodule that cannot be traced (data-dependent control flow, checks on input shapes) is
    kept as one opaque call: its inputs and outputs are pinned, everything around it stays prunable.
    Only a top-level ``forward`` that cannot be traced is an error.
    """
    opaque: frozenset[str] = frozenset()
    while True:
        try:
            graph = _LeafTracer(opaque).trace(model)
            break
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
            culprit = _first_untraceable(model, opaque)
            if not culprit or culprit in opaque:
                raise StructureError(
                    f"{purpose} needs a torch.fx-traceable model; the forward() of {type(model).__name__} "
                    f"itself cannot be traced: {type(exc).__name__}: {exc}. Move data-dependent control flow "
                    f"into a submodule (which is then kept whole){advice}"
                ) from exc
            log.warning(
                "module %r (%s) cannot be traced by torch.fx (%s); it is kept whole (%s leaves it alone)",
                culprit,
                type(model.get_submodule(culprit)).__name__,
                type(exc).__name__,
                purpose,
            )
            opaque = opaque | {culprit}
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(*as_tuple(example))
    model.train(was_training)
    return gm
