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
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from torchshrink.augment import AugmentConfig, augment_batch, natural_shift, shiftable
from torchshrink.distillation.ensemble import Combine, Ensemble
from torchshrink.distillation.losses import FeatureAdapter, FeatureTap, Objective, StepOutputs, make_term
from torchshrink.errors import RecipeError, TrainingError
from torchshrink.inputs import MASK_INPUT, ModelInput, call, samples, take
from torchshrink.measure import accuracy, check_model_fits, count_params, predict
from torchshrink.models import LoadedModel, ModelSpec, open_model
from torchshrink.parallel import ddp, pipelining
from torchshrink.pruning.masks import keeper_for
from torchshrink.registry import register_stage
from torchshrink.stages.training import TrainStageConfig, check_augment, train_config
from torchshrink.state import ModelState, RunContext
from torchshrink.tables import markdown_table
from torchshrink.train import MONITOR_TERMS, Batch, DatasetBatches, TrainResult, batch_accuracy, fit
from torchshrink.transformer_blocks import attention_blocks, layer_lists

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
    temperature: float = Field(
        1.0,
        gt=0,
        description="T of the soft targets (1: measured to beat T 2 and T 4 over the student trained alone at "
        "6 and 30 epochs, MNIST-5k and MNIST-1D; B4's defaults rows)",
    )
    match: Literal["kd", "mae", "cosine"] | None = Field(
        None,
        description="how the student's outputs match the teacher's: kd (softened KL, T^2) or mae on "
        "logits, cosine on embedding vectors; default kd, cosine for an embedding model",
    )
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the soft-target term; 1 - alpha on the labels (0.5: measured to beat the "
        "student trained alone at short schedules, where 0.9 did not; B4's defaults rows)",
    )
    augment: AugmentConfig | Literal["auto"] = Field(
        "auto",
        description="the student's (and live teacher's) input views; auto: random shifts on image / signal "
        "inputs (2 pixels on 28x28), none otherwise; {} for none",
    )
    features: list[tuple[str, str]] = Field(
        default_factory=list, description="[[student_layer, teacher_layer], ...] for feature distillation"
    )
    feature_loss: Literal["hint", "attention"] = "hint"
    feature_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="transformers: weight of the hidden-state term (MSE of matched layers' outputs over "
        "real tokens)",
    )
    attention_map_weight: float = Field(
        0.0,
        ge=0,
        description="transformers: weight of the attention-map term (KL of matched layers' head-averaged "
        "attention over real tokens)",
    )
    layer_map: list[int] | None = Field(
        None,
        description="transformers: the teacher layer each student layer matches (default: spread "
        "evenly, the last on the last)",
    )
    regularizers: dict[Literal["confidence", "l1", "l2"], float] = Field(
        default_factory=dict, description="extra terms lambda * R: confidence penalty, L1/L2 on the weights"
    )
    epochs: int = Field(10, ge=1)

    def replaces_model(self) -> bool:
        """A new student replaces the pipeline's model (its layer names are the student's)."""
        return self.student != "current"


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


def output_match(cfg: DistillConfig, embedding: bool, source: str) -> str:
    """The term that matches the student's outputs to the teacher's: the option, or its default."""
    if cfg.match is None:
        return "cosine" if embedding else "kd"
    if embedding and cfg.match != "cosine":
        raise RecipeError(
            f"{source}.match: {cfg.match!r} compares class logits; an embedding model's vectors are "
            "matched by 'cosine' (the default for it)"
        )
    if not embedding and cfg.match == "cosine":
        raise RecipeError(f"{source}.match: 'cosine' matches embedding vectors; use kd or mae on logits")
    return cfg.match


def _objective(
    cfg: DistillConfig, adapters: dict[str, nn.Module], match: str, layers: LayerPairs
) -> Objective:
    pairs = dict(cfg.features)
    terms = {
        "ce": (1.0 - cfg.alpha, make_term("ce")),
        match: (cfg.alpha, make_term(match, temperature=cfg.temperature)),
    }
    if pairs:
        kind = "feature" if cfg.feature_loss == "hint" else "attention"
        terms[kind] = (cfg.feature_weight, make_term(kind, pairs=pairs, adapters=adapters))
    if cfg.hidden_weight:
        terms["hidden"] = (cfg.hidden_weight, make_term("hidden", pairs=layers.hidden))
    if cfg.attention_map_weight:
        terms["attention_maps"] = (
            cfg.attention_map_weight,
            make_term("attention_maps", pairs=layers.attention),
        )
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


