"""Pick the best of several data-free restarts without a real input.

Data-free students vary by several points between seeds (B5). With ``restarts: N`` the ``datafree``
stage trains N generator-student pairs and keeps one. No real training input may decide which, so
each student is scored on what the *other* restarts' generators make: the share of those samples on
which it gives the teacher's top-1 class. A student is not scored on its own generator's samples,
which it was trained on (and an adversarial generator makes exactly what its own student gets
wrong). With a single restart there is nothing to pick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchshrink.modes import switched

__all__ = ["Draw", "cross_agreement", "pick_restart"]

Draw = Callable[[int, int], torch.Tensor]
"""``draw(n, seed)``: ``n`` generated inputs of one restart, the same for the same seed."""


@torch.no_grad()
def cross_agreement(
    students: Sequence[nn.Module], draws: Sequence[Draw], teacher: nn.Module, samples: int, seed: int
) -> list[float]:
    """Per student, its top-1 agreement with the teacher on ``samples`` inputs of every other
    restart's generator (the mean over those generators)."""
    if len(students) != len(draws) or len(students) < 2:
        raise ValueError("cross_agreement needs one generator per student and at least two restarts")
    device = next(teacher.parameters()).device
    checks = []
    with switched(teacher):
        for j, draw in enumerate(draws):
            inputs = draw(samples, seed + j).to(device)
            checks.append((inputs, teacher(inputs).argmax(1)))
    scores = []
    for k, student in enumerate(students):
        with switched(student):
            agree = [
                float((student(inputs).argmax(1) == labels).float().mean())
                for j, (inputs, labels) in enumerate(checks)
                if j != k
            ]
        scores.append(sum(agree) / len(agree))
    return scores


def pick_restart(scores: Sequence[float]) -> int:
    """The restart with the highest score (the first of equals: the lowest seed)."""
    return max(range(len(scores)), key=lambda k: (scores[k], -k))
