"""The single source of numbers: accuracy, parameters, non-zeros, MACs, artefact size and latency."""

from __future__ import annotations

import functools
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from torchshrink.errors import ShapeMismatchError
from torchshrink.inputs import InputSpec, ModelInput, as_spec, call, count, spec_of, take
from torchshrink.io import encode_sparse
from torchshrink.modes import switched
from torchshrink.parallel import pipelining

METRIC_NAMES = (
    "accuracy",
    "params",
    "nonzero_params",
    "macs",
    "size_bytes",
    "latency_ms_b1",
    "latency_ms_b32",
)

__all__ = [
    "METRIC_NAMES",
    "predict",
    "accuracy",
    "fidelity",
    "mean_cosine",
    "neighbour_agreement",
    "is_embedding_target",
    "count_params",
    "count_macs",
    "count_activations",
    "serialized_size",
    "latency_ms",
    "latencies_ms",
    "interleaved_medians",
    "interleaved_times",
    "Latency",
    "TimingPass",
    "timing_pass",
    "measure",
    "check_model_fits",
]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def predict(
    model: nn.Module, inputs: ModelInput, batch_size: int = 500, pipelined: bool = False
) -> torch.Tensor:
    """The outputs of ``model`` for all ``inputs``, in eval mode and batches, without gradients.

    ``pipelined``: through the pipeline stages of a pipeline-parallel job (every rank must call it);
    as usual when the job is not one. (``no_grad`` rather than ``inference_mode``: the result may
    serve as a training target.)
    """
    if pipelined and (split := pipelining.predict(model, inputs, batch_size)) is not None:
        return split
    with switched(model):
        n = count(inputs)
        return torch.cat(
            [call(model, take(inputs, slice(i, i + batch_size))) for i in range(0, n, batch_size)]
        )


def is_embedding_target(y: torch.Tensor) -> bool:
    """Targets that are vectors (an embedding model's outputs to stay close to), not class labels."""
    return y.is_floating_point() and y.ndim == 2


def accuracy(
    model: nn.Module, dataset: TensorDataset, batch_size: int = 500, pipelined: bool = False
) -> float:
    """The quality score (0-1) of ``model`` on ``dataset``, in eval mode: top-1 accuracy against
    integer labels; against vector targets (the original embedding model's outputs), the mean
    cosine similarity of the outputs to them."""
    x, y = dataset.tensors[0], dataset.tensors[1]
    if count(x) == 0:
        return 0.0
    out = predict(model, x, batch_size, pipelined)
    if is_embedding_target(y):
        return mean_cosine(out, y)
    return int((out.argmax(dim=1) == y).sum()) / count(x)


def mean_cosine(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean cosine similarity of each output vector to its target vector."""
    return float(torch.nn.functional.cosine_similarity(outputs.float(), targets.float(), dim=1).mean())


def neighbour_agreement(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The share of samples whose nearest neighbour (by cosine, itself excluded) among the others is
    the same for ``outputs`` as for ``targets``: does the compressed embedding retrieve the same text?"""
    if len(outputs) < 2:
        return 1.0
    return float((_nearest(outputs) == _nearest(targets)).float().mean())


def _nearest(vectors: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Each vector's most cosine-similar other vector, ``rows`` at a time (memory grows with
    ``rows`` x n, not n x n)."""
    v = torch.nn.functional.normalize(vectors.float(), dim=1)
    found = []
    for start in range(0, len(v), rows):
        similarity = v[start : start + rows] @ v.T
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -float(
            "inf"
        )
        found.append(similarity.argmax(dim=1))
    return torch.cat(found)


def fidelity(
    model: nn.Module, dataset: TensorDataset, batch_size: int = 500, pipelined: bool = False
) -> dict[str, float]:
    """Mean cosine and nearest-neighbour agreement of ``model``'s embeddings with the target vectors."""
    x, y = dataset.tensors[0], dataset.tensors[1]
    out = predict(model, x, batch_size, pipelined)
    return {"cosine": mean_cosine(out, y), "nn_agreement": neighbour_agreement(out, y)}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters); shared parameters count once."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