@dataclass(frozen=True)
class LayerPairs:
    """Matched transformer layers: student -> teacher layer outputs, and their attention modules."""

    hidden: dict[str, str]
    attention: dict[str, str]

    @property
    def active(self) -> bool:
        return bool(self.hidden or self.attention)


def _layers_of(model: nn.Module, role: str, source: str) -> tuple[str, nn.ModuleList, list[str]]:
    """The encoder layer list of ``model`` and, per layer, the name of its attention module."""
    lists = layer_lists(model)
    if len(lists) != 1:
        raise RecipeError(
            f"{source}: the hidden / attention-map terms match transformer layers; the {role} has "
            f"{len(lists)} layer lists (a ModuleList whose entries each hold one attention block)"
        )
    name, layers = lists[0]
    blocks = {b.name for b in attention_blocks(model)}
    attention = [next(b for b in blocks if b.startswith(f"{name}.{i}.")) for i in range(len(layers))]
    return name, layers, attention


def match_layers(student: nn.Module, teacher: nn.Module, cfg: DistillConfig, source: str) -> LayerPairs:
    """Student layer i matches teacher layer ``layer_map[i]``; by default they are spread evenly
    over the teacher's (TinyBERT's uniform mapping), the student's last on the teacher's last."""
    if not (cfg.hidden_weight or cfg.attention_map_weight):
        return LayerPairs({}, {})
    s_name, s_layers, s_attention = _layers_of(student, "student", source)
    t_name, t_layers, t_attention = _layers_of(teacher, "teacher", source)
    n_s, n_t = len(s_layers), len(t_layers)
    mapping = cfg.layer_map or [round((i + 1) * n_t / n_s) - 1 for i in range(n_s)]
    if len(mapping) != n_s or not all(0 <= t < n_t for t in mapping):
        raise RecipeError(
            f"{source}.layer_map: {mapping} must give one teacher layer in [0, {n_t - 1}] for each of the "
            f"student's {n_s} layers"
        )
    hidden = {f"{s_name}.{i}": f"{t_name}.{t}" for i, t in enumerate(mapping)} if cfg.hidden_weight else {}
    attention = (
        {s_attention[i]: t_attention[t] for i, t in enumerate(mapping)} if cfg.attention_map_weight else {}
    )
    return LayerPairs(hidden, attention)


def attention_probabilities(output: object) -> torch.Tensor:
    """The attention distribution a transformers attention module returns next to its output."""
    if not isinstance(output, (tuple, list)) or len(output) < 2 or not isinstance(output[1], torch.Tensor):
        raise RecipeError(
            "distill.attention_map_weight: the attention module returned no attention probabilities "
            "(the model must run eager attention, as model.hf loads it)"
        )
    return output[1]


@dataclass
class Distillation:
    """What a distillation stage trains with: the frozen teacher, the student (with its adapters, as
    the training loop's module), the objective and the feature taps on both networks."""

    teacher: nn.Module
    named: list[tuple[str, nn.Module]]
    loaded: LoadedModel
    learner: StudentWithAdapters
    objective: Objective
    student_taps: list[FeatureTap]
    teacher_taps: list[FeatureTap]
    augment: AugmentConfig
    augment_reason: str
    """Why these views: "as given", or what ``augment: auto`` chose and why."""
    """The student's input views (resolved from ``augment: auto``)."""
    live: bool
    """The teacher must run on every batch (features are compared), not just once for its outputs."""

    @property
    def student(self) -> nn.Module:
        return self.learner.student

    def terms(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The objective's named terms for one step (the taps hold this step's features), with the
        student's top-1 accuracy on class labels as a monitored term."""
        return batch_accuracy(student_logits, labels) | self.objective(
            StepOutputs(
                student_logits=student_logits,
                labels=labels,
                teacher_logits=teacher_logits,
                student_features={k: v for tap in self.student_taps for k, v in tap.outputs.items()},
                teacher_features={k: v for tap in self.teacher_taps for k, v in tap.outputs.items()},
                student=self.student,
                token_mask=token_mask,
            )
        )

    def remove_taps(self) -> None:
        for tap in (*self.student_taps, *self.teacher_taps):
            tap.remove()


