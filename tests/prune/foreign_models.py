"""Architectures torchshrink did not write: Hugging Face models built from configs (random weights).

Factories for the structured-pruning tests; importable as ``foreign_models:NAME`` so a pruned copy
can be saved and rebuilt through the factory + recorded layer shapes.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelLogits(nn.Module):
    """Calls a Hugging Face image classifier on ``pixel_values`` and returns its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )
    return PixelLogits(ResNetForImageClassification(config)).eval()


def hf_mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    config = MobileNetV2Config(
        num_channels=1, image_size=28, depth_multiplier=0.35, tf_padding=False, num_labels=10
    )
    return PixelLogits(MobileNetV2ForImageClassification(config)).eval()


def hf_mobilenet_v2_tf() -> nn.Module:
    """MobileNetV2 as its checkpoints ship: TensorFlow "same" padding computed from input shapes."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    config = MobileNetV2Config(num_channels=1, image_size=28, depth_multiplier=0.35, num_labels=10)
    return PixelLogits(MobileNetV2ForImageClassification(config)).eval()


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=28,
        patch_size=7,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
        attn_implementation="eager",
    )
    return PixelLogits(ViTForImageClassification(config)).eval()


class BertMLP(nn.Module):
    """Hugging Face BERT's feed-forward block: intermediate (Linear + GELU) and output (Linear + residual + LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        torch.manual_seed(0)
        config = BertConfig(hidden_size=32, intermediate_size=128)
        self.intermediate, self.output = BertIntermediate(config), BertOutput(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(hidden), hidden)


def hf_bert_mlp() -> nn.Module:
    return BertMLP().eval()
