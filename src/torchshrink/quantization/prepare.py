"""Turn a float model into a fake-quant model that int8 kernels can run exactly.

1. Trace it with torch.fx and fold every batch-norm that directly follows a conv into that conv.
2. Quantize each conv/linear weight per output channel (signed, symmetric: zero point 0, as
   ONNX Runtime's int8 kernels want), at the layer's bit width; layers planned as float keep theirs.
3. Put activation quantization points where quantized operators read: the inputs of quantized
   convs/linears, residual adds, concatenations and average pooling. A point sits on the *source* of the value
   (after its ReLU, so the ReLU folds into the range), and is re-applied after shape-only or
   max-pool steps in between (a no-op on values, but in ONNX it keeps those steps in int8).
   A bias is rounded to int32 at scale ``input_scale * weight_scale``, as the int8 kernels store it.

The plan is data (:class:`QuantPlan`), so a saved model rebuilds the same structure before its
scales are loaded.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from torchshrink.errors import QuantizationError
from torchshrink.inputs import InputSpec, ModelInput
from torchshrink.quantization.affine import QuantSpec
from torchshrink.quantization.embeddings import snap_embedding_tables
from torchshrink.quantization.fakequant import _ONNX_INT32, FakeQuantize, export_constant_dq, untraced
from torchshrink.quantization.observers import OBSERVERS
from torchshrink.quantization.smoothing import insert_input_scales, smooth, smoothing_groups
from torchshrink.registry import register_architecture_layer
from torchshrink.tracing import bake_parametrizations, torch_layer_type, trace_model

log = logging.getLogger(__name__)

__all__ = [
    "QuantOptions",
    "QuantPlan",
    "prepare",
    "restore",
    "quantization_record",
    "quantizable_layers",
    "weight_quantizers",
    "activation_quantizers",
]

Mode = Literal["static", "dynamic", "weight_only", "qat"]
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity, nn.Unflatten)
# Zero padding keeps values on the quantization grid (zero is exactly representable), so a point
# re-applied after it is a no-op in PyTorch; in ONNX the Pad then merges into the next convolution.
_ZERO_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_CONSTANT_PAD_MODULES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
_PASS_FUNCTIONS = {
    torch.flatten,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.dropout,
    torch.squeeze,
    torch.unsqueeze,
}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_AVG_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_AVG_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}


@dataclass(frozen=True)
class QuantOptions:
    """How every quantized layer of a plan quantizes; checked when made, so a wrong value never
    reaches the tracer."""

    activation_bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    weight_observer: str = "mse"
    reduce_range: bool = False  # 7-bit weights at 8 bits: exact int8 kernels on x86 without VNNI
    matmuls: bool = True  # static: activation x activation matmuls (attention) get int8 inputs too
    smoothing: float | None = None  # SmoothQuant's alpha for the linears' inputs (None: off)
    embeddings: bool = True  # large embedding tables on an int8 block grid (int8 in the ONNX file)

    def __post_init__(self) -> None:
        problems = []
        if not 2 <= self.activation_bits <= 8:
            problems.append(f"activation_bits={self.activation_bits} (2..8)")
        for key in ("observer", "weight_observer"):
            if getattr(self, key) not in OBSERVERS:
                problems.append(f"{key}={getattr(self, key)!r} (one of {', '.join(OBSERVERS)})")
        if self.smoothing is not None and not 0 <= self.smoothing <= 1:
            problems.append(f"smoothing={self.smoothing} (0..1 or None)")
        if problems:
            raise QuantizationError("quantization options out of range: " + "; ".join(problems))


@dataclass(frozen=True)
class QuantPlan:
    """What gets quantized how. ``layers`` maps a conv/linear name to its weight bits (None = float);
    ``options`` says how (the same for every layer)."""

    mode: Mode = "static"
    layers: dict[str, int | None] = field(default_factory=dict)
    options: QuantOptions = field(default_factory=QuantOptions)

    def with_layers(self, changes: dict[str, int | None]) -> QuantPlan:
        """This plan with some layers' bits changed."""
        return replace(self, layers={**self.layers, **changes})

    def with_options(self, **changes: Any) -> QuantPlan:
        """This plan with some options changed (checked again)."""
        return replace(self, options=replace(self.options, **changes))

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON record (the format saved models carry)."""
        return {"mode": self.mode, "layers": dict(self.layers), **asdict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        # plans saved before activation matmuls / embedding tables were quantized did not quantize them
        data = {"matmuls": False, "embeddings": False, **data}
        option_keys = {f.name for f in fields(QuantOptions)}
        options = QuantOptions(**{k: v for k, v in data.items() if k in option_keys})
        return cls(mode=data.get("mode", "static"), layers=dict(data.get("layers", {})), options=options)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers whose weights can be quantized, in model order."""
    return [name for name, m in model.named_modules() if isinstance(m, WEIGHTED) and m.weight is not None]


