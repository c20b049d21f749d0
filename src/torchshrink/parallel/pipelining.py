"""Model (pipeline) parallelism on ``torch.distributed.pipelining``: one model split into
consecutive stages, one stage per process under torchrun, micro-batches flowing through them.

* **Split.** At module boundaries the recipe names (``split: [layers.1]``: stage 2 begins there), or
  balanced automatically: the model's blocks (top-level children, with sequential containers opened
  one level) are timed on an example batch (``balance: time``) or weighed by their parameter bytes
  (``balance: memory``), and cut where the slowest (or largest) stage is smallest.
* **Train.** :class:`StageRunner` is what the one training loop (:func:`torchshrink.train.fit`) steps
  through instead of ``loss.backward()``: the first rank feeds the batch, the last computes the loss
  on each micro-batch, the schedule (GPipe or 1F1B) runs forward and backward, gradients are averaged
  over micro-batches (so a step equals a full-batch step up to float order and batch-norm statistics,
  which see one micro-batch at a time). Each rank's optimizer holds only its stage's parameters.
* **After training** every rank receives the other stages' weights (:meth:`StageRunner.gather`), so
  the stages after training (pruning, quantization, measurement, files) see the whole model.

Pipeline x data (2-D) parallelism is not supported: the process count must equal the stage count.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import fx, nn

from torchshrink.errors import TrainingError
from torchshrink.inputs import ModelInput, call, count, take, to_device
from torchshrink.modes import switched
from torchshrink.parallel import ddp
from torchshrink.parallel.ddp import DistInfo, broadcast_object
from torchshrink.parallel.graph_split import graph_stages

log = logging.getLogger(__name__)

__all__ = [
    "PipelineSettings",
    "pipelined",
    "active",
    "blocks",
    "block_costs",
    "block_bytes",
    "balanced_split",
    "check_split",
    "StageRunner",
]


@dataclass(frozen=True)
class PipelineSettings:
    """How a model is split: ``stages`` processes, ``microbatches`` per batch, where stages begin."""

    stages: int = 2
    microbatches: int = 4
    split: tuple[str, ...] = ()  # module names where stages 2, 3, ... begin; empty: balanced by cost
    schedule: str = "gpipe"  # gpipe | 1f1b
    balance: str = "time"  # an automatic split evens out: time (measured) | memory (parameter bytes)


_ACTIVE: PipelineSettings | None = None


@contextlib.contextmanager
def pipelined(settings: PipelineSettings | None) -> Iterator[None]:
    """Within this block, training runs pipeline-parallel with ``settings`` (None: as usual)."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, settings
    try:
        yield
    finally:
        _ACTIVE = previous


def active() -> PipelineSettings | None:
    """The pipeline settings of the running job, if it trains pipeline-parallel."""
    return _ACTIVE


def blocks(model: nn.Module) -> list[str]:
    """Candidate stage boundaries in execution order: the top-level children, with sequential
    containers (``nn.Sequential``, ``nn.ModuleList``) opened one level; in a torch.fx graph module
    (a fake-quant model) ordered by their first call in the graph."""
    if isinstance(model, fx.GraphModule):
        children = dict(model.named_children())
        called = [
            str(n.target).split(".")[0] for n in model.graph.nodes if n.op in ("call_module", "get_attr")
        ]
        return list(dict.fromkeys(name for name in called if name in children))
    names = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