@torch.inference_mode()
def _forward_once(model: nn.Module, inputs: InputSpec | Sequence[int], mode: TorchDispatchMode) -> None:
    """Run one stand-in sample through ``model`` in eval mode under a dispatch ``mode`` that counts."""
    # FlopCounterMode's module tracker hooks gradients of any module input that requires grad, which
    # fails without autograd (e.g. a parametrized weight passed to its quantizer): switch them off.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    sample = as_spec(inputs).example(1, device=device)  # made outside the mode: not the model's work
    try:
        with switched(model), mode:
            call(model, sample)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def count_macs(model: nn.Module, inputs: InputSpec | Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one sample (FLOPs / 2, by torch.utils.flop_counter).

    ``inputs`` describes what the model takes (a per-sample shape means one float input)."""
    counter = FlopCounterMode(display=False)
    _forward_once(model, inputs, counter)
    return counter.get_total_flops() // 2


class _ElementCounter(TorchDispatchMode):
    """Sums the elements every non-view operator writes: the memory traffic MACs do not show."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.elements += sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out


def count_activations(model: nn.Module, inputs: InputSpec | Sequence[int]) -> int:
    """Elements written by one forward pass on one sample (outputs of every operator except views).

    Small models on a CPU are bound by this traffic as much as by MACs: a LeNet-5's first conv costs
    more latency per MAC than its later layers because its output and the ReLU and pooling over it
    are large.
    """
    counter = _ElementCounter()
    _forward_once(model, inputs, counter)
    return counter.elements


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's weights as torchshrink writes them (safetensors; sparse tensors packed)."""
    tensors, metadata = encode_sparse(model.state_dict())
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return len(safetensors_bytes(state, metadata=metadata or None))


def interleaved_times(
    variants: Mapping[str, Callable[[], object]], repeats: int = 30, warmup: int = 5
) -> dict[str, list[float]]:
    """Milliseconds of each callable per round, timed interleaved (A B C, then C A B, ...: every round
    runs each once, in a new order) so a slow stretch of the machine hits every variant alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle  # a fresh order each round: no variant always follows another
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - start) * 1000.0)
        shuffle(order)
    return times


def interleaved_medians(
    variants: Mapping[str, Callable[[], object]], repeats: int = 30, warmup: int = 5
) -> dict[str, float]:
    """Median milliseconds of each callable, timed interleaved (:func:`interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(variants, repeats, warmup).items()}


@dataclass(frozen=True)
class Latency:
    """One model on one runtime at one batch size (ms): the median and quartiles of its own times,
    and ``paired``: the median over rounds of its time over the reference's time in that round,
    times the reference's median. Paired ratios cancel what a round shares (a busy stretch), so
    identical models read alike even on a loaded machine."""

    median: float
    q1: float
    q3: float
    paired: float

    @classmethod
    def of(cls, times: Sequence[float], reference: Sequence[float]) -> Latency:
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        ratio = statistics.median(t / max(r, 1e-9) for t, r in zip(times, reference, strict=True))
        return cls(statistics.median(times), q1, q3, ratio * statistics.median(reference))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


BUSY_ROUNDS = 100
"""Rounds of a timing pass when other processes keep the machine busy (fewer are asked for)."""


def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine from /proc/stat (Linux), else None."""
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return sum(fields) - idle, sum(fields)


@dataclass(frozen=True)
class TimingPass:
    """One interleaved timing of every row on every runtime it runs on (per batch size: [paired
    median, median, q1, q3] ms, paired against the first row's first runtime), and how busy the machine
    was with other work meanwhile (``other_load``: cores' worth, from /proc/stat minus this process)."""

    rows: dict[str, dict[str, dict[int, Latency]]]
    rounds: int
    seconds: float
    other_load: float | None
    cores: int
    threads: int

    @property
    def busy(self) -> bool:
        """Other processes kept more than a quarter of a core busy on average."""
        return self.other_load is not None and self.other_load > 0.25

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
            "other_load_cores": None if self.other_load is None else round(self.other_load, 3),
            "cores": self.cores,
            "threads": self.threads,
            "busy": self.busy,
            "rows": {
                row: {rt: {str(b): [round(v.paired, 4), round(v.median, 4), round(v.q1, 4), round(v.q3, 4)]
                           for b, v in by.items()}
                      for rt, by in runtimes.items()}
                for row, runtimes in self.rows.items()
            },
        }  # fmt: skip


def timing_pass(
    rows: Mapping[str, Mapping[str, nn.Module]],
    inputs: InputSpec | Sequence[int],
    batch_sizes: Sequence[int] = (1, 32),
    rounds: int = 30,
    threads: int = 2,
    warmup: int = 3,
) -> TimingPass:
    """Time every (row, runtime) model in one interleaved pass per batch size, on the same stand-in
    input: all numbers of a report share the machine's moment, so identical models get the same
    latency and speed-ups are ratios within one pass. When other processes keep cores busy (sampled
    just before), the pass uses only the free ones (at least one)."""
    cores = os.cpu_count() or 1
    before = _other_load(0.3)
    if before is not None and before > 0.5:  # others hold cores: time on the free ones (contended
        # threads make every call's time bimodal, and the median of such times jumps between modes)
        threads = max(1, min(threads, round(cores - before)))
        rounds = max(rounds, BUSY_ROUNDS)  # and more rounds: a contended call's time varies more
    started, cpu_before, own_before = time.perf_counter(), _cpu_jiffies(), os.times()
    out: dict[str, dict[str, dict[int, Latency]]] = {row: {rt: {} for rt in rts} for row, rts in rows.items()}
    models = [m for rts in rows.values() for m in rts.values()]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with _threads(threads), torch.inference_mode():
            for batch in batch_sizes:
                x = as_spec(inputs).example(batch)
                variants = {
                    f"{row}\x00{rt}": functools.partial(call, m, x)
                    for row, rts in rows.items()
                    for rt, m in rts.items()
                }
                measured = interleaved_times(variants, repeats=rounds, warmup=warmup)
                reference = next(iter(measured.values()))  # the first row's first runtime
                for key, times in measured.items():
                    row, rt = key.split("\x00")
                    out[row][rt][batch] = Latency.of(times, reference)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    seconds = time.perf_counter() - started
    other = _load_between(cpu_before, own_before, seconds)
    return TimingPass(out, rounds, seconds, other, cores, threads)


def _load_between(
    cpu_before: tuple[float, float] | None, own_before: os.times_result, seconds: float
) -> float | None:
    """Cores' worth of CPU time other processes used since ``cpu_before`` / ``own_before``."""
    cpu_after, own_after = _cpu_jiffies(), os.times()
    if cpu_before is None or cpu_after is None or seconds <= 0:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (cpu_after[0] - cpu_before[0]) / ticks
    own = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    return max(busy - own, 0.0) / seconds


def _other_load(window: float) -> float | None:
    """Cores' worth of CPU other processes use, sampled over ``window`` seconds (this one idle)."""
    cpu_before, own_before, started = _cpu_jiffies(), os.times(), time.perf_counter()
    time.sleep(window)
    return _load_between(cpu_before, own_before, time.perf_counter() - started)


def latencies_ms(
    models: Mapping[str, nn.Module],
    inputs: InputSpec | Sequence[int],
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 2,
) -> dict[str, float]:
    """Median forward-pass milliseconds of several models on the same stand-in input, timed interleaved."""
    x = as_spec(inputs).example(batch_size)
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with _threads(threads), torch.inference_mode():
            return interleaved_medians(
                {name: functools.partial(call, m, x) for name, m in models.items()},
                repeats=repeats,
                warmup=warmup,
            )
    finally:
        for name, m in models.items():
            m.train(modes[name])


def latency_ms(
    model: nn.Module,
    inputs: InputSpec | Sequence[int],
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 2,
) -> float:
    """Median wall-clock milliseconds of one forward pass, after warm-up, with a fixed thread count."""
    return latencies_ms({"model": model}, inputs, batch_size, repeats, warmup, threads)["model"]


def check_model_fits(
    model: nn.Module, inputs: InputSpec | Sequence[int], num_classes: int, source: str
) -> int:
    """Run one stand-in sample through the model and return its output width (its number of classes).

    A model may have more outputs than the data has classes (an ImageNet model on a few photos);
    fewer is an error that names both shapes, as are inputs the model cannot take (their number,
    order, dtype or shape).
    """
    spec = as_spec(inputs)
    spec.check_order(model, source)
    own_check = getattr(model, "check_inputs", None)  # a model that knows its limits (transformers)
    if callable(own_check):
        own_check(spec, source)
    try:
        with switched(model), torch.inference_mode():
            out = call(model, spec.example(1))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        shown = (
            f"of shape {spec.fields[0].shape}"
            if spec.single and not spec.fields[0].is_integer
            else spec.describe()
        )
        raise ShapeMismatchError(
            f"{source}: the model cannot take inputs {shown} (per sample): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeMismatchError(
            f"{source}: the model outputs {shape} per batch of 1; torchshrink needs logits of shape "
            "(batch, classes): wrap the model so that forward() returns them"
        )
    if out.shape[1] < num_classes:
        raise ShapeMismatchError(
            f"{source}: the data's labels exceed the model's classes: labels go up to {num_classes - 1}, "
            f"the model outputs {out.shape[1]} classes (0 to {out.shape[1] - 1}; expected at least "
            f"(1, {num_classes})): fix the labels above {out.shape[1] - 1}, or give the model num_classes: "
            f"{num_classes}"
        )
    return int(out.shape[1])


def measure(
    model: nn.Module,
    test: TensorDataset,
    *,
    artefact: str | Path | None = None,
    latency_repeats: int = 30,
    threads: int = 2,
    reference: nn.Module | None = None,
    runtime: nn.Module | None = None,
    onnx_reference: nn.Module | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    inputs: InputSpec | None = None,
) -> dict[str, float | int]:
    """All metrics of ``model``: accuracy on ``test``, size (the ``artefact`` file if given), MACs, latency.
    On embedding targets "accuracy" is the mean cosine, and "cosine" and "nn_agreement" are added.

    With a ``runtime`` (what executes the artefact, e.g. ONNX Runtime on an int8 file), accuracy and
    latency are measured on it; parameters and MACs still come from ``model``.

    With a ``reference`` model, latency is timed interleaved with it and ``speedup_b{n}`` (reference
    time / model time, from the same run) are added. With a ``runtime`` and an ``onnx_reference`` (the
    reference model on ONNX Runtime in fp32), ``speedup_onnx_fp32_b{n}`` is added too: what the ONNX
    file gains over the same model on the same runtime, the honest measure of quantization.

    ``inputs`` describes the model's inputs (the data's :attr:`~DatasetBundle.inputs`); without it the
    test inputs are described as they are.
    """
    spec = inputs if inputs is not None else spec_of(test.tensors[0])
    params, nonzero = count_params(model)
    size = Path(artefact).stat().st_size if artefact is not None else serialized_size(model)
    if is_embedding_target(test.tensors[1]):
        scores = fidelity(runtime or model, test, pipelined=runtime is None)
        quality: dict[str, float] = {"accuracy": scores["cosine"], **scores}
    else:
        quality = {"accuracy": accuracy(runtime or model, test, pipelined=runtime is None)}
    metrics: dict[str, float | int] = {
        **quality,
        "params": params,
        "nonzero_params": nonzero,
        "macs": count_macs(model, spec),
        "size_bytes": size,
    }
    for batch in batch_sizes:
        variants = {"model": runtime or model}
        if reference is not None:
            variants["reference"] = reference
        if runtime is not None and onnx_reference is not None:
            variants["onnx_fp32"] = onnx_reference
        times = latencies_ms(variants, spec, batch, repeats=latency_repeats, threads=threads)
        metrics[f"latency_ms_b{batch}"] = times["model"]
        if reference is not None:
            metrics[f"speedup_b{batch}"] = times["reference"] / times["model"]
        if "onnx_fp32" in times:
            metrics[f"speedup_onnx_fp32_b{batch}"] = times["onnx_fp32"] / times["model"]
    return metrics
