"""Stage ``export``: write the model as ONNX and check ONNX Runtime against PyTorch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from torchshrink.inputs import take
from torchshrink.onnx_export import export_onnx
from torchshrink.parallel import ddp
from torchshrink.quantization.fakequant import FakeQuantize
from torchshrink.quantization.onnx_int8 import export_int8
from torchshrink.registry import register_stage
from torchshrink.state import ModelState, RunContext


class ExportConfig(BaseModel, extra="forbid"):
    """Options of the ``export`` stage."""

    format: Literal["onnx"] = "onnx"
    file: str = Field(
        "model.onnx", pattern=r"^[^/\\]+\.onnx$", description="file name inside the output folder"
    )
    opset: int = Field(17, ge=13, le=21)
    check: bool = Field(True, description="run ONNX Runtime on test inputs and compare with PyTorch")
    atol: float = Field(1e-4, gt=0)


@register_stage("export", ExportConfig, role="observe", embeddings=True)
def export_stage(state: ModelState, cfg: ExportConfig, ctx: RunContext) -> ModelState:
    """Export to ``out/<file>``; the ONNX file becomes the state's shipped artefact."""
    path = ctx.out_dir / cfg.file
    check = take(ctx.data.test.tensors[0], slice(0, 32)) if cfg.check else None
    if ctx.dist.is_main:
        if any(isinstance(m, FakeQuantize) for m in state.model.modules()):
            # A quantized model exports as int8 QDQ; ONNX Runtime's int8 kernels match it within two steps.
            ctx.details.update(export_int8(state.model, path, ctx.data.inputs, check_inputs=check))
        else:
            diff = export_onnx(
                state.model, path, ctx.data.inputs, opset=cfg.opset, check_inputs=check, atol=cfg.atol
            )
            ctx.details["max_abs_diff_vs_torch"] = diff
    ddp.barrier()
    ctx.artefacts["onnx"] = cfg.file
    return state.replace(artefact=path, lineage=(*state.lineage, ctx.stage_name))