def prepare_distillation(
    state: ModelState, cfg: DistillConfig, ctx: RunContext, example: ModelInput
) -> Distillation:
    """Teacher(s), student, adapters (sized on ``example`` inputs) and objective of a distill stage."""
    teacher, named = _teacher(state, cfg, ctx)
    augment, why = distill_augment(cfg, ctx)
    if isinstance(cfg.augment, str):
        log.info("%s: %s", ctx.stage_name, why)
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
    match = output_match(cfg, ctx.data.embedding, ctx.stage_name)
    layers = match_layers(student, teacher, cfg, ctx.stage_name)
    return Distillation(
        teacher=teacher,
        named=named,
        loaded=loaded,
        learner=StudentWithAdapters(student, adapters),
        objective=_objective(cfg, adapters, match, layers),
        student_taps=[
            FeatureTap(student, [s for s, _ in cfg.features] + list(layers.hidden)),
            FeatureTap(student, list(layers.attention), select=attention_probabilities),
        ],
        teacher_taps=[
            FeatureTap(teacher, [t for _, t in cfg.features] + list(layers.hidden.values())),
            FeatureTap(teacher, list(layers.attention.values()), select=attention_probabilities),
        ],
        augment=augment,
        augment_reason=why,
        live=bool(cfg.features) or augment.active or layers.active,
    )


MEMORISED = 0.97
"""The teacher's top-1 agreement with the labels of the images the student learns on, from which its
outputs there are taken to add little beyond the labels (it has learnt those very images)."""


def _warn_if_memorised(
    teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig, ctx: RunContext
) -> None:
    """Say so when the student learns the teacher's outputs on the teacher's own training images, with
    no augmentation, on inputs that could be augmented: B4's defaults rows measured that setting below
    the student trained alone."""
    spec = ctx.data.inputs
    if not spec.single or not shiftable(tuple(spec.fields[0].shape)):
        return
    agreement = float((teacher_logits.argmax(1) == labels).float().mean())
    if agreement >= MEMORISED:
        shift = natural_shift(tuple(spec.fields[0].shape))
        advice = (
            f"pipeline-parallel distillation cannot augment: train the teacher with augment: {{shift: {shift}}} "
            "so that it does not learn the images by heart"
            if pipelining.active() is not None and ctx.dist.distributed
            else f"leave 'augment' out (auto: shifted views the teacher scores live) or give augment: {{shift: {shift}}}"
        )
        ctx.warn(
            f"the student learns the teacher's outputs on images the teacher gets {agreement:.1%} right (it has "
            "learnt them), with no augmentation: such targets add little beyond the labels, and B4 measured "
            f"this setting below the student trained alone (93.5% vs 95.0% at 6 epochs); {advice}"
        )


def distill_augment(cfg: DistillConfig, ctx: RunContext) -> tuple[AugmentConfig, str]:
    """The views the student learns on, and why: as given, or (``auto``) random shifts on one image or
    signal input, scored by the teacher live; none for token inputs, several inputs, or a pipelined
    run (its teacher cannot run live). Mixup (function matching) stays opt-in: it paid at 60 epochs
    (B4) but cost 0.4-2 points at 6 and 30 (B4 defaults)."""
    if isinstance(cfg.augment, AugmentConfig):
        return cfg.augment, "as given"
    spec = ctx.data.inputs
    field = spec.fields[0]
    if (
        ctx.data.embedding
        or not spec.single
        or not field.torch_dtype.is_floating_point
        or not shiftable(tuple(field.shape))
    ):
        return AugmentConfig(), "auto: none (the inputs are not one image or signal)"
    if pipelining.active() is not None and ctx.dist.distributed:
        return AugmentConfig(), "auto: none (pipeline-parallel: the teacher cannot run on each view)"
    views = AugmentConfig(shift=natural_shift(tuple(field.shape)))
    return views, f"auto: random shifts of up to {views.shift}"


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
        steps=result.steps,
        samples_per_second=round(result.samples_per_second, 1),
        models_table=markdown_table(
            ["model", "params", "test cosine" if ctx.data.embedding else "test accuracy"],
            [[n, f"{p:,}", f"{a:.4f}" if ctx.data.embedding else f"{a * 100:.2f}%"] for n, p, a in rows],
        ),
    )
    if result.pipeline is not None:
        ctx.details["pipeline"] = result.pipeline
    log.info("%s:\n%s", ctx.stage_name, ctx.details["models_table"])
    return ModelState(
        model=student, architecture=setup.loaded.architecture, lineage=(*state.lineage, ctx.stage_name)
    )


