"""Stage ``datafree``: distil the teacher(s) into a student without the training data.

The student never sees the dataset's training split: its inputs come from a generator (``dafl``,
``adversarial``, ``conditional``), from a VAE fitted to inputs inverted from the teacher (``vae``),
or from noise (``noise``, the floor). With ``inputs: N`` the stage reads N unlabelled inputs of the
training split (a seeded random choice, no label): the VAE is fitted to them instead (``vae``), or
the student learns from them alone (``real``, the baseline). The dataset's test split is used only to
measure, as in every stage.
Teachers, student, adapters and the objective are the ``distill`` stage's (one objective, with the
teacher's argmax as the label of the ``ce`` term); every optimisation runs in the one training loop.
See :mod:`torchshrink.distillation.datafree` for the methods.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink.augment import AugmentConfig, random_shift
from torchshrink.distillation.datafree import (
    VAE,
    BatchNormStatistics,
    ConditionalGenerator,
    Encoder,
    Generator,
    InputPool,
    InvertedInputs,
    LatentBatches,
    PenultimateTap,
    class_draw,
    dafl_terms,
    draw_offset,
    mode_seeking,
    reverse_gradient,
    smoothness,
    to_range,
    vae_terms,
)
from torchshrink.distillation.ensemble import Ensemble
from torchshrink.distillation.restarts import Draw, cross_agreement, pick_restart
from torchshrink.distillation.sample_grid import sample_rows, write_sample_grid
from torchshrink.distillation.stage import (
    Distillation,
    DistillConfig,
    StudentWithAdapters,
    finish_distillation,
    prepare_distillation,
)
from torchshrink.errors import TrainingError
from torchshrink.io import load_tensors, save_tensors
from torchshrink.modes import switched
from torchshrink.parallel import ddp
from torchshrink.registry import register_stage
from torchshrink.stages.training import train_config
from torchshrink.state import ModelState, RunContext
from torchshrink.train import Batch, DatasetBatches, TrainConfig, TrainResult, fit

log = logging.getLogger(__name__)

__all__ = ["DataFreeConfig", "DataFreeLearner", "Generated", "choose_real_inputs", "datafree_stage"]

Method = Literal["dafl", "adversarial", "conditional", "vae", "real", "noise"]


class GeneratorLoss(BaseModel, extra="forbid"):
    """Weights of the generator's terms: DAFL's three; ``adversarial``, the scale of the discrepancy
    the generator ascends (through the gradient reversal); ``class_ce`` (the teacher names the
    requested class) and ``diversity`` (mode seeking), for the conditional generator;
    ``bn_statistics``, the teacher's batch-norm statistics prior (teachers with batch-norm)."""

    one_hot: float = Field(0.0, ge=0)
    activation: float = Field(0.0, ge=0)
    entropy: float = Field(0.0, ge=0)
    adversarial: float = Field(0.0, ge=0)
    class_ce: float = Field(0.0, ge=0)
    diversity: float = Field(0.0, ge=0)
    bn_statistics: float = Field(0.0, ge=0)
    smoothness: float = Field(0.0, ge=0, description="the neighbouring-pixel prior (images and signals)")


GENERATOR_LOSS_DEFAULTS = {
    "dafl": GeneratorLoss(one_hot=1.0, activation=0.1, entropy=5.0),  # DAFL's MNIST weights
    # DAFL's class-balance (entropy) term beside the adversarial one: without it a seed's generator can
    # collapse onto a few classes (B5, 3 seeds: lowest seed 81.0% alone, 92.8% with it; median 93.8 / 94.1)
    "adversarial": GeneratorLoss(adversarial=1.0, entropy=5.0),
    # the adversarial term keeps looking for what the student has not learnt yet, within the class asked for
    "conditional": GeneratorLoss(class_ce=1.0, diversity=0.1, bn_statistics=0.1, adversarial=1.0),
}
CONDITIONAL_TERMS = ("class_ce", "diversity")
"""Generator terms that need a requested class: only the conditional generator has one."""