def block_costs(model: nn.Module, example: ModelInput, repeats: int = 5) -> dict[str, float]:
    """Seconds each block takes in a forward pass of ``example`` (median of ``repeats``), by hooks."""
    names = blocks(model)
    started: dict[str, float] = {}
    spent: dict[str, list[float]] = {n: [] for n in names}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(lambda m, a, n=name: started.__setitem__(n, time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, n=name: spent[n].append(time.perf_counter() - started[n])
            )
        )
    try:
        with torch.no_grad():
            for _ in range(repeats + 1):
                call(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return {n: sorted(t[1:])[len(t[1:]) // 2] if len(t) > 1 else 0.0 for n, t in spent.items()}


def block_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of parameters each block holds (what its stage's training state grows with)."""
    return {
        name: float(sum(p.numel() * p.element_size() for p in model.get_submodule(name).parameters()))
        for name in blocks(model)
    }


def balanced_split(costs: dict[str, float], stages: int) -> tuple[str, ...]:
    """The ``stages - 1`` block names where stages begin that make the slowest stage fastest
    (exhaustive over contiguous partitions by dynamic programming)."""
    names, values = list(costs), list(costs.values())
    n = len(names)
    if n < stages:
        raise TrainingError(f"the model has {n} blocks ({names}); it cannot be split into {stages} stages")
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    inf = float("inf")
    # best[k][i]: the slowest stage when the first i blocks form k stages; cut[k][i]: where the last begins
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    starts, i = [], n
    for k in range(stages, 1, -1):
        i = cut[k][i]
        starts.append(names[i])
    return tuple(reversed(starts))


def check_split(model: nn.Module, split: Sequence[str], stages: int) -> None:
    """Named errors for a split that does not divide the model into ``stages`` consecutive parts."""
    if len(split) != stages - 1:
        raise TrainingError(
            f"parallel.pipeline.split names {len(split)} boundaries ({list(split)}); {stages} stages need "
            f"{stages - 1}: the modules where stages 2..{stages} begin"
        )
    known = dict(model.named_modules())
    missing = [name for name in split if name not in known or name == ""]
    if missing:
        raise TrainingError(
            f"parallel.pipeline.split names {missing}, which are not modules of the model; candidates in "
            f"execution order: {blocks(model)}"
        )
    order = blocks(model)
    positions = [order.index(name) for name in split if name in order]
    if len(positions) == len(split) and positions != sorted(positions):
        raise TrainingError(f"parallel.pipeline.split {list(split)} is not in execution order ({order})")


class StageRunner:
    """This rank's stage of ``model`` and the schedule that trains it (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        example: ModelInput,
        settings: PipelineSettings,
        info: DistInfo,
        loss_of_outputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        device: torch.device,
        training: bool = True,
    ) -> None:
        """``loss_of_outputs`` None: a forward-only pipeline (evaluation, :func:`predict`)."""
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        if info.world_size != settings.stages:
            raise TrainingError(
                f"parallel.pipeline.stages is {settings.stages} but torchrun started {info.world_size} "
                "process(es): start one process per stage (--nproc_per_node / --nnodes); pipeline x data "
                "parallelism is not supported"
            )
        if _batch(example) % settings.microbatches:
            raise TrainingError(
                f"the batch of {_batch(example)} does not divide into {settings.microbatches} equal "
                "micro-batches (parallel.pipeline.microbatches): choose a batch_size that is a multiple of it"
            )
        if settings.schedule == "1f1b" and settings.microbatches < settings.stages:
            raise TrainingError(
                f"schedule 1f1b needs at least as many micro-batches as stages ({settings.stages}); "
                f"parallel.pipeline.microbatches is {settings.microbatches}"
            )
        split = settings.split
        if not split:
            model.eval()  # timed without touching batch-norm statistics
            costs = block_bytes(model) if settings.balance == "memory" else block_costs(model, example)
            # rank 0 decides: timings differ between processes, and every stage must cut alike
            split = tuple(broadcast_object(balanced_split(costs, settings.stages)))  # type: ignore[arg-type]
            log.info("pipeline: block %s %s; stages begin at %s", settings.balance, costs, list(split))
        check_split(model, split, settings.stages)
        micro = take(example, slice(0, _batch(example) // settings.microbatches))
        self.split = tuple(split)
        self.info = info
        self.device = device
        cut = graph_stages(model, micro, split)
        # every rank must take the same route: rank 0 decides (a rank whose cut failed cannot follow)
        graph = bool(broadcast_object(cut is not None))
        if graph and cut is None:
            raise TrainingError(
                "rank 0 cut the model's graph into stages but this rank could not (see its log); the "
                "stages would not fit together"
            )
        cut = cut if graph else None
        if cut is not None:  # the model's own modules, eagerly (see graph_split)
            from torch.distributed.pipelining import PipelineStage

            self.route = "graph"
            self.stage_modules: list[nn.Module] = [part.module for part in cut]
            mine = cut[info.rank]
            self.stage = PipelineStage(
                mine.module,
                info.rank,
                settings.stages,
                device,
                input_args=mine.inputs,
                output_args=mine.outputs,
            )
        else:
            self.route = "export"
            self.stage_modules, self.stage = _exported(model, micro, split, settings, info, device, training)
        self.module = self.stage_modules[info.rank]
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[settings.schedule]
        self.schedule = kind(self.stage, n_microbatches=settings.microbatches, loss_fn=loss_of_outputs)
        self.first, self.last = info.rank == 0, info.rank == info.world_size - 1

    def forward(self, x: ModelInput) -> torch.Tensor | None:
        """The outputs for one batch, forward only (a runner built without a loss): on the last rank;
        None on the others."""
        args = x if isinstance(x, tuple) else (x,)
        with torch.no_grad():
            if self.first:
                self.schedule.step(*args)
                return None
            out = self.schedule.step()
        return out if self.last else None

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's stage's parameters (the same objects as the model's)."""
        return list(self.module.named_parameters())

    def step(self, x: ModelInput, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch through the pipeline; the mean micro-batch loss, on every rank."""
        args = x if isinstance(x, tuple) else (x,)
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(*args)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        if self.last:
            loss = torch.stack([v.detach().float() for v in losses]).mean()
        else:
            loss = torch.zeros((), device=self.device)
        dist.broadcast(loss, src=self.info.world_size - 1)
        return loss

    def grad_norm_squared(self) -> torch.Tensor:
        """The squared gradient norm over every stage (for clipping by the global norm)."""
        local = sum(
            (p.grad.detach().pow(2).sum() for p in self.module.parameters() if p.grad is not None),
            torch.zeros((), dtype=torch.float64, device=self.device),
        )
        total = local.to(torch.float64)
        dist.all_reduce(total)
        return total

    def gather(self) -> None:
        """Every stage's weights and buffers from the rank that trained them to every rank."""
        with torch.no_grad():
            for owner, module in enumerate(self.stage_modules):
                for tensor in module.state_dict().values():
                    if tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32):
                        dist.broadcast(tensor.data, src=owner)
                    else:  # bool / small integer buffers (flags): through int32
                        carried = tensor.data.to(torch.int32)
                        dist.broadcast(carried, src=owner)
                        tensor.data.copy_(carried.to(tensor.dtype))

    def state_bytes(self, optimizer: torch.optim.Optimizer) -> int:
        """Bytes this rank holds for training: its stage's parameters, gradients and optimizer state."""
        params = sum(p.numel() * p.element_size() for p in self.module.parameters())
        grads = sum(
            p.grad.numel() * p.grad.element_size() for p in self.module.parameters() if p.grad is not None
        )
        state = sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        return params + grads + state


def _exported(
    model: nn.Module,
    micro: ModelInput,
    split: Sequence[str],
    settings: PipelineSettings,
    info: DistInfo,
    device: torch.device,
    training: bool,
) -> tuple[list[nn.Module], object]:
    """The stages traced by ``torch.export`` (for models torch.fx cannot trace): stage modules and this
    rank's stage. The mode is fixed in the traced graph, so a training pipeline and an evaluating one
    are traced apart."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    args = micro if isinstance(micro, tuple) else (micro,)
    with switched(model, training=training):
        try:
            pipe = pipeline(model, mb_args=args, split_spec={name: SplitPoint.BEGINNING for name in split})
        except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds on untraceable models
            raise TrainingError(
                f"the model cannot be split for pipeline parallelism at {list(split)} (neither torch.fx nor "
                f"torch.export could trace it: {type(exc).__name__}: {str(exc)[:300]})"
            ) from None
    if getattr(pipe, "replicated_params", None):
        raise TrainingError(
            "the model shares weights between stages (tied parameters): the split would train separate "
            f"copies; choose split points that keep them in one stage (now {list(split)})"
        )
    if pipe.num_stages != settings.stages:
        raise TrainingError(
            f"splitting at {list(split)} gave {pipe.num_stages} stages, not {settings.stages}: the "
            "boundaries must be modules the forward pass calls in order"
        )
    return [pipe.get_stage_module(i) for i in range(pipe.num_stages)], pipe.build_stage(info.rank, device)


def predict(model: nn.Module, inputs: ModelInput, batch_size: int = 500) -> torch.Tensor | None:
    """``model``'s outputs for all ``inputs`` computed through the pipeline of the running job (every
    rank calls it; every rank gets the outputs), in eval mode; None when no pipeline is active."""
    settings, info = active(), ddp.current()
    if settings is None or not info.distributed:
        return None
    size = settings.microbatches * max(1, batch_size // settings.microbatches)
    n = count(inputs)
    device = ddp.device_for(info)
    model.to(device)  # as fit does: the stages run where the inputs go
    with switched(model):
        try:
            runner = StageRunner(
                model, to_device(_padded(inputs, 0, size), device), settings, info, None, device, False
            )
        except TrainingError as exc:  # the same on every rank: each holds the same model
            log.warning("evaluated without the pipeline (on the whole model in every process): %s", exc)
            return None
        parts = []
        for start in range(0, n, size):
            out = runner.forward(to_device(_padded(inputs, start, size), device))
            if out is not None:
                parts.append(out[: min(size, n - start)].cpu())
    outputs = torch.cat(parts) if parts else None
    return broadcast_object(outputs, src=info.world_size - 1)  # type: ignore[return-value]


def _padded(inputs: ModelInput, start: int, size: int) -> ModelInput:
    """``size`` samples from ``start``, the last one repeated past the end (micro-batches are equal)."""
    n = count(inputs)
    index = torch.arange(start, start + size).clamp_max(n - 1)
    return take(inputs, index)


def _batch(x: ModelInput) -> int:
    return int((x[0] if isinstance(x, tuple) else x).shape[0])
