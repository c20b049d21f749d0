"""The stage registry: maps each recipe stage kind to its config class and handler.

Capabilities add stages with ``@register_stage("prune", PruneConfig, role="transform")``; the
pipeline looks kinds up here and never imports a capability itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from torchshrink.errors import UnknownStageError

Role = Literal["reference", "transform", "observe"]
StageHandler = Callable[[Any, Any, Any], Any]  # (ModelState, config, RunContext) -> ModelState

BUILTIN_STAGE_MODULES = (
    "torchshrink.stages.training",
    "torchshrink.stages.evaluate",
    "torchshrink.export",
    "torchshrink.prune.stage",
    "torchshrink.quantize.stage",
    "torchshrink.encode.stage",
    "torchshrink.distill.stage",
    "torchshrink.distill.ensemble_stage",
    "torchshrink.distill.datafree_stage",
)


@dataclass(frozen=True)
class StageEntry:
    """A registered stage kind.

    ``role`` tells the report which model is the baseline: "reference" stages (train, ensemble)
    produce it, "transform" stages change the model, "observe" stages only look at it.
    ``embeddings``: the stage works on embedding models (targets are the original's output vectors,
    not class labels); a stage that trains or scores with class labels leaves it False.
    """

    kind: str
    config: type[BaseModel]
    handler: StageHandler
    role: Role
    embeddings: bool = False


STAGES: dict[str, StageEntry] = {}


def register_stage(
    kind: str, config: type[BaseModel], role: Role = "transform", embeddings: bool = False
) -> Callable[[StageHandler], StageHandler]:
    """Decorator that registers ``handler(state, config, ctx) -> state`` for stage ``kind``."""

    def decorate(handler: StageHandler) -> StageHandler:
        if kind in STAGES and STAGES[kind].handler is not handler:
            raise ValueError(f"stage kind {kind!r} is already registered by {STAGES[kind].handler}")
        STAGES[kind] = StageEntry(kind, config, handler, role, embeddings)
        return handler

    return decorate


def load_builtin_stages() -> None:
    """Import the modules that register torchshrink's own stages."""
    for name in BUILTIN_STAGE_MODULES:
        importlib.import_module(name)


def get_stage(kind: str) -> StageEntry:
    """The entry for ``kind``; an unknown kind lists the known ones."""
    load_builtin_stages()
    if kind not in STAGES:
        raise UnknownStageError(f"unknown stage kind {kind!r}; known kinds: {', '.join(sorted(STAGES))}")
    return STAGES[kind]
