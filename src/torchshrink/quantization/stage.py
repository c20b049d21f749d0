"""Stage ``quantize``: static / dynamic / weight-only PTQ, QAT, or mixed precision, shipped as int8 ONNX."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import nn

from torchshrink.errors import QuantizationError
from torchshrink.inputs import take
from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.parallel import ddp
from torchshrink.quantization.embeddings import snap_embedding_tables
from torchshrink.quantization.mixed import MixedConfig, choose_plan, describe_plan
from torchshrink.quantization.observers import ObserverName
from torchshrink.quantization.onnx_int8 import (
    FLOAT_MATMUL_OPS,
    FLOAT_WEIGHTED_OPS,
    export_int8,
    needs_reduced_range,
)
from torchshrink.quantization.prepare import (
    QuantOptions,
    QuantPlan,
    activation_quantizers,
    quantization_record,
    weight_quantizers,
)
from torchshrink.quantization.ptq import quantize_model, stem_layer, uniform_plan
from torchshrink.registry import register_stage
from torchshrink.stages.training import FinetuneStageConfig, run_training
from torchshrink.state import ModelState, RunContext

log = logging.getLogger(__name__)

__all__ = ["QuantizeConfig", "quantize_stage"]


class QuantizeConfig(BaseModel, extra="forbid"):
    """Options of the ``quantize`` stage."""

    mode: Literal["static", "dynamic", "qat", "weight_only"] = "static"
    bits: int = Field(
        8, ge=2, le=8, description="weight bits of every quantized layer (mixed: the starting point)"
    )
    activation_bits: int = Field(8, ge=2, le=8, description="static/qat: activation bits")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    observer: ObserverName = Field(
        "minmax", description="activation range: minmax|moving_average|percentile|mse"
    )
    weight_observer: ObserverName = Field("mse", description="weight range per channel")
    calibration_batches: int = Field(16, ge=1)
    bias_correction: bool = Field(
        True,
        description="static/qat: biases absorb the mean output shift weight rounding causes, measured on "
        "the calibration batches (empirical bias correction)",
    )
    batch_size: int = Field(32, ge=1, description="calibration batch size")
    epochs: int = Field(3, ge=1, description="qat: training epochs")
    lr: float = Field(1e-4, gt=0, description="qat: learning rate")
    checkpoint_every: int = Field(200, ge=0, description="qat: steps between training checkpoints (0: none)")
    learn_scales: bool = Field(True, description="qat: train the scales too (LSQ)")
    skip: list[str] = Field(default_factory=list, description="conv/linear layers that stay float")
    float_stem: bool = Field(
        True,
        description="static/qat: a first conv reading at most 4 channels stays float (its int8 kernel is "
        "slower), unless a max-pool follows it",
    )
    mixed: MixedConfig | None = None
    matmuls: bool = Field(
        True,
        description="static/qat: matrix products of two activations (attention scores and their mixing) "
        "run on int8 kernels too; false keeps them float",
    )
    smoothing: float | None = Field(
        None,
        ge=0,
        le=1,
        description="static/dynamic/qat: SmoothQuant's alpha: the share of each linear input channel's range "
        "moved into the weights (0.5 is the paper's default for BERT-class models; off when unset)",
    )
    embeddings: bool = Field(
        True,
        description="embedding tables of at least 65,536 values on a block-wise int8 grid (one scale per 128 "
        "values of a row), stored as int8 in the ONNX file (GatherBlockQuantized); false keeps them float",
    )
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="7-bit weights at 8 bits (auto: on x86 CPUs without VNNI, where int8 kernels saturate)",
    )
    backend: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="onnxruntime: write and measure the int8 ONNX file; torch: fake-quant only"
    )
    file: str = Field("model.int8.onnx", pattern=r"^[^/\\]+\.onnx$")
    allow_partial: bool = Field(
        False,
        description="static: accept an int8 file in which ONNX Runtime runs more convolutions / linears in "
        "float than the plan keeps float, instead of stopping with an error",
    )

    @model_validator(mode="after")
    def _consistent(self) -> QuantizeConfig:
        if self.mode == "dynamic" and self.activation_bits != 8:
            raise ValueError(
                "dynamic quantization computes 8-bit activation ranges at run time; leave activation_bits at 8"
            )
        if self.mixed is not None and self.mode not in ("static", "weight_only"):
            raise ValueError("mixed precision chooses bits for static or weight_only quantization")
        if self.smoothing is not None and self.mode == "weight_only":
            raise ValueError(
                "smoothing migrates activation ranges: weight_only quantization keeps activations float"
            )
        return self

    def options(self, reduce_range: bool) -> QuantOptions:
        """The options every quantized layer shares (``reduce_range`` resolved from "auto" by the caller)."""
        return QuantOptions(
            activation_bits=self.activation_bits,
            per_channel=self.per_channel,
            observer=self.observer,
            weight_observer=self.weight_observer,
            reduce_range=reduce_range,
            matmuls=self.matmuls,
            smoothing=self.smoothing,
            embeddings=self.embeddings,
        )

    def layer_names(self) -> dict[str, list[str]]:
        """Layer names this config refers to (checked against the model before any stage runs)."""
        return {"skip": list(self.skip)}


def _rename_pruned(names: Iterable[str], model: nn.Module) -> list[str]:
    """Pruned-weight names after quantization (a quantized layer's weight lives under its parametrization)."""
    own = {n for n, _ in model.named_parameters()}
    out = []
    for n in names:
        layer, _, leaf = n.rpartition(".")
        moved = f"{layer}.parametrizations.{leaf}.original"
        if moved in own:
            out.append(moved)
        elif n in own:
            out.append(n)
    return out


@register_stage("quantize", QuantizeConfig, role="transform", embeddings=True)
def quantize_stage(state: ModelState, cfg: QuantizeConfig, ctx: RunContext) -> ModelState:
    """Quantize ``state.model``; with the ONNX Runtime backend the int8 file is what the report measures."""
    if state.architecture is None:
        log.warning(
            "the model has no architecture reference: the quantized model can be exported but not reloaded"
        )
    reduce_range = needs_reduced_range() if cfg.reduce_range == "auto" else cfg.reduce_range
    calibration = ctx.calibration_batches(cfg.calibration_batches, cfg.batch_size)
    example = take(calibration[0][0], slice(0, 2))
    options = cfg.options(reduce_range)
    mode = "static" if cfg.mode == "qat" else cfg.mode
    skip = list(cfg.skip)
    stem = stem_layer(state.model) if cfg.float_stem and mode == "static" else None
    if stem is not None and stem not in skip:
        skip.append(stem)
        log.info("layer %r (first conv, few input channels) stays float: its int8 kernel is slower", stem)
    if cfg.mixed is not None:
        plan = choose_plan(
            state.model,
            example,
            calibration,
            ctx.data,
            cfg.mixed,
            mode=mode,
            bits=cfg.bits,
            skip=skip,
            seed=ctx.seed,
            options=options,
        )
    else:
        plan = uniform_plan(state.model, mode, cfg.bits, skip=skip, options=options)
    model = quantize_model(state.model, example, plan, calibration, bias_correction=cfg.bias_correction)
    if cfg.mode == "qat":
        model = _train_aware(model, state, cfg, ctx)
    ctx.details.update(describe_plan(model, plan))
    log.info("quantization plan:\n%s", ctx.details["plan_table"])
    architecture = None
    if state.architecture is not None:
        architecture = {**state.architecture, "quantized": quantization_record(plan, ctx.data.inputs)}
    new = state.replace(
        model=model.eval(),
        architecture=architecture,
        pruned_weights=tuple(_rename_pruned(state.pruned_weights, model)),
        lineage=(*state.lineage, ctx.stage_name),
    )
    if cfg.backend == "torch":
        return new.replace(artefact=None, runtime=None)
    path = ctx.out_dir / cfg.file
    if ctx.dist.is_main:
        ctx.details.update(
            export_int8(model, path, ctx.data.inputs, take(ctx.data.test.tensors[0], slice(0, 64)))
        )
        if mode == "static" and cfg.mixed is None and cfg.bits == 8:
            _check_int8_coverage(
                plan, ctx.details["operators"], cfg.allow_partial, path, _fused_attention(model)
            )
    ddp.barrier()
    ctx.artefacts["int8_onnx"] = cfg.file
    return new.replace(artefact=path, runtime=OnnxRuntimeModel(path))


def _fused_attention(model: nn.Module) -> int:
    """Calls of ``F.scaled_dot_product_attention`` in the traced model: their two matrix products stay
    float (no quantization point can sit inside the fused call)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return 0
    return sum(n.op == "call_function" and n.target is F.scaled_dot_product_attention for n in graph.nodes)


def _check_int8_coverage(
    plan: QuantPlan, operators: dict[str, int], allow_partial: bool, path: Path, fused_attention: int = 0
) -> None:
    """Every conv / linear the plan quantizes (and every product of two activations, unless
    ``matmuls`` is off) must run on an int8 kernel: a float ``Conv`` / ``Gemm`` / ``MatMul`` left in
    the optimised graph beyond the planned float layers means the file is int8 in name only."""
    planned_float = sum(bits is None for bits in plan.layers.values())
    float_ops = FLOAT_WEIGHTED_OPS + (FLOAT_MATMUL_OPS if plan.options.matmuls else ())
    left_float = sum(operators.get(op, 0) for op in float_ops)
    if plan.options.matmuls:
        planned_float += 2 * fused_attention
    if left_float <= planned_float:
        return
    message = (
        f"{path}: ONNX Runtime runs {left_float} convolution / linear / matmul operator(s) in float, but the plan keeps only "
        f"{planned_float} float (fused attention's two products count as float); the others sit where "
        "torchshrink placed no quantization point (inside a module kept whole because it cannot be traced, "
        f"see the warnings above). Operators: {operators}"
    )
    if not allow_partial:
        raise QuantizationError(message + "; make that module traceable or set allow_partial: true")
    log.warning("%s; allow_partial: keeping the file", message)


def _train_aware(model: nn.Module, state: ModelState, cfg: QuantizeConfig, ctx: RunContext) -> nn.Module:
    """Quantization-aware training: the fake-quant model through the one training loop (the finetune stage's)."""
    if cfg.learn_scales:
        for fq in [*activation_quantizers(model).values(), *weight_quantizers(model).values()]:
            fq.learn_scale()
    train_state = state.replace(
        model=model,
        pruned_weights=tuple(_rename_pruned(state.pruned_weights, model)),
    )
    run_training(
        train_state,
        FinetuneStageConfig(epochs=cfg.epochs, lr=cfg.lr, checkpoint_every=cfg.checkpoint_every),
        ctx,
    )
    if cfg.embeddings:
        snap_embedding_tables(model)  # training moved the tables off their int8 grid
    return model