class _WeightQuant(nn.Module):
    """Parametrization: the layer sees its weight fake-quantized (int8 codes + DequantizeLinear in ONNX)."""

    def __init__(self, quantizer: FakeQuantize) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantizer.constant_dq(weight)


class _BiasQuant(nn.Module):
    """Parametrization: the bias rounded to int32 at ``input_scale * weight_scale`` (what int8 kernels add)."""

    def __init__(self, input_quant: FakeQuantize, weight_quant: FakeQuantize) -> None:
        super().__init__()
        # Plain references (a list hides them from the module tree): they are owned elsewhere.
        self._refs = [input_quant, weight_quant]

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        inp, weight = self._refs
        if not (inp.enabled and weight.enabled) or inp.dynamic:
            return bias
        if torch.onnx.is_in_onnx_export():
            with untraced():
                scale = (inp.step() * weight.step()).reshape(-1).expand(bias.shape).clamp_min(1e-12)
                codes = torch.round(bias.detach() / scale).to(torch.int32)
            return export_constant_dq(bias, codes, scale, torch.zeros_like(codes), 0, _ONNX_INT32)
        scale = (inp.step() * weight.step()).reshape(-1).expand(bias.shape).clamp_min(1e-12)
        return bias + (torch.round(bias / scale) * scale - bias).detach()


def _weight_spec(bits: int, plan: QuantPlan) -> QuantSpec:
    if plan.options.reduce_range and bits == 8:
        bits = 7
    return QuantSpec(bits, signed=True, symmetric=True, per_channel=plan.options.per_channel, axis=0)


def _activation_spec(bits: int) -> QuantSpec:
    return QuantSpec(bits, signed=False, symmetric=False)


def _fold_batchnorm(gm: fx.GraphModule) -> list[str]:
    """Fold each batch-norm whose only input is a conv used nowhere else into that conv's weight and bias."""
    modules = dict(gm.named_modules())
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), tuple(_BN.values())):
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        kind = torch_layer_type(conv) if conv is not None else None
        if kind not in _BN or len(src.users) != 1:
            continue
        bn = modules[node.target]
        # Exactly torch's batch-norm: a subclass may do more in forward (an activation, say).
        if type(bn) is not _BN[kind] or bn.running_mean is None:
            continue
        saved = (conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone())
        probe = _probe_input(src)
        if probe is not None:
            with torch.no_grad():
                expected = bn(conv(probe))
        with torch.no_grad():
            factor = (
                bn.weight / torch.sqrt(bn.running_var + bn.eps)
                if bn.affine
                else 1 / torch.sqrt(bn.running_var + bn.eps)
            )
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(factor.reshape(-1, *([1] * (conv.weight.dim() - 1))))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new_bias = (bias - bn.running_mean) * factor + shift
            conv.bias = nn.Parameter(new_bias.clone())
        if probe is not None and not _same_output(conv, probe, expected):
            # The conv's forward does more than convolve its weight (weight standardisation, say):
            # the folded weights would be transformed again. Undo the fold; the batch-norm stays.
            log.warning(
                "batch-norm %r not folded into %r: the conv's forward changes its weight",
                node.target,
                src.target,
            )
            with torch.no_grad():
                conv.weight.copy_(saved[0])
                conv.bias = None if saved[1] is None else nn.Parameter(saved[1])
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        _delete_submodule(gm, node.target)
        folded.append(str(node.target))
    gm.graph.lint()
    gm.recompile()
    return folded


