"""ONNX export (legacy TorchScript exporter, opset 17) with an ONNX Runtime check, and a wrapper that
runs an ``.onnx`` file like a module so the same metrics apply to it."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchshrink.errors import CorruptFileError, ExportError, MissingFileError, ShapeMismatchError
from torchshrink.inputs import InputSpec, ModelInput, as_spec, as_tuple, call
from torchshrink.io import atomic_path
from torchshrink.onnx_passes import clean_graph, fuse_transformer_blocks, pack_embedding_tables

log = logging.getLogger(__name__)

__all__ = ["export_onnx", "OnnxRuntimeModel", "max_abs_diff_vs_onnx"]


class OnnxRuntimeModel(nn.Module):
    """An ONNX file behind ONNX Runtime, callable like a module: the graph's inputs in (positionally, in
    the graph's order, each cast to the dtype the graph declares), its first output out."""

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
        graph_inputs = self.session.get_inputs()
        self.input_names = [i.name for i in graph_inputs]
        self.input_dtypes = [np.int64 if i.type == "tensor(int64)" else np.float32 for i in graph_inputs]
        self.output_name = self.session.get_outputs()[0].name

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """Per-sample shape of the first input as declared in the graph (symbolic dims stay strings)."""
        return tuple(self.session.get_inputs()[0].shape[1:])

    def check_inputs(self, inputs: InputSpec, source: str) -> None:
        """A named error when data of ``inputs`` cannot feed this graph: another number of inputs, or a
        fixed per-sample axis of another length (checked before anything runs)."""
        graph = self.session.get_inputs()
        if len(graph) != len(inputs.fields):
            raise ShapeMismatchError(
                f"{source}: the graph takes {len(graph)} input(s) "
                f"{[g.name for g in graph]}, the data gives {len(inputs.fields)} ({inputs.describe()})"
            )
        for declared, given in zip(graph, inputs.fields, strict=True):
            dims = list(declared.shape[1:])
            fixed = [d if isinstance(d, int) else None for d in dims]
            fits = len(dims) == len(given.shape) and all(
                d is None or d == n for d, n in zip(fixed, given.shape, strict=True)
            )
            if not fits:
                raise ShapeMismatchError(
                    f"{source}: the graph's input {declared.name!r} takes samples of shape "
                    f"{tuple(d if d is not None else '?' for d in fixed)}, the data's are {tuple(given.shape)}; "
                    "use data of the shape the model was exported for"
                )

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) != len(self.input_names):
            raise ExportError(
                f"{self.path}: the graph takes {len(self.input_names)} input(s) {self.input_names}, got {len(xs)}"
            )
        feed = {
            name: x.detach().cpu().numpy().astype(dtype, copy=False)
            for name, dtype, x in zip(self.input_names, self.input_dtypes, xs, strict=True)
        }
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])


def max_abs_diff_vs_onnx(model: nn.Module, onnx_path: str | Path, x: ModelInput) -> float:
    """Largest absolute difference between the module's and ONNX Runtime's outputs on ``x``."""
    model.eval()
    with torch.inference_mode():
        expected = call(model, x)
    got = call(OnnxRuntimeModel(onnx_path), x)
    return float((expected - got).abs().max())


def _clean_file(path: Path, int8: bool) -> None:
    """Fold the exporter's constant sub-graphs and zero Pads into convolutions; for an int8 file also
    store int8-grid embedding tables as int8 and apply the transformer fusions (see onnx_passes)."""
    import onnx

    model = onnx.load(str(path))
    changed = any(clean_graph(model).values())
    if int8:
        changed = bool(pack_embedding_tables(model)) or changed
        model, fused = fuse_transformer_blocks(model)
        changed = changed or bool(fused)
    if changed:
        onnx.save(model, str(path))


def export_onnx(
    model: nn.Module,
    path: str | Path,
    inputs: InputSpec | Sequence[int],
    *,
    opset: int = 17,
    check_inputs: ModelInput | None = None,
    atol: float = 1e-4,
    int8: bool = False,
) -> float | None:
    """Export ``model`` to ``path`` atomically, with the graph inputs named and shaped as ``inputs``
    describes (dynamic batch axis, and dynamic sequence axes for variable-length inputs); with
    ``check_inputs``, verify that ONNX Runtime reproduces PyTorch within ``atol`` and return the max
    abs difference. ``int8`` applies the int8 file's passes before the check: int8 embedding tables,
    ONNX Runtime's skip-layer-norm / GELU fusions on a transformer graph."""
    path = Path(path)
    spec = as_spec(inputs)
    model.eval()
    dummy = as_tuple(spec.example(2))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                dummy,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=list(spec.names),
                output_names=["output"],
                dynamic_axes={**spec.onnx_axes(), "output": {0: "batch"}},
            )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(f"ONNX export to {path} failed for inputs {spec.describe()}: {exc}") from exc
        _clean_file(tmp, int8)
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