class InversionConfig(BaseModel, extra="forbid"):
    """``vae``: the pool of inputs inverted from the teacher (each optimised towards a target class)."""

    pool: int = Field(2048, ge=16, description="how many inputs to invert (the classes in turn)")
    epochs: int = Field(30, ge=1, description="passes of Adam over the pool")
    lr: float = Field(0.1, gt=0)
    batch_size: int = Field(128, ge=1)
    jitter: int = Field(1, ge=0, le=8, description="random shift of the inputs each step (robust inversions)")
    smoothness: float = Field(1.0, ge=0, description="weight of the neighbouring-pixel prior")
    bn_statistics: float = Field(0.05, ge=0, description="weight of the batch-norm statistics prior")


class VaeConfig(BaseModel, extra="forbid"):
    """``vae``: fitting the VAE to the inverted pool."""

    epochs: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    beta: float = Field(
        0.1, ge=0, description="weight of the KL term (1: the plain ELBO; lower keeps the latent in use)"
    )
    batch_size: int = Field(64, ge=1)


class DataFreeConfig(DistillConfig):
    """Options of the ``datafree`` stage: the ``distill`` options (no real input reaches them) plus
    the input source."""

    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="shifts of the generated inputs (mixup: not used here)"
    )
    temperature: float = Field(
        4.0,
        gt=0,
        description="T of the soft targets: B5 measured the generator routes at 4 (distill's 1 was chosen on "
        "real inputs at short schedules)",
    )
    generator: Method = Field("dafl", description="where the student's inputs come from")
    latent_dim: int = Field(100, ge=1)
    generator_width: int = Field(64, ge=2, description="channels of the generator's seed map")
    generator_lr: float = Field(1e-3, gt=0)
    input_range: tuple[float, float] | None = Field(
        (0.0, 1.0), description="[lo, hi] of the model's inputs; null: standardised (unknown range)"
    )
    steps_per_epoch: int = Field(100, ge=1, description="generated batches per epoch")
    batch_size: int = Field(128, ge=1)
    alpha: float = Field(
        1.0, ge=0, le=1, description="weight of the soft-target term; 1 - alpha on the teacher's argmax"
    )
    generator_loss: GeneratorLoss | None = Field(
        None,
        description="dafl / adversarial / conditional: weights of the generator's terms (default: the method's)",
    )
    inputs: int = Field(
        0,
        ge=0,
        description="vae / real: how many real unlabelled inputs of the training split to read (a seeded "
        "random choice; labels never read); vae: 0 fits the VAE to inputs inverted from the teacher",
    )
    real_share: float = Field(
        0.5, ge=0, le=1, description="vae with inputs: the share of each batch taken from the real inputs"
    )
    classes: Literal["balanced", "disagreement"] = Field(
        "balanced",
        description="conditional: the classes of each batch: every class equally, or half equally and half "
        "in proportion to the student's running disagreement with the teacher on that class",
    )
    restarts: int = Field(
        1,
        ge=1,
        description="dafl / adversarial / conditional: train this many generator-student pairs (seeds "
        "seed, seed + 1000, ...) and keep the student that agrees best with the teacher on the other "
        "restarts' generated inputs (no real input decides)",
    )
    pick_samples: int = Field(512, ge=16, description="restarts: generated inputs per restart to pick on")
    inversion: InversionConfig = Field(default_factory=InversionConfig)
    vae: VaeConfig = Field(default_factory=VaeConfig)

    @model_validator(mode="after")
    def _checks(self) -> DataFreeConfig:
        if self.augment.mixup:
            raise ValueError(
                "augment.mixup blends labelled training inputs; data-free distillation has none: use augment.shift"
            )
        if self.generator_loss is not None and self.generator not in GENERATOR_LOSS_DEFAULTS:
            raise ValueError(
                f"generator_loss trains a generator; generator: {self.generator} has none to train"
            )
        if self.generator_loss is not None and not any(self.generator_loss.model_dump().values()):
            raise ValueError(
                "generator_loss: every weight is 0, so the generator would never learn; give one a weight"
            )
        conditional = [t for t in CONDITIONAL_TERMS if getattr(self.generator_weights, t)]
        if conditional and self.generator != "conditional":
            raise ValueError(
                f"generator_loss.{conditional[0]} scores a requested class; only generator: conditional "
                "is given one"
            )
        if self.restarts > 1 and self.generator not in GENERATOR_LOSS_DEFAULTS:
            raise ValueError(
                f"restarts: {self.restarts} retrains a generator with its student; generator: {self.generator} "
                f"trains none (use dafl, adversarial or conditional, or restarts: 1)"
            )
        if self.classes != "balanced" and self.generator != "conditional":
            raise ValueError("classes: only generator: conditional draws the classes of its batches")
        if self.generator == "real" and not self.inputs:
            raise ValueError("generator: real trains on real inputs: say how many with inputs: N (N > 0)")
        if "real_share" in self.model_fields_set and not (self.generator == "vae" and self.inputs):
            raise ValueError(
                "real_share splits the batches of generator: vae with inputs: N; it has no use here"
            )
        if self.inputs and self.generator not in ("vae", "real"):
            raise ValueError(
                f"inputs: {self.inputs} real inputs feed generator: vae or real; generator: "
                f"{self.generator} reads none (set inputs: 0)"
            )
        if self.generator in ("adversarial", "conditional"):  # B5's settings, unless given
            if "match" not in self.model_fields_set:
                self.match = "mae"
            if "generator_lr" not in self.model_fields_set:
                self.generator_lr = 2e-4
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError(f"input_range must be [lo, hi] with lo < hi, got {list(self.input_range)}")
        return self

    @property
    def generator_weights(self) -> GeneratorLoss:
        """The generator's loss weights: as given, or the method's defaults."""
        return self.generator_loss or GENERATOR_LOSS_DEFAULTS.get(self.generator, GeneratorLoss())


