"""A picture of what a generator makes: one row per class the teacher assigns, a few samples each.

Images are drawn as images (grey for one channel, colour for three), 1-D signals as small line
plots. A class the teacher never assigns to any drawn sample keeps an empty row, labelled so: a
generator that collapses onto a few classes shows it at a glance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from torchshrink.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["sample_rows", "write_sample_grid"]


@torch.no_grad()
def sample_rows(
    draw: Callable[[int], torch.Tensor],
    teacher: torch.nn.Module,
    num_classes: int,
    per_class: int = 8,
    draws: int = 8,
) -> list[torch.Tensor]:
    """For classes 0 .. ``num_classes`` - 1, up to ``per_class`` generated samples the teacher assigns
    to each, the most confident first; ``draw(n)`` makes n samples, called at most ``draws`` times
    (samples of other classes are dropped)."""
    found: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(num_classes)]
    for _ in range(draws):
        x = draw(per_class * num_classes).detach()
        probs = torch.softmax(teacher(x).float(), dim=1)
        confidence, label = probs.max(dim=1)
        x = x.cpu()
        for sample, c, k in zip(x, confidence.tolist(), label.tolist(), strict=True):
            if k < num_classes:
                found[k].append((c, sample))
        if all(len(row) >= per_class for row in found):
            break
    return [
        torch.stack([s for _, s in sorted(row, key=lambda t: -t[0])[:per_class]]) if row else torch.empty(0)
        for row in found
    ]


def write_sample_grid(
    rows: list[torch.Tensor], path: Path, title: str, input_range: tuple[float, float] | None = (0.0, 1.0)
) -> Path:
    """Draw ``rows`` (class k's samples in row k) into a PNG at ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max((len(r) for r in rows), default=1) or 1
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(columns * 0.9 + 0.6, len(rows) * 0.9 + 0.5), squeeze=False
    )
    for k, row in enumerate(rows):
        for j in range(columns):
            ax = axes[k][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                _draw(ax, row[j], input_range)
            elif j == 0:  # keep the row's label visible
                for spine in ax.spines.values():
                    spine.set_visible(False)
            else:
                ax.axis("off")
        axes[k][0].set_ylabel(f"{k}" if len(row) else f"{k}: none", rotation=0, labelpad=14, fontsize=8)
    try:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)
    return path


def _draw(ax: object, sample: torch.Tensor, input_range: tuple[float, float] | None) -> None:
    """One sample: an image (C, H, W) as an image, a signal (C, L) as lines."""
    if sample.dim() == 3:
        lo, hi = input_range if input_range is not None else (float(sample.min()), float(sample.max()))
        image = ((sample - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)  # type: ignore[attr-defined]
        else:
            ax.imshow(image[:3].permute(1, 2, 0).numpy())  # type: ignore[attr-defined]
    else:
        for channel in sample.reshape(-1, sample.shape[-1]):
            ax.plot(channel.numpy(), linewidth=0.8)  # type: ignore[attr-defined]
