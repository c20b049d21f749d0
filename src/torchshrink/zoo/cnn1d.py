"""The 1-D CNN of the MNIST-1D paper (Greydanus 2020): three strided convs and a linear head."""

from __future__ import annotations

from torch import nn


def cnn1d(num_classes: int = 10, in_channels: int = 1, length: int = 40, channels: int = 25) -> nn.Sequential:
    """Conv1d(5, stride 2) -> Conv1d(3, stride 2) -> Conv1d(3, stride 2) -> Linear, ReLU between."""
    out_len = length
    for kernel in (5, 3, 3):
        out_len = (out_len + 2 - kernel) // 2 + 1
    return nn.Sequential(
        nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * out_len, num_classes),
    )