class Generated(NamedTuple):
    """One step's inputs: ``inputs`` as made (with the generator's gradient), the student's ``view``
    of them (shifted when asked; through the gradient reversal when the generator ascends the
    discrepancy, else detached), the student's ``logits``, and the requested ``classes`` (conditional
    generator; else None)."""

    inputs: torch.Tensor
    view: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor | None


class DataFreeLearner(nn.Module):
    """What the training loop optimises: the student (with its adapters) and, for ``dafl``,
    ``adversarial`` and ``conditional``, the generator; ``forward(z, indices)`` makes the inputs
    (``indices`` pick real inputs from ``pool``, for ``real`` and the VAE with inputs) and runs the
    student on them, returning :class:`Generated`.

    The conditional generator's classes follow ``disagreement`` (a buffer, so checkpoints keep it):
    uniform for ``classes: balanced``; else half uniform, half in proportion to the running
    student-teacher divergence per class, which :meth:`note_disagreement` updates.
    """

    def __init__(
        self,
        distill: StudentWithAdapters,
        method: Method,
        generator: nn.Module | None,
        input_range: tuple[float, float] | None,
        shift: int = 0,
        adversarial: float = 0.0,
        *,
        num_classes: int = 0,
        classes: str = "balanced",
        pool: InputPool | None = None,
        real_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.distill, self.method, self.generator, self.pool = distill, method, generator, pool
        self.input_range, self.shift, self.adversarial = input_range, shift, adversarial
        self.real_share, self.classes = real_share, classes
        self.trains_generator = method in GENERATOR_LOSS_DEFAULTS
        if generator is not None and not self.trains_generator:
            generator.requires_grad_(False)
        # buffers, so checkpoints keep them (under torchrun, rank 0's are broadcast each step)
        self.register_buffer("disagreement", torch.ones(max(num_classes, 1)))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        info = ddp.current()
        self.rank, self.world_size = info.rank, info.world_size

    def train(self, mode: bool = True) -> DataFreeLearner:
        super().train(mode)
        if self.generator is not None and not self.trains_generator:
            self.generator.eval()  # a fitted decoder keeps its batch-norm statistics
        return self

    def class_weights(self) -> torch.Tensor:
        """The share of each class in the conditional generator's next batch."""
        uniform = torch.full_like(self.disagreement, 1.0 / len(self.disagreement))
        if self.classes == "balanced":
            return uniform
        return 0.5 * uniform + 0.5 * self.disagreement / self.disagreement.sum()

    @torch.no_grad()
    def note_disagreement(
        self, classes: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> None:
        """Move each class's running divergence (KL of the student from the teacher, a 0.9 moving
        average over steps) towards this batch's mean for that class."""
        kl = F.kl_div(
            F.log_softmax(student_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
            reduction="none", log_target=True,
        ).sum(1)  # fmt: skip
        count = torch.zeros_like(self.disagreement).index_add_(0, classes, torch.ones_like(kl))
        total = torch.zeros_like(self.disagreement).index_add_(0, classes, kl)
        seen = count > 0
        self.disagreement[seen] = 0.9 * self.disagreement[seen] + 0.1 * total[seen] / count[seen]
        self.disagreement.clamp_(min=1e-6)

    def _make(
        self, z: torch.Tensor, indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.method == "noise":
            return to_range(z, self.input_range), None
        if self.method == "real":
            return self.pool(indices), None
        if self.method == "conditional":
            offset = draw_offset(int(self.draws), self.rank, self.world_size)
            if self.training:
                self.draws += 1
            classes = class_draw(self.class_weights(), len(z), offset)
            return self.generator(z, classes), classes
        if self.trains_generator:
            return self.generator(z), None
        with torch.no_grad():
            if self.pool is None:
                return self.generator(z), None
            real = round(self.real_share * len(z))  # the VAE fitted to real inputs: a share is those
            return torch.cat([self.pool(indices[:real]), self.generator(z[real:])]), None

    def forward(self, z: torch.Tensor, indices: torch.Tensor | None = None) -> Generated:
        generated, classes = self._make(z, indices)
        if self.trains_generator and self.adversarial:
            view = reverse_gradient(generated, self.adversarial)
        else:
            view = generated.detach()
        view = random_shift(view, self.shift)
        return Generated(generated, view, self.distill(view), classes)


def _teachers(teacher: nn.Module) -> list[nn.Module]:
    return list(teacher.members) if isinstance(teacher, Ensemble) else [teacher]


def _phase_config(phase: str, epochs: int, lr: float, cfg: DataFreeConfig, ctx: RunContext) -> TrainConfig:
    """The training loop's settings for one fitting phase of the ``vae`` route."""
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        seed=ctx.seed,
        checkpoint_every=cfg.checkpoint_every,
        desc=f"{ctx.stage_name} {phase}",
    )


def _invert(teacher: nn.Module, cfg: DataFreeConfig, ctx: RunContext, checkpoint_dir: Path) -> torch.Tensor:
    """A pool of inputs the teacher assigns to each class in turn, optimised from noise."""
    shape, classes = ctx.data.input_shape, ctx.data.num_classes
    inputs = InvertedInputs(cfg.inversion.pool, shape, cfg.input_range, seed=ctx.seed)
    targets = torch.arange(cfg.inversion.pool) % classes
    # The batch-norm prior's hooks only when it is weighed (teachers without batch-norm get none).
    statistics = [BatchNormStatistics(m) for m in _teachers(teacher)] if cfg.inversion.bn_statistics else []

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        indices, labels = batch
        x = model(indices)
        seen = random_shift(x, cfg.inversion.jitter) if len(shape) > 1 else x
        terms = {"ce": F.cross_entropy(teacher(seen), labels)}
        if len(shape) > 1 and cfg.inversion.smoothness:
            terms["smoothness"] = cfg.inversion.smoothness * smoothness(x)
        distances = [d for d in (s.take() for s in statistics) if d is not None]
        if distances:
            terms["bn_statistics"] = cfg.inversion.bn_statistics * torch.stack(distances).mean()
        return terms

    try:
        fit(
            inputs,
            DatasetBatches(
                TensorDataset(torch.arange(cfg.inversion.pool), targets),
                cfg.inversion.batch_size,
                seed=ctx.seed,
            ),
            loss_fn,
            _phase_config("inversion", cfg.inversion.epochs, cfg.inversion.lr, cfg, ctx),
            checkpoint_dir=checkpoint_dir,
        )
    finally:
        for s in statistics:
            s.remove()
    pool = inputs.pool()  # on the training device, where the teacher is
    with torch.no_grad():
        agreement = float((teacher(pool).argmax(1).cpu() == targets).float().mean())
    pool = pool.cpu()
    ctx.details["inversion"] = {"pool": len(pool), "teacher_agrees": round(agreement, 4)}
    return pool


def choose_real_inputs(available: int, count: int, seed: int) -> torch.Tensor:
    """The indices of the ``count`` training inputs the ``inputs: N`` routes read (a seeded random
    choice of ``available``), sorted; benchmarks use it to blank out every other input."""
    if count > available:
        raise TrainingError(
            f"inputs: {count} real inputs asked for, but the training split holds {available}; "
            f"set inputs to at most {available}"
        )
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def _real_inputs(cfg: DataFreeConfig, ctx: RunContext) -> torch.Tensor:
    """The ``inputs`` real training inputs, read one by one (their labels are never looked at)."""
    train = ctx.data.train
    chosen = [train[int(i)][0] for i in choose_real_inputs(len(train), cfg.inputs, ctx.seed)]
    if not all(isinstance(x, torch.Tensor) and tuple(x.shape) == ctx.data.input_shape for x in chosen):
        raise TrainingError(
            f"{ctx.stage_name}.inputs: the training split's inputs must be single tensors of shape "
            f"{list(ctx.data.input_shape)} for the vae / real routes"
        )
    inputs = torch.stack(chosen).float()
    if not bool(torch.isfinite(inputs).all()):
        raise TrainingError(f"{ctx.stage_name}.inputs: a chosen training input holds NaN or inf")
    return inputs


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(
            name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _fitted_decoder(
    teacher: nn.Module, cfg: DataFreeConfig, ctx: RunContext, real: torch.Tensor | None
) -> Generator:
    """The ``vae`` route's generator: a VAE fitted to the ``real`` inputs, or without them to a pool
    inverted from the teacher; phases finished by an interrupted run are kept in the stage's work
    folder and reused by ``--resume``."""
    shape = ctx.data.input_shape
    # Files and checkpoints named by what made them (teacher or real inputs, seed, settings): a resumed
    # run with another teacher or other settings starts afresh instead of reusing a stale pool.
    source = (
        {"real": _digest({"inputs": real})}
        if real is not None
        else {"teacher": _digest(teacher.state_dict())}
    )
    settings = cfg.model_dump(include={"inversion", "latent_dim", "generator_width", "input_range"})
    made_by = json.dumps({**source, "seed": ctx.seed, **settings}, sort_keys=True)
    tag = hashlib.sha256(made_by.encode()).hexdigest()[:12]
    vae_tag = hashlib.sha256(
        (made_by + json.dumps(cfg.vae.model_dump(), sort_keys=True)).encode()
    ).hexdigest()[:12]
    pool_file = ctx.work_dir / f"inverted-pool-{tag}.safetensors"
    vae_file = ctx.work_dir / f"vae-{vae_tag}.safetensors"
    if real is not None:
        pool = real
    elif pool_file.is_file():
        pool = load_tensors(pool_file)["pool"]
    else:
        pool = _invert(teacher, cfg, ctx, ctx.work_dir / f"inversion-{tag}")
        if ctx.dist.is_main:
            save_tensors(pool_file, {"pool": pool})
    torch.manual_seed(ctx.seed)  # the same VAE whether the pool was just made or loaded
    decoder = Generator(cfg.latent_dim, shape, cfg.generator_width, cfg.input_range)
    vae = VAE(Encoder(cfg.latent_dim, shape, cfg.generator_width), decoder)
    if vae_file.is_file():
        vae.load_state_dict(load_tensors(vae_file))
    else:
        result = fit(
            vae,
            DatasetBatches(TensorDataset(pool), cfg.vae.batch_size, seed=ctx.seed),
            lambda model, batch: vae_terms(model, batch[0], cfg.vae.beta),
            _phase_config("vae", cfg.vae.epochs, cfg.vae.lr, cfg, ctx),
            checkpoint_dir=ctx.work_dir / f"vae-{vae_tag}",
        )
        ctx.details["vae_final_loss"] = result.epoch_losses[-1]
        if ctx.dist.is_main:
            save_tensors(vae_file, vae.state_dict())
    ddp.barrier()
    return decoder.eval()


def _generator(
    teacher: nn.Module, cfg: DataFreeConfig, ctx: RunContext, real: torch.Tensor | None
) -> nn.Module | None:
    if cfg.generator in ("noise", "real"):
        return None
    if cfg.generator == "vae":
        return _fitted_decoder(teacher, cfg, ctx, real)
    torch.manual_seed(ctx.seed)
    shape = ctx.data.input_shape
    if cfg.generator == "conditional":
        return ConditionalGenerator(
            cfg.latent_dim, ctx.data.num_classes, shape, cfg.generator_width, cfg.input_range
        )
    return Generator(cfg.latent_dim, shape, cfg.generator_width, cfg.input_range)


def _training_inputs(cfg: DataFreeConfig, available: int) -> str:
    """What the student's inputs were, for the report."""
    if not cfg.inputs:
        return "none: generated only"
    if cfg.generator == "real":
        return f"{cfg.inputs} real unlabelled training inputs (of {available}), nothing generated"
    return (
        f"{cfg.inputs} real unlabelled training inputs (of {available}): {cfg.real_share:.0%} of each batch, "
        "the rest sampled from a VAE fitted to them"
    )


RESTART_SEED_STEP = 1000
"""Restart k trains with seed ``seed + k * RESTART_SEED_STEP`` (restart 0 is the single run)."""


class _Restart(NamedTuple):
    """One trained generator-student pair."""

    setup: Distillation
    learner: DataFreeLearner
    result: TrainResult
    seed: int


@register_stage("datafree", DataFreeConfig, role="transform")
def datafree_stage(state: ModelState, cfg: DataFreeConfig, ctx: RunContext) -> ModelState:
    """Train ``cfg.student`` from the teacher(s) on generated inputs (and, with ``inputs``, a few real
    unlabelled ones); it becomes the pipeline's model. With ``restarts``, several pairs are trained
    and the one picked without real inputs (:mod:`restarts`) is kept."""
    shape = ctx.data.input_shape
    real = _real_inputs(cfg, ctx) if cfg.inputs else None
    latent = shape if cfg.generator == "noise" else (cfg.latent_dim,)
    fresh = cfg.restarts > 1 and cfg.student == "current"
    runs = []
    for k in range(cfg.restarts):
        seed = ctx.seed + k * RESTART_SEED_STEP
        own = dataclasses.replace(ctx, seed=seed)  # details and artefacts stay the stage's
        # each restart from the model as given (``student: current`` trains that very module)
        start = state.replace(model=copy.deepcopy(state.model)) if fresh else state
        folder = ctx.work_dir / f"restart-{k}" if k else ctx.work_dir
        runs.append(_train_restart(start, cfg, own, real, latent, folder))
    chosen = runs[0]
    if len(runs) > 1:
        chosen = runs[_pick(runs, latent, cfg, ctx)]
    learner, teacher = chosen.learner, chosen.setup.teacher
    ctx.details["generator"] = cfg.generator
    ctx.details["training_inputs"] = _training_inputs(cfg, len(ctx.data.train))
    if cfg.generator == "conditional":
        ctx.details["class_weights"] = [round(float(w), 4) for w in learner.class_weights()]
        ctx.details["class_agreement"] = _class_agreement(learner, teacher, cfg, ctx)
    _picture_samples(learner, teacher, latent, cfg, ctx)
    return finish_distillation(state, chosen.setup, chosen.result, ctx)


def _pick(runs: list[_Restart], latent: tuple[int, ...], cfg: DataFreeConfig, ctx: RunContext) -> int:
    """Which restart to keep: the best cross agreement (:func:`cross_agreement`), recorded in details."""
    device = next(runs[0].setup.teacher.parameters()).device

    def drawer(learner: DataFreeLearner) -> Draw:
        def draw(n: int, seed: int) -> torch.Tensor:
            z = torch.randn(n, *latent, generator=torch.Generator().manual_seed(seed)).to(device)
            with switched(learner), torch.no_grad():
                return learner(z).inputs

        return draw

    scores = cross_agreement(
        [r.setup.student for r in runs],
        [drawer(r.learner) for r in runs],
        runs[0].setup.teacher,
        cfg.pick_samples,
        ctx.seed + 7,
    )
    picked = pick_restart(scores)
    ctx.details["restarts"] = {
        "seeds": [r.seed for r in runs],
        "cross_agreement": [round(s, 4) for s in scores],
        "picked": picked,
    }
    log.info(
        "%s: restarts (seed: agreement with the teacher on the other restarts' samples) %s; kept seed %d",
        ctx.stage_name,
        ", ".join(f"{r.seed}: {s:.3f}" for r, s in zip(runs, scores, strict=True)),
        runs[picked].seed,
    )
    return picked


def _train_restart(
    state: ModelState,
    cfg: DataFreeConfig,
    ctx: RunContext,
    real: torch.Tensor | None,
    latent: tuple[int, ...],
    checkpoint_dir: Path,
) -> _Restart:
    """One generator-student pair trained with ``ctx.seed``, checkpointed in ``checkpoint_dir``."""
    shape = ctx.data.input_shape
    setup: Distillation = prepare_distillation(state, cfg, ctx, torch.zeros(2, *shape))
    teacher = setup.teacher
    generator = _generator(teacher, cfg, ctx, real)
    weights = cfg.generator_weights
    learner = DataFreeLearner(
        setup.learner,
        cfg.generator,
        generator,
        cfg.input_range,
        cfg.augment.shift,
        weights.adversarial,
        num_classes=ctx.data.num_classes,
        classes=cfg.classes,
        pool=InputPool(real) if real is not None else None,
        real_share=cfg.real_share if cfg.generator == "vae" else 1.0,
    )
    scoring = {
        name: getattr(weights, name)
        for name in ("one_hot", "activation", "entropy", "class_ce", "bn_statistics")
        if getattr(weights, name)
    }
    scores_generated = learner.trains_generator and bool(scoring)
    penultimate = PenultimateTap(_teachers(teacher)) if scores_generated and weights.activation else None
    statistics = (
        [BatchNormStatistics(m) for m in _teachers(teacher)]
        if scores_generated and weights.bn_statistics
        else []
    )

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out: Generated = model(*batch)
        terms: dict[str, torch.Tensor] = {}
        scored = None
        if scores_generated:
            scored = teacher(out.inputs)  # the generator's gradient flows through the frozen teacher
            features = penultimate.take() if penultimate else []
            dafl = dafl_terms(scored, features)
            for name in ("one_hot", "activation", "entropy"):
                if name in scoring:
                    terms[f"generator_{name}"] = scoring[name] * dafl[name]
            if "class_ce" in scoring:
                terms["generator_class_ce"] = scoring["class_ce"] * F.cross_entropy(scored, out.classes)
            distances = [d for d in (s.take() for s in statistics) if d is not None]
            if distances:
                terms["generator_bn_statistics"] = scoring["bn_statistics"] * torch.stack(distances).mean()
        if learner.trains_generator and weights.smoothness and len(shape) > 1:
            terms["generator_smoothness"] = weights.smoothness * smoothness(out.inputs)
        if learner.trains_generator and weights.diversity:
            terms["generator_diversity"] = weights.diversity * mode_seeking(out.inputs, batch[0], out.classes)
        if learner.adversarial:
            teacher_logits = teacher(out.view)  # the reversal sends the discrepancy's ascent to the generator
        elif scored is not None and not (cfg.augment.shift or cfg.features):
            teacher_logits = scored.detach()  # the student's view is the generated batch itself
        else:
            with torch.no_grad():
                teacher_logits = teacher(out.view)
        if penultimate:
            penultimate.take()  # only the generator's scoring pass counts
        for s in statistics:
            s.take()
        if out.classes is not None and cfg.classes == "disagreement":
            learner.note_disagreement(out.classes, out.logits.detach(), teacher_logits.detach())
        terms.update(setup.terms(out.logits, teacher_logits.detach().argmax(1), teacher_logits))
        return terms

    train_cfg = train_config(cfg, ctx)
    # agreement on generated inputs is pushed down on purpose (adversarial): no chance-level guard
    train_cfg.num_classes = None
    if learner.trains_generator:
        train_cfg.lr_groups = {"generator.": cfg.generator_lr}
    pool = len(real) if real is not None else 0
    try:
        result = fit(
            learner,
            LatentBatches(latent, cfg.batch_size, cfg.steps_per_epoch, seed=ctx.seed, pool=pool),
            loss_fn,
            train_cfg,
            checkpoint_dir=checkpoint_dir,
        )
    finally:
        setup.remove_taps()
        if penultimate:
            penultimate.remove()
        for s in statistics:
            s.remove()
    return _Restart(setup, learner, result, ctx.seed)


def _class_agreement(
    learner: DataFreeLearner, teacher: nn.Module, cfg: DataFreeConfig, ctx: RunContext
) -> float:
    """The share of the conditional generator's samples (balanced over the classes, a fresh seeded
    draw) that the teacher assigns to the class they were made for."""
    classes = torch.arange(ctx.data.num_classes).repeat_interleave(max(1, 1000 // ctx.data.num_classes))
    device = next(teacher.parameters()).device
    z = torch.randn(len(classes), cfg.latent_dim, generator=torch.Generator().manual_seed(ctx.seed + 1))
    with switched(learner), torch.no_grad():
        made = torch.cat([learner.generator(z[i : i + 250].to(device), classes[i : i + 250].to(device))
                          for i in range(0, len(z), 250)])  # fmt: skip
        assigned = torch.cat([teacher(made[i : i + 250]).argmax(1).cpu() for i in range(0, len(made), 250)])
    return round(float((assigned == classes).float().mean()), 4)


GRID_CLASSES = 20
"""Rows of the sample picture at most (the first classes): a picture of 1,000 rows helps nobody."""


def _picture_samples(
    learner: DataFreeLearner,
    teacher: nn.Module,
    latent: tuple[int, ...],
    cfg: DataFreeConfig,
    ctx: RunContext,
) -> None:
    """Write the generator's samples as a PNG grid, one row per class the teacher assigns (see
    :mod:`sample_grid`), and list it with the run's files. Only generated inputs are drawn: a real
    training input never goes into the report (the ``real`` route, which generates none, draws none)."""
    if cfg.generator == "real":
        ctx.details["samples"] = "none: the real route generates nothing (and shows no training input)"
        return
    seeded = torch.Generator().manual_seed(ctx.seed)
    device = next(teacher.parameters()).device

    def draw(n: int) -> torch.Tensor:
        z = torch.randn(n, *latent, generator=seeded).to(device)
        with switched(learner), torch.no_grad():
            if learner.pool is not None:  # the VAE's own samples, not the real inputs beside them
                return learner.generator(z)
            return learner(z).inputs

    rows = sample_rows(draw, teacher, min(ctx.data.num_classes, GRID_CLASSES))
    name = f"samples-{ctx.stage_index:02d}.png"
    title = f"{ctx.stage_name}: {cfg.generator} samples by teacher class"
    if ctx.dist.is_main:
        try:
            write_sample_grid(rows, ctx.out_dir / name, title, cfg.input_range)
        except (OSError, ValueError, RuntimeError) as exc:  # a picture must not cost the trained student
            ctx.warn(f"the sample picture could not be drawn ({type(exc).__name__}: {exc})")
            return
    ctx.artefacts[f"{ctx.stage_name}_samples"] = name
    ctx.details["samples"] = {
        "file": name,
        "classes_drawn": sum(len(r) > 0 for r in rows),
        "per_class": [len(r) for r in rows],
    }
