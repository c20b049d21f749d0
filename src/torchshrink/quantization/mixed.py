"""Mixed precision: per-layer weight bits (some layers left in float) chosen from measured sensitivity.

Two measurements drive the plan, both on evaluation batches:

* which layers to leave in float: each quantized layer's *float gain*, how much closer (output MSE vs
  the float model) the fully quantized model comes when that layer alone runs in float (its weights
  and the activation points only it reads): in static and dynamic plans activation rounding, not
  weight rounding, is what hurts a transformer;
* which bits to lower: a layer's weight-only output MSE at each candidate width.

The plan then meets one budget:

* ``avg_bits``: lower bits where the error per stored bit saved is smallest, until the
  parameter-weighted average weight bit width reaches the budget;
* ``max_drop`` (quality points the model may lose) or ``min_cosine`` (the quantized model's outputs
  keep at least this mean cosine to the float model's, a fidelity target): the fewest layers with the
  largest float gains go to float (found by bisection, each step measured with every quantizer on),
  then bits are lowered greedily, each step kept only if the measured budget still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from torch import fx, nn
from tqdm.auto import tqdm

from torchshrink.data import DatasetBundle
from torchshrink.inputs import ModelInput
from torchshrink.measure import accuracy, mean_cosine, predict
from torchshrink.quantization.embeddings import embedding_tables
from torchshrink.quantization.fakequant import FakeQuantize
from torchshrink.quantization.prepare import (
    MATMUL_FUNCTIONS,
    QuantOptions,
    QuantPlan,
    is_passthrough,
    quantizable_layers,
    weight_quantizers,
)
from torchshrink.quantization.ptq import quantize_model
from torchshrink.tables import markdown_table

log = logging.getLogger(__name__)

__all__ = [
    "MixedConfig",
    "layer_sensitivity",
    "float_gains",
    "average_bits",
    "choose_plan",
    "describe_plan",
]

FLOAT_BITS = 32
# Units of their own, switched by a plan option: the int8 embedding tables, and (static) the int8
# inputs of every product of two activations (attention scores and their mixing).
OPTION_UNITS = {"(embedding tables)": "embeddings", "(activation products)": "matmuls"}


class MixedConfig(BaseModel, extra="forbid"):
    """Budget of a mixed-precision plan: exactly one of ``avg_bits``, ``max_drop`` and ``min_cosine``."""

    avg_bits: float | None = Field(None, ge=2, le=32, description="parameter-weighted average weight bits")
    max_drop: float | None = Field(None, ge=0, description="quality points the quantized model may lose")
    min_cosine: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fidelity target: the quantized model's outputs keep at least this mean cosine to the "
        "float model's (an embedding model's vectors, a classifier's logits)",
    )
    candidates: list[int] = Field(
        default_factory=lambda: [8, 6, 4, 3, 2], description="bit widths to choose from"
    )
    allow_float: bool = Field(
        True, description="max_drop / min_cosine: leave the most sensitive layers in float if needed"
    )
    split: Literal["test", "train"] = Field(
        "test",
        description="where sensitivity and the budget are measured (the report's split by default)",
    )
    samples: int = Field(1000, ge=32, description="evaluation samples")

    @model_validator(mode="after")
    def _one_budget(self) -> MixedConfig:
        budgets = [self.avg_bits, self.max_drop, self.min_cosine]
        if sum(b is not None for b in budgets) != 1:
            raise ValueError("mixed: give exactly one budget, 'avg_bits', 'max_drop' or 'min_cosine'")
        if any(not 2 <= b <= 8 for b in self.candidates):
            raise ValueError(f"mixed.candidates must be bit widths between 2 and 8, got {self.candidates}")
        return self


def _sizes(model: nn.Module) -> dict[str, int]:
    return {name: model.get_submodule(name).weight.numel() for name in quantizable_layers(model)}


def _mse(a: Any, b: Any) -> float:
    return float(((a - b) ** 2).mean())


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
            plan = replace(
                base, mode="weight_only", layers={n: (bits if n == name else None) for n in layers}
            )
            quantized = quantize_model(model, example, plan)
            out[name][bits] = _mse(predict(quantized, inputs), reference)
    return out


def _float_units(gm: fx.GraphModule, layers: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """Layers that go float together, each with the activation points only they read.

    Layers reading one activation point (a transformer's query, key and value) form one unit: only
    with all of them in float does that point, and its rounding, leave the model (unless a product of
    two activations reads it too: then it stays). Readers through reshapes count; other operators
    (a residual add, a LayerNorm) read float once no int8 kernel needs the point."""
    modules = dict(gm.named_modules())

    def needing(node: fx.Node) -> set[str | None]:
        """Readers of ``node``'s value that need it quantized: layers by name, matmuls as None."""
        found: set[str | None] = set()
        for user in node.users:
            if user.op == "call_module" and str(user.target) in layers:
                found.add(str(user.target))
            elif user.op == "call_function" and user.target in MATMUL_FUNCTIONS:
                found.add(None)
            elif is_passthrough(user, modules):
                found |= needing(user)
        return found

    readers: dict[str, set[str | None]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantize):
            readers.setdefault(str(node.target), set()).update(needing(node))
    unit_of = {name: name for name in layers}

    def root(name: str) -> str:
        while unit_of[name] != name:
            name = unit_of[name]
        return name

    own_points = {point: sorted(r) for point, r in readers.items() if r and None not in r}
    for group in own_points.values():
        for name in group[1:]:
            unit_of[root(name)] = root(group[0])
    units: dict[str, tuple[list[str], list[str]]] = {}
    for name in layers:
        units.setdefault(root(name), ([], []))[0].append(name)
    for point, group in own_points.items():
        units[root(group[0])][1].append(point)
    return list(units.values())


def float_gains(
    model: nn.Module,
    example: ModelInput,
    calibration: list,
    plan: QuantPlan,
    inputs: ModelInput,
    quantized: fx.GraphModule | None = None,
) -> list[tuple[list[str], float]]:
    """Units of quantized layers (see :func:`_float_units`) with their float gain: output MSE vs float of
    the quantized model minus that with the unit alone in float (its weight quantizers and the
    activation points only it reads switched off), largest gain first. The plan options of
    ``OPTION_UNITS`` are units too, each measured by quantizing once more with it off. ``quantized``:
    the model already quantized by ``plan`` (its quantizers are switched and restored), if at hand."""
    reference = predict(model, inputs)
    gm = quantized if quantized is not None else quantize_model(model, example, plan, calibration)
    weights = weight_quantizers(gm)
    base = _mse(predict(gm, inputs), reference)
    gains = []
    units = _float_units(gm, list(weights))
    for layers, points in tqdm(units, desc="mixed: float gains", leave=False):
        switched = [*(weights[n] for n in layers), *(gm.get_submodule(p) for p in points)]
        states = [fq.enabled for fq in switched]
        for fq in switched:
            fq.enabled = False
        try:
            gains.append((layers, base - _mse(predict(gm, inputs), reference)))
        finally:
            for fq, on in zip(switched, states, strict=True):
                fq.enabled = on
    for unit, option in OPTION_UNITS.items():
        if _option_applies(model, plan, option):
            floating = quantize_model(model, example, plan.with_options(**{option: False}), calibration)
            gains.append(([unit], base - _mse(predict(floating, inputs), reference)))
    return sorted(gains, key=lambda unit: -unit[1])


def _option_applies(model: nn.Module, plan: QuantPlan, option: str) -> bool:
    if option == "embeddings":
        return plan.options.embeddings and bool(embedding_tables(model))
    return plan.options.matmuls and plan.mode == "static"


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
    options: QuantOptions | None = None,
) -> QuantPlan:
    """The per-layer plan meeting ``cfg``'s budget (see the module docstring)."""
    split = data.subset(cfg.split, cfg.samples, seed=seed)
    inputs = split.tensors[0]
    layers = [n for n in quantizable_layers(model) if n not in skip]
    candidates = sorted({b for b in cfg.candidates if b <= bits} | {bits}, reverse=True)
    base = QuantPlan(
        mode=mode,  # type: ignore[arg-type]
        layers={n: (None if n in skip else bits) for n in quantizable_layers(model)},
        options=options or QuantOptions(),
    )
    sizes = _sizes(model)
    sens: dict[str, dict[int, float]] = {}
    if len(candidates) > 1:
        sens = layer_sensitivity(model, example, inputs, candidates, base)

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

    plan = base
    if cfg.avg_bits is not None:
        while average_bits(plan, sizes) > cfg.avg_bits:
            moves = lower_moves(plan, set())
            if not moves:
                log.warning("mixed: avg_bits %.2f not reachable with candidates %s", cfg.avg_bits, candidates)
                break
            _, name, nxt = moves[0]
            plan = plan.with_layers({name: nxt})
        return plan

    score, what = _budget(model, split, cfg)

    def excess(p: QuantPlan) -> float:
        return score(quantize_model(model, example, p, calibration))

    uniform = quantize_model(model, example, plan, calibration)
    current = score(uniform)
    if current > 0 and cfg.allow_float:
        gains = float_gains(model, example, calibration, plan, inputs, quantized=uniform)
        units = [u for u, _ in gains]
        units = [[n for n in u if n in layers or n in OPTION_UNITS] for u in units]
        plan, current = _fewest_float(plan, units, excess)
    frozen: set[str] = set()
    while moves := lower_moves(plan, frozen):
        _, name, nxt = moves[0]
        trial = plan.with_layers({name: nxt})
        over = excess(trial)
        if over <= 0:
            plan, current = trial, over
        else:
            frozen.add(name)
    if current > 0:
        log.warning("mixed: %s not met (%s)", what, _describe_excess(cfg, current))
    return plan


