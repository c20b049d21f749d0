"""Helpers several test folders share (importable because pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Per-sample input shape of every zoo model in its default configuration.
ZOO_INPUTS: dict[str, tuple[int, ...]] = {
    "lenet300": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "lenet5_half": (1, 28, 28),
    "resnet": (1, 28, 28),
    "cnn1d": (1, 40),
}


# Small models for scikit-learn's 8x8 digits (1x8x8 inputs), used by the stage tests.
DIGITS_MLP: dict[str, Any] = {"zoo": "lenet300", "kwargs": {"in_features": 64}}
DIGITS_CNN: dict[str, Any] = {"zoo": "resnet", "kwargs": {"width": 8}}


def digits_recipe(*stages: dict, model: dict) -> dict[str, Any]:
    """A recipe on scikit-learn's digits with few latency repeats and PyTorch timing only: fast
    pipeline tests (files a stage ships are still timed on ONNX Runtime)."""
    return {
        "seed": 0,
        "model": model,
        "data": {"name": "digits"},
        "measure": {"latency_repeats": 3, "onnx_fp32": False},
        "stages": list(stages),
    }


def randomise_bn(model: nn.Module) -> nn.Module:
    """Give every batch-norm non-trivial statistics and affine parameters (as after training)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


# Transformer-like blocks whose LayerNorm has a few outlier channels (quantization's hard case).
class PreNormBlock(nn.Module):
    """x -> LayerNorm -> (fc_a, fc_b) -> GELU -> out, plus a residual: the LayerNorm feeds only linears
    (smoothing folds into it), ``out`` reads a GELU (smoothing needs an input scale)."""

    def __init__(self, width: int = 32, outliers: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc_a = nn.Linear(width, 2 * width)
        self.fc_b = nn.Linear(width, 2 * width)
        self.out = nn.Linear(2 * width, width)
        with torch.no_grad():  # a few channels far larger than the rest, as BERT's LayerNorms have
            self.norm.weight[:3] = outliers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.out(F.gelu(self.fc_a(h)) * self.fc_b(h))


class PostNormBlock(PreNormBlock):
    """The LayerNorm's output feeds the linears and the residual (post-LN BERT): no fold possible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.out(F.gelu(self.fc_a(h)) * self.fc_b(h))


def untimed(metrics: dict) -> dict:
    """A run's metrics without its timings (latency, speed-up): what a re-run must reproduce exactly."""
    return {k: v for k, v in metrics.items() if "latency" not in k and "speedup" not in k}
