"""The one training loop. Fine-tuning, QAT, distillation and data-free distillation differ only in
the loss function and the batch source they pass in.

* ``loss_fn(model, batch)`` returns a tensor or a mapping of named loss terms (summed to the loss),
  so a NaN error can name the term that went bad.
* A batch source yields the batches of one epoch; :class:`DatasetBatches` covers datasets and shards
  them over ranks with a ``DistributedSampler``, so the loop runs unchanged under ``torchrun``.
* Checkpoints (:mod:`torchshrink.checkpoint`, safetensors + JSON) hold model, optimizer,
  scheduler, position and RNG state: a resumed run ends with bit-identical weights to an
  uninterrupted one.
* Divergence stops the run with the step, term and learning rate: a non-finite loss term, or a loss
  grown past ``divergence`` times its first value (at least 1), as an exploding learning rate makes it.
* The progress bar shows on the main process unless ``TORCHSHRINK_PROGRESS=0`` (parallel task
  workers set it, so their bars do not interleave).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from torchshrink.checkpoint import LoopState, TrainCheckpoint
from torchshrink.errors import TorchshrinkError, TrainingError
from torchshrink.inputs import call, to_device
from torchshrink.inputs import count as count_samples
from torchshrink.io import write_json_atomic
from torchshrink.measure import is_embedding_target
from torchshrink.parallel import ddp, pipelining

log = logging.getLogger(__name__)

Batch = tuple["torch.Tensor | tuple[torch.Tensor, ...]", ...]
"""A batch: the model input first (a tensor, or a tuple for a model that takes several), then targets."""
LossFn = Callable[[nn.Module, Batch], "torch.Tensor | Mapping[str, torch.Tensor]"]

__all__ = [
    "TrainConfig",
    "TrainResult",
    "BatchSource",
    "DatasetBatches",
    "classification_loss",
    "cosine_distance",
    "task_loss",
    "supervised_loss",
    "fit",
]


class BatchSource(Protocol):
    """Anything that yields the batches of one epoch and knows how many there are (on this rank)."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterable[Batch]: ...


class DatasetBatches:
    """Shuffled batches of a dataset, sharded over ranks; ``batch_size`` is the global batch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        info = ddp.current()
        # pipeline parallelism: every stage sees the whole batch (full batches only: the stages'
        # buffers are shaped for one micro-batch size)
        replicas, rank = (1, 0) if pipelining.active() else (info.world_size, info.rank)
        if batch_size % replicas:
            raise TrainingError(
                f"batch_size {batch_size} must be divisible by the number of processes ({replicas})"
            )
        self.dataset = dataset
        self.per_rank = batch_size // replicas
        self.sampler = DistributedSampler(
            dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed
        )
        # A private generator keeps DataLoader from drawing on the global RNG (exact resume).
        self.loader = DataLoader(
            dataset,
            batch_size=self.per_rank,
            sampler=self.sampler,
            generator=torch.Generator().manual_seed(seed),
            drop_last=pipelining.active() is not None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterable[Batch]:
        self.sampler.set_epoch(epoch)
        return self.loader


ACCURACY_TERM = "train_accuracy"
"""A loss function may return this term (top-1 accuracy on the batch): it is logged and watched by
the chance-level guard, never added to the loss."""
MONITOR_TERMS = frozenset({ACCURACY_TERM})


def batch_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{ACCURACY_TERM: top-1 accuracy}`` for integer labels; nothing for soft targets (mixup)."""
    if labels.dim() != 1 or labels.is_floating_point():
        return {}
    return {ACCURACY_TERM: (logits.detach().argmax(dim=1) == labels).float().mean()}


def classification_loss(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Cross-entropy of the model's logits against integer labels (or class distributions, as mixup
    makes), with the batch's top-1 accuracy as a monitored (not optimised) term."""
    x, y = batch[0], batch[1]
    logits = call(model, x)
    return {"ce": F.cross_entropy(logits, y), **batch_accuracy(logits, y)}


