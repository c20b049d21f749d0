"""Models torchshrink did not write: ``nn.Conv2d`` subclasses that pad themselves, quantized to int8
kernels end to end (no float convolution left behind a Pad) and structurally pruned."""

from __future__ import annotations

import onnx
import pytest
import torch
from same_padding import SamePadConv2d, same_pad_net
from testkit import randomise_bn
from torch import nn

from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.quantization.onnx_int8 import export_int8, int8_kernel_counts, needs_reduced_range
from torchshrink.quantization.prepare import QuantOptions, activation_quantizers
from torchshrink.quantization.ptq import quantize_model, uniform_plan
from torchshrink.tracing import torch_layer_type, trace_model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_a_conv_subclass_is_one_leaf_of_the_traced_graph(images) -> None:
    model = same_pad_net()
    assert torch_layer_type(model.stem) is nn.Conv2d and torch_layer_type(model) is None
    gm = trace_model(model, images[:2])
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"stem", "blocks.0.depthwise", "head"} <= called
    assert not any(t == "stem.pad" for t in called)  # the padding stays inside its conv


def test_zero_pads_merge_into_the_convolution_in_onnx(tmp_path, images) -> None:
    model = nn.Sequential(SamePadConv2d(3, 4, 3, stride=2, image_size=16), nn.ReLU()).eval()
    assert model[0].pad.padding == (0, 1, 0, 1)  # asymmetric: torch's Conv2d cannot express it
    path = tmp_path / "pad.onnx"
    diff = export_onnx(model, path, (3, 16, 16), check_inputs=images[:8])
    ops = _ops(path)
    assert "Pad" not in ops and ops.count("Conv") == 1 and diff < 1e-5
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
    pads = next(list(a.ints) for a in conv.attribute if a.name == "pads")
    assert pads == [0, 0, 1, 1]  # ONNX order: begins (H, W), then ends (H, W)


def test_a_nonzero_pad_is_not_merged(tmp_path, images) -> None:
    model = nn.Sequential(nn.ConstantPad2d(1, 0.5), nn.Conv2d(3, 4, 3)).eval()
    path = tmp_path / "pad.onnx"
    export_onnx(model, path, (3, 16, 16), check_inputs=images[:8])
    assert "Pad" in _ops(path)