def _probe_input(conv_node: fx.Node) -> torch.Tensor | None:
    """A random input of the shape the traced conv reads (from the recorded shapes), or None."""
    source = conv_node.args[0] if conv_node.args else None
    meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return torch.randn(1, *meta.shape[1:], generator=torch.Generator().manual_seed(0))


def _same_output(conv: nn.Module, probe: torch.Tensor, expected: torch.Tensor) -> bool:
    with torch.no_grad():
        got = conv(probe)
    return torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()) + 1e-6)


def _delete_submodule(gm: fx.GraphModule, target: str) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, nn.Identity())


def _is_zero_pad(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, _ZERO_PAD_MODULES) or (
            isinstance(module, _CONSTANT_PAD_MODULES) and module.value == 0
        )
    if node.op == "call_function" and node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    return False


def is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Does ``node`` pass values through unchanged in int8 (reshapes, max-pools, zero pads)?"""
    if _is_zero_pad(node, modules):
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _is_float_tensor(node: object) -> bool:
    """A graph value that is a floating-point tensor (shape arithmetic on ints, integer index
    tensors and boolean masks are never quantized)."""
    if not isinstance(node, fx.Node):
        return False
    if "type" not in node.meta:  # a graph without recorded values (no shape propagation): by position
        return True
    meta = node.meta.get("tensor_meta")
    return hasattr(meta, "shape") and meta.dtype.is_floating_point


_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = {F.relu, F.relu6, torch.relu}


def _transparent(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops an int8 value passes through on its way to the next int8 kernel (ORT folds a ReLU into
    the quantize step)."""
    if is_passthrough(node, modules):
        return True
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _RELU_MODULES)
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target == "relu"
    )


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CAT_FUNCTIONS


def _is_merge(node: fx.Node) -> bool:
    """An add or concat: int8 (QLinearAdd / QLinearConcat) only where that pays, see _feeds_int8."""
    return _is_add(node) or _is_cat(node)


def _feeds_int8(
    node: fx.Node, modules: dict[str, nn.Module], plan: QuantPlan, memo: dict[fx.Node, bool]
) -> bool:
    """Does ``node``'s result reach an int8 kernel (through passthrough and ReLU ops)? An add or
    concat is worth running in int8 only then: a transformer's residual add before a LayerNorm, or
    the attention-mask add before a softmax, stays float (quantizing it only costs fidelity)."""
    if node not in memo:
        memo[node] = False
        for user in node.users:  # (an fx graph has no cycles: each node is judged once)
            if _transparent(user, modules) or _is_merge(user):
                reaches = _feeds_int8(user, modules, plan, memo)
            else:
                reaches = node in _kernel_inputs(user, modules, plan)
            if reaches:
                memo[node] = True
                break
    return memo[node]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_int8_conv(node: fx.Node, modules: dict[str, nn.Module], plan: QuantPlan) -> bool:
    return (
        node.op == "call_module"
        and isinstance(modules.get(node.target), _CONVS)
        and plan.layers.get(str(node.target)) is not None
    )


def _quantized_after(
    node: fx.Node, sources: dict[fx.Node, set[fx.Node]], modules: dict[str, nn.Module]
) -> bool:
    """Is ``node``'s value quantized right after it (through passthrough and ReLU ops)?"""
    return node in sources or any(
        _transparent(user, modules) and _quantized_after(user, sources, modules) for user in node.users
    )


