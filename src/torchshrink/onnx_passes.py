"""Clean-ups of an exported ONNX graph that let ONNX Runtime fuse int8 kernels.

The TorchScript exporter writes a static ``F.pad`` as a chain of Constant / ConstantOfShape /
Slice / Transpose / Cast nodes that compute the pads at run time. A ``Pad`` whose pads are not an
initializer cannot be fused, and a ``DequantizeLinear -> Pad -> Conv`` keeps the convolution in
float ("same"-padding convolutions of TensorFlow-born models, e.g. EfficientNet). Two passes fix it:

- :func:`fold_constants` evaluates small nodes whose inputs are all constants (never Q/DQ nodes,
  whose constant weights are what int8 kernels read);
- :func:`fold_pad_into_conv` moves a zero ``Pad`` on the spatial axes into the ``pads`` attribute
  of the ``Conv`` it feeds (ONNX convolutions take asymmetric padding; torch's do not).

:func:`pack_embedding_tables` stores an embedding table that sits on an int8 block grid (see
:mod:`torchshrink.quantization.embeddings`) as int8 codes read by ``GatherBlockQuantized``.

And :func:`fuse_transformer_blocks`, runs on graphs with LayerNorms: ONNX Runtime's transformer
optimizer fuses each residual ``Add -> LayerNormalization`` into ``SkipLayerNormalization`` and the
erf GELU into ``Gelu`` / ``BiasGelu`` (ONNX Runtime's own session optimiser finds no skip-layer-norm
in an exported graph, whose reshapes leave it without the shapes that fusion checks). Attention
fusion is left off: a fused ``Attention`` computes its two products in float, while torchshrink's
static int8 runs them on int8 kernels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "fold_constants",
    "fold_pad_into_conv",
    "block_int8",
    "pack_embedding_tables",
    "fuse_transformer_blocks",
    "clean_graph",
]

_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "RandomNormal", "RandomUniform", "RandomNormalLike"}
_MAX_FOLDED_ELEMENTS = 1 << 16


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def fold_constants(model: Any) -> int:
    """Replace small nodes computed from constants only by initializers; returns how many were folded."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    known = _constants(graph)
    opset = [helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
    kept, folded = [], 0
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type in _NEVER_FOLD
            or not all(name in known for name in inputs)
        ):
            kept.append(node)
            continue
        single = helper.make_graph(
            [node],
            "fold",
            [
                helper.make_tensor_value_info(
                    n, helper.np_dtype_to_tensor_dtype(known[n].dtype), known[n].shape
                )
                for n in inputs
            ],
            [helper.make_value_info(n, helper.TypeProto()) for n in node.output],
        )
        try:
            outputs = ReferenceEvaluator(helper.make_model(single, opset_imports=opset)).run(
                None, {n: known[n] for n in inputs}
            )
        except Exception:  # noqa: BLE001 - a node the reference runtime cannot evaluate stays as it is
            kept.append(node)
            continue
        if sum(np.asarray(o).size for o in outputs) > _MAX_FOLDED_ELEMENTS:
            kept.append(node)
            continue
        for name, value in zip(node.output, outputs, strict=True):
            known[name] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        folded += 1
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_initializers(graph)
    return folded


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _zero_pad_amounts(node: Any, known: dict[str, np.ndarray]) -> list[int] | None:
    """The spatial pads [begin..., end...] of a constant-zero ``Pad`` on an N, C, spatial... tensor."""
    from onnx import helper

    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"constant")
    if mode not in (b"constant", "constant") or len(node.input) < 2 or node.input[1] not in known:
        return None
    if len(node.input) > 2 and node.input[2]:
        value = known.get(node.input[2])
        if value is None or np.any(value != 0):
            return None
    if len(node.input) > 3 and node.input[3]:
        return None  # explicit axes: rare, left alone
    pads = [int(p) for p in known[node.input[1]].reshape(-1)]
    dims = len(pads) // 2
    begin, end = pads[:dims], pads[dims:]
    if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(pads) < 0:
        return None  # pads on the batch or channel axis, or cropping
    return begin[2:] + end[2:]


