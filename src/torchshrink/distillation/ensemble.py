"""Ensembles: several models combined into one module, evaluated and distilled like any model.

Combination rules (the output is always logits-like, so ``argmax`` is the prediction and
``softmax`` the probabilities):

* ``mean_logits``: the mean of the members' logits;
* ``mean_probs``: log of the mean of their softmax probabilities;
* ``weighted``: log of a weighted mean of probabilities, the weights fit on held-out data
  (:func:`fit_weights`, minimum negative log-likelihood);
* ``vote``: log of the vote shares (majority vote), ties broken by the mean probability.

An ensemble saves and loads like other models: its architecture reference is
``{"ensemble": {"members": [member references], "combine": rule}}`` and the weights live in the
state_dict (``members.<i>.*`` and ``weights``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.measure import predict
from torchshrink.registry import register_architecture_builder

__all__ = ["Combine", "COMBINE_RULES", "Ensemble", "fit_weights", "ensemble_architecture"]

log = logging.getLogger(__name__)

Combine = Literal["mean_logits", "mean_probs", "weighted", "vote"]
COMBINE_RULES: tuple[str, ...] = get_args(Combine)
_TIE_BREAK = 1e-3  # weight of the mean probability added to vote shares (breaks ties only)


class Ensemble(nn.Module):
    """Members run side by side; their outputs are combined by ``combine`` (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        combine: Combine = "mean_logits",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        if combine not in COMBINE_RULES:
            raise ValueError(f"unknown combine rule {combine!r}; known: {', '.join(COMBINE_RULES)}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        n = len(members)
        w = torch.full((n,), 1.0 / n) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (n,):
            raise ValueError(f"{n} members need {n} weights, got {tuple(w.shape)}")
        self.register_buffer("weights", w)

    def member_logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Every member's logits, stacked: (members, batch, classes)."""
        return torch.stack([m(*inputs) for m in self.members])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.member_logits(*inputs), self.combine, self.weights)


def combine_logits(logits: torch.Tensor, combine: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Combine stacked member logits (members, batch, classes) by ``combine``."""
    if combine == "mean_logits":
        return logits.mean(0)
    probs = F.softmax(logits, dim=-1)
    if combine == "mean_probs":
        return probs.mean(0).clamp_min(1e-12).log()
    if combine == "weighted":
        assert weights is not None
        w = weights / weights.sum()
        return (w[:, None, None] * probs).sum(0).clamp_min(1e-12).log()
    if combine == "vote":
        votes = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype).mean(0)
        shares = votes + _TIE_BREAK * probs.mean(0)
        return (shares / shares.sum(-1, keepdim=True)).log()
    raise ValueError(f"unknown combine rule {combine!r}; known: {', '.join(COMBINE_RULES)}")


def fit_weights(
    ensemble: Ensemble, inputs: torch.Tensor, labels: torch.Tensor, steps: int = 300
) -> torch.Tensor:
    """Weights (non-negative, summing to 1) that minimise the held-out NLL of the weighted mean probability.

    Stored in ``ensemble.weights`` and returned. A convex problem in the mixture weights; solved with
    Adam on softmax-parametrised weights (deterministic, a few hundred steps on cached probabilities).
    """
    probs = F.softmax(torch.stack([predict(m, inputs) for m in ensemble.members]), dim=-1)  # (members, n, K)
    picked = probs[:, torch.arange(len(labels)), labels].T  # (n, members): each member's prob of the truth
    theta = torch.zeros(probs.shape[0], requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        nll = -(picked @ F.softmax(theta, 0)).clamp_min(1e-12).log().mean()
        nll.backward()
        optimizer.step()
    weights = F.softmax(theta.detach(), 0)
    ensemble.weights.copy_(weights)
    log.info(
        "ensemble weights fit on %d held-out samples: %s", len(labels), [round(float(w), 3) for w in weights]
    )
    return weights


def ensemble_architecture(members: Sequence[dict[str, Any] | None], combine: str) -> dict[str, Any] | None:
    """The architecture reference of an ensemble (None if a member has none: it cannot be rebuilt)."""
    if any(m is None for m in members):
        return None
    return {"ensemble": {"members": list(members), "combine": combine}}


@register_architecture_builder("ensemble")
def build_ensemble(reference: dict[str, Any], build_member) -> Ensemble:
    """An untrained ensemble from its architecture reference; ``build_member`` builds one member's."""
    spec = reference["ensemble"]
    return Ensemble([build_member(m) for m in spec["members"]], spec["combine"])
