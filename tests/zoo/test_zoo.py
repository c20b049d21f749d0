"""The reference model zoo: exact sizes, output shapes, ResNet structure, and build() errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchshrink.errors import ModelLoadError
from torchshrink.zoo import ZOO, ResNet, build, cnn1d, lenet5, lenet5_half, lenet300, resnet
from torchshrink.zoo.resnet import BasicBlock


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet300_param_count() -> None:
    assert _params(lenet300()) == 266_610


def test_lenet5_param_count() -> None:
    assert _params(lenet5()) == 431_080


def test_lenet5_half_has_half_the_channels_and_units() -> None:
    full, half = lenet5(), lenet5_half()
    full_convs = [m for m in full if isinstance(m, nn.Conv2d)]
    half_convs = [m for m in half if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in full_convs] == [20, 50]
    assert [c.out_channels for c in half_convs] == [10, 25]
    assert half_convs[1].in_channels == 10
    full_fcs = [m for m in full if isinstance(m, nn.Linear)]
    half_fcs = [m for m in half if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in full_fcs] == [(800, 500), (500, 10)]
    assert [(f.in_features, f.out_features) for f in half_fcs] == [(400, 250), (250, 10)]
    # conv1 260 + conv2 6,275 + fc 100,250 + fc 2,510
    assert _params(half) == 10 * 25 + 10 + 25 * 10 * 25 + 25 + 400 * 250 + 250 + 250 * 10 + 10


@pytest.mark.parametrize("factory", [lenet300, lenet5, lenet5_half])
@pytest.mark.parametrize("batch", [1, 3])
def test_lenet_output_shapes(factory, batch: int) -> None:
    model = factory().eval()
    out = model(torch.randn(batch, 1, 28, 28))
    assert out.shape == (batch, 10)
    assert torch.isfinite(out).all()


def test_num_classes_argument() -> None:
    x = torch.randn(2, 1, 28, 28)
    assert lenet5(num_classes=3)(x).shape == (2, 3)
    assert lenet300(num_classes=4)(x).shape == (2, 4)
    assert resnet(num_classes=5).eval()(x).shape == (2, 5)


def test_resnet_on_grayscale_28() -> None:
    model = resnet().eval()
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_resnet_on_rgb_32() -> None:
    model = resnet(in_channels=3).eval()
    assert model.stem[0].in_channels == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 1, 32, 32))


def test_resnet_depth_sets_block_count() -> None:
    def blocks(model: nn.Module) -> int:
        return sum(isinstance(m, BasicBlock) for m in model.modules())

    r8, r14, r20 = resnet(depth=8), resnet(depth=14), resnet(depth=20)
    assert (blocks(r8), blocks(r14), blocks(r20)) == (3, 6, 9)
    assert _params(r8) < _params(r14) < _params(r20)
    assert r14.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("depth", [10, 2, 7, 0])
def test_resnet_invalid_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"6n\+2 .*got {depth}$"):
        resnet(depth=depth)


def test_resnet_width_and_batchnorm() -> None:
    model = resnet(width=8)
    assert isinstance(model, ResNet)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert model.fc.in_features == 32  # 4 * width
    # with a stage-width 8/16/32 and depth 8: stem bn + 2 per block + 1 per projection shortcut
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 3 * 2 + 2


def test_resnet_shortcuts_project_only_where_the_shape_changes() -> None:
    model = resnet(depth=8, width=16)
    first, second, third = list(model.layers)
    assert isinstance(first.shortcut, nn.Identity)  # 16 -> 16, stride 1
    for block, (cin, cout) in ((second, (16, 32)), (third, (32, 64))):
        conv, bn = block.shortcut
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert (conv.in_channels, conv.out_channels) == (cin, cout)


def test_basic_block_adds_identity_shortcut() -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    out = block(x)
    assert torch.allclose(out, torch.relu(main + x), atol=1e-6)
    assert not torch.allclose(out, torch.relu(main), atol=1e-3)  # the residual matters


def test_basic_block_adds_projection_shortcut() -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 6, 6)
    out = block(x)
    assert out.shape == (2, 8, 3, 3)
    main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
    assert torch.allclose(out, torch.relu(main + block.shortcut(x)), atol=1e-6)
    # changing the shortcut's weights changes the block's output
    with torch.no_grad():
        block.shortcut[0].weight.mul_(-1.0)
    assert not torch.allclose(block(x), out, atol=1e-3)


@pytest.mark.parametrize("batch", [1, 4])
def test_cnn1d_output_shape(batch: int) -> None:
    model = cnn1d()
    out = model(torch.randn(batch, 1, 40))
    assert out.shape == (batch, 10)
    assert model[-1].in_features == 25 * 5  # 40 -> 19 -> 10 -> 5 after three stride-2 convs


def test_cnn1d_other_length() -> None:
    model = cnn1d(num_classes=4, length=64, channels=8)
    assert model(torch.randn(2, 1, 64)).shape == (2, 4)


def test_build_matches_direct_construction() -> None:
    assert set(ZOO) == {"lenet300", "lenet5", "lenet5_half", "resnet", "cnn1d"}
    model = build("lenet5", num_classes=3)
    assert _params(model) == _params(lenet5(num_classes=3))
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    assert sum(isinstance(m, BasicBlock) for m in build("resnet", depth=14).modules()) == 6


def test_build_unknown_name_lists_known_names() -> None:
    with pytest.raises(ModelLoadError, match="'vgg16'") as excinfo:
        build("vgg16")
    for name in ZOO:
        assert name in str(excinfo.value)


def test_build_bad_kwargs() -> None:
    with pytest.raises(ModelLoadError, match="'lenet5'") as excinfo:
        build("lenet5", depth=3)
    assert "depth" in str(excinfo.value)


def test_bad_argument_values_are_model_load_errors():
    with pytest.raises(ModelLoadError, match=r"'resnet' rejects arguments \{'depth': 10\}.*6n\+2"):
        build("resnet", depth=10)
