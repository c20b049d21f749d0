"""Importance criteria: how much each weight, and each channel group, matters.

Every criterion produces per-element scores for the model's tensors; an :class:`Importance` is
then a callable ``group -> scores`` (one score per channel of a structured group), and
``elements(name)`` gives the per-weight scores that unstructured pruning ranks. Low scores go first.

* ``magnitude``: |w| (L1) or w^2 (L2). Cheap, data-free, the classic baseline.
* ``taylor``: mean over batches of |w * dL/dw| (first-order Taylor estimate of the loss change).
* ``snip``: |w * mean dL/dw| normalised to sum 1 (connection sensitivity, Lee et al. 2019);
  meaningful at initialisation as well as after training.
* ``entropy``: information carried by each input channel / neuron: the Shannon entropy of its
  activation histogram over calibration data. A weight scores |w| times the entropy of its input;
  a channel scores the entropy of its activation as the next layers see it.
* ``random``: uniform random scores, the control.
* ``bn_scale``: |gamma| of the batch-norm layers in the group (network slimming, Liu et al. 2017).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from torchshrink.inputs import ModelInput, call
from torchshrink.modes import switched
from torchshrink.pruning.graph import Group
from torchshrink.train import task_loss

Batches = Sequence[tuple[ModelInput, torch.Tensor]]
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ENTROPY_BINS = 32

__all__ = ["Criterion", "Importance", "IMPORTANCE", "make_importance", "channel_entropy"]


def _per_position(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum scores over every axis but ``dim``: one value per position along ``dim``."""
    moved = scores.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).sum(1)


class Importance:
    """Per-element scores of a model's tensors, usable per weight and per channel group."""

    def __init__(self, scores: dict[str, torch.Tensor], name: str) -> None:
        self.scores = scores
        self.name = name

    def elements(self, tensor_name: str) -> torch.Tensor:
        """Per-weight scores of one tensor (same shape)."""
        return self.scores[tensor_name]

    def __call__(self, group: Group) -> torch.Tensor:
        """One score per channel of ``group``: the sum over every member slice it owns."""
        total = torch.zeros(group.size, dtype=torch.float64)
        for member in group.members:
            scores = self.scores.get(member.name)
            if scores is None:
                continue
            per_pos = _per_position(scores.double(), member.dim)
            total += per_pos[member.index].sum(1)
        return total


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def magnitude(model: nn.Module, norm: str = "l1") -> Importance:
    power = 1 if norm == "l1" else 2
    return Importance({n: t.abs().pow(power) for n, t in _named_tensors(model).items()}, f"magnitude-{norm}")


def random_scores(model: nn.Module, seed: int = 0) -> Importance:
    gen = torch.Generator().manual_seed(seed)
    return Importance(
        {n: torch.rand(t.shape, generator=gen) for n, t in _named_tensors(model).items()}, "random"
    )


def bn_scale(model: nn.Module) -> Importance:
    scores = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            scores[f"{name}.weight" if name else "weight"] = module.weight.detach().abs()
    return Importance(scores, "bn_scale")


def _gradients(model: nn.Module, batches: Batches) -> list[dict[str, torch.Tensor]]:
    """Per-batch gradients of the task loss (cross-entropy, or cosine distance to an embedding
    model's target vectors); the model's weights are not changed."""
    grads = []
    with switched(model):
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            task_loss(call(model, x), y).backward()
            grads.append(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            )
    model.zero_grad(set_to_none=True)
    return grads


def taylor(model: nn.Module, batches: Batches) -> Importance:
    weights = _named_tensors(model)
    grads = _gradients(model, batches)
    scores = {n: sum((weights[n] * g[n]).abs() for g in grads) / len(grads) for n in grads[0]}
    return Importance(scores, "taylor")


def snip(model: nn.Module, batches: Batches) -> Importance:
    weights = _named_tensors(model)
    grads = _gradients(model, batches)
    saliency = {n: (weights[n] * (sum(g[n] for g in grads) / len(grads))).abs() for n in grads[0]}
    total = sum(float(s.sum()) for s in saliency.values()) or 1.0
    return Importance({n: s / total for n, s in saliency.items()}, "snip")