def _quantized_inputs(
    node: fx.Node, modules: dict[str, nn.Module], plan: QuantPlan, memo: dict[fx.Node, bool]
) -> list[fx.Node]:
    """The float tensor inputs of ``node`` that must arrive quantized for its int8 kernel; an add or
    concat only when its result goes on to an int8 kernel."""
    if _is_merge(node) and not _feeds_int8(node, modules, plan, memo):
        return []
    return [a for a in _kernel_inputs(node, modules, plan) if _is_float_tensor(a)]


def _kernel_inputs(node: fx.Node, modules: dict[str, nn.Module], plan: QuantPlan) -> list[fx.Node]:
    """The tensor inputs an int8 kernel for ``node`` takes."""
    if node.op == "call_module" and isinstance(modules.get(node.target), WEIGHTED):
        if plan.layers.get(node.target) is None:
            return []
        return [a for a in node.args[:1] if isinstance(a, fx.Node)]
    if plan.mode == "dynamic":
        return []
    is_avg = (node.op == "call_module" and isinstance(modules.get(node.target), _AVG_MODULES)) or (
        node.op == "call_function" and node.target in _AVG_FUNCTIONS
    )
    if is_avg:  # int8 average pooling kernels (QLinearAveragePool / QLinearGlobalAveragePool)
        return [a for a in node.args[:1] if isinstance(a, fx.Node)]
    if _is_add(node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if _is_cat(node):
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in tensors if isinstance(a, fx.Node)]
    is_matmul = (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("matmul", "bmm")
    )
    if (
        is_matmul and plan.options.matmuls
    ):  # activation operands; a parameter operand (x @ self.w) stays as it is
        return [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"]
    return []


def _make_activation_quantizer(plan: QuantPlan) -> FakeQuantize:
    if plan.mode == "dynamic":
        fq = FakeQuantize(_activation_spec(8), "minmax")
        fq.set_dynamic()
        return fq
    return FakeQuantize(_activation_spec(plan.options.activation_bits), plan.options.observer)


def _insert_activation_points(gm: fx.GraphModule, plan: QuantPlan) -> dict[str, str]:
    """Add activation quantizers; returns, per quantized conv/linear, the quantizer node feeding it."""
    modules = dict(gm.named_modules())
    # source node -> nodes between source and consumers that need the same point re-applied
    sources: dict[fx.Node, set[fx.Node]] = {}
    memo: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        for inp in _quantized_inputs(node, modules, plan, memo):
            chain = []
            src = inp
            # Dynamic points quantize right before the kernel: re-applying them after a max-pool
            # would re-measure the range, not pass the codes through.
            while (
                plan.mode != "dynamic" and is_passthrough(src, modules) and isinstance(src.args[0], fx.Node)
            ):
                chain.append(src)
                src = src.args[0]
            sources.setdefault(src, set()).update(chain)
    if plan.mode == "static":
        # ONNX Runtime runs a conv as QLinearConv only with a quantize step on its output: the next
        # int8 kernel's input point usually provides it; where none follows (a ViT's patch
        # embedding into the position add, a conv into a LayerNorm or the model output), it gets one.
        for node in gm.graph.nodes:
            if _is_int8_conv(node, modules, plan) and not _quantized_after(node, sources, modules):
                sources[node] = set()
    for src in [n for n in gm.graph.nodes if n in sources]:  # graph order: deterministic names
        name = f"quant_{src.name}"
        gm.add_submodule(name, _make_activation_quantizer(plan))
        for where in [src, *sorted(sources[src], key=lambda n: list(gm.graph.nodes).index(n))]:
            with gm.graph.inserting_after(where):
                point = gm.graph.call_module(name, (where,))
            where.replace_all_uses_with(
                point, delete_user_cb=lambda user, p=point: user is not p and user.op != "output"
            )
    gm.graph.lint()
    gm.recompile()
    feeding: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), WEIGHTED):
            arg = node.args[0]
            if isinstance(arg, fx.Node) and arg.op == "call_module" and str(arg.target).startswith("quant_"):
                feeding[str(node.target)] = str(arg.target)
    return feeding


