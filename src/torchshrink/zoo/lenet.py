"""LeNet-300-100 and LeNet-5 (Caffe form), the reference models of the Deep Compression paper."""

from __future__ import annotations

from torch import nn


def lenet300(num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    """LeNet-300-100: 784-300-100-10 fully connected with ReLU (266,610 parameters)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def lenet5(
    num_classes: int = 10, in_channels: int = 1, conv1: int = 20, conv2: int = 50, fc: int = 500
) -> nn.Sequential:
    """LeNet-5 as in Caffe: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 (431,080 params).

    ReLU follows each layer but the last; for 28x28 inputs the flattened features are 50*4*4.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, conv1, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(conv1, conv2, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(conv2 * 4 * 4, fc),
        nn.ReLU(),
        nn.Linear(fc, num_classes),
    )


def lenet5_half(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """LeNet-5 with half the channels and units (10, 25, 250): the usual distillation student."""
    return lenet5(num_classes=num_classes, in_channels=in_channels, conv1=10, conv2=25, fc=250)
