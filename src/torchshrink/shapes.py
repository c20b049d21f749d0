"""Layer shapes as data: what structured pruning changed, recorded in the architecture reference
so a smaller model can be rebuilt from its zoo/factory builder without executing code from a file.

``architecture["resized"] = {"features.0": {"in_channels": 1, "out_channels": 12, "groups": 1}, ...}``
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchshrink.errors import ModelLoadError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

__all__ = ["module_shape", "resize_module", "apply_resized", "RESIZABLE"]

RESIZABLE = (*_CONV, nn.Linear, *_BN, nn.LayerNorm)


def module_shape(module: nn.Module) -> dict[str, Any]:
    """The shape-defining attributes of a resizable layer."""
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


def resize_module(module: nn.Module, shape: dict[str, Any]) -> nn.Module:
    """A fresh layer of the same type and settings as ``module`` with the given shape attributes."""
    if isinstance(module, _CONV):
        return type(module)(
            shape["in_channels"],
            shape["out_channels"],
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=shape["groups"],
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(shape["in_features"], shape["out_features"], bias=module.bias is not None)
    if isinstance(module, _BN):
        return type(module)(
            shape["num_features"],
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
    if isinstance(module, nn.LayerNorm):
        return nn.LayerNorm(
            tuple(shape["normalized_shape"]),
            eps=module.eps,
            elementwise_affine=module.elementwise_affine,
            bias=module.bias is not None,
        )
    raise ModelLoadError(f"layer type {type(module).__name__} cannot be resized")


def apply_resized(model: nn.Module, resized: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace each named layer by a resized copy (weights uninitialised: load a state_dict after)."""
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