def prepare(
    model: nn.Module,
    example: ModelInput,
    plan: QuantPlan,
    smoothing_inputs: Sequence[ModelInput] | None = None,
) -> fx.GraphModule:
    """A fake-quant copy of ``model`` (BN folded, inputs smoothed, quantizers placed, weights' ranges fixed).

    With ``plan.options.smoothing``, the linears' inputs are measured on ``smoothing_inputs`` and their range
    migrated into the weights before the weights' ranges are fixed (without inputs, as when a saved
    model is rebuilt, the smoothing modules start at factor 1 and its weights file sets them).
    Activation quantizers start in calibration mode (observing, values unchanged) unless the plan
    is dynamic; call :func:`torchshrink.quantization.ptq.calibrate` next.
    """
    model = copy.deepcopy(model).eval()
    bake_parametrizations(model)  # a weight-normed layer quantizes its current weight
    if plan.options.embeddings:
        snap_embedding_tables(model)
    unknown = sorted(set(plan.layers) - set(quantizable_layers(model)))
    if unknown:
        raise QuantizationError(
            f"quantization plan names layers the model does not have: {unknown[:5]}; "
            f"quantizable layers: {quantizable_layers(model)[:10]}"
        )
    gm = trace_model(model, example, purpose="quantization", advice=" or use mode: weight_only")
    folded = _fold_batchnorm(gm)
    if folded:
        log.info("folded %d batch-norm layer(s) into convolutions", len(folded))
    if plan.options.smoothing is not None and plan.mode != "weight_only":
        groups = smoothing_groups(gm, [n for n, bits in plan.layers.items() if bits is not None])
        insert_input_scales(gm, groups)
        if smoothing_inputs is not None:
            smooth(gm, groups, smoothing_inputs, plan.options.smoothing)
    feeding = _insert_activation_points(gm, plan) if plan.mode != "weight_only" else {}
    for name, bits in plan.layers.items():
        if bits is None:
            continue
        layer = gm.get_submodule(name)
        quantizer = FakeQuantize(
            _weight_spec(bits, plan), plan.options.weight_observer, channels=layer.weight.shape[0]
        )
        quantizer.calibrate()
        quantizer(layer.weight.detach())
        quantizer.freeze()
        parametrize.register_parametrization(layer, "weight", _WeightQuant(quantizer), unsafe=True)
        if layer.bias is not None and name in feeding and plan.mode != "dynamic":
            act = gm.get_submodule(feeding[name])
            parametrize.register_parametrization(layer, "bias", _BiasQuant(act, quantizer), unsafe=True)
    for fq in activation_quantizers(gm).values():
        if not fq.dynamic:
            fq.calibrate()
    return gm


def weight_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """The weight quantizer of each quantized layer, by layer name."""
    out = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations["weight"]:
                if isinstance(p, _WeightQuant):
                    out[name] = p.quantizer
    return out


def activation_quantizers(model: nn.Module) -> dict[str, FakeQuantize]:
    """The activation quantization points, by name."""
    return {n: m for n, m in model.named_children() if isinstance(m, FakeQuantize)}


@register_architecture_layer("quantized")
def restore(model: nn.Module, record: dict[str, Any]) -> fx.GraphModule:
    """Rebuild the fake-quant structure a saved model was made with (scales come from its weights file).

    ``record`` is what :func:`quantization_record` wrote into the architecture reference.
    """
    plan = QuantPlan.from_dict(record["plan"])
    spec = (
        InputSpec.from_dict(record["inputs"])
        if "inputs" in record
        else InputSpec.of_shape(record["input_shape"])
    )
    gm = prepare(model, spec.example(2), plan)
    for fq in activation_quantizers(gm).values():
        if not fq.dynamic:
            fq.observing, fq.enabled = False, True
    return gm


def quantization_record(plan: QuantPlan, inputs: InputSpec) -> dict[str, Any]:
    """The JSON-able description under which a quantized model's architecture is saved."""
    return {"plan": plan.to_dict(), "inputs": inputs.to_dict()}
