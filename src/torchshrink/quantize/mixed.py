"""Mixed precision: per-layer weight bits (some layers left in float) chosen from measured sensitivity.

Sensitivity of a layer at ``b`` bits is the mean squared error of the model's outputs (vs float) when
only that layer's weights are quantized to ``b`` bits, measured on evaluation batches. The plan
then meets one budget:

* ``avg_bits``: lower bits where the error per stored bit saved is smallest, until the
  parameter-weighted average weight bit width reaches the budget;
* ``max_drop``: start from the uniform plan, move the most sensitive layers to float until the
  accuracy drop (measured with every quantizer on) is within budget, then lower bits greedily,
  keeping each step only if the measured drop stays within budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from torch import nn

from torchshrink.data import DatasetBundle
from torchshrink.inputs import ModelInput
from torchshrink.measure import accuracy, predict
from torchshrink.quantize.prepare import QuantPlan, quantizable_layers
from torchshrink.quantize.ptq import quantize_model
from torchshrink.tables import markdown_table

log = logging.getLogger(__name__)

__all__ = ["MixedConfig", "layer_sensitivity", "average_bits", "choose_plan", "describe_plan"]

FLOAT_BITS = 32


class MixedConfig(BaseModel, extra="forbid"):
    """Budget of a mixed-precision plan: exactly one of ``avg_bits`` and ``max_drop``."""

    avg_bits: float | None = Field(None, ge=2, le=32, description="parameter-weighted average weight bits")
    max_drop: float | None = Field(None, ge=0, description="accuracy points the quantized model may lose")
    candidates: list[int] = Field(
        default_factory=lambda: [8, 6, 4, 3, 2], description="bit widths to choose from"
    )
    allow_float: bool = Field(
        True, description="max_drop: leave the most sensitive layers in float if needed"
    )
    split: Literal["test", "train"] = Field(
        "test",
        description="where sensitivity and the accuracy drop are measured (the report's split by default)",
    )
    samples: int = Field(1000, ge=32, description="evaluation samples")

    @model_validator(mode="after")
    def _one_budget(self) -> MixedConfig:
        if (self.avg_bits is None) == (self.max_drop is None):
            raise ValueError("mixed: give exactly one budget, 'avg_bits' or 'max_drop'")
        if any(not 2 <= b <= 8 for b in self.candidates):
            raise ValueError(f"mixed.candidates must be bit widths between 2 and 8, got {self.candidates}")
        return self


def _sizes(model: nn.Module) -> dict[str, int]:
    return {name: model.get_submodule(name).weight.numel() for name in quantizable_layers(model)}


def average_bits(plan: QuantPlan, sizes: dict[str, int]) -> float:
    """Parameter-weighted average weight bits (float layers count 32)."""
    total = sum(sizes.values())
    return sum(sizes[n] * (FLOAT_BITS if b is None else b) for n, b in plan.layers.items()) / max(total, 1)


def layer_sensitivity(
    model: nn.Module, example: ModelInput, inputs: ModelInput, candidates: Sequence[int], base: QuantPlan
) -> dict[str, dict[int, float]]:
    """Output MSE vs float when only one layer's weights are quantized, per layer and bit width."""
    reference = predict(model, inputs)
    layers = quantizable_layers(model)
    out: dict[str, dict[int, float]] = {}
    for name in layers:
        out[name] = {}
        for bits in candidates:
            plan = QuantPlan(
                **{
                    **base.to_dict(),
                    "mode": "weight_only",
                    "layers": {n: (bits if n == name else None) for n in layers},
                }
            )
            quantized = quantize_model(model, example, plan)
            out[name][bits] = float(((predict(quantized, inputs) - reference) ** 2).mean())
    return out


def choose_plan(
    model: nn.Module,
    example: ModelInput,
    calibration: list,
    data: DatasetBundle,
    cfg: MixedConfig,
    *,
    mode: str,
    bits: int,
    skip: Sequence[str] = (),
    seed: int = 0,
    **options: Any,
) -> QuantPlan:
    """The per-layer plan meeting ``cfg``'s budget (see the module docstring)."""
    split = data.subset(cfg.split, cfg.samples, seed=seed)
    inputs = split.tensors[0]
    layers = [n for n in quantizable_layers(model) if n not in skip]
    candidates = sorted({b for b in cfg.candidates if b <= bits} | {bits}, reverse=True)
    base = QuantPlan(
        mode=mode, layers={n: (None if n in skip else bits) for n in quantizable_layers(model)}, **options
    )
    sens = layer_sensitivity(model, example, inputs, candidates, base)
    sizes = _sizes(model)

    def lower_moves(plan: QuantPlan, frozen: set[str]) -> list[tuple[float, str, int]]:
        moves = []
        for n in layers:
            b = plan.layers[n]
            if n in frozen or b is None or b == candidates[-1]:
                continue
            nxt = candidates[candidates.index(b) + 1]
            cost = max(sens[n][nxt] - sens[n][b], 0.0) / (sizes[n] * (b - nxt))
            moves.append((cost, n, nxt))
        return sorted(moves)

    def with_layer(plan: QuantPlan, name: str, value: int | None) -> QuantPlan:
        return QuantPlan(**{**plan.to_dict(), "layers": {**plan.layers, name: value}})

    plan = base
    if cfg.avg_bits is not None:
        while average_bits(plan, sizes) > cfg.avg_bits:
            moves = lower_moves(plan, set())
            if not moves:
                log.warning("mixed: avg_bits %.2f not reachable with candidates %s", cfg.avg_bits, candidates)
                break
            _, name, nxt = moves[0]
            plan = with_layer(plan, name, nxt)
        return plan

    assert cfg.max_drop is not None
    float_accuracy = accuracy(model, split)

    def drop(p: QuantPlan) -> float:
        return (float_accuracy - accuracy(quantize_model(model, example, p, calibration), split)) * 100

    current = drop(plan)
    for name in sorted(layers, key=lambda n: -sens[n][bits]):
        if current <= cfg.max_drop or not cfg.allow_float:
            break
        plan = with_layer(plan, name, None)
        current = drop(plan)
        log.info("mixed: %s stays float (drop now %.2f points)", name, current)
    frozen: set[str] = set()
    while moves := lower_moves(plan, frozen):
        _, name, nxt = moves[0]
        trial = with_layer(plan, name, nxt)
        d = drop(trial)
        if d <= cfg.max_drop:
            plan, current = trial, d
        else:
            frozen.add(name)
    if current > cfg.max_drop:
        log.warning("mixed: max_drop %.2f not met (drop %.2f points)", cfg.max_drop, current)
    return plan


def describe_plan(model: nn.Module, plan: QuantPlan) -> dict[str, Any]:
    """Report details: each layer's bits, the average, and a printable table."""
    sizes = {n: model.get_submodule(n).weight.numel() for n in plan.layers}
    rows = [[n, "float" if b is None else f"{b}-bit", f"{sizes[n]:,}"] for n, b in plan.layers.items()]
    return {
        "mode": plan.mode,
        "plan": {n: ("float" if b is None else b) for n, b in plan.layers.items()},
        "average_weight_bits": round(average_bits(plan, sizes), 3),
        "reduce_range": plan.reduce_range,
        "plan_table": markdown_table(["layer", "weights", "weight count"], rows),
    }