def _pipeline_loss(
    loss_fn: Any, setup: Distillation, cfg: DistillConfig, ctx: RunContext, live: bool
) -> None:
    """Give ``loss_fn`` what a pipeline's last stage computes: the objective from the student's
    outputs and a target holding the cached teacher logits and the labels. Only objectives of
    outputs qualify (no feature, hidden-state or weight terms, no live teacher, no augmentation)."""
    blocked = [
        why
        for why, present in (
            ("the teacher runs live (features or augmentation)", live),
            (
                "feature / hidden / attention-map terms",
                bool(cfg.features or cfg.hidden_weight or cfg.attention_map_weight),
            ),
            ("weight regularizers", bool(cfg.regularizers)),
            ("an embedding model (vector targets)", ctx.data.embedding),
        )
        if present
    ]
    if blocked:
        raise TrainingError(
            f"{ctx.stage_name}: pipeline-parallel distillation computes its loss from the student's outputs "
            f"alone; this stage has {', '.join(blocked)}: remove parallel.pipeline or those options"
        )

    def of_outputs(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = setup.terms(outputs, target[:, -1].long(), target[:, :-1].to(outputs.dtype))
        return sum(v for k, v in terms.items() if k not in MONITOR_TERMS)

    loss_fn.of_outputs, loss_fn.term = of_outputs, "distill"
    # cached teacher logits and the label, side by side: one tensor the schedule cuts into micro-batches
    # (float64: every class index and logit exactly)
    loss_fn.target_of = lambda batch: torch.cat([batch[2].double(), batch[1][:, None].double()], dim=1)


@register_stage("distill", DistillConfig, role="transform", embeddings=True)
def distill_stage(state: ModelState, cfg: DistillConfig, ctx: RunContext) -> ModelState:
    """Train ``cfg.student`` from the teacher(s); the student becomes the pipeline's model."""
    x, y = ctx.data.train.tensors[0], ctx.data.train.tensors[1]
    if isinstance(cfg.augment, AugmentConfig):
        check_augment(cfg.augment, ctx.data.embedding, ctx.stage_name)
    setup = prepare_distillation(state, cfg, ctx, take(x, slice(0, 2)))
    teacher = setup.teacher
    # Features or augmented inputs need the teacher's forward pass on the student's view; else its logits are cached.
    live = setup.live
    cached = None if live else predict(teacher, x)
    dataset = samples(x, y) if live else samples(x, y, cached)
    ctx.details["augment"] = {**setup.augment.model_dump(), "chosen": setup.augment_reason}
    if cached is not None and not ctx.data.embedding:
        _warn_if_memorised(cached, y, cfg, ctx)
    mask_at = ctx.data.input_names.index(MASK_INPUT) if MASK_INPUT in ctx.data.input_names else None

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        inputs, labels = augment_batch(batch[0], batch[1], setup.augment, ctx.data.num_classes)
        logits = call(model, inputs)
        if live:
            with torch.no_grad():
                t_logits = call(teacher, inputs)
        else:
            t_logits = batch[2]
        token_mask = inputs[mask_at] if mask_at is not None else None
        return setup.terms(logits, labels, t_logits, token_mask)

    learner: nn.Module = setup.learner
    if pipelining.active() is not None and ctx.dist.distributed:
        _pipeline_loss(loss_fn, setup, cfg, ctx, live or mask_at is not None)
        learner = setup.student  # no adapters: the student alone is what the stages split
    try:
        result = fit(
            learner,
            DatasetBatches(dataset, cfg.batch_size, seed=ctx.seed),
            loss_fn,
            train_config(cfg, ctx),
            checkpoint_dir=ctx.work_dir,
            # a pruned student keeps its pruned weights at zero
            after_step=keeper_for(setup.student, state.pruned_weights) if cfg.student == "current" else None,
        )
    finally:
        setup.remove_taps()
    ctx.details["teacher_outputs"] = (
        "live, on the student's view" if live else "cached once for the training set"
    )
    new = finish_distillation(state, setup, result, ctx)
    if cfg.student == "current":  # the same model, trained on: its pruned weights stay pruned
        return new.replace(attachments=dict(state.attachments), pruned_weights=state.pruned_weights)
    return new
