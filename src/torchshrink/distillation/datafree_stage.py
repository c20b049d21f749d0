"""Stage ``datafree``: distil the teacher(s) into a student without one training input.

The student never sees the dataset's training split: its inputs come from a generator (``dafl``,
``adversarial``), from a VAE fitted to inputs inverted from the teacher (``vae``), or from noise
(``noise``, the floor). The dataset's test split is used only to measure, as in every stage.
Teachers, student, adapters and the objective are the ``distill`` stage's (one objective, with the
teacher's argmax as the label of the ``ce`` term); every optimisation runs in the one training loop.
See :mod:`torchshrink.distillation.datafree` for the methods.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink.augment import AugmentConfig, random_shift
from torchshrink.distillation.datafree import (
    VAE,
    BatchNormStatistics,
    Encoder,
    Generator,
    InvertedInputs,
    LatentBatches,
    PenultimateTap,
    dafl_terms,
    reverse_gradient,
    smoothness,
    to_range,
    vae_terms,
)
from torchshrink.distillation.ensemble import Ensemble
from torchshrink.distillation.sample_grid import sample_rows, write_sample_grid
from torchshrink.distillation.stage import (
    Distillation,
    DistillConfig,
    StudentWithAdapters,
    finish_distillation,
    prepare_distillation,
)
from torchshrink.io import load_tensors, save_tensors
from torchshrink.modes import switched
from torchshrink.parallel import ddp
from torchshrink.registry import register_stage
from torchshrink.stages.training import train_config
from torchshrink.state import ModelState, RunContext
from torchshrink.train import Batch, DatasetBatches, TrainConfig, fit

log = logging.getLogger(__name__)

__all__ = ["DataFreeConfig", "DataFreeLearner", "datafree_stage"]

Method = Literal["dafl", "adversarial", "vae", "noise"]


class GeneratorLoss(BaseModel, extra="forbid"):
    """Weights of the generator's terms: DAFL's three, and ``adversarial``, the scale of the
    discrepancy the generator ascends (through the gradient reversal)."""

    one_hot: float = Field(0.0, ge=0)
    activation: float = Field(0.0, ge=0)
    entropy: float = Field(0.0, ge=0)
    adversarial: float = Field(0.0, ge=0)


GENERATOR_LOSS_DEFAULTS = {
    "dafl": GeneratorLoss(one_hot=1.0, activation=0.1, entropy=5.0),  # DAFL's MNIST weights
    "adversarial": GeneratorLoss(adversarial=1.0),
}


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
        None, description="dafl / adversarial: weights of the generator's terms (default: the method's)"
    )
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
        if self.generator == "adversarial":  # B5's settings, unless given
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


class DataFreeLearner(nn.Module):
    """What the training loop optimises: the student (with its adapters) and, for ``dafl`` and
    ``adversarial``, the generator; ``forward(z)`` makes the inputs and runs the student on them.

    Returns ``(generated, view, student_logits)``: the generated inputs (with the generator's
    gradient), the student's view of them (shifted when asked; through a gradient reversal scaled by
    ``adversarial`` when the generator ascends the discrepancy, else detached) and the logits.
    """

    def __init__(
        self,
        distill: StudentWithAdapters,
        method: Method,
        generator: nn.Module | None,
        input_range: tuple[float, float] | None,
        shift: int = 0,
        adversarial: float = 0.0,
    ) -> None:
        super().__init__()
        self.distill, self.method, self.generator = distill, method, generator
        self.input_range, self.shift, self.adversarial = input_range, shift, adversarial
        self.trains_generator = method in GENERATOR_LOSS_DEFAULTS
        if generator is not None and not self.trains_generator:
            generator.requires_grad_(False)

    def train(self, mode: bool = True) -> DataFreeLearner:
        super().train(mode)
        if self.generator is not None and not self.trains_generator:
            self.generator.eval()  # a fitted decoder keeps its batch-norm statistics
        return self

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.method == "noise":
            generated = to_range(z, self.input_range)
        elif self.trains_generator:
            generated = self.generator(z)
        else:
            with torch.no_grad():
                generated = self.generator(z)
        if self.trains_generator and self.adversarial:
            view = reverse_gradient(generated, self.adversarial)
        else:
            view = generated.detach()
        view = random_shift(view, self.shift)
        return generated, view, self.distill(view)


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


def _fitted_decoder(teacher: nn.Module, cfg: DataFreeConfig, ctx: RunContext) -> Generator:
    """The ``vae`` route's generator: a VAE fitted to the inverted pool; phases finished by an
    interrupted run are kept in the stage's work folder and reused by ``--resume``."""
    shape = ctx.data.input_shape
    # Files and checkpoints named by what made them (teacher, seed, settings): a resumed run with
    # another teacher or other settings starts afresh instead of reusing a stale pool.
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(
            name.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    settings = cfg.model_dump(include={"inversion", "latent_dim", "generator_width", "input_range"})
    made_by = json.dumps({"teacher": digest.hexdigest(), "seed": ctx.seed, **settings}, sort_keys=True)
    tag = hashlib.sha256(made_by.encode()).hexdigest()[:12]
    vae_tag = hashlib.sha256(
        (made_by + json.dumps(cfg.vae.model_dump(), sort_keys=True)).encode()
    ).hexdigest()[:12]
    pool_file = ctx.work_dir / f"inverted-pool-{tag}.safetensors"
    vae_file = ctx.work_dir / f"vae-{vae_tag}.safetensors"
    if pool_file.is_file():
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


def _generator(teacher: nn.Module, cfg: DataFreeConfig, ctx: RunContext) -> nn.Module | None:
    if cfg.generator == "noise":
        return None
    if cfg.generator == "vae":
        return _fitted_decoder(teacher, cfg, ctx)
    torch.manual_seed(ctx.seed)
    return Generator(cfg.latent_dim, ctx.data.input_shape, cfg.generator_width, cfg.input_range)


@register_stage("datafree", DataFreeConfig, role="transform")
def datafree_stage(state: ModelState, cfg: DataFreeConfig, ctx: RunContext) -> ModelState:
    """Train ``cfg.student`` from the teacher(s) on generated inputs only; it becomes the pipeline's model."""
    shape = ctx.data.input_shape
    setup: Distillation = prepare_distillation(state, cfg, ctx, torch.zeros(2, *shape))
    teacher = setup.teacher
    generator = _generator(teacher, cfg, ctx)
    weights = cfg.generator_weights
    learner = DataFreeLearner(
        setup.learner, cfg.generator, generator, cfg.input_range, cfg.augment.shift, weights.adversarial
    )
    dafl = {"one_hot": weights.one_hot, "activation": weights.activation, "entropy": weights.entropy}
    scores_generated = learner.trains_generator and any(dafl.values())
    penultimate = PenultimateTap(_teachers(teacher)) if scores_generated and weights.activation else None

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        generated, view, student_logits = model(batch[0])
        terms: dict[str, torch.Tensor] = {}
        scored = None
        if scores_generated:
            scored = teacher(generated)  # the generator's gradient flows through the frozen teacher
            features = penultimate.take() if penultimate else []
            for name, value in dafl_terms(scored, features).items():
                if dafl[name]:
                    terms[f"generator_{name}"] = dafl[name] * value
        if learner.adversarial:
            teacher_logits = teacher(view)  # the reversal sends the discrepancy's ascent to the generator
        elif scored is not None and not (cfg.augment.shift or cfg.features):
            teacher_logits = scored.detach()  # the student's view is the generated batch itself
        else:
            with torch.no_grad():
                teacher_logits = teacher(view)
        if penultimate:
            penultimate.take()  # only the generator's scoring pass counts
        terms.update(setup.terms(student_logits, teacher_logits.detach().argmax(1), teacher_logits))
        return terms

    latent = shape if cfg.generator == "noise" else (cfg.latent_dim,)
    train_cfg = train_config(cfg, ctx)
    # agreement on generated inputs is pushed down on purpose (adversarial): no chance-level guard
    train_cfg.num_classes = None
    if learner.trains_generator:
        train_cfg.lr_groups = {"generator.": cfg.generator_lr}
    try:
        result = fit(
            learner,
            LatentBatches(latent, cfg.batch_size, cfg.steps_per_epoch, seed=ctx.seed),
            loss_fn,
            train_cfg,
            checkpoint_dir=ctx.work_dir,
        )
    finally:
        setup.remove_taps()
        if penultimate:
            penultimate.remove()
    ctx.details["generator"] = cfg.generator
    ctx.details["training_inputs"] = "none: generated only"
    _picture_samples(learner, teacher, latent, cfg, ctx)
    return finish_distillation(state, setup, result, ctx)


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
    :mod:`sample_grid`), and list it with the run's files."""
    seeded = torch.Generator().manual_seed(ctx.seed)
    device = next(teacher.parameters()).device

    def draw(n: int) -> torch.Tensor:
        with switched(learner):
            return learner(torch.randn(n, *latent, generator=seeded).to(device))[0]

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
