"""ONNX export (legacy TorchScript exporter, opset 17) with an ONNX Runtime check, and a wrapper that
runs an ``.onnx`` file like a module so the same metrics apply to it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchshrink.errors import CorruptFileError, ExportError, MissingFileError
from torchshrink.io import atomic_path
from torchshrink.onnx_passes import clean_graph

log = logging.getLogger(__name__)

__all__ = ["export_onnx", "OnnxRuntimeModel", "max_abs_diff_vs_onnx"]


class OnnxRuntimeModel(nn.Module):
    """An ONNX file behind ONNX Runtime, callable like a module: float tensor in, float tensor out."""

    def __init__(self, path: str | Path, threads: int = 2) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(self.path, "ONNX model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads must sleep, not spin: with spinning, several live sessions (or a session
        # next to torch) fight over the cores and timings swing by 10x on a 2-core machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CorruptFileError(self.path, f"ONNX Runtime cannot load it: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """Per-sample input shape as declared in the graph (symbolic dims stay strings)."""
        return tuple(self.session.get_inputs()[0].shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(
            [self.output_name], {self.input_name: x.detach().cpu().numpy().astype(np.float32)}
        )
        return torch.from_numpy(out[0])


def max_abs_diff_vs_onnx(model: nn.Module, onnx_path: str | Path, x: torch.Tensor) -> float:
    """Largest absolute difference between the module's and ONNX Runtime's outputs on ``x``."""
    model.eval()
    with torch.inference_mode():
        expected = model(x)
    got = OnnxRuntimeModel(onnx_path)(x)
    return float((expected - got).abs().max())


def _clean_file(path: Path) -> None:
    """Fold the exporter's constant sub-graphs and zero Pads into convolutions (see onnx_passes)."""
    import onnx

    model = onnx.load(str(path))
    if any(clean_graph(model).values()):
        onnx.save(model, str(path))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    opset: int = 17,
    check_inputs: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> float | None:
    """Export ``model`` to ``path`` (dynamic batch axis) atomically; with ``check_inputs``, verify that
    ONNX Runtime reproduces PyTorch within ``atol`` and return the max abs difference."""
    path = Path(path)
    model.eval()
    dummy = torch.zeros(2, *input_shape)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(
                f"ONNX export to {path} failed for input shape {tuple(input_shape)}: {exc}"
            ) from exc
        _clean_file(tmp)
    if check_inputs is None:
        return None
    diff = max_abs_diff_vs_onnx(model, path, check_inputs)
    if not diff <= atol:
        raise ExportError(
            f"{path}: ONNX Runtime output differs from PyTorch by {diff:.3g} (tolerance {atol:g}); "
            "the model may use an operation the exporter translates differently"
        )
    log.info("exported %s (max abs diff vs PyTorch %.2e)", path, diff)
    return diff
