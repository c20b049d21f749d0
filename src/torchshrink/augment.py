"""Training-time input augmentation shared by every stage that trains (one mechanism).

* Random shifts: each sample moves by up to ``shift`` pixels along its spatial axes (zeros fill in).
* Mixup (Zhang et al. 2018): each sample is blended with another sample of the batch,
  ``lam * x_i + (1 - lam) * x_j`` with ``lam ~ Beta(mixup, mixup)`` per sample, and its target becomes
  the same blend of the two one-hot labels (a class distribution, which ``F.cross_entropy`` takes).

Randomness comes from torch's global generator, which the training loop seeds and checkpoints, so
augmented runs stay deterministic and resumable. Under ``torchrun`` every rank seeds it alike (so
runs without randomness match one process exactly): the ranks draw the same offsets and weights for
their different samples. Distillation feeds the teacher the very same view
the student sees ("consistent teaching"; with mixup, Beyer et al. 2022's "function matching").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

__all__ = ["AugmentConfig", "shiftable", "natural_shift", "random_shift", "mixup", "augment_batch"]


class AugmentConfig(BaseModel, extra="forbid"):
    """Augmentation of training inputs (off by default)."""

    shift: int = Field(0, ge=0, le=8, description="random shift of up to this many pixels per spatial axis")
    mixup: float = Field(
        0.0, ge=0, description="mixup: blend weights ~ Beta(mixup, mixup); 1.0 draws them uniformly; 0: off"
    )

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.mixup > 0


def shiftable(sample_shape: tuple[int, ...]) -> bool:
    """Whether one sample of this shape is an image (C, H, W) or a signal (C, L) that shifts apply to."""
    return len(sample_shape) in (2, 3) and min(sample_shape[1:]) >= 4


def natural_shift(sample_shape: tuple[int, ...]) -> int:
    """A shift as large, relative to the input's extent, as 2 pixels on a 28x28 digit (Hinton et al.'s
    and B4's setting): 1 on 8x8 digits, 3 on a 40-sample signal."""
    return max(1, round(2 * min(sample_shape[1:]) / 28))


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Shift each sample of ``x`` (N, C, L) or (N, C, H, W) by a random integer offset in [-pixels, pixels]."""
    if pixels <= 0:
        return x
    spatial = x.shape[2:]
    if len(spatial) not in (1, 2):
        raise ValueError(f"random shifts need (N, C, L) or (N, C, H, W) inputs, got {tuple(x.shape)}")
    n = len(x)
    padded = F.pad(x, (pixels, pixels) * len(spatial))
    offsets = torch.randint(0, 2 * pixels + 1, (n, len(spatial)))
    batch = torch.arange(n)[:, None]
    if len(spatial) == 1:
        cols = offsets[:, :1] + torch.arange(spatial[0])  # (N, L)
        return _canonical(padded.permute(0, 2, 1)[batch, cols].permute(0, 2, 1))
    rows = offsets[:, 0:1] + torch.arange(spatial[0])  # (N, H)
    cols = offsets[:, 1:2] + torch.arange(spatial[1])  # (N, W)
    moved = padded.permute(0, 2, 3, 1)[batch[:, :, None], rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return _canonical(moved.permute(0, 3, 1, 2))


def _canonical(x: torch.Tensor) -> torch.Tensor:
    """A copy with plain row-major strides. ``contiguous()`` is not enough: with one channel it keeps
    the permuted stride of the size-1 axis, and torch 2.13's CPU conv backward then corrupts the heap."""
    return x.clone(memory_format=torch.contiguous_format)


def mixup(
    x: torch.Tensor, labels: torch.Tensor, concentration: float, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend every sample with a random partner of the batch; return the inputs and the blended label
    distributions (float32). ``labels`` are class indices (N,) or distributions (N, num_classes)."""
    if not x.is_floating_point():
        raise ValueError(f"mixup blends inputs, which must be floating point; got {x.dtype}")
    if labels.dim() == 1:
        targets = F.one_hot(labels, num_classes).float()
    elif labels.shape[1:] == (num_classes,) and labels.is_floating_point():
        targets = labels.float()
    else:
        raise ValueError(
            f"mixup needs class indices (N,) or float distributions (N, {num_classes}); got "
            f"{labels.dtype} labels of shape {tuple(labels.shape)}"
        )
    n = len(x)
    # Drawn on the CPU from the global generator (seeded and checkpointed by the loop), then moved.
    lam = torch.distributions.Beta(concentration, concentration).sample((n,)).to(x.device)
    partner = torch.randperm(n).to(x.device)
    weight = lam.to(x.dtype).reshape(n, *([1] * (x.dim() - 1)))
    mixed = weight * x + (1 - weight) * x[partner]
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets[partner]


def augment_batch(
    x: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets augmented as ``cfg`` says: shifted, then mixed (targets become class
    distributions only under mixup; both are returned unchanged when augmentation is off)."""
    if not cfg.active:
        return x, labels
    if isinstance(x, (tuple, list)):
        raise ValueError(
            f"augmentation shifts and mixes one image or signal input; this model takes {len(x)} inputs: "
            "set augment off for it"
        )
    x = random_shift(x, cfg.shift)
    if cfg.mixup > 0:
        return mixup(x, labels, cfg.mixup, num_classes)
    return x, labels
