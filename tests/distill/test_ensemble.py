"""Ensembles: each combine rule by hand, weights fit on held-out data, saving and loading, bagging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink.distillation.ensemble import Ensemble, ensemble_architecture, fit_weights
from torchshrink.distillation.ensemble_stage import bootstrap, split_holdout
from torchshrink.models import build_architecture, open_model, save_model


class Fixed(nn.Module):
    """A 'model' that returns the same logits for every input (one row per sample)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


A, B, C = [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0]
X = torch.zeros(2, 1)


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(a) for a in v]
    return [a / sum(e) for a in e]


def test_mean_logits_and_mean_probs() -> None:
    members = [Fixed(A), Fixed(B), Fixed(C)]
    assert torch.allclose(Ensemble(members, "mean_logits")(X)[0], torch.tensor([2 / 3, 4 / 3, 0.0]))
    probs = [sum(p) / 3 for p in zip(_softmax(A), _softmax(B), _softmax(C), strict=True)]
    out = Ensemble(members, "mean_probs")(X)[0]
    assert torch.allclose(out.exp(), torch.tensor(probs), atol=1e-6)


def test_weighted_and_vote() -> None:
    members = [Fixed(A), Fixed(B), Fixed(C)]
    weighted = Ensemble(members, "weighted", weights=[0.5, 0.25, 0.25])(X)[0].exp()
    expected = [
        0.5 * a + 0.25 * b + 0.25 * c for a, b, c in zip(_softmax(A), _softmax(B), _softmax(C), strict=True)
    ]
    assert torch.allclose(weighted, torch.tensor(expected), atol=1e-6)
    # votes: class 0 once, class 1 twice -> shares (1/3, 2/3, 0) up to the tie-break
    vote = Ensemble(members, "vote")(X)[0].exp()
    assert torch.allclose(vote, torch.tensor([1 / 3, 2 / 3, 0.0]), atol=2e-3)
    assert vote.argmax() == 1
    # a tie (one vote each) goes to the class with the higher mean probability
    tie = Ensemble([Fixed([2.0, 0.0, 0.0]), Fixed([0.0, 5.0, 0.0])], "vote")(X)[0]
    assert tie.argmax() == 1


def test_fit_weights_prefers_the_accurate_member() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=gen)
    good = torch.nn.functional.one_hot(labels, 3).float() * 4  # right every time
    noise = torch.randn(300, 3, generator=gen)

    class Lookup(nn.Module):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("table", table)

        def forward(self, index: torch.Tensor) -> torch.Tensor:
            return self.table[index.long().squeeze(1)]

    ensemble = Ensemble([Lookup(good), Lookup(noise)], "weighted")
    weights = fit_weights(ensemble, torch.arange(300).unsqueeze(1), labels)
    assert weights[0] > 0.9 and weights.sum().item() == pytest.approx(1.0)
    assert torch.equal(ensemble.weights, weights)


def test_ensemble_saves_and_loads_like_any_model(tmp_path) -> None:
    torch.manual_seed(0)
    refs = [{"zoo": "lenet5_half", "kwargs": {}}, {"zoo": "lenet300", "kwargs": {}}]
    architecture = ensemble_architecture(refs, "weighted")
    ensemble = build_architecture(architecture)
    ensemble.weights.copy_(torch.tensor([0.3, 0.7]))
    save_model(tmp_path / "e.safetensors", ensemble, architecture, (1, 28, 28))
    loaded = open_model(tmp_path / "e.safetensors")
    x = torch.rand(3, 1, 28, 28)
    assert isinstance(loaded.module, Ensemble) and loaded.module.combine == "weighted"
    assert torch.equal(loaded.module(x), ensemble(x))
    assert (
        ensemble_architecture([refs[0], None], "vote") is None
    )  # a member without reference: not rebuildable


def test_split_holdout_and_bootstrap() -> None:
    data = TensorDataset(torch.arange(100).float().unsqueeze(1), torch.arange(100))
    rest, held = split_holdout(data, 0.1, seed=0)
    assert len(held) == 10 and len(rest) == 90
    assert set(held.tensors[1].tolist()).isdisjoint(rest.tensors[1].tolist())
    sample = bootstrap(data, seed=0)
    labels = sample.tensors[1].tolist()
    assert len(labels) == 100 and len(set(labels)) < 80  # with replacement: ~63% distinct
    assert torch.equal(sample.tensors[0].squeeze(1).long(), sample.tensors[1])  # pairs stay together
    assert not torch.equal(bootstrap(data, seed=1).tensors[1], sample.tensors[1])
