"""Distillation losses as small composable terms.

The objective is ``L(f_s(x), y) + sum_i lambda_i * R_i(...)``: a task loss plus weighted
regularisers. Every term reads what one training step produced (:class:`StepOutputs`: the
student's logits, the labels, the teacher's logits, tapped intermediate features, the student
itself) and returns a scalar. :class:`Objective` evaluates the weighted sum and returns the named
terms, so the training loop logs each and names the one that goes NaN.

Terms: ``ce`` (the task loss: cross-entropy, or cosine distance to an embedding model's target
vectors), ``kd`` (soft targets, Hinton et al. 2015: ``KL(softmax(t/T) || softmax(s/T)) * T^2``),
``mae`` (mean absolute logit difference, Fang et al. 2019), ``cosine`` (cosine distance of the
student's vectors to the teacher's: the match of embedding models), ``feature`` (hint loss through
a learned adapter, FitNets), ``attention`` (attention transfer, Zagoruyko & Komodakis 2017),
``hidden`` and ``attention_maps`` (transformers, TinyBERT-style: the hidden states of matched layers
and their head-averaged attention distributions, over real tokens only), ``confidence``
(confidence penalty, Pereyra et al. 2017: minus the entropy of the student's prediction), ``l1`` and
``l2`` (on the student's conv/linear weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.train import cosine_distance, task_loss

__all__ = [
    "StepOutputs",
    "Term",
    "soft_target_loss",
    "logit_mae",
    "confidence_penalty",
    "weight_penalty",
    "attention_map",
    "attention_transfer",
    "hidden_state_loss",
    "attention_map_loss",
    "FeatureAdapter",
    "FeatureTap",
    "Objective",
    "TERMS",
    "make_term",
]


@dataclass
class StepOutputs:
    """What one step produced, for the loss terms to read."""

    student_logits: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)
    student: nn.Module | None = None
    token_mask: torch.Tensor | None = None
    """(N, L) 1 for real tokens, 0 for padding (transformer terms average over real tokens only)."""


Term = Callable[[StepOutputs], torch.Tensor]


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the batch.

    The ``T^2`` keeps the gradient's size independent of ``T`` (the soft gradients scale as 1/T^2).
    """
    t = float(temperature)
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def logit_mae(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the logits (Fang et al. 2019): unlike KL it does not fade as the
    student's probabilities approach the teacher's, so an adversarial generator keeps a gradient."""
    return (student_logits - teacher_logits).abs().mean()


def confidence_penalty(logits: torch.Tensor) -> torch.Tensor:
    """Minus the mean entropy of ``softmax(logits)``: adding it (weighted) discourages over-confidence."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * log_p).sum(dim=1).mean()


def weight_penalty(model: nn.Module, p: int) -> torch.Tensor:
    """``sum |W|`` (p=1) or ``sum W^2`` (p=2) over the conv and linear weights of ``model``."""
    weights = [
        m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    return sum((w.abs() if p == 1 else w.pow(2)).sum() for w in weights)


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of conv features: ``sum_c |F_c|^p``, flattened and L2-normalised per sample."""
    if features.dim() < 3:
        raise ValueError(
            f"attention transfer needs conv features (N, C, ...), got shape {tuple(features.shape)}"
        )
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Squared distance of the attention maps, averaged over the batch; the larger map is pooled to the smaller."""
    if student.shape[2:] != teacher.shape[2:]:
        size = tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:], strict=True))
        student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).sum(dim=1).mean()


def _token_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token ``values`` (N, L) over the real tokens (all tokens without a mask)."""
    if token_mask is None:
        return values.mean()
    weights = token_mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared difference of two layers' hidden states (N, L, H), over real tokens."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"hidden states of shape {tuple(student.shape)} (student) and {tuple(teacher.shape)} (teacher) "
            "differ: the hidden term matches layers of the same width"
        )
    return _token_mean((student - teacher).pow(2).mean(-1), token_mask)


def attention_map_loss(
    student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(teacher || student)`` of the head-averaged attention distributions (N, heads, L, L) of
    two layers, per real query token. Averaging over heads lets a student that lost heads still
    learn where its layer as a whole looks."""
    t, s_ = teacher.mean(1), student.mean(1)
    if t.shape != s_.shape:
        raise ValueError(f"attention maps {tuple(s_.shape)} and {tuple(t.shape)} differ in length")
    kl = (t * (t.clamp_min(1e-12).log() - s_.clamp_min(1e-12).log())).sum(-1)
    return _token_mean(kl, token_mask)


class FeatureAdapter(nn.Module):
    """Maps a student feature to the teacher's shape: a 1x1 conv (conv features) or a linear layer.

    Spatial sizes that differ are matched by adaptive average pooling of the student's map.
    With equal shapes it is the identity (nothing to learn).
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(student_shape) != len(teacher_shape):
            raise ValueError(
                f"student feature {tuple(student_shape)} and teacher feature {tuple(teacher_shape)} differ in rank"
            )
        self.spatial = tuple(teacher_shape[2:])
        s, t = student_shape[1], teacher_shape[1]
        if len(student_shape) == 2:
            self.map: nn.Module = nn.Identity() if s == t else nn.Linear(s, t)
        elif len(student_shape) == 4:
            self.map = nn.Identity() if s == t else nn.Conv2d(s, t, 1)
        else:
            raise ValueError(
                f"feature distillation supports (N, C) and (N, C, H, W) features, got {tuple(student_shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial and tuple(x.shape[2:]) != self.spatial:
            x = F.adaptive_avg_pool2d(x, self.spatial)
        return self.map(x)


def first_tensor(output: object) -> torch.Tensor:
    """A module's output tensor, or the first element of a tuple it returns (a transformer layer's)."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


