"""Stage ``encode``: Deep-Compression storage. k-means weight sharing per layer, centroid fine-tuning
with the one training loop, then the packed ``.tshrink`` file (Huffman-coded indices and positions).

The stage's model afterwards is the one decoded from the file (checked bit-identical to the
fine-tuned shared model), so the report measures exactly what a user ships.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from torchshrink.encoding.kmeans import MAX_BITS, InitName, plain_state_dict, share_weights
from torchshrink.encoding.packfile import (
    FloatDtype,
    format_layer_table,
    read_packed,
    snap_to_storage,
    write_packed,
)
from torchshrink.errors import EncodeError
from torchshrink.inputs import take
from torchshrink.models import build_architecture, load_weights_into
from torchshrink.parallel import ddp
from torchshrink.pruning.masks import prunable_weights
from torchshrink.quantization.mixed import MixedConfig, choose_plan
from torchshrink.registry import register_stage
from torchshrink.stages.training import FinetuneStageConfig, run_training
from torchshrink.state import ModelState, RunContext

log = logging.getLogger(__name__)

__all__ = ["EncodeConfig", "layer_bits", "encode_stage"]

LAYER_TYPES = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "linear": (nn.Linear,)}


class EncodeConfig(BaseModel, extra="forbid"):
    """Options of the ``encode`` stage."""

    bits: int | dict[str, int] = Field(
        default_factory=lambda: {"conv": 8, "linear": 5},
        description="centroid index bits: one number, or per layer type (conv, linear) and/or layer name",
    )
    mixed: MixedConfig | None = Field(
        None, description="choose each layer's bits from measured sensitivity (weight-only plan) instead"
    )
    init: InitName = Field("linear", description="k-means start: linear (the paper's best), density, random")
    huffman: bool = Field(True, description="Huffman-code indices and positions (else fixed-width)")
    finetune_epochs: int = Field(3, ge=0, description="epochs of centroid fine-tuning (0: none)")
    lr: float = Field(1e-4, gt=0, description="fine-tuning learning rate")
    batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(200, ge=0, description="steps between fine-tuning checkpoints (0: none)")
    float_dtype: FloatDtype = Field("float16", description="storage of codebooks, biases and norms")
    ignore: list[str] = Field(default_factory=list, description="conv/linear layers stored unshared")
    file: str = Field("model.tshrink", pattern=r"^[^/\\]+\.tshrink$", description="file in the output folder")

    @field_validator("bits")
    @classmethod
    def _bits_range(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        for key, b in value.items() if isinstance(value, dict) else [("bits", value)]:
            if not 1 <= b <= MAX_BITS:
                raise ValueError(f"{key}: weight sharing takes 1 to {MAX_BITS} bits, got {b}")
        return value

    def layer_names(self) -> dict[str, list[str]]:
        """Layer names this config refers to (checked against the model before any stage runs)."""
        return {"ignore": list(self.ignore)}


def layer_bits(model: nn.Module, bits: int | dict[str, int], ignore: Sequence[str] = ()) -> dict[str, int]:
    """Bits of every conv/linear layer: a layer's own entry, else its type's (conv/linear), else the number."""
    modules = dict(model.named_modules())
    layers = [name.removesuffix(".weight").removesuffix("weight") for name in prunable_weights(model, ignore)]
    unknown_ignored = [n for n in ignore if n not in modules]
    if unknown_ignored:
        raise EncodeError(f"encode.ignore names unknown layer(s) {unknown_ignored}; layers: {layers}")
    if isinstance(bits, int):
        return {name: bits for name in layers}
    unknown = [k for k in bits if k not in LAYER_TYPES and k not in layers]
    if unknown:
        raise EncodeError(
            f"encode.bits has unknown key(s) {unknown}: use 'conv', 'linear' or a layer name ({', '.join(layers)})"
        )
    out = {}
    for name in layers:
        kind = next(k for k, types in LAYER_TYPES.items() if isinstance(modules[name], types))
        if name in bits:
            out[name] = bits[name]
        elif kind in bits:
            out[name] = bits[kind]
        else:
            raise EncodeError(
                f"layer {name!r} ({type(modules[name]).__name__}) has no bits: add {kind!r} or {name!r} to encode.bits"
            )
    return out


def _mixed_bits(model: nn.Module, cfg: EncodeConfig, ctx: RunContext) -> dict[str, int]:
    """Per-layer bits from the mixed-precision search of the quantization stage (weight-only)."""
    assert cfg.mixed is not None
    calibration = ctx.calibration_batches(4, 32)
    plan = choose_plan(
        model, take(calibration[0][0], slice(0, 2)), calibration, ctx.data, cfg.mixed,
        mode="weight_only", bits=MAX_BITS, skip=cfg.ignore, seed=ctx.seed,
    )  # fmt: skip
    # A layer the plan leaves in float gets the most centroids a packed file has.
    return {name: (b or MAX_BITS) for name, b in plan.layers.items() if name not in cfg.ignore}


def _check_plain(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise EncodeError(
                f"layer {name!r} is already quantized or shared: put the encode stage before quantize "
                "(encode stores a float model through weight sharing)"
            )


def _check_identical(decoded: nn.Module, shared: nn.Module, path: object) -> None:
    """The model loaded from the file must equal the in-memory shared model bit for bit."""
    expected = plain_state_dict(shared)
    for name, tensor in decoded.state_dict().items():
        if not torch.equal(tensor, expected[name]):
            raise EncodeError(f"{path}: tensor {name!r} does not load back exactly; please report this bug")


@register_stage("encode", EncodeConfig, role="transform")
def encode_stage(state: ModelState, cfg: EncodeConfig, ctx: RunContext) -> ModelState:
    """Share weights, fine-tune the centroids, write ``out/<file>`` and continue with the decoded model."""
    _check_plain(state.model)
    model = copy.deepcopy(state.model)
    bits = _mixed_bits(model, cfg, ctx) if cfg.mixed is not None else layer_bits(model, cfg.bits, cfg.ignore)
    share_weights(model, bits, init=cfg.init, seed=ctx.seed)
    if cfg.finetune_epochs:
        # The sharing parametrization keeps pruned weights at zero: no mask keeper needed.
        tune = FinetuneStageConfig(
            epochs=cfg.finetune_epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            checkpoint_every=cfg.checkpoint_every,
        )
        run_training(state.replace(model=model, pruned_weights=()), tune, ctx)
    snap_to_storage(model, cfg.float_dtype)
    path = ctx.out_dir / cfg.file
    if ctx.dist.is_main:
        write_packed(
            path,
            model,
            state.architecture,
            ctx.data.inputs,
            use_huffman=cfg.huffman,
            float_dtype=cfg.float_dtype,
        )
    ddp.barrier()
    packed = read_packed(path)
    decoded = build_architecture(state.architecture) if state.architecture else copy.deepcopy(state.model)
    load_weights_into(decoded, packed.state_dict, str(path))
    _check_identical(decoded, model, path)
    summary = (
        f"{packed.file_bytes:,} bytes packed, {packed.ratio:.1f}x smaller than the "
        f"{packed.float_bytes:,} bytes of float32 weights"
    )
    ctx.details.update(
        summary=summary,
        compression_ratio=round(packed.ratio, 2),
        file_bytes=packed.file_bytes,
        float_bytes=packed.float_bytes,
        bits=bits,
        layers_table=format_layer_table(packed),
    )
    ctx.artefacts["packed"] = cfg.file
    log.info("%s: %s\n%s", cfg.file, summary, ctx.details["layers_table"])
    return state.replace(model=decoded.eval(), artefact=path, lineage=(*state.lineage, ctx.stage_name))