def _budget(model: nn.Module, split: Any, cfg: MixedConfig) -> tuple[Callable[[nn.Module], float], str]:
    """``score(quantized)``: how far a quantized model misses the budget (<= 0: met), and the budget's name."""
    inputs = split.tensors[0]
    if cfg.min_cosine is not None:
        reference = predict(model, inputs).flatten(1)
        target = cfg.min_cosine
        return (
            lambda q: target - mean_cosine(predict(q, inputs).flatten(1), reference),
            f"min_cosine {target}",
        )
    assert cfg.max_drop is not None
    float_quality, limit = accuracy(model, split), cfg.max_drop
    return lambda q: (float_quality - accuracy(q, split)) * 100 - limit, f"max_drop {limit}"


def _describe_excess(cfg: MixedConfig, excess: float) -> str:
    if cfg.min_cosine is not None:
        return f"cosine {cfg.min_cosine - excess:.4f}"
    return f"drop {excess + (cfg.max_drop or 0):.2f} points"


def _fewest_float(
    plan: QuantPlan, units: list[list[str]], excess: Callable[[QuantPlan], float]
) -> tuple[QuantPlan, float]:
    """The plan with the fewest of ``units``' first entries in float that meets the budget, by
    bisection over how many (assuming more float layers never hurt; each step is measured)."""

    def floated(k: int) -> QuantPlan:
        names = {n for unit in units[:k] for n in unit}
        changed = plan.with_layers({n: None for n in names - set(OPTION_UNITS)})
        return changed.with_options(**{OPTION_UNITS[n]: False for n in names & set(OPTION_UNITS)})

    low, high = 0, len(units)  # low misses the budget; every unit in float is the float model
    best, best_excess = floated(high), None
    while high - low > 1:
        mid = (low + high) // 2
        trial = floated(mid)
        over = excess(trial)
        log.info("mixed: %d most sensitive unit(s) in float: %s", mid, "met" if over <= 0 else "missed")
        if over <= 0:
            high, best, best_excess = mid, trial, over
        else:
            low = mid
    if best_excess is None:
        best_excess = excess(best)
    log.info("mixed: layers kept float: %s", [n for unit in units[:high] for n in unit])
    return best, best_excess


def describe_plan(model: nn.Module, plan: QuantPlan) -> dict[str, Any]:
    """Report details: each layer's bits, the average, and a printable table."""
    sizes = {n: model.get_submodule(n).weight.numel() for n in plan.layers}
    rows = [[n, "float" if b is None else f"{b}-bit", f"{sizes[n]:,}"] for n, b in plan.layers.items()]
    return {
        "mode": plan.mode,
        "plan": {n: ("float" if b is None else b) for n, b in plan.layers.items()},
        "average_weight_bits": round(average_bits(plan, sizes), 3),
        "reduce_range": plan.options.reduce_range,
        "plan_table": markdown_table(["layer", "weights", "weight count"], rows),
    }