class FeatureTap:
    """Forward hooks that keep the outputs of named submodules of a model (``with`` removes them).

    ``select`` picks the tensor from a module's output (default: the output, or the first element
    of a tuple); an attention module's probabilities are its output's second element.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        select: Callable[[object], torch.Tensor] = first_tensor,
    ) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            known = [n for n in modules if n]
            listed = ", ".join(known[:25]) + (f", ... ({len(known)} in all)" if len(known) > 25 else "")
            raise ValueError(f"no layer(s) {missing} in {type(model).__name__}; layers: {listed}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.select = select
        self._handles = [modules[n].register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[name] = self.select(output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _needs_teacher(out: StepOutputs) -> torch.Tensor:
    if out.teacher_logits is None:
        raise ValueError("the 'kd' / 'mae' / 'cosine' terms need the teacher's outputs")
    return out.teacher_logits


@dataclass(frozen=True)
class TermOptions:
    """What a term may be built with: the soft-target temperature, matched layers (student ->
    teacher) and the feature adapters fitted to them."""

    temperature: float = 4.0
    pairs: Mapping[str, str] = field(default_factory=dict)
    adapters: Mapping[str, nn.Module] = field(default_factory=dict)


def _weight_term(p: int) -> Callable[[str, TermOptions], Term]:
    def build(name: str, opts: TermOptions) -> Term:
        def penalty(out: StepOutputs) -> torch.Tensor:
            if out.student is None:
                raise ValueError(f"the {name!r} term needs the student model")
            return weight_penalty(out.student, p)

        return penalty

    return build


def _matched_term(compare: Callable[..., torch.Tensor]) -> Callable[[str, TermOptions], Term]:
    """Matched hidden states or attention maps, averaged over the pairs (token-masked)."""

    def build(name: str, opts: TermOptions) -> Term:
        if not opts.pairs:
            raise ValueError(f"the {name!r} term needs matched layers {{student_layer: teacher_layer}}")
        pairs = dict(opts.pairs)
        return lambda out: torch.stack(
            [
                compare(out.student_features[s], out.teacher_features[t].detach(), out.token_mask)
                for s, t in pairs.items()
            ]
        ).mean()

    return build


def _layer_term(adapt: bool) -> Callable[[str, TermOptions], Term]:
    """Feature maps (through the fitted adapters, MSE) or attention transfer, averaged over the pairs."""

    def build(name: str, opts: TermOptions) -> Term:
        if not opts.pairs:
            raise ValueError(f"the {name!r} term needs layer pairs [[student_layer, teacher_layer], ...]")
        pairs, fitted = dict(opts.pairs), dict(opts.adapters)

        def one(s: str, t: str, out: StepOutputs) -> torch.Tensor:
            fs, ft = out.student_features[s], out.teacher_features[t].detach()
            if adapt:
                return F.mse_loss(fitted[s](fs) if s in fitted else fs, ft)
            return attention_transfer(fs, ft)

        return lambda out: torch.stack([one(s, t, out) for s, t in pairs.items()]).mean()

    return build


TERMS: dict[str, Callable[[str, TermOptions], Term]] = {
    "ce": lambda name, opts: lambda out: task_loss(out.student_logits, out.labels),
    "kd": lambda name, opts: (
        lambda out: soft_target_loss(out.student_logits, _needs_teacher(out), opts.temperature)
    ),
    "mae": lambda name, opts: lambda out: logit_mae(out.student_logits, _needs_teacher(out)),
    "cosine": lambda name, opts: lambda out: cosine_distance(out.student_logits, _needs_teacher(out)),
    "feature": _layer_term(adapt=True),
    "attention": _layer_term(adapt=False),
    "hidden": _matched_term(hidden_state_loss),
    "attention_maps": _matched_term(attention_map_loss),
    "confidence": lambda name, opts: lambda out: confidence_penalty(out.student_logits),
    "l1": _weight_term(1),
    "l2": _weight_term(2),
}
"""The one registry of loss terms: name -> builder(name, options) -> term."""


def make_term(name: str, *, temperature: float = 4.0, pairs: Mapping[str, str] | None = None,
              adapters: Mapping[str, nn.Module] | None = None) -> Term:  # fmt: skip
    """The registered term ``name`` (see :data:`TERMS`) with its options bound.

    ``pairs`` maps student layer -> teacher layer (feature, attention, hidden, attention_maps);
    ``adapters`` maps student layer -> :class:`FeatureAdapter` (feature).
    """
    if name not in TERMS:
        raise ValueError(f"unknown loss term {name!r}; known: {', '.join(TERMS)}")
    return TERMS[name](name, TermOptions(temperature, dict(pairs or {}), dict(adapters or {})))


class Objective:
    """A weighted sum of terms: ``{name: weight}``; calling it returns the weighted terms by name."""

    def __init__(self, terms: Mapping[str, tuple[float, Term]]) -> None:
        if not terms:
            raise ValueError("an objective needs at least one term")
        self.terms = dict(terms)

    def __call__(self, out: StepOutputs) -> dict[str, torch.Tensor]:
        return {name: weight * term(out) for name, (weight, term) in self.terms.items() if weight}