def cosine_distance(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - cos(output, target)`` averaged over the batch: how far an embedding model's vectors are
    from the ones it should reproduce (the quality score is the mean cosine, so this is its loss)."""
    return 1.0 - F.cosine_similarity(outputs.float(), targets.float(), dim=1).mean()


def embedding_loss(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Cosine distance of the model's vectors to the target vectors (an embedding model's outputs)."""
    return {"cosine": cosine_distance(call(model, batch[0]), batch[1])}


# What a pipeline's last stage computes from the model's outputs (the first stage holds the inputs).
classification_loss.of_outputs, classification_loss.term = F.cross_entropy, "ce"  # type: ignore[attr-defined]
embedding_loss.of_outputs, embedding_loss.term = cosine_distance, "cosine"  # type: ignore[attr-defined]


def task_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss a model is judged by on plain data: cosine distance against vector targets (an
    embedding model's own outputs), cross-entropy against class labels. Importance scores and the
    sensitivity allocation measure it; class distributions (mixup) go through
    :func:`classification_loss` instead."""
    if is_embedding_target(targets):
        return cosine_distance(outputs, targets)
    return F.cross_entropy(outputs, targets)


def supervised_loss(embedding: bool) -> LossFn:
    """The training loss for a dataset's targets: :func:`embedding_loss` for vectors, else cross-entropy."""
    return embedding_loss if embedding else classification_loss


@dataclass
class TrainConfig:
    """How to train: optimizer, learning-rate schedule, length, checkpoints and seed."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = None
    checkpoint_every: int = 0
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    lr_groups: dict[str, float] = field(default_factory=dict)
    """Learning rates for parameters whose names start with a prefix (e.g. ``{"generator.": 1e-3}``);
    the rest train at ``lr``. The schedule scales every group alike."""
    divergence: float | None = 1e3
    """Stop when the loss exceeds this multiple of its first value (at least 1), or when the training
    accuracy falls to chance after an epoch where it started above it; None: neither check."""
    num_classes: int | None = None
    """Classes of the task: sets the chance level the accuracy guard compares with (None: no guard)."""


@dataclass
class TrainResult:
    """What a training run did: steps, time, throughput and the mean loss terms of each epoch."""

    steps: int = 0
    seconds: float = 0.0
    samples_per_second: float = 0.0
    epoch_losses: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int | None = None
    pipeline: dict[str, object] | None = None  # pipeline parallelism: split, this rank's training bytes


def _param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict[str, object]]:
    """One optimizer group per ``lr_groups`` prefix (the first matching prefix wins), the rest at ``lr``."""
    groups: dict[str, list[nn.Parameter]] = {prefix: [] for prefix in cfg.lr_groups}
    rest: list[nn.Parameter] = []
    for name, p in named:
        prefix = next((k for k in cfg.lr_groups if name.startswith(k)), None)
        (groups[prefix] if prefix is not None else rest).append(p)
    empty = [k for k, ps in groups.items() if not ps]
    if empty:
        starts = sorted({n.split(".")[0] + "." for n, _ in named})
        raise TrainingError(
            f"lr_groups prefix(es) {empty} name no trainable parameter; parameter names start with {starts}"
        )
    out = [{"params": ps, "lr": cfg.lr_groups[k]} for k, ps in groups.items()]
    return ([{"params": rest, "lr": cfg.lr}] if rest else []) + out


def _make_optimizer(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(named, cfg)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _terms(raw: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"loss": raw} if isinstance(raw, torch.Tensor) else dict(raw)


def _check_divergence(
    cfg: TrainConfig,
    terms: Mapping[str, torch.Tensor],
    loss: float,
    first: float,
    step: int,
    epoch: int,
    index: int,
    optimizer: torch.optim.Optimizer,
) -> None:
    """A named error when the loss grew past ``cfg.divergence`` times its first value (at least 1)."""
    if cfg.divergence is None or loss <= cfg.divergence * max(first, 1.0):
        return
    largest = max(terms, key=lambda n: float(terms[n].detach()))
    raise TrainingError(
        f"{cfg.desc}: training diverged: loss {loss:.3g} at step {step + 1} (epoch {epoch + 1}, batch "
        f"{index + 1}) is over {cfg.divergence:g}x its first value {first:.3g} (largest term {largest!r}); "
        f"lower the learning rate (now {optimizer.param_groups[0]['lr']:.3g}), or set divergence: null "
        "to let it run"
    )


OPENING_SAMPLES = 32
"""The chance guard's "at the start": the accuracy of the first batch (scored before any update),
and of the next ones too while they hold fewer than this many samples together."""


def chance_floor(num_classes: int) -> tuple[float, float]:
    """(at chance, clearly above it): accuracy up to 10 % of the way from chance (1/classes) to 1
    counts as chance; a start counts as above chance from 25 % of the way."""
    chance = 1.0 / num_classes
    return chance + 0.1 * (1 - chance), chance + 0.25 * (1 - chance)


def _check_chance(
    cfg: TrainConfig, accuracy: float, opening: float | None, epoch: int, optimizer: torch.optim.Optimizer
) -> None:
    """A named error when an epoch's training accuracy is at chance although it started above it."""
    if cfg.divergence is None or not cfg.num_classes or cfg.num_classes < 2 or opening is None:
        return
    at_chance, above = chance_floor(cfg.num_classes)
    if accuracy <= at_chance and opening >= above:
        raise TrainingError(
            f"{cfg.desc}: training diverged: accuracy on the training batches fell to {accuracy:.3f} in "
            f"epoch {epoch + 1} (chance for {cfg.num_classes} classes: {1 / cfg.num_classes:.3f}) from "
            f"{opening:.3f} at the start; lower the learning rate (now "
            f"{optimizer.param_groups[0]['lr']:.3g}), or set divergence: null to let it run"
        )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


SPLIT_FILE = "pipeline-split.json"
"""In a training's checkpoint folder: the split it chose, so a resumed run cuts the model alike
(a split balanced by time could come out otherwise, and the per-rank checkpoints would not fit)."""


def _stage_runner(
    model: nn.Module,
    batches: BatchSource,
    loss_fn: LossFn,
    info: ddp.DistInfo,
    device: torch.device,
    checkpoint_dir: str | Path | None,
) -> pipelining.StageRunner | None:
    """This rank's pipeline stage when the job trains pipeline-parallel (see :mod:`pipelining`)."""
    settings = pipelining.active()
    if settings is None or not info.distributed:
        return None
    chosen = Path(checkpoint_dir) / SPLIT_FILE if checkpoint_dir is not None else None
    if chosen is not None and chosen.is_file() and not settings.split:
        settings = dataclasses.replace(settings, split=tuple(json.loads(chosen.read_text(encoding="utf-8"))))
    of_outputs = getattr(loss_fn, "of_outputs", None)
    if of_outputs is None:
        raise TrainingError(
            "this stage's loss needs the whole model in one process (augmentation, L1 training, generator "
            "training): it cannot run pipeline-parallel yet; remove parallel.pipeline or the stage"
        )
    example = next(iter(batches.epoch(0)))[0]
    runner = pipelining.StageRunner(model, to_device(example, device), settings, info, of_outputs, device)
    if chosen is not None and info.is_main:
        write_json_atomic(chosen, list(runner.split))
    return runner


def _load_common_step(
    checkpoint: TrainCheckpoint,
    stage: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    desc: str,
) -> LoopState | None:
    """A pipeline rank's stage restored at the newest step every rank's checkpoints hold: all stages
    must resume at the same step, or their schedules would not meet (a kill between two ranks' saves
    leaves them one save apart; each keeps the save before)."""
    try:
        mine, problem = checkpoint.steps(), None
    except TorchshrinkError as exc:  # told to every rank, so none waits for the others forever
        mine, problem = {}, str(exc)
    gathered = ddp.all_gather_object((sorted(mine), problem))
    problems = [p for _, p in gathered if p]  # type: ignore[misc]
    if problems:
        raise TrainingError(f"{desc}: {problems[0]}")
    held = [set(steps) for steps, _ in gathered]  # type: ignore[misc]
    common = set.intersection(*held)
    if not common:
        if any(held):
            log.warning(
                "%s: the pipeline's checkpoints hold no common step (%s); training starts over", desc, held
            )
            checkpoint.discard()  # a later resume must not pair these with the new run's saves
        return None
    step = max(common)
    if any(max(s) != step for s in held):
        log.info("%s: the ranks' newest checkpoints differ (%s); all resume at step %d", desc, held, step)
    return checkpoint.load(stage, optimizer, scheduler, path=mine[step])


def _clip_gradients(
    params: list[nn.Parameter], max_norm: float, runner: pipelining.StageRunner | None
) -> None:
    """Scale gradients to a total norm of at most ``max_norm`` (over every pipeline stage when split)."""
    if runner is None:
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = float(runner.grad_norm_squared()) ** 0.5
    if total > max_norm:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(max_norm / (total + 1e-6))


def _time_left(seconds: float, steps_done: int, steps_left: int) -> str:
    """ " (12.3 s, about 40 s left)": the time so far and the estimate for the rest of this training,
    at the rate of the steps this call ran."""
    if steps_done <= 0:
        return ""
    left = seconds / steps_done * steps_left
    return f" ({seconds:.1f} s, about {left:.0f} s left)" if steps_left else f" ({seconds:.1f} s)"


def _resume_fields(cfg: TrainConfig, steps_per_epoch: int) -> dict[str, object]:
    """The settings a checkpoint must agree with to be resumed (the batch count per epoch too: another
    batch size or dataset size would put its step on another sample)."""
    keep = (
        "epochs",
        "lr",
        "optimizer",
        "momentum",
        "weight_decay",
        "schedule",
        "grad_clip",
        "seed",
        "lr_groups",
    )
    return {k: v for k, v in asdict(cfg).items() if k in keep} | {"steps_per_epoch": steps_per_epoch}


def fit(
    model: nn.Module,
    batches: BatchSource,
    loss_fn: LossFn = classification_loss,
    config: TrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``batches`` with ``loss_fn``; resume from ``checkpoint_dir`` if it holds one.

    ``after_step(model)`` runs after every optimizer step (for example to re-apply pruning masks).
    Under torchrun the model is wrapped in DDP, gradients are averaged over ranks, only rank 0
    writes checkpoints and the logged losses are averaged over ranks.
    """
    cfg = config or TrainConfig()
    info = ddp.current()
    device = ddp.device_for(info)
    model.to(device)
    steps_per_epoch = len(batches)
    total_steps = cfg.epochs * steps_per_epoch
    if steps_per_epoch == 0:
        raise TrainingError("the batch source yields no batches: is the dataset empty?")
    runner = _stage_runner(model, batches, loss_fn, info, device, checkpoint_dir)
    owned = runner.named_parameters() if runner is not None else list(model.named_parameters())
    named = [(n, p) for n, p in owned if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    optimizer = _make_optimizer(named, cfg)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
        if cfg.schedule == "cosine"
        else None
    )

    settings = _resume_fields(cfg, steps_per_epoch)
    trained: nn.Module = model
    if runner is not None:  # every rank keeps its own stage's state
        checkpoint_dir = Path(checkpoint_dir) / f"rank{info.rank}" if checkpoint_dir is not None else None
        settings["pipeline"] = list(runner.split)
        trained = runner.module
    checkpoint = TrainCheckpoint(
        checkpoint_dir, settings, writer=info.is_main or runner is not None, keep_previous=runner is not None
    )
    result = TrainResult()
    if runner is None:
        loop = checkpoint.load(trained, optimizer, scheduler)
    else:
        loop = _load_common_step(checkpoint, trained, optimizer, scheduler, cfg.desc)
    if loop is not None:
        result.epoch_losses = loop.epoch_losses
        result.resumed_from_step = loop.step
        log.info("%s: resumed from %s at step %d of %d", cfg.desc, checkpoint_dir, loop.step, total_steps)
    else:
        torch.manual_seed(cfg.seed)
        loop = LoopState()
    step, opening = loop.step, loop.opening

    wrapped: nn.Module = model
    if info.distributed and runner is None:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    start_time = time.perf_counter()
    start_step = step
    samples = 0
    wrapped.train()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=cfg.desc,
        disable=not (cfg.progress and info.is_main and os.environ.get("TORCHSHRINK_PROGRESS", "1") != "0"),
        leave=False,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    try:
        while step < total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            sums: dict[str, float] = {}
            count = 0
            if skip and result.resumed_from_step == step:  # finish the epoch the checkpoint interrupted
                sums, count = dict(loop.epoch_sums), loop.epoch_count
            for index, batch in enumerate(batches.epoch(epoch)):
                if index < skip:
                    continue
                batch = tuple(to_device(t, device) for t in batch)
                optimizer.zero_grad(set_to_none=True)
                if runner is None:
                    terms = _terms(loss_fn(wrapped, batch))
                else:  # forward and backward run inside the pipeline's schedule
                    target = loss_fn.target_of(batch) if hasattr(loss_fn, "target_of") else batch[1]
                    terms = {getattr(loss_fn, "term", "loss"): runner.step(batch[0], target)}
                monitors = {n: terms.pop(n) for n in MONITOR_TERMS & terms.keys()}
                if ACCURACY_TERM in monitors and sum(n for _, n in opening) < OPENING_SAMPLES:
                    opening.append((float(monitors[ACCURACY_TERM]), count_samples(batch[0])))
                for name, value in terms.items():
                    if not torch.isfinite(value).all():
                        raise TrainingError(
                            f"{cfg.desc}: loss term {name!r} is {value.item()} at step {step + 1} "
                            f"(epoch {epoch + 1}, batch {index + 1}); lower the learning rate "
                            f"(now {optimizer.param_groups[0]['lr']:.3g}) or check the data for NaN/inf"
                        )
                loss = sum(terms.values())
                value = float(loss.detach())
                if loop.first_loss is None:
                    loop.first_loss = value
                _check_divergence(cfg, terms, value, loop.first_loss, step, epoch, index, optimizer)
                if runner is None:
                    loss.backward()
                if cfg.grad_clip:
                    _clip_gradients(params, cfg.grad_clip, runner)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if after_step is not None:
                    after_step(model)
                step += 1
                samples += count_samples(batch[0]) * (1 if runner is not None else info.world_size)
                count += 1
                for name, term in {**terms, **monitors}.items():
                    sums[name] = sums.get(name, 0.0) + float(term.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    loop.step, loop.epoch_sums, loop.epoch_count = step, sums, count
                    loop.epoch_losses = result.epoch_losses
                    checkpoint.save(trained, optimizer, scheduler, loop)
            names = sorted(sums)
            means = ddp.all_reduce_mean(
                torch.tensor([sums[n] / max(count, 1) for n in names], dtype=torch.float64)
            )
            result.epoch_losses.append({n: float(v) for n, v in zip(names, means, strict=True)})
            log.info(
                "%s epoch %d/%d%s: %s",
                cfg.desc,
                epoch + 1,
                cfg.epochs,
                _time_left(time.perf_counter() - start_time, step - start_step, total_steps - step),
                {k: round(v, 4) for k, v in result.epoch_losses[-1].items()},
            )
            if ACCURACY_TERM in result.epoch_losses[-1] and opening:
                mean = sum(a * n for a, n in opening) / max(sum(n for _, n in opening), 1)
                start = float(ddp.all_reduce_mean(torch.tensor([mean], dtype=torch.float64))[0])
                _check_chance(cfg, result.epoch_losses[-1][ACCURACY_TERM], start, epoch, optimizer)
    finally:
        bar.close()
        model.eval()
    result.steps = step
    result.seconds = time.perf_counter() - start_time
    result.samples_per_second = samples / result.seconds if result.seconds > 0 else math.nan
    if runner is not None:
        result.pipeline = {
            "split": list(runner.split),
            # per rank: bytes of its stage's parameters, gradients and optimizer state; peak RSS
            "training_bytes": ddp.all_gather_object(runner.state_bytes(optimizer)),
            "peak_rss_mb": ddp.all_gather_object(round(peak_rss_mb(), 1)),
        }
        runner.gather()  # every rank continues with the whole trained model
    checkpoint.discard()
    ddp.barrier()
    log.debug("%s: %d steps (%d new) in %.1fs", cfg.desc, step, step - start_step, result.seconds)
    return result
