"""Stage ``distill``: train a student against one teacher or an ensemble of teachers.

The teacher is the pipeline's current model (after an ``ensemble`` stage: the ensemble) unless
``teachers`` names models; several are combined by ``combine``. Teachers run in eval mode under
``torch.no_grad`` with frozen parameters; when only their logits are needed they are computed
once over the training set and travel with the batches (the data is fixed). The objective is
``(1 - alpha) * CE + alpha * KD(T)`` plus the feature term and any regularisers, trained by the one
training loop. The student becomes the pipeline's model; the report lists teachers, ensemble and
student side by side.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from torchshrink.augment import augment_batch
from torchshrink.distill.ensemble import Combine, Ensemble
from torchshrink.distill.losses import FeatureAdapter, FeatureTap, Objective, StepOutputs, make_term
from torchshrink.errors import RecipeError
from torchshrink.inputs import ModelInput, call, samples, take
from torchshrink.measure import accuracy, check_model_fits, count_params, predict
from torchshrink.models import LoadedModel, ModelSpec, open_model
from torchshrink.parallel import ddp
from torchshrink.prune.masks import keeper_for
from torchshrink.registry import register_stage
from torchshrink.stages.training import TrainStageConfig, train_config
from torchshrink.state import ModelState, RunContext
from torchshrink.tables import markdown_table
from torchshrink.train import Batch, DatasetBatches, TrainResult, fit

log = logging.getLogger(__name__)

__all__ = [
    "DistillConfig",
    "Distillation",
    "StudentWithAdapters",
    "prepare_distillation",
    "finish_distillation",
    "distill_stage",
]


class DistillConfig(TrainStageConfig):
    """Options of the ``distill`` stage: the ``train`` options for the student, plus the objective."""

    student: ModelSpec | Literal["current"] = Field(
        description="the model to train: a model spec, or 'current' (the pipeline's model, e.g. just "
        "pruned, distilled back from the baseline)"
    )
    teachers: list[ModelSpec] = Field(
        default_factory=list,
        description="teacher models (default: the pipeline's current model; with student 'current', the "
        "baseline: the model as it was before the first compressing stage)",
    )
    combine: Combine = Field("mean_logits", description="how several teachers are combined")
    temperature: float = Field(4.0, gt=0)
    match: Literal["kd", "mae"] = Field(
        "kd", description="how the student's logits match the teacher's: kd (softened KL, T^2) or mae"
    )
    alpha: float = Field(
        0.9, ge=0, le=1, description="weight of the soft-target term; 1 - alpha on the labels"
    )
    features: list[tuple[str, str]] = Field(
        default_factory=list, description="[[student_layer, teacher_layer], ...] for feature distillation"
    )
    feature_loss: Literal["hint", "attention"] = "hint"
    feature_weight: float = Field(1.0, ge=0)
    regularizers: dict[Literal["confidence", "l1", "l2"], float] = Field(
        default_factory=dict, description="extra terms lambda * R: confidence penalty, L1/L2 on the weights"
    )
    epochs: int = Field(10, ge=1)


class StudentWithAdapters(nn.Module):
    """The student plus the feature adapters, so the training loop optimises (and checkpoints) both."""

    def __init__(self, student: nn.Module, adapters: dict[str, nn.Module]) -> None:
        super().__init__()
        self.student = student
        # Layer names contain dots, which ModuleDict keys may not.
        self.adapters = nn.ModuleDict({k.replace(".", "__"): v for k, v in adapters.items()})

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.student(*inputs)


def _frozen(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _teacher(
    state: ModelState, cfg: DistillConfig, ctx: RunContext
) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """The (frozen) teacher and the named models to report next to the student."""
    if not cfg.teachers and cfg.student == "current":
        if ctx.baseline is None:
            raise RecipeError(
                f"{ctx.stage_name}: student 'current' learns from the baseline, which this run does not "
                "have; name the teachers"
            )
        teacher = _frozen(ctx.baseline)
        return teacher, [("teacher (baseline)", teacher)]
    if not cfg.teachers:
        teacher = _frozen(state.model)
        named = (
            [(f"teacher {i}", m) for i, m in enumerate(teacher.members)]
            if isinstance(teacher, Ensemble)
            else []
        )
        return teacher, named + [("teacher" if not named else "ensemble", teacher)]
    models = [_frozen(open_model(spec).module) for spec in cfg.teachers]
    if len(models) == 1:
        return models[0], [("teacher", models[0])]
    ensemble = Ensemble(models, cfg.combine).eval()
    return ensemble, [(f"teacher {i}", m) for i, m in enumerate(models)] + [("ensemble", ensemble)]


def _objective(cfg: DistillConfig, adapters: dict[str, nn.Module]) -> Objective:
    pairs = dict(cfg.features)
    terms = {
        "ce": (1.0 - cfg.alpha, make_term("ce")),
        cfg.match: (cfg.alpha, make_term(cfg.match, temperature=cfg.temperature)),
    }
    if pairs:
        kind = "feature" if cfg.feature_loss == "hint" else "attention"
        terms[kind] = (cfg.feature_weight, make_term(kind, pairs=pairs, adapters=adapters))
    for name, weight in cfg.regularizers.items():
        terms[name] = (weight, make_term(name))
    return Objective(terms)


def _adapters(student: nn.Module, teacher: nn.Module, cfg: DistillConfig, example: ModelInput) -> dict:
    """One adapter per feature pair, sized from the features of an example batch."""
    if not cfg.features:
        return {}
    s_names, t_names = [s for s, _ in cfg.features], [t for _, t in cfg.features]
    try:
        with FeatureTap(student, s_names) as s_tap, FeatureTap(teacher, t_names) as t_tap, torch.no_grad():
            student.eval()
            call(student, example)
            call(teacher, example)
    except ValueError as exc:
        raise RecipeError(f"distill.features: {exc}") from exc
    if cfg.feature_loss == "attention":
        flat = [s for s, _ in cfg.features if s_tap.outputs[s].dim() < 3] + [
            t for _, t in cfg.features if t_tap.outputs[t].dim() < 3
        ]
        if flat:
            raise RecipeError(
                f"distill.features: attention transfer needs conv features (N, C, H, W); layer(s) {flat} "
                "give flat features: use feature_loss: hint for them"
            )
        return {}
    return {
        s: FeatureAdapter(tuple(s_tap.outputs[s].shape), tuple(t_tap.outputs[t].shape))
        for s, t in cfg.features
    }


@dataclass
class Distillation:
    """What a distillation stage trains with: the frozen teacher, the student (with its adapters, as
    the training loop's module), the objective and the feature taps on both networks."""

    teacher: nn.Module
    named: list[tuple[str, nn.Module]]
    loaded: LoadedModel
    learner: StudentWithAdapters
    objective: Objective
    student_tap: FeatureTap
    teacher_tap: FeatureTap

    @property
    def student(self) -> nn.Module:
        return self.learner.student

    def terms(
        self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The objective's named terms for one step (the taps hold this step's features)."""
        return self.objective(
            StepOutputs(
                student_logits=student_logits,
                labels=labels,
                teacher_logits=teacher_logits,
                student_features=dict(self.student_tap.outputs),
                teacher_features=dict(self.teacher_tap.outputs),
                student=self.student,
            )
        )

    def remove_taps(self) -> None:
        self.student_tap.remove()
        self.teacher_tap.remove()


def prepare_distillation(
    state: ModelState, cfg: DistillConfig, ctx: RunContext, example: ModelInput
) -> Distillation:
    """Teacher(s), student, adapters (sized on ``example`` inputs) and objective of a distill stage."""
    teacher, named = _teacher(state, cfg, ctx)
    teacher.to(ddp.device_for(ddp.current()))  # live teaching runs it on the training device's batches
    torch.manual_seed(ctx.seed)  # the same initial student for the same seed, however the stage is run
    loaded = (
        LoadedModel(state.model, state.architecture) if cfg.student == "current" else open_model(cfg.student)
    )
    student = loaded.module
    check_model_fits(
        student, ctx.data.inputs, ctx.data.num_classes, source=f"{ctx.stage_name}.student {cfg.student}"
    )
    adapters = _adapters(student, teacher, cfg, example)
    return Distillation(
        teacher=teacher,
        named=named,
        loaded=loaded,
        learner=StudentWithAdapters(student, adapters),
        objective=_objective(cfg, adapters),
        student_tap=FeatureTap(student, [s for s, _ in cfg.features]),
        teacher_tap=FeatureTap(teacher, [t for _, t in cfg.features]),
    )


def finish_distillation(
    state: ModelState, setup: Distillation, result: TrainResult, ctx: RunContext
) -> ModelState:
    """Report teachers, ensemble and student side by side; the student becomes the pipeline's model."""
    setup.remove_taps()
    student = setup.student.eval()
    rows = [(name, count_params(m)[0], accuracy(m, ctx.data.test)) for name, m in setup.named]
    rows.append(("student", count_params(student)[0], accuracy(student, ctx.data.test)))
    ctx.details.update(
        models={name: {"params": p, "accuracy": a} for name, p, a in rows},
        terms=sorted(setup.objective.terms),
        epoch_losses=result.epoch_losses,
        models_table=markdown_table(
            ["model", "params", "test accuracy"], [[n, f"{p:,}", f"{a * 100:.2f}%"] for n, p, a in rows]
        ),
    )
    log.info("%s:\n%s", ctx.stage_name, ctx.details["models_table"])
    return ModelState(
        model=student, architecture=setup.loaded.architecture, lineage=(*state.lineage, ctx.stage_name)
    )


@register_stage("distill", DistillConfig, role="transform")
def distill_stage(state: ModelState, cfg: DistillConfig, ctx: RunContext) -> ModelState:
    """Train ``cfg.student`` from the teacher(s); the student becomes the pipeline's model."""
    x, y = ctx.data.train.tensors[0], ctx.data.train.tensors[1]
    setup = prepare_distillation(state, cfg, ctx, take(x, slice(0, 2)))
    teacher = setup.teacher
    # Features or augmented inputs need the teacher's forward pass on the student's view; else its logits are cached.
    live = bool(cfg.features) or cfg.augment.active
    dataset = samples(x, y) if live else samples(x, y, predict(teacher, x))

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        inputs, labels = augment_batch(batch[0], batch[1], cfg.augment, ctx.data.num_classes)
        logits = call(model, inputs)
        if live:
            with torch.no_grad():
                t_logits = call(teacher, inputs)
        else:
            t_logits = batch[2]
        return setup.terms(logits, labels, t_logits)

    try:
        result = fit(
            setup.learner,
            DatasetBatches(dataset, cfg.batch_size, seed=ctx.seed),
            loss_fn,
            train_config(cfg, ctx),
            checkpoint_dir=ctx.work_dir,
            # a pruned student keeps its pruned weights at zero
            after_step=keeper_for(setup.student, state.attachments) if cfg.student == "current" else None,
        )
    finally:
        setup.remove_taps()
    ctx.details["teacher_outputs"] = (
        "live, on the student's view" if live else "cached once for the training set"
    )
    new = finish_distillation(state, setup, result, ctx)
    return new.replace(attachments=dict(state.attachments)) if cfg.student == "current" else new
