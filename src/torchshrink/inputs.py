"""What a model takes, described once: named input tensors with dtypes, per-sample shapes, integer
ranges and variable-length axes, read from the data and used wherever a model is run.

A model input (:data:`ModelInput`) is one tensor, or a tuple of tensors for a model whose
``forward`` takes several (token ids and an attention mask, an image and its metadata). Single-input
models see exactly what they always did: one tensor. Every place that runs a model goes through
:func:`call`, slices samples with :func:`take`, and makes stand-in inputs with
:meth:`InputSpec.example`, so latency, MACs, tracing, calibration, importance scores, ONNX export
and evaluation all agree on what the model is fed.

The description comes from the data (:meth:`InputSpec.observe`), never from guessing: dtypes and
shapes as stored, integer ranges as observed (or as declared, e.g. a vocabulary size), and the
per-sample axis of integer sequences marked variable, so ONNX files take any sequence length.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink.errors import DataError, ShapeMismatchError

__all__ = [
    "ModelInput",
    "InputField",
    "InputSpec",
    "as_spec",
    "spec_of",
    "as_tuple",
    "call",
    "take",
    "count",
    "to_device",
    "samples",
    "Samples",
    "DEFAULT_NAME",
]

ModelInput = torch.Tensor | tuple[torch.Tensor, ...]
DEFAULT_NAME = "input"
"""The name of a model's only input when the data does not name it (also its ONNX input name)."""
TEXT_INPUTS = ("input_ids", "attention_mask")
"""What a tokenizer gives a transformers text model, in its ``forward``'s order."""
MASK_INPUT = TEXT_INPUTS[1]
"""The input that marks real tokens (1) and padding (0)."""

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def call(model: nn.Module | Any, x: ModelInput) -> Any:
    """``model(x)`` for one input tensor, ``model(*x)`` for several."""
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def take(x: ModelInput, index: Any) -> ModelInput:
    """The samples ``index`` (a slice, an index tensor or an int) of every input tensor."""
    return tuple(t[index] for t in x) if isinstance(x, (tuple, list)) else x[index]


def count(x: ModelInput) -> int:
    """How many samples ``x`` holds."""
    return len(x[0]) if isinstance(x, (tuple, list)) else len(x)


def to_device(x: ModelInput, device: torch.device | str) -> ModelInput:
    """``x`` on ``device``."""
    return tuple(t.to(device) for t in x) if isinstance(x, (tuple, list)) else x.to(device)


def as_tuple(x: ModelInput) -> tuple[torch.Tensor, ...]:
    """``x`` as a tuple of tensors (positional arguments of ``forward``)."""
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class Samples(TensorDataset):
    """A dataset whose first entry is a model input of several tensors: item ``i`` is
    ``((x1[i], x2[i], ...), y[i], ...)``, so a DataLoader's batch is ``([X1, X2, ...], Y, ...)``.

    ``tensors`` keeps the :class:`~torch.utils.data.TensorDataset` layout, with the input tuple first.
    """

    def __init__(self, x: tuple[torch.Tensor, ...], *targets: torch.Tensor) -> None:  # noqa: D107
        n = count(x)
        if any(len(t) != n for t in (*x, *targets)):
            raise DataError(f"every input and target needs the same number of samples ({n})")
        self.tensors = (tuple(x), *targets)  # type: ignore[assignment]

    def __getitem__(self, index: Any) -> tuple[Any, ...]:
        return tuple(take(t, index) for t in self.tensors)

    def __len__(self) -> int:
        return count(self.tensors[0])


def samples(x: ModelInput, *targets: torch.Tensor) -> TensorDataset:
    """A dataset of inputs ``x`` and per-sample ``targets``: a plain TensorDataset for one input tensor."""
    if isinstance(x, (tuple, list)):
        return Samples(tuple(x), *targets)
    return TensorDataset(x, *targets)


