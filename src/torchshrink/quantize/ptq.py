"""Post-training quantization: static (ranges calibrated once, "global"), dynamic (activation ranges
per batch at run time) and weight-only (2-8 bit weights, float activations).

All three start from :func:`torchshrink.quantize.prepare.prepare`; static quantization then runs
calibration batches through the model so each activation point's observer sees real values.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from torchshrink.errors import QuantizationError
from torchshrink.quantize.prepare import QuantPlan, activation_quantizers, prepare, quantizable_layers

log = logging.getLogger(__name__)

__all__ = ["uniform_plan", "stem_layer", "calibrate", "quantize_model", "STEM_MAX_CHANNELS"]

# ONNX Runtime's int8 convolution is slow when it reads very few channels (im2col over 1-4 channels
# gives tiny GEMMs): measured per operator on this x86 machine, the 1-channel stem conv of the
# ResNet took 875 us in int8 vs 147 us in float, LeNet-5's first conv 1557 vs 296 us.
STEM_MAX_CHANNELS = 4


def uniform_plan(model: nn.Module, mode: str = "static", bits: int = 8, **options) -> QuantPlan:
    """Every conv/linear at ``bits`` (``skip`` layers stay float)."""
    skip = set(options.pop("skip", ()))
    unknown = sorted(skip - set(quantizable_layers(model)))
    if unknown:
        raise QuantizationError(
            f"quantize.skip names {unknown}, which are not conv/linear layers of the model; "
            f"its quantizable layers are {quantizable_layers(model)[:12]}"
        )
    layers = {name: (None if name in skip else bits) for name in quantizable_layers(model)}
    return QuantPlan(mode=mode, layers=layers, **options)  # type: ignore[arg-type]


def stem_layer(model: nn.Module) -> str | None:
    """The first conv/linear layer if it is a convolution reading at most ``STEM_MAX_CHANNELS`` channels."""
    layers = quantizable_layers(model)
    if not layers:
        return None
    first = model.get_submodule(layers[0])
    is_conv = isinstance(first, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return layers[0] if is_conv and first.in_channels <= STEM_MAX_CHANNELS else None


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor | Sequence[torch.Tensor]]) -> nn.Module:
    """Run ``batches`` through ``model`` (observing), then fix every observing point's range."""
    points = [fq for fq in activation_quantizers(model).values() if fq.observing]
    model.eval()
    with torch.no_grad():
        for batch in tqdm(list(batches), desc="calibrate", leave=False, disable=None):
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    for fq in points:
        fq.freeze()
    log.info("calibrated %d activation quantization point(s)", len(points))
    return model


def quantize_model(
    model: nn.Module,
    example: torch.Tensor,
    plan: QuantPlan,
    calibration: Iterable[torch.Tensor | Sequence[torch.Tensor]] = (),
) -> fx.GraphModule:
    """A fake-quant copy of ``model`` following ``plan``, calibrated when the plan needs it."""
    gm = prepare(model, example, plan)
    if plan.mode in ("static", "qat"):
        batches = list(calibration)
        if not batches:
            raise ValueError("static quantization needs calibration batches")
        calibrate(gm, batches)
    return gm
