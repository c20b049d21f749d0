"""Layer shapes as data: what structured pruning changed, recorded in the architecture reference
so a smaller model can be rebuilt from its zoo/factory builder without executing code from a file.

``architecture["resized"] = {"features.0": {"in_channels": 1, "out_channels": 12, "groups": 1}, ...}``

Besides conv / linear / norm layers, a transformer's attention module records its head count
(``{"num_attention_heads": 9}``, the heads' q/k/v/projection linears are entries of their own) and
an encoder's layer list its length after layers were dropped (``{"length": 4}``: the first four
entries stay, as the kept layers were renumbered when the others went).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from torchshrink.errors import ModelLoadError
from torchshrink.tracing import bake_parametrizations
from torchshrink.transformer_blocks import is_attention, set_head_count

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

__all__ = ["module_shape", "resize_module", "apply_resized", "is_resizable"]

_LAYERS = (*_CONV, nn.Linear, *_BN, nn.LayerNorm)


def is_resizable(module: nn.Module) -> bool:
    """Whether structured pruning may change ``module``'s shape (and :func:`module_shape` records it)."""
    return isinstance(module, (*_LAYERS, nn.ModuleList)) or is_attention(module)


def module_shape(module: nn.Module) -> dict[str, Any]:
    """The shape-defining attributes of a resizable layer."""
    if is_attention(module):
        return {"num_attention_heads": int(module.num_attention_heads)}
    if isinstance(module, nn.ModuleList):
        return {"length": len(module)}
    if isinstance(module, _CONV):
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.Linear):
        return {"in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, _BN):
        return {"num_features": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"normalized_shape": list(module.normalized_shape)}
    raise ModelLoadError(f"layer type {type(module).__name__} cannot be resized")


def _reshaped_copy(
    module: nn.Module, attributes: dict[str, Any], tensors: dict[str, tuple[int, ...]]
) -> nn.Module:
    """A copy of ``module`` (its class, settings and children kept) with new shape attributes and
    uninitialised tensors of the given shapes. Copying rather than calling the constructor keeps
    subclasses from other packages intact (a "same"-padding conv keeps its padding)."""
    originals = {**module._parameters, **module._buffers}
    module._parameters = {k: None for k in module._parameters}
    module._buffers = {k: None for k in module._buffers}
    try:
        new = copy.deepcopy(module)
    finally:
        module._parameters = {k: originals[k] for k in module._parameters}
        module._buffers = {k: originals[k] for k in module._buffers}
    for name, value in attributes.items():
        setattr(new, name, value)
    for name, shape in tensors.items():
        old = originals[name]
        if old is None:
            continue
        fresh = torch.zeros(
            shape, dtype=old.dtype, device=old.device
        )  # finite: a model is traced before its weights load
        if name in new._parameters:
            new._parameters[name] = nn.Parameter(fresh, requires_grad=old.requires_grad)
        else:
            new._buffers[name] = fresh
    for name in new._buffers:  # e.g. num_batches_tracked: shape-free, kept as it was
        if new._buffers[name] is None and originals.get(name) is not None:
            new._buffers[name] = originals[name].clone()
    return new


def resize_module(module: nn.Module, shape: dict[str, Any]) -> nn.Module:
    """A fresh layer of the same type and settings as ``module`` with the given shape attributes
    (an attention module and a layer list are changed in place: their tensors are their children's)."""
    if is_attention(module) and "num_attention_heads" in shape:
        set_head_count(module, int(shape["num_attention_heads"]))
        return module
    if isinstance(module, nn.ModuleList) and "length" in shape:
        length = int(shape["length"])
        if not 0 < length <= len(module):
            raise ModelLoadError(f"a layer list of {len(module)} cannot be cut to length {length}")
        del module[length:]
        return module
    if isinstance(module, _CONV):
        cin, cout, groups = shape["in_channels"], shape["out_channels"], shape["groups"]
        tensors = {"weight": (cout, cin // groups, *module.kernel_size), "bias": (cout,)}
        return _reshaped_copy(module, {"in_channels": cin, "out_channels": cout, "groups": groups}, tensors)
    if isinstance(module, nn.Linear):
        fin, fout = shape["in_features"], shape["out_features"]
        return _reshaped_copy(
            module, {"in_features": fin, "out_features": fout}, {"weight": (fout, fin), "bias": (fout,)}
        )
    if isinstance(module, _BN):
        n = shape["num_features"]
        tensors = {k: (n,) for k in ("weight", "bias", "running_mean", "running_var")}
        return _reshaped_copy(module, {"num_features": n}, tensors)
    if isinstance(module, nn.LayerNorm):
        dims = tuple(shape["normalized_shape"])
        return _reshaped_copy(module, {"normalized_shape": dims}, {"weight": dims, "bias": dims})
    raise ModelLoadError(f"layer type {type(module).__name__} cannot be resized")


def apply_resized(model: nn.Module, resized: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace each named layer by a resized copy (weights zero: load a state_dict after).

    Parametrizations are baked first, as structured pruning baked them before it resized anything.
    """
    bake_parametrizations(model)
    for path, shape in resized.items():
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, name) if not name.isdigit() else parent[int(name)]
        except (AttributeError, IndexError, TypeError) as exc:
            raise ModelLoadError(f"resized layer {path!r} does not exist in {type(model).__name__}") from exc
        new = resize_module(old, shape)
        if name.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
            parent[int(name)] = new
        else:
            setattr(parent, name, new)
    return model
