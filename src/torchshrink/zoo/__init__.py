"""Reference models, built by name: ``build("lenet5", num_classes=10)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from torchshrink.errors import ModelLoadError
from torchshrink.zoo.cnn1d import cnn1d
from torchshrink.zoo.lenet import lenet5, lenet5_half, lenet300
from torchshrink.zoo.resnet import ResNet, resnet

ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300,
    "lenet5": lenet5,
    "lenet5_half": lenet5_half,
    "resnet": resnet,
    "cnn1d": cnn1d,
}

__all__ = ["ZOO", "build", "lenet300", "lenet5", "lenet5_half", "resnet", "cnn1d", "ResNet"]


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the zoo model ``name`` with keyword arguments; unknown names list the known ones."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
    try:
        return ZOO[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"zoo model {name!r} rejects arguments {kwargs}: {exc}") from exc
