"""Post-training quantization: static (ranges calibrated once, "global"), dynamic (activation ranges
per batch at run time) and weight-only (2-8 bit weights, float activations).

All three start from :func:`torchshrink.quantization.prepare.prepare`; static quantization then runs
calibration batches through the model so each activation point's observer sees real values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from torchshrink.errors import QuantizationError
from torchshrink.inputs import ModelInput, call
from torchshrink.quantization.prepare import (
    QuantOptions,
    QuantPlan,
    activation_quantizers,
    prepare,
    quantizable_layers,
    weight_quantizers,
)

log = logging.getLogger(__name__)

__all__ = ["uniform_plan", "stem_layer", "calibrate", "correct_bias", "quantize_model", "STEM_MAX_CHANNELS"]

# ONNX Runtime's int8 convolution is slow when it reads very few channels (im2col over 1-4 channels
# gives tiny GEMMs): measured per operator on this x86 machine, the 1-channel stem conv of the
# ResNet took 875 us in int8 vs 147 us in float, LeNet-5's first conv 1557 vs 296 us.
STEM_MAX_CHANNELS = 4


def uniform_plan(
    model: nn.Module,
    mode: str = "static",
    bits: int = 8,
    skip: Sequence[str] = (),
    options: QuantOptions | None = None,
) -> QuantPlan:
    """Every conv/linear at ``bits`` (``skip`` layers stay float), quantized as ``options`` say."""
    skip = set(skip)
    unknown = sorted(skip - set(quantizable_layers(model)))
    if unknown:
        raise QuantizationError(
            f"quantize.skip names {unknown}, which are not conv/linear layers of the model; "
            f"its quantizable layers are {quantizable_layers(model)[:12]}"
        )
    layers = {name: (None if name in skip else bits) for name in quantizable_layers(model)}
    return QuantPlan(mode=mode, layers=layers, options=options or QuantOptions())  # type: ignore[arg-type]


def stem_layer(model: nn.Module) -> str | None:
    """The first layer if it is a convolution reading at most ``STEM_MAX_CHANNELS`` channels whose
    output does not go through a max-pool before the next layer.

    (With a float stem, ONNX Runtime moves the next quantization in front of that max-pool and runs
    it as a u8 NCHW max-pool: 1020 us instead of 97 us on LeNet-5, which cancels the gain.)
    """
    layers = quantizable_layers(model)
    if not layers:
        return None
    first = model.get_submodule(layers[0])
    if not isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or first.in_channels > STEM_MAX_CHANNELS:
        return None
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models keep every layer quantized
        return None
    modules = dict(model.named_modules())
    frontier = [n for n in graph.nodes if n.op == "call_module" and n.target == layers[0]]
    seen = set(frontier)
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            module = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) or user.target in (
                F.max_pool1d,
                F.max_pool2d,
                F.max_pool3d,
            ):
                return None
            if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                frontier.append(user)
    return layers[0]


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor | Sequence[ModelInput]]) -> nn.Module:
    """Run ``batches`` through ``model`` (observing), then fix every observing point's range."""
    points = [fq for fq in activation_quantizers(model).values() if fq.observing]
    model.eval()
    with torch.no_grad():
        for batch in tqdm(list(batches), desc="calibrate", leave=False, disable=None):
            call(model, batch[0] if isinstance(batch, (tuple, list)) else batch)
    for fq in points:
        fq.freeze()
    log.info("calibrated %d activation quantization point(s)", len(points))
    return model


def correct_bias(model: nn.Module, batches: Iterable[torch.Tensor | Sequence[ModelInput]]) -> int:
    """Empirical bias correction (Nagel et al. 2019): each quantized layer's bias absorbs the mean
    shift, per output channel, that weight rounding adds to its output on the calibration inputs.

    Every layer is measured on the input it really gets in the quantized model (one pass, all layers
    hooked): the layer runs once with its quantized weight and once with its float weight. Rounding
    errors that do not average out per channel stay; the systematic part, which depthwise convolutions
    with folded batch-norms (EfficientNet, MobileNet) suffer from most, goes. Returns the layers corrected.
    """
    quantizers = {
        n: fq for n, fq in weight_quantizers(model).items() if _bias_of(model.get_submodule(n)) is not None
    }
    shifts: dict[str, list[torch.Tensor]] = {n: [] for n in quantizers}
    busy: set[str] = set()

    def hook_for(name: str):  # noqa: ANN202 - a forward hook
        def hook(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if name in busy:
                return
            busy.add(name)
            quantizers[name].enabled = False
            try:
                reference = layer(*inputs)
            finally:
                quantizers[name].enabled = True
                busy.discard(name)
            diff = output - reference
            if isinstance(layer, nn.Linear):  # features on the last axis: (..., F) -> (N, F, ...)
                diff = diff.reshape(-1, diff.shape[-1])
            shifts[name].append(diff.mean(dim=[0, *range(2, diff.dim())]))

        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in quantizers]
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                call(model, batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for name, measured in shifts.items():
            if measured:
                _bias_of(model.get_submodule(name)).sub_(torch.stack(measured).mean(0))
    log.info("bias correction: %d layer(s)", len(shifts))
    return len(shifts)


def _bias_of(layer: nn.Module) -> torch.Tensor | None:
    """The stored bias parameter (under its int32-rounding parametrization when it has one)."""
    if parametrize.is_parametrized(layer, "bias"):
        return layer.parametrizations["bias"].original
    return layer.bias


def quantize_model(
    model: nn.Module,
    example: ModelInput,
    plan: QuantPlan,
    calibration: Iterable[torch.Tensor | Sequence[torch.Tensor]] = (),
    bias_correction: bool = False,
) -> fx.GraphModule:
    """A fake-quant copy of ``model`` following ``plan``, calibrated when the plan needs it; with
    ``bias_correction`` (static / qat) the biases then absorb the mean error of weight rounding.
    Smoothing (``plan.options.smoothing``) measures its inputs on the calibration batches too."""
    batches = list(calibration)
    needs_batches = plan.mode in ("static", "qat") or (
        plan.options.smoothing is not None and plan.mode != "weight_only"
    )
    if needs_batches and not batches:
        raise ValueError(f"{plan.mode} quantization with these options needs calibration batches")
    inputs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    gm = prepare(
        model, example, plan, smoothing_inputs=inputs if plan.options.smoothing is not None else None
    )
    if plan.mode in ("static", "qat"):
        calibrate(gm, batches)
        if bias_correction:
            correct_bias(gm, batches)
    return gm
