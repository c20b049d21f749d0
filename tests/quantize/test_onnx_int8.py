"""Real int8 on ONNX Runtime: exported QDQ files run int8 kernels and match the fake-quant model."""

from __future__ import annotations

import pytest
import torch
from testkit import ZOO_INPUTS

from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.quantization.onnx_int8 import export_int8, int8_kernel_counts
from torchshrink.quantization.prepare import QuantOptions, activation_quantizers, weight_quantizers
from torchshrink.quantization.ptq import quantize_model, uniform_plan
from torchshrink.train import DatasetBatches, TrainConfig, classification_loss, fit
from torchshrink.zoo import build


def _max_step(model) -> float:
    return max(float(fq.scale.detach()) for fq in activation_quantizers(model).values() if not fq.dynamic)


@pytest.fixture(scope="module")
def images():
    return torch.rand(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("reduce_range", [True, False])
def test_static_resnet_runs_int8_kernels_and_matches_fake_quant(tmp_path, images, reduce_range) -> None:
    model = build("resnet", width=8).eval()
    gm = quantize_model(
        model,
        images[:2],
        uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=reduce_range)),
        [images[:64]],
    )
    path = tmp_path / "resnet.int8.onnx"
    if not reduce_range:
        # Full 8-bit weights: exact only where u8 x s8 products cannot saturate (VNNI); export without the check.
        export_int8(gm, path, (1, 28, 28))
    else:
        info = export_int8(gm, path, (1, 28, 28), check_inputs=images[64:])
        assert info["max_abs_diff_vs_fakequant"] <= _max_step(gm)
    ops = int8_kernel_counts(path)
    assert ops.get("QLinearConv", 0) >= 7  # stem, 6 block convs, 2 shortcuts (some may fuse further)
    assert ops.get("QLinearAdd", 0) == 3  # the three residual adds run in int8
    assert ops.get("QLinearGlobalAveragePool", 0) == 1
    assert not {"Conv", "Add", "BatchNormalization", "GlobalAveragePool"} & set(ops)  # nothing left in float


def test_qat_model_exports_and_matches_on_onnx_runtime(tmp_path, mnist_small) -> None:
    model = build("lenet5").eval()
    x = mnist_small.train.tensors[0]
    gm = quantize_model(
        model,
        x[:2],
        uniform_plan(model, "static", 4, options=QuantOptions(activation_bits=4, reduce_range=True)),
        [x[:128]],
    )
    for fq in [*activation_quantizers(gm).values(), *weight_quantizers(gm).values()]:
        fq.learn_scale()
    before = [float(fq.scale.detach().reshape(-1)[0]) for fq in activation_quantizers(gm).values()]
    fit(
        gm,
        DatasetBatches(mnist_small.train, 64, seed=0),
        classification_loss,
        TrainConfig(epochs=1, lr=1e-3, seed=0),
    )
    after = [float(fq.scale.detach().reshape(-1)[0]) for fq in activation_quantizers(gm).values()]
    assert before != after  # the scales were trained (LSQ)
    gm.eval()
    info = export_int8(gm, tmp_path / "qat.onnx", (1, 28, 28), check_inputs=mnist_small.test.tensors[0][:64])
    assert info["max_abs_diff_vs_fakequant"] <= _max_step(gm)
    runtime = OnnxRuntimeModel(tmp_path / "qat.onnx")
    test_x = mnist_small.test.tensors[0][:200]
    with torch.no_grad():
        assert (runtime(test_x).argmax(1) == gm(test_x).argmax(1)).float().mean() >= 0.99


def test_dynamic_quantization_covers_convolutions(tmp_path, images) -> None:
    model = build("lenet5").eval()
    gm = quantize_model(
        model, images[:2], uniform_plan(model, "dynamic", 8, options=QuantOptions(reduce_range=True))
    )
    assert all(fq.dynamic for fq in activation_quantizers(gm).values())
    info = export_int8(gm, tmp_path / "dyn.onnx", (1, 28, 28), check_inputs=images[:32])
    assert info["max_abs_diff_vs_fakequant"] < 1e-3
    ops = int8_kernel_counts(tmp_path / "dyn.onnx")
    assert ops.get("DynamicQuantizeLinear", 0) + ops.get("DynamicQuantizeMatMul", 0) >= 2


def test_weight_only_low_bit_file_matches(tmp_path, images) -> None:
    model = build("lenet5").eval()
    gm = quantize_model(model, images[:2], uniform_plan(model, "weight_only", 3))
    info = export_int8(gm, tmp_path / "w3.onnx", (1, 28, 28), check_inputs=images[:32])
    assert info["max_abs_diff_vs_fakequant"] < 1e-4
    # int8 storage of the weights: the file is about 4x smaller than float
    assert (tmp_path / "w3.onnx").stat().st_size < 0.3 * 431_080 * 4


@pytest.mark.parametrize("name", sorted(ZOO_INPUTS))
def test_every_zoo_model_quantizes_to_int8_kernels_that_match(tmp_path, name) -> None:
    from torchshrink.zoo import ZOO

    assert set(ZOO) == set(ZOO_INPUTS)  # a new zoo model must be added here
    model = build(name).eval()
    x = torch.rand(64, *ZOO_INPUTS[name], generator=torch.Generator().manual_seed(1))
    gm = quantize_model(
        model, x[:2], uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=True)), [x[:32]]
    )
    info = export_int8(gm, tmp_path / f"{name}.onnx", ZOO_INPUTS[name], check_inputs=x[32:])
    assert info["int8_kernels"] >= len(weight_quantizers(gm))
    assert info["max_abs_diff_vs_fakequant"] <= _max_step(gm)


class _ConvIntoLayerNorm(torch.nn.Module):
    """ConvNeXt-like: a conv whose output goes to a LayerNorm (float), a residual add before it, and
    an additive mask that hides two of the classes (as an attention mask hides padding): no int8
    kernel follows the conv or the adds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x) + x  # residual add into a LayerNorm
        y = self.norm(y.permute(0, 2, 3, 1)).mean((1, 2))
        hidden = torch.arange(10, device=x.device) >= 8
        mask = torch.where(hidden, -1e30, 0.0)
        return self.fc(y) + mask


def test_a_conv_that_no_int8_kernel_follows_still_runs_qlinearconv(tmp_path) -> None:
    model = _ConvIntoLayerNorm().eval()
    x = torch.rand(64, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    gm = quantize_model(
        model, x[:2], uniform_plan(model, "static", 8, options=QuantOptions(reduce_range=True)), [x[:32]]
    )
    info = export_int8(gm, tmp_path / "m.onnx", (8, 6, 6), check_inputs=x[32:])
    # inputs of the conv and the fc, and the conv's output; none on the adds' other operands
    assert sorted(activation_quantizers(gm)) == ["quant_conv", "quant_mean", "quant_x"]
    ops = int8_kernel_counts(tmp_path / "m.onnx")
    assert ops.get("QLinearConv") == 1 and "Conv" not in ops  # its output got a quantize step
    assert "QLinearAdd" not in ops  # the adds feed a LayerNorm and the output: they stay float
    assert info["max_abs_diff_vs_fakequant"] <= _max_step(gm)
    # the mask add in float: one quantization scale over -1e30 and the logits would zero the logits
    with torch.no_grad():
        shown, expected = gm(x[32:])[:, :8], model(x[32:])[:, :8]
    assert torch.allclose(shown, expected, atol=0.1) and expected.abs().max() > 0.1