def _conv_pads(conv: Any, size: int) -> list[int] | None:
    """A convolution's explicit pads (zeros if absent), or None when it pads itself (auto_pad)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    pads = list(attrs.get("pads", [0] * size))
    return pads if len(pads) == size else None


def fold_pad_into_conv(model: Any) -> int:
    """Merge each zero ``Pad`` feeding only convolutions (directly or through one Q/DQ pair) into their
    ``pads``; returns how many Pads went."""
    from onnx import helper

    graph = model.graph
    known = _constants(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    removed = []
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        # The padded tensor reaches the convolutions directly, or through one Quantize/Dequantize pair
        # (a quantization point after the pad: zero padding commutes with it, since 0.0 quantizes to
        # the zero point, which is what an int8 convolution pads with).
        head, tail = pad.output[0], pad.output[0]
        users = consumers.get(tail, [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            dq = consumers.get(users[0].output[0], [])
            if len(dq) == 1 and dq[0].op_type == "DequantizeLinear" and users[0].output[0] not in outputs:
                head, tail = users[0], dq[0].output[0]
                users = consumers.get(tail, [])
        if (
            pad.output[0] in outputs
            or tail in outputs
            or not users
            or any(u.op_type != "Conv" or u.input[0] != tail for u in users)
        ):
            continue
        amounts = _zero_pad_amounts(pad, known)
        if amounts is None:
            continue
        if not all(_conv_pads(conv, len(amounts)) is not None for conv in users):
            continue
        for conv in users:
            new = [a + b for a, b in zip(_conv_pads(conv, len(amounts)), amounts, strict=True)]
            keep = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend([*keep, helper.make_attribute("pads", new)])
            if isinstance(head, str):
                conv.input[0] = pad.input[0]
        if not isinstance(head, str):
            head.input[0] = pad.input[0]  # quantize the unpadded tensor
        removed.append(pad)
    for pad in removed:
        graph.node.remove(pad)
    if removed:
        _drop_unused_initializers(graph)
    return len(removed)


def clean_graph(model: Any) -> dict[str, int]:
    """Both passes, in order; returns what each did."""
    folded = fold_constants(model)
    pads = fold_pad_into_conv(model)
    if folded or pads:
        log.info("ONNX graph: %d constant node(s) folded, %d Pad(s) merged into convolutions", folded, pads)
    return {"constants_folded": folded, "pads_merged": pads}


def fuse_transformer_blocks(model: Any) -> tuple[Any, dict[str, int]]:
    """``model`` with ONNX Runtime's skip-layer-norm and GELU fusions applied (see the module
    docstring), and the fused operators counted; unchanged when it has no LayerNormalization."""
    if not any(n.op_type == "LayerNormalization" for n in model.graph.node):
        return model, {}
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False  # int8 attention products stay int8 (see above)
    options.enable_embed_layer_norm = False  # the embeddings keep their own inputs and position ids
    logging.getLogger("onnxruntime.transformers").setLevel(logging.WARNING)
    fused = optimize_model(model, model_type="bert", opt_level=0, optimization_options=options)
    counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    if counts:
        log.info("ONNX graph: transformer fusions %s", counts)
    return fused.model, counts


TABLE_BLOCKS = (128, 64, 32, 16)  # ONNX Runtime's GatherBlockQuantized takes powers of two from 16
MIN_TABLE_ELEMENTS = 1 << 16  # smaller tables (token types, short position tables) stay float


def block_int8(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes (the table's shape) and float32 scales (rows x blocks) of a 2-D table,
    one scale per ``block`` consecutive values of a row."""
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block).astype(np.float32)
    scale = np.maximum(np.abs(blocks).max(-1) / 127, np.finfo(np.float32).tiny).astype(np.float32)
    codes = np.clip(np.round(blocks / scale[..., None]), -127, 127).astype(np.int8)
    return codes.reshape(rows, width), scale


def _on_block_grid(table: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(block, int8 codes, scales) when ``table``'s rows sit on a symmetric int8 grid with one scale
    per block of that size; None otherwise."""
    rows, width = table.shape
    for block in TABLE_BLOCKS:
        if width % block:
            continue
        codes, scale = block_int8(table, block)
        values = codes.reshape(rows, width // block, block) * scale[..., None]
        if np.allclose(values.reshape(rows, width), table, rtol=1e-5, atol=0):
            return block, codes, scale
    return None


def pack_embedding_tables(model: Any) -> int:
    """Replace each ``Gather`` (axis 0) from a large float table on an int8 block grid by
    ``GatherBlockQuantized`` over int8 codes; returns how many tables were packed."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    packed = 0
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        init = initializers[node.input[0]]
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2:
            continue
        if init.dims[0] * init.dims[1] < MIN_TABLE_ELEMENTS:
            continue
        grid = _on_block_grid(numpy_helper.to_array(init))
        if grid is None:
            continue
        block, codes, scale = grid
        name = node.input[0]
        names = (f"{name}_int8", f"{name}_scale", f"{name}_zero_point")
        graph.initializer.extend(
            [
                numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8), names[0]),
                numpy_helper.from_array(scale, names[1]),
                numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), names[2]),
            ]
        )
        fused = helper.make_node(
            "GatherBlockQuantized",
            [names[0], node.input[1], names[1], names[2]],
            list(node.output),
            name=f"{node.name}_int8",
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
            bits=8,
        )
        index = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(index, fused)
        packed += 1
    if packed:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        _drop_unused_initializers(graph)
        log.info("ONNX graph: %d embedding table(s) stored as int8 (GatherBlockQuantized)", packed)
    return packed
