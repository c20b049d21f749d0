"""Weight sharing (Deep Compression, Han et al. 2016): each layer's surviving weights become indices
into a small codebook of 2^b centroids found by k-means, and the centroids are fine-tuned.

A shared layer's weight is a torch parametrization ``weight = where(mask, codebook[indices], 0)``:
the codebook is the only trainable tensor, so the training loop's gradient of a centroid is the sum
of the gradients of every weight that shares it (the paper's centroid update), and pruned weights
(mask False) stay exactly zero. :func:`plain_state_dict` gives the dense weights a plain model loads.

k-means is one-dimensional here, so it is done exactly with sorted centroids: a weight belongs to
the centroid whose midpoint interval holds it (``bucketize``), O(n log k) per Lloyd iteration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "MAX_BITS",
    "InitName",
    "kmeans_1d",
    "SharedWeight",
    "share_weights",
    "shared_layers",
    "codebook_of",
    "plain_state_dict",
]

log = logging.getLogger(__name__)

MAX_BITS = 8  # indices are stored as uint8
InitName = Literal["linear", "density", "random"]


def _initial_centroids(values: torch.Tensor, k: int, init: InitName, seed: int) -> torch.Tensor:
    """Linear (evenly spaced over [min, max], the paper's best), density (quantiles) or random (Forgy)."""
    if init == "linear":
        return torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    if init == "density":
        return torch.quantile(values, torch.linspace(0, 1, k, dtype=torch.float64))
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (k,), generator=generator)
    return values[picks].sort().values


def kmeans_1d(
    values: torch.Tensor, k: int, init: InitName = "linear", iterations: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a 1-D tensor: (sorted centroids float64 [k], assignment of each value int64).

    A centroid that loses all its values keeps its place (it costs nothing and may win values back).
    """
    if values.numel() == 0:
        return torch.zeros(k, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    if k < 1:
        raise ValueError(f"k-means needs at least one centroid, got k={k}")
    x = values.detach().reshape(-1).to(torch.float64)
    centroids = _initial_centroids(x, k, init, seed)
    assign = None
    for _ in range(iterations):
        centroids = centroids.sort().values
        new_assign = torch.bucketize(x, (centroids[1:] + centroids[:-1]) / 2)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(torch.float64)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    assert assign is not None
    return centroids, assign


class SharedWeight(nn.Module):
    """Parametrization ``codebook -> where(mask, codebook[indices], 0)``; the stored original is the codebook."""

    def __init__(self, indices: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.register_buffer("indices", indices.to(torch.uint8))
        self.register_buffer("mask", mask.to(torch.bool))
        self.bits = bits
        self._initial_codebook: torch.Tensor | None = codebook

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=codebook.dtype, device=codebook.device)
        return torch.where(self.mask, codebook[self.indices.long()], zero)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """What torch stores as ``parametrizations.weight.original``: the codebook, not the dense weight."""
        if self._initial_codebook is None:
            raise RuntimeError(
                "a shared weight's codebook is set once; train it instead of assigning the weight"
            )
        codebook, self._initial_codebook = self._initial_codebook, None
        return codebook.to(weight.dtype)


def share_weights(
    model: nn.Module,
    bits: Mapping[str, int],
    init: InitName = "linear",
    iterations: int = 50,
    seed: int = 0,
) -> dict[str, SharedWeight]:
    """Replace the weight of each layer named in ``bits`` by 2^b shared centroids (in place).

    Only non-zero weights are clustered and they stay the only non-zero ones (pruned weights keep
    their zeros). Returns the parametrizations by layer name.
    """
    modules = dict(model.named_modules())
    out = {}
    for name, b in bits.items():
        if not 1 <= b <= MAX_BITS:
            raise ValueError(f"layer {name!r}: weight sharing takes 1 to {MAX_BITS} bits, got {b}")
        layer = modules.get(name)
        if layer is None or not isinstance(getattr(layer, "weight", None), torch.Tensor):
            raise ValueError(f"layer {name!r} has no weight to share")
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(
                f"layer {name!r}: its weight is already parametrized (shared or quantized); "
                "weight sharing needs a plain float weight"
            )
        weight = layer.weight.detach()
        mask = weight != 0
        centroids, assign = kmeans_1d(weight[mask], 2**b, init=init, iterations=iterations, seed=seed)
        indices = torch.zeros(weight.shape, dtype=torch.uint8)
        indices[mask] = assign.to(torch.uint8)
        shared = SharedWeight(indices, mask, centroids.to(weight.dtype), b)
        parametrize.register_parametrization(layer, "weight", shared, unsafe=True)
        out[name] = shared
        error = (layer.weight.detach() - weight).pow(2).mean().sqrt()
        log.debug("%s: %d weights -> %d centroids, rms error %.2e", name, int(mask.sum()), 2**b, error)
    return out


def shared_layers(model: nn.Module) -> dict[str, SharedWeight]:
    """The shared-weight parametrizations of ``model`` by layer name."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SharedWeight):
                    out[name] = p
    return out


def codebook_of(model: nn.Module, layer: str) -> torch.Tensor:
    """The trainable centroids of a shared layer."""
    return dict(model.named_modules())[layer].parametrizations.weight.original


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of the plain model: shared weights as dense ``codebook[indices]`` (or 0) tensors.

    (Computed, not by removing the parametrizations: that changes the model, and on a deep copy it
    breaks the original too, because torch's parametrized copies share their generated class.)
    """
    shared = shared_layers(model)
    modules = dict(model.named_modules())
    out = {}
    for key, tensor in model.state_dict().items():
        head, found, rest = key.partition("parametrizations.weight.")
        layer = head.removesuffix(".")
        if found and (head == "" or head.endswith(".")) and layer in shared:
            if rest == "original":
                out[f"{layer}.weight" if layer else "weight"] = modules[layer].weight.detach().clone()
            continue
        out[key] = tensor
    return out
