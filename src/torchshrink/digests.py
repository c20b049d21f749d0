"""Content hashes of models, data and settings: what keys a checkpoint to the exact inputs that made it,
so that ``--resume`` reuses a file only when everything that determined it is unchanged."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["combine", "model_digest", "tensors_digest"]

_DIGEST_CHARS = 16


def _feed_tensor(h: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors: names, dtypes, shapes and bytes (order-independent for a mapping)."""
    items = sorted(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    h = hashlib.sha256()
    for name, tensor in items:
        _feed_tensor(h, name, tensor)
    return h.hexdigest()[:_DIGEST_CHARS]


def model_digest(model: nn.Module, architecture: Mapping[str, object] | None) -> str:
    """A hash of a model's weights and buffers and of the architecture it is rebuilt from."""
    return combine(
        json.dumps(architecture or {}, sort_keys=True, default=str), tensors_digest(model.state_dict())
    )


def combine(*parts: str) -> str:
    """One hash of several (order matters)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:_DIGEST_CHARS]
