"""A model written the way TensorFlow-born PyTorch ports are (EfficientNet, MobileNet): convolutions
as ``nn.Conv2d`` subclasses from outside ``torch.nn`` that pad themselves ("same" padding, asymmetric
at stride 2), batch-norm and ReLU6 after each, depthwise blocks with a residual add."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SamePadConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" padding fixed at construction (for ``image_size``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        image_size: int = 16,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        out = math.ceil(image_size / stride)
        total = max((out - 1) * stride + kernel_size - image_size, 0)
        self.pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.pad(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class _Block(nn.Module):
    def __init__(self, channels: int, image_size: int) -> None:
        super().__init__()
        self.expand = SamePadConv2d(channels, channels * 2, 1, image_size=image_size, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * 2)
        self.depthwise = SamePadConv2d(
            channels * 2, channels * 2, 3, groups=channels * 2, image_size=image_size, bias=False
        )
        self.bn1 = nn.BatchNorm2d(channels * 2)
        self.project = SamePadConv2d(channels * 2, channels, 1, image_size=image_size, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn0(self.expand(x)))
        y = self.act(self.bn1(self.depthwise(y)))
        return self.bn2(self.project(y)) + x


class SamePadNet(nn.Module):
    """3x16x16 images -> 10 classes; a stride-2 "same" stem (asymmetric pads), two residual blocks."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = SamePadConv2d(3, width, 3, stride=2, image_size=16, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.act = nn.ReLU6()
        self.blocks = nn.Sequential(_Block(width, 8), _Block(width, 8))
        self.head = SamePadConv2d(width, 4 * width, 1, image_size=8, bias=False)
        self.bn_head = nn.BatchNorm2d(4 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.blocks(x)
        x = self.act(self.bn_head(self.head(x)))
        return self.fc(self.pool(x).flatten(1))


def same_pad_net(width: int = 8, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return SamePadNet(width, num_classes).eval()
