"""Data-free distillation: inputs made by a generator, never taken from a dataset.

The student learns from the teacher on synthetic inputs only. Four sources of inputs:

* ``dafl`` (Chen et al. 2019, "Data-Free Learning of Student Networks"): a generator trained so the
  teacher answers its images confidently (``one_hot``: cross-entropy against the teacher's own
  argmax), with strong penultimate-layer activations (``activation``: minus their mean absolute
  value), and evenly over the classes (``entropy``: minus the entropy of the batch's mean
  prediction, so the generator cannot collapse onto one class). The student matches the teacher on
  the (detached) images at the same time.
* ``adversarial`` (Fang et al. 2019, "Data-Free Adversarial Distillation"): the generator seeks the
  inputs on which student and teacher disagree most, the student closes the gap. One backward pass
  does both: the images pass a gradient reversal on their way to the two networks, so the
  discrepancy the student descends is the one the generator ascends. The generator's objective is
  one weighted set of terms (``one_hot``, ``activation``, ``entropy``, ``adversarial``): the two
  methods are its two default weightings, and any mixture of them can be asked for.
* ``vae``: a variational auto-encoder whose decoder is the generator, fitted to a pool of inputs
  inverted from the teacher (each optimised from noise until the teacher names its target class;
  smoothness and batch-norm statistics as priors), then sampled for fresh inputs the pool does not
  hold.
* ``conditional``: a generator given a class as well as noise (``G(z, c)``), trained so the teacher
  names the requested class (cross-entropy to ``c``), with the batch-norm statistics prior and a
  diversity term (mode seeking, Mao et al. 2019: different codes of one class must give different
  inputs); the student's batches hold every class equally, or more of the classes where student and
  teacher disagree most.
* ``vae`` with real inputs: the VAE is fitted to a few real unlabelled inputs instead of the
  inverted pool; ``real``: those inputs alone (the baseline that shows what the VAE adds).
* ``noise``: Gaussian noise in the input range, the floor every generator must beat.

Every optimisation here (generator, student, inverted inputs, VAE) runs in the one training loop;
this module holds the pieces: generators, the reversal, the DAFL terms and the latent batch source.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.errors import TrainingError
from torchshrink.parallel import ddp
from torchshrink.train import Batch

__all__ = [
    "Generator",
    "ConditionalGenerator",
    "class_draw",
    "draw_offset",
    "mode_seeking",
    "InputPool",
    "GradientReversal",
    "reverse_gradient",
    "dafl_terms",
    "LatentBatches",
    "PenultimateTap",
    "to_range",
    "InvertedInputs",
    "smoothness",
    "BatchNormStatistics",
    "Encoder",
    "VAE",
    "vae_terms",
]


def to_range(h: torch.Tensor, input_range: tuple[float, float] | None) -> torch.Tensor:
    """Raw generator output mapped into ``[lo, hi]`` by a sigmoid, or standardised per channel
    (batch statistics, as DAFL's last batch-norm) when the range is unknown (``None``)."""
    if input_range is None:
        dims = [0, *range(2, h.dim())]
        return (h - h.mean(dims, keepdim=True)) / (h.var(dims, keepdim=True, unbiased=False) + 1e-5).sqrt()
    lo, hi = input_range
    return lo + (hi - lo) * torch.sigmoid(h)


class Generator(nn.Module):
    """``z -> input`` for any input shape: transposed convolutions for images (C, H, W) and signals
    (C, L), an MLP for flat inputs (D,). Images and signals grow 4x from a quarter-size seed map of
    ``width`` channels (two stride-2 upsamplings), then are cropped to the exact size."""

    def __init__(
        self,
        latent_dim: int,
        input_shape: Sequence[int],
        width: int = 64,
        input_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__()
        self.latent_dim, self.input_shape = latent_dim, tuple(int(s) for s in input_shape)
        self.input_range = input_range
        self.width = width
        if len(self.input_shape) == 1:
            (d,) = self.input_shape
            self.seed_shape: tuple[int, ...] = (width * 4,)
            self.body: nn.Module = nn.Sequential(
                nn.Linear(width * 4, width * 8),
                nn.BatchNorm1d(width * 8),
                nn.LeakyReLU(0.2),
                nn.Linear(width * 8, d),
            )
        elif len(self.input_shape) in (2, 3):
            channels, spatial = self.input_shape[0], self.input_shape[1:]
            conv_t = nn.ConvTranspose2d if len(spatial) == 2 else nn.ConvTranspose1d
            norm = nn.BatchNorm2d if len(spatial) == 2 else nn.BatchNorm1d
            self.seed_shape = (width, *(math.ceil(s / 4) for s in spatial))
            half = max(width // 2, 1)
            self.body = nn.Sequential(
                conv_t(width, half, 4, 2, 1), norm(half), nn.LeakyReLU(0.2), conv_t(half, channels, 4, 2, 1)
            )
        else:
            raise ValueError(
                f"a generator makes inputs of shape (D,), (C, L) or (C, H, W); got {self.input_shape}"
            )
        seed = math.prod(self.seed_shape)
        self.project = nn.Sequential(nn.Linear(latent_dim, seed), nn.BatchNorm1d(seed), nn.LeakyReLU(0.2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.project(z).view(len(z), *self.seed_shape))
        if h.dim() > 2:  # crop the 4x map to the input size
            h = h[(slice(None), slice(None), *(slice(0, s) for s in self.input_shape[1:]))]
        return to_range(h, self.input_range)


class ConditionalGenerator(nn.Module):
    """``(z, class) -> input``: a :class:`Generator` whose code is ``z`` followed by the class one-hot."""

    def __init__(
        self,
        latent_dim: int,
        num_classes: int,
        input_shape: Sequence[int],
        width: int = 64,
        input_range: tuple[float, float] | None = (0.0, 1.0),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.generator = Generator(latent_dim + num_classes, input_shape, width, input_range)

    def forward(self, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(classes, self.num_classes).to(z.dtype)
        return self.generator(torch.cat([z, one_hot], dim=1))


GOLDEN = 0.6180339887498949
"""The offset step of successive class draws (a low-discrepancy rotation)."""


def class_draw(weights: torch.Tensor, n: int, offset: float = 0.5) -> torch.Tensor:
    """``n`` class indices in the proportions ``weights`` (need not sum to 1), exact up to one per
    class: stratified inverse-CDF sampling at ``(i + offset) / n``. Uniform weights give a balanced
    batch; moving ``offset`` between batches (see :func:`draw_offset`) spreads the remainders (and,
    with more classes than samples, the classes themselves) evenly over the batches, with no random
    numbers, so a resumed run repeats the draws."""
    cdf = (weights / weights.sum()).cumsum(0)
    points = (torch.arange(n, dtype=cdf.dtype, device=cdf.device) + offset % 1.0) / n
    return torch.searchsorted(cdf, points).clamp_max(len(weights) - 1)


def draw_offset(step: int, rank: int = 0, world_size: int = 1) -> float:
    """The offset of draw ``step`` on ``rank``: golden-ratio steps, the ranks spread in between."""
    return (step * GOLDEN + rank / world_size) % 1.0


def mode_seeking(x: torch.Tensor, z: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mode-seeking diversity term (Mao et al. 2019), to be minimised: for neighbouring samples of
    the same class, the inverse of (mean absolute input difference / mean absolute code
    difference). It grows without bound when different codes give the same input (mode collapse)."""
    same = classes == classes.roll(1)
    if not bool(same.any()):
        return x.new_zeros(())
    dx = (x - x.roll(1, 0)).abs().flatten(1).mean(1)[same]
    dz = (z - z.roll(1, 0)).abs().mean(1)[same]
    return 1.0 / ((dx / dz.clamp_min(1e-8)).mean() + 1e-5)


class InputPool(nn.Module):
    """A fixed pool of real inputs, never trained; ``forward(indices)`` returns those (on the
    indices' device). A plain attribute, not a buffer: data-parallel training would otherwise
    broadcast the whole pool every step, and checkpoints would copy it."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.inputs[indices.cpu()].to(indices.device)


class GradientReversal(torch.autograd.Function):
    """The identity forward; the gradient negated and scaled backward (what descends for the
    networks after it ascends, ``scale`` times, for the generator before it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``-scale`` on the way back."""
    return GradientReversal.apply(x, scale)


def dafl_terms(teacher_logits: torch.Tensor, features: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """DAFL's generator losses (unweighted), all to be minimised.

    ``one_hot``: cross-entropy of the teacher's logits against their own argmax; ``activation``:
    minus the mean absolute penultimate feature (averaged over the given feature tensors, e.g. one
    per ensemble member); ``entropy``: ``sum_c p_c log p_c`` of the batch's mean prediction ``p``
    (its minimum, ``-log C``, is a uniform spread over the classes).
    """
    one_hot = F.cross_entropy(teacher_logits, teacher_logits.argmax(1))
    tensors = list(features)
    activation = (
        -torch.stack([f.abs().mean() for f in tensors]).mean() if tensors else teacher_logits.new_zeros(())
    )
    mean_p = F.softmax(teacher_logits, 1).mean(0)
    entropy = (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return {"one_hot": one_hot, "activation": activation, "entropy": entropy}


class PenultimateTap:
    """Keeps the inputs of the last ``nn.Linear`` of each given model (the penultimate features)."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.features: list[torch.Tensor] = []
        self._handles = []
        for model in models:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise TrainingError(
                    f"{type(model).__name__} has no nn.Linear layer whose input could serve as the "
                    "penultimate features of DAFL's activation term; set weights.activation: 0"
                )
            self._handles.append(linears[-1].register_forward_pre_hook(self._keep))

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features.append(inputs[0])

    def take(self) -> list[torch.Tensor]:
        """The features recorded since the last call (and forget them)."""
        out, self.features = self.features, []
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LatentBatches:
    """``steps`` batches of latent codes ``z ~ N(0, I)`` per epoch, the same for the same
    (seed, epoch, rank) whatever came before, so an interrupted run resumes exactly; each rank draws
    its own share of the global ``batch_size``. With ``pool`` > 0 each batch also carries as many
    random indices into a pool of that many real inputs: ``(z, indices)``."""

    def __init__(
        self, latent_shape: Sequence[int], batch_size: int, steps: int, seed: int = 0, pool: int = 0
    ) -> None:
        info = ddp.current()
        if batch_size % info.world_size:
            raise TrainingError(
                f"batch_size {batch_size} must be divisible by the number of processes ({info.world_size})"
            )
        self.latent_shape = tuple(latent_shape)
        self.per_rank = batch_size // info.world_size
        self.steps, self.seed, self.rank, self.pool = steps, seed, info.rank, pool

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterable[Batch]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + self.rank)
        for _ in range(self.steps):
            z = torch.randn(self.per_rank, *self.latent_shape, generator=generator)
            if self.pool:
                yield (z, torch.randint(self.pool, (self.per_rank,), generator=generator))
            else:
                yield (z,)


class InvertedInputs(nn.Module):
    """A pool of ``count`` inputs as one trainable tensor (model inversion optimises the inputs
    themselves); ``forward(indices)`` returns those inputs in the input range."""

    def __init__(
        self, count: int, input_shape: Sequence[int], input_range: tuple[float, float] | None, seed: int = 0
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.raw = nn.Parameter(torch.randn(count, *input_shape, generator=generator) * 0.5)
        self.input_range = input_range

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return to_range(self.raw[indices], self.input_range)

    def pool(self) -> torch.Tensor:
        """All inputs, detached."""
        with torch.no_grad():
            return self.forward(torch.arange(len(self.raw)))


def smoothness(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels (a total-variation prior for images and signals)."""
    return torch.stack([x.diff(dim=d).pow(2).mean() for d in range(2, x.dim())]).mean()


class BatchNormStatistics:
    """DeepInversion's prior (Yin et al. 2020): hooks on every batch-norm of a model measure how far
    the batch statistics of its input lie from the running statistics it learnt on real data."""

    def __init__(self, model: nn.Module) -> None:
        self.losses: list[torch.Tensor] = []
        self._handles = [
            m.register_forward_hook(self._measure)
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]

    def __len__(self) -> int:
        return len(self._handles)

    def _measure(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.losses.append(
            torch.linalg.vector_norm(mean - module.running_mean)
            + torch.linalg.vector_norm(var - module.running_var)
        )

    def take(self) -> torch.Tensor | None:
        """The summed distance of the forward passes since the last call (None without batch-norms)."""
        losses, self.losses = self.losses, []
        return torch.stack(losses).sum() if losses else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Encoder(nn.Module):
    """The VAE's encoder: input -> (mean, log-variance) of the latent code; convolutions for images
    and signals, an MLP for flat inputs."""

    def __init__(self, latent_dim: int, input_shape: Sequence[int], width: int = 64) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            layers: list[nn.Module] = [nn.Linear(shape[0], width * 8), nn.LeakyReLU(0.2)]
        else:
            conv = nn.Conv2d if len(shape) == 3 else nn.Conv1d
            half = max(width // 2, 1)
            layers = [
                conv(shape[0], half, 4, 2, 1),
                nn.LeakyReLU(0.2),
                conv(half, width, 4, 2, 1),
                nn.LeakyReLU(0.2),
            ]
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *shape)).shape[1]
        self.head = nn.Linear(flat, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.head(self.features(x)).chunk(2, dim=1)
        return mean, log_var.clamp(-10, 10)


class VAE(nn.Module):
    """A variational auto-encoder (Kingma & Welling 2014) whose decoder is a :class:`Generator`, so
    sampling it (``decoder(z)``, ``z ~ N(0, I)``) makes new inputs like those it was fitted to."""

    def __init__(self, encoder: Encoder, decoder: Generator) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_var = self.encoder(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        return self.decoder(z), mean, log_var


def vae_terms(vae: nn.Module, x: torch.Tensor, beta: float = 1.0) -> dict[str, torch.Tensor]:
    """The VAE's negative evidence lower bound per sample: squared reconstruction error summed over
    the input, plus ``beta`` times the KL divergence of the latent posterior from ``N(0, I)``."""
    recon, mean, log_var = vae(x)
    reconstruction = (recon - x).pow(2).flatten(1).sum(1).mean()
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(1).mean()
    return {"reconstruction": reconstruction, "kl": beta * kl}