@dataclass(frozen=True)
class InputField:
    """One input tensor of a model: its name, dtype, per-sample shape and, for integers, the range
    ``[low, high)`` its values lie in; ``dynamic`` lists the per-sample axes whose length may vary."""

    name: str
    dtype: str = "float32"
    shape: tuple[int, ...] = ()
    low: int | None = None
    high: int | None = None
    dynamic: tuple[int, ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def is_integer(self) -> bool:
        return self.dtype != "float32"

    def describe(self) -> str:
        """``input_ids int64 (128,) in [0, 30522)``: for error messages and reports."""
        text = f"{self.name} {self.dtype} {tuple(self.shape)}"
        if self.is_integer and self.low is not None:
            text += f" in [{self.low}, {self.high})"
        return text

    def example(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Stand-in values: standard normal floats, integers drawn uniformly from the field's range."""
        shape = (batch_size, *self.shape)
        if not self.is_integer:
            return torch.randn(shape, generator=generator)
        low = self.low if self.low is not None else 0
        high = self.high if self.high is not None else low + 1
        return torch.randint(low, high, shape, generator=generator, dtype=self.torch_dtype)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.low is not None:
            out |= {"low": self.low, "high": self.high}
        if self.dynamic:
            out["dynamic"] = list(self.dynamic)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputField:
        dtype = str(data.get("dtype", "float32"))
        if dtype not in _DTYPES:
            raise DataError(f"input {data.get('name')!r}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return cls(
            name=str(data["name"]),
            dtype=dtype,
            shape=tuple(int(s) for s in data.get("shape", ())),
            low=None if data.get("low") is None else int(data["low"]),
            high=None if data.get("high") is None else int(data["high"]),
            dynamic=tuple(int(a) for a in data.get("dynamic", ())),
        )


@dataclass(frozen=True)
class InputSpec:
    """The inputs of a model, in the order its ``forward`` takes them."""

    fields: tuple[InputField, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.fields:
            raise DataError("a model needs at least one input")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise DataError(f"input names must be distinct, got {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def single(self) -> bool:
        return len(self.fields) == 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape of a model's only float input (image-shaped generators, augmentation)."""
        if not self.single or self.fields[0].is_integer:
            raise DataError(
                f"this needs a model with one float input (an image, a signal, features); the model takes "
                f"{self.describe()}"
            )
        return self.fields[0].shape

    def describe(self) -> str:
        return ", ".join(f.describe() for f in self.fields)

    @classmethod
    def of_shape(cls, shape: Sequence[int], name: str = DEFAULT_NAME) -> InputSpec:
        """One float input of per-sample ``shape``."""
        return cls((InputField(name, "float32", tuple(int(s) for s in shape)),))

    @classmethod
    def observe(
        cls,
        named: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
        ranges: Mapping[str, tuple[int, int]] | None = None,
    ) -> InputSpec:
        """The description of the tensors ``named`` (one tensor, or several splits, per input).

        Integer inputs get the range their values span (or the declared ``ranges``, which must hold
        them); an integer input of one axis per sample (a token sequence) gets a variable length.
        """
        ranges = dict(ranges or {})
        unknown = sorted(set(ranges) - set(named))
        if unknown:
            raise DataError(
                f"input_ranges names {unknown}, which are not inputs; the inputs are {sorted(named)}"
            )
        fields = []
        for name, value in named.items():
            parts = [value] if isinstance(value, torch.Tensor) else list(value)
            first = parts[0]
            if first.is_floating_point():
                fields.append(InputField(name, "float32", tuple(first.shape[1:])))
                continue
            observed = (
                (
                    min(int(p.min()) for p in parts if p.numel()),
                    max(int(p.max()) for p in parts if p.numel()) + 1,
                )
                if any(p.numel() for p in parts)
                else (0, 1)
            )
            low, high = observed
            if name in ranges:
                low, high = (int(v) for v in ranges[name])
                if not (low <= observed[0] and observed[1] <= high):
                    raise DataError(
                        f"input {name!r}: values span [{observed[0]}, {observed[1]}) but input_ranges declares "
                        f"[{low}, {high}); declare a range that holds the data"
                    )
            dynamic = (0,) if first.ndim == 2 else ()
            fields.append(InputField(name, "int64", tuple(first.shape[1:]), low, high, dynamic))
        return cls(tuple(fields))

    def example(
        self, batch_size: int = 1, seed: int = 0, device: torch.device | str | None = None
    ) -> ModelInput:
        """Stand-in inputs of ``batch_size`` samples (the same for the same seed): for timing,
        counting, tracing and export, where values do not change the work done."""
        generator = torch.Generator().manual_seed(seed)
        tensors = tuple(f.example(batch_size, generator) for f in self.fields)
        if device is not None:
            tensors = tuple(t.to(device) for t in tensors)
        return tensors[0] if self.single else tensors

    def onnx_axes(self) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes: the batch of every input, and each variable per-sample axis (inputs of the
        same length share a name, so ONNX Runtime knows they agree)."""
        axes: dict[str, dict[int, str]] = {}
        for f in self.fields:
            axes[f.name] = {0: "batch"} | {a + 1: "sequence" if a == 0 else f"axis{a + 1}" for a in f.dynamic}
        return axes

    def to_dict(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.fields]

    @classmethod
    def from_dict(cls, data: Iterable[Mapping[str, Any]]) -> InputSpec:
        return cls(tuple(InputField.from_dict(d) for d in data))

    def check_order(self, model: nn.Module, source: str) -> None:
        """A named error unless ``model.forward`` takes these inputs, positionally, in this order.

        Inputs named after ``forward``'s parameters must come in its order with none it requires left
        out; a model with one input takes it whatever it is called, and ``forward(x, *rest)`` takes the
        inputs past its named parameters in any names.
        """
        if self.single:
            return
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [p for p in params if p.kind in kinds]
        order = [p.name for p in positional]
        name = type(model).__name__
        if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
            # forward(x, *rest): inputs past the named parameters go to *rest. Inputs named after none
            # of its parameters are taken as they come; once one is named after a parameter, the
            # named ones must be exactly forward's, in its order.
            named = bool(set(self.names) & set(order))
            if named and list(self.names[: len(order)]) != order[: len(self.names)]:
                raise ShapeMismatchError(
                    f"{source}: inputs are passed to {name}.forward by position, which takes {order} "
                    f"before *args; the data gives {list(self.names)}: list data.inputs in forward's order"
                )
            return
        missing = [n for n in self.names if n not in order]
        if missing:
            raise ShapeMismatchError(
                f"{source}: {name}.forward has no parameter for input(s) {missing}; it takes {order}: "
                "name the data's inputs after them"
            )
        taken = order[: len(self.names)]
        if list(self.names) != taken:
            raise ShapeMismatchError(
                f"{source}: inputs are passed to {name}.forward by position, which takes {taken} first; "
                f"the data gives {list(self.names)}: list data.inputs in forward's order (add the ones "
                "left out, e.g. an attention mask of ones)"
            )


def spec_of(x: ModelInput) -> InputSpec:
    """The description of the batch ``x`` as it is (for sizes and timings, where only shapes and
    dtypes matter)."""
    tensors = as_tuple(x)
    names = [DEFAULT_NAME] if len(tensors) == 1 else [f"input{i}" for i in range(len(tensors))]
    return InputSpec.observe(dict(zip(names, tensors, strict=True)))


def as_spec(value: InputSpec | Sequence[int]) -> InputSpec:
    """An :class:`InputSpec`, or a per-sample shape meaning one float input of that shape."""
    return value if isinstance(value, InputSpec) else InputSpec.of_shape(value)