def test_same_padding_model_runs_every_conv_on_int8_kernels(tmp_path, images) -> None:
    model = randomise_bn(same_pad_net())
    gm = quantize_model(
        model,
        images[:2],
        uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=True)),
        [images[:48]],
    )
    path = tmp_path / "net.int8.onnx"
    info = export_int8(gm, path, (3, 16, 16), check_inputs=images[48:])
    steps = [float(fq.step().max()) for fq in activation_quantizers(gm).values()]
    assert info["max_abs_diff_vs_fakequant"] <= max(steps)
    kernels = int8_kernel_counts(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert kernels.get("QLinearConv") == convs == 8
    assert kernels.get("QLinearAdd") == 2 and kernels.get("QGemm") == 1
    for float_op in ("Conv", "Pad", "Transpose", "BatchNormalization"):
        assert float_op not in kernels, kernels  # batch-norms folded, pads merged, no layout shuffles
    with torch.no_grad():
        expected = model(images[48:])
    got = OnnxRuntimeModel(path)(images[48:])
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.75


def weight_normed_net() -> nn.Module:
    """A CNN whose layers carry torch.nn.utils parametrizations (weight norm), as trained."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    return nn.Sequential(
        weight_norm(nn.Conv2d(1, 16, 3, padding=1)), nn.BatchNorm2d(16), nn.ReLU(),
        weight_norm(nn.Conv2d(16, 16, 3, padding=1)), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        weight_norm(nn.Linear(64, 10)),
    )  # fmt: skip


def test_parametrized_layers_are_quantized_to_int8_kernels(tmp_path) -> None:
    model = randomise_bn(weight_normed_net())
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=True))
    gm = quantize_model(model, images[:2], plan, [images[:48]])
    info = export_int8(gm, tmp_path / "wn.int8.onnx", (1, 8, 8), check_inputs=images[48:])
    kernels = int8_kernel_counts(tmp_path / "wn.int8.onnx")
    assert (
        kernels.get("QLinearConv") == 2 and kernels.get("QGemm") == 1 and "BatchNormalization" not in kernels
    )
    assert info["max_abs_diff_vs_fakequant"] <= info["tolerance"]
    with torch.no_grad():
        assert torch.allclose(gm(images[48:]), model(images[48:]), atol=0.3)  # the weight-normed weights
    assert parametrize_count(model) == 3  # the user's model is left as it was


def parametrize_count(model: nn.Module) -> int:
    from torch.nn.utils import parametrize

    return sum(parametrize.is_parametrized(m) for m in model.modules())


class _StdConv2d(nn.Conv2d):
    """Weight standardisation in forward (as in BiT / timm's StdConv2d): folding a BN into it is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _BatchNormAct(nn.BatchNorm2d):
    """A batch-norm subclass that also applies its activation (as timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x)) - 0.5


@pytest.mark.parametrize("conv, bn", [(_StdConv2d, nn.BatchNorm2d), (nn.Conv2d, _BatchNormAct)])
def test_batch_norm_folds_only_where_it_is_exact(conv, bn, images) -> None:
    model = randomise_bn(nn.Sequential(conv(3, 8, 3), bn(8), nn.Flatten(), nn.Linear(8 * 14 * 14, 4)))
    gm = quantize_model(model, images[:2], uniform_plan(model, "weight_only", 8), [])
    for fq in weight_quantizers_of(gm):
        fq.enabled = False
    with torch.no_grad():
        assert torch.allclose(gm(images), model(images), atol=1e-4)  # the float graph is unchanged


def weight_quantizers_of(model: nn.Module) -> list:
    from torchshrink.quantization.prepare import weight_quantizers

    return list(weight_quantizers(model).values())


def test_baking_keeps_frozen_layers_frozen() -> None:
    from torchshrink.tracing import bake_parametrizations

    model = weight_normed_net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    expected = model(torch.ones(1, 1, 8, 8))
    assert bake_parametrizations(model) == ["0.weight", "3.weight", "7.weight"]
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert torch.allclose(model(torch.ones(1, 1, 8, 8)), expected)


class ShapeChecked(nn.Module):
    """Python control flow on shapes and options, as Hugging Face blocks have: a channel check, an
    optional argument, and TensorFlow "same" padding computed from the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        if x.shape[1] != self.conv.in_channels:
            raise ValueError("wrong channel count")
        height, width = int(x.shape[-2]), int(x.shape[-1])
        pad_h, pad_w = max(3 - 2, 0) if height % 2 == 0 else 2, max(3 - 2, 0) if width % 2 == 0 else 2
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        x = torch.relu(self.conv(x))
        if scale is not None:
            x = x * scale
        return self.head(x.mean(dim=(2, 3)))


def test_control_flow_on_shapes_traces_through_and_the_graph_runs_any_batch(images) -> None:
    model = ShapeChecked().eval()
    gm = trace_model(model, images[:2])
    assert {"conv", "head"} <= {n.target for n in gm.graph.nodes if n.op == "call_module"}
    with torch.no_grad():  # shapes stay graph nodes: the traced model serves any batch size
        assert torch.allclose(gm(images), model(images), atol=1e-6)
    from torchshrink.pruning.graph import find_groups

    assert [g.name for g in find_groups(model, images[:2])] == ["conv"]  # through the pad


def test_control_flow_on_values_is_kept_whole(caplog) -> None:
    class ValueGate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x  # holds for one input only

    model = nn.Sequential(nn.Linear(4, 4), ValueGate(), nn.Linear(4, 2))
    with caplog.at_level("WARNING"):
        gm = trace_model(model, torch.randn(2, 4))
    assert "module '1' (ValueGate) cannot be traced" in caplog.text and "tensor values" in caplog.text
    assert "1" in {n.target for n in gm.graph.nodes if n.op == "call_module"}  # one opaque call


class Iterates(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([r * 2 for r in x])  # one Python step per sample: the batch size


class ScalesByBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * int(x.size(0))  # the batch size read into Python


@pytest.mark.parametrize("inner", [Iterates, ScalesByBatch])
def test_code_that_reads_the_batch_size_is_kept_whole(inner) -> None:
    model = nn.Sequential(nn.Linear(4, 4), inner(), nn.Linear(4, 2)).eval()
    gm = trace_model(model, torch.randn(2, 4))
    assert "1" in {n.target for n in gm.graph.nodes if n.op == "call_module"}  # one opaque call
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))  # the traced graph serves another batch size


def test_an_ensemble_of_members_traces_with_its_varargs_forward() -> None:
    from torchshrink.distillation.ensemble import Ensemble

    ensemble = Ensemble([nn.Sequential(nn.Flatten(), nn.Linear(12, 3)) for _ in range(2)]).eval()
    gm = trace_model(ensemble, torch.randn(2, 3, 4))
    x = torch.randn(4, 3, 4)
    with torch.no_grad():
        assert torch.allclose(gm(x), ensemble(x))


class FusedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).mean(1))


def test_fused_attention_quantizes_with_its_products_counted_float(tmp_path) -> None:
    from torchshrink.quantization.stage import _check_int8_coverage, _fused_attention

    torch.manual_seed(0)
    model = FusedAttention().eval()
    x = torch.randn(16, 5, 8)
    # 7-bit weights on CPUs without VNNI, as the stage chooses: 8-bit ones saturate there
    plan = uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=needs_reduced_range()))
    q = quantize_model(model, x[:2], plan, [x[:8], x[8:]])
    info = export_int8(q, tmp_path / "m.onnx", (5, 8), x[:4])
    assert _fused_attention(q) == 1
    _check_int8_coverage(plan, info["operators"], False, tmp_path / "m.onnx", _fused_attention(q))  # no error


class _CountsToo(nn.Module):
    """Branches on a shape and returns a plain number next to the tensor (as HF outputs may)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x) if x.shape[1] == 1 else x
        return y, 7


def test_a_trace_with_non_tensor_outputs_keeps_the_shape_branch(caplog) -> None:
    x = torch.rand(4, 1, 8, 8)
    with caplog.at_level("WARNING"):
        gm = trace_model(_CountsToo().eval(), x)
    assert "traced again without it" not in caplog.text  # the outputs agree on another batch
    assert gm(x[:3])[1] == 7 and gm(x[:3])[0].shape == (3, 4, 8, 8)