def channel_entropy(values: torch.Tensor, dim: int, bins: int = ENTROPY_BINS) -> torch.Tensor:
    """Shannon entropy (nats) of each channel's value histogram; a constant channel has 0."""
    per_channel = values.movedim(dim, 0).reshape(values.shape[dim], -1).double()
    lo = per_channel.min(1, keepdim=True).values
    hi = per_channel.max(1, keepdim=True).values
    scaled = (per_channel - lo) / (hi - lo).clamp_min(1e-12)
    idx = (scaled * bins).long().clamp(0, bins - 1)
    counts = torch.zeros(per_channel.shape[0], bins, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(scaled)
    )
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-300))).sum(1)


class EntropyImportance(Importance):
    """Entropy of every layer's input channels, measured with forward hooks on calibration data."""

    def __init__(self, model: nn.Module, batches: Batches) -> None:
        inputs: dict[str, list[torch.Tensor]] = {}
        hooks = []
        for name, module in model.named_modules():
            if isinstance(module, _LAYERS):
                hooks.append(
                    module.register_forward_pre_hook(
                        lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0].detach())
                    )
                )
        try:
            with switched(model), torch.no_grad():
                for x, _ in batches:
                    call(model, x)
        finally:
            for h in hooks:
                h.remove()
        self.input_entropy: dict[str, torch.Tensor] = {}
        for name, chunks in inputs.items():
            values = torch.cat(chunks)
            module = model.get_submodule(name)
            dim = 1 if not isinstance(module, nn.Linear) else values.dim() - 1
            self.input_entropy[name] = channel_entropy(values, dim).float()
        scores = {}
        for name, module in model.named_modules():
            if name in self.input_entropy:
                w = module.weight.detach()
                h = self.input_entropy[name]
                groups = 1 if isinstance(module, nn.Linear) else module.groups
                # filter o of a grouped conv reads the input channels of its own group
                per_filter = h.reshape(groups, -1).repeat_interleave(w.shape[0] // groups, dim=0)
                scores[f"{name}.weight"] = w.abs() * per_filter.reshape(
                    *per_filter.shape, *([1] * (w.dim() - 2))
                )
        super().__init__(scores, "entropy")

    def __call__(self, group: Group) -> torch.Tensor:
        """Mean entropy of each channel as its consumers receive it (after activations)."""
        total = torch.zeros(group.size, dtype=torch.float64)
        seen = 0
        for member in group.members:
            if member.role == "in" and member.module_name in self.input_entropy:
                h = self.input_entropy[member.module_name].double()
                total += h[member.index].mean(1)
                seen += 1
        return total / max(seen, 1)


@dataclass(frozen=True)
class Criterion:
    """A registered importance criterion: how to score a model, and whether it needs calibration data."""

    score: Callable[[nn.Module, Batches, str, int], Importance]  # (model, batches, norm, seed)
    needs_data: bool


IMPORTANCE: dict[str, Criterion] = {
    "magnitude": Criterion(lambda model, batches, norm, seed: magnitude(model, norm), needs_data=False),
    "taylor": Criterion(lambda model, batches, norm, seed: taylor(model, batches), needs_data=True),
    "snip": Criterion(lambda model, batches, norm, seed: snip(model, batches), needs_data=True),
    "entropy": Criterion(
        lambda model, batches, norm, seed: EntropyImportance(model, batches), needs_data=True
    ),
    "random": Criterion(lambda model, batches, norm, seed: random_scores(model, seed), needs_data=False),
    "bn_scale": Criterion(lambda model, batches, norm, seed: bn_scale(model), needs_data=False),
}
"""The one list of criteria: the prune config's ``importance`` names exactly these (a test checks)."""


def make_importance(
    kind: str, model: nn.Module, batches: Batches, norm: str = "l1", seed: int = 0
) -> Importance:
    """Compute the scores of criterion ``kind`` for ``model`` (``batches``: labelled calibration data)."""
    return IMPORTANCE[kind].score(model, batches, norm, seed)
