"""The held-out share of the training split a search judges on, and the check that the given model
did not learn it."""

from __future__ import annotations

import dataclasses
import math

import torch

from torchshrink.data import DatasetBundle
from torchshrink.errors import TrainingError
from torchshrink.inputs import samples, take

__all__ = ["held_out_split", "seen_in_training"]


def held_out_split(data: DatasetBundle, fraction: float, seed: int) -> DatasetBundle:
    """The data with a seeded ``fraction`` of the training split moved out as its "test" split (the
    training split keeps the rest). The same data, fraction and seed give the same share, so a model
    can be trained on the rest beforehand (B8 does)."""
    train = data.train
    if not hasattr(train, "tensors"):
        raise TrainingError("search: the training split must be in-memory tensors to keep a held-out share")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    cut = int(round(fraction * len(train)))
    if cut < 1 or cut >= len(train):
        raise TrainingError(
            f"search.holdout {fraction} leaves no held-out or no training sample of {len(train)}"
        )
    rest, held_out = (samples(*(take(t, idx) for t in train.tensors)) for idx in (order[cut:], order[:cut]))
    return dataclasses.replace(data, train=rest, test=held_out)


def seen_in_training(held_out: float, test: float, held_out_samples: int, test_samples: int) -> bool:
    """Whether a model's accuracy on the held-out share is so far above its test accuracy that it must
    have trained on those points: more than 1 point and three standard errors of the difference."""
    spread = math.sqrt(
        held_out * (1 - held_out) / max(held_out_samples, 1) + test * (1 - test) / max(test_samples, 1)
    )
    return held_out - test > max(0.01, 3 * spread)
