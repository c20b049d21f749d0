"""Train / eval mode for a block of work, with every submodule's own mode restored afterwards.

``model.train(was_training)`` after a measurement sets every submodule to the root's mode: a model
whose parts were in different modes (a wrapper left in training mode around an encoder in eval,
frozen batch-norms in a training model) comes back with dropout or statistics switched on. Every
place that switches a model's mode for a while goes through :func:`switched` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["switched"]


@contextmanager
def switched(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode (or train mode) inside the block; each submodule's mode as before after it."""
    saved = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in saved:
            module.training = flag
