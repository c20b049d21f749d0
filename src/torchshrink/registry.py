"""The registries capability packages fill, so that the layers below them never import them:

* stages: each recipe stage kind's config class and handler
  (``@register_stage("prune", PruneConfig, role="transform")``); the pipeline looks kinds up here;
* architecture parts: keys of an architecture reference that a capability writes and knows how to
  build (``"ensemble"``: the whole module) or re-apply to a built module (``"quantized"``);
* file readers: weights-file kinds a capability writes (``"packed"``), read without running code.

``models`` builds and loads through the last two and never imports a capability itself.
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
    "torchshrink.export_stage",
    "torchshrink.pruning.stage",
    "torchshrink.quantization.stage",
    "torchshrink.encoding.stage",
    "torchshrink.distillation.stage",
    "torchshrink.distillation.ensemble_stage",
    "torchshrink.distillation.datafree_stage",
    "torchshrink.plan_search.stage",
)


@dataclass(frozen=True)
class StageEntry:
    """A registered stage kind.

    ``role`` tells the report which model is the baseline: "reference" stages (train, ensemble)
    produce it, "transform" stages change the model, "observe" stages only look at it.
    ``embeddings``: whether the stage works on embedding models (targets are the original's output
    vectors, not class labels) or not (it trains or scores with class labels only).
    """

    kind: str
    config: type[BaseModel]
    handler: StageHandler
    role: Role
    embeddings: bool = False


STAGES: dict[str, StageEntry] = {}


def register_stage(
    kind: str,
    config: type[BaseModel],
    role: Role = "transform",
    embeddings: bool = False,
) -> Callable[[StageHandler], StageHandler]:
    """Decorator that registers ``handler(state, config, ctx) -> state`` for stage ``kind``."""

    def decorate(handler: StageHandler) -> StageHandler:
        if kind in STAGES and STAGES[kind].handler is not handler:
            raise ValueError(f"stage kind {kind!r} is already registered by {STAGES[kind].handler}")
        STAGES[kind] = StageEntry(kind, config, handler, role, embeddings)
        return handler

    return decorate


def layer_names(config: BaseModel) -> dict[str, list[str]]:
    """The options of a stage config that name layers of the model (option -> names), from its
    ``layer_names()`` method when it has one: the pipeline checks them before the first stage runs."""
    method = getattr(config, "layer_names", None)
    return dict(method()) if callable(method) else {}


def replaces_model(config: BaseModel) -> bool:
    """Whether a stage continues with another model (a new student, an ensemble), from the config's
    ``replaces_model()``: layer names in later stages then refer to that model, not the one loaded."""
    method = getattr(config, "replaces_model", None)
    return bool(method()) if callable(method) else False


ArchitectureBuilder = Callable[[dict[str, Any], Callable[[dict[str, Any]], Any]], Any]
"""(reference, build) -> module: builds a whole module; ``build`` builds a nested reference."""
ArchitectureLayer = Callable[[Any, Any], Any]
"""(module, recorded value) -> module: re-applies what a capability did to a built module."""
FileReader = Callable[[Any], Any]
"""path -> an object with ``state_dict``, ``architecture`` and ``inputs`` (never runs code)."""

ARCHITECTURE_BUILDERS: dict[str, ArchitectureBuilder] = {}
ARCHITECTURE_LAYERS: dict[str, ArchitectureLayer] = {}
FILE_READERS: dict[str, FileReader] = {}


def _registrar(table: dict[str, Any], key: str) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        if key in table and table[key] is not fn:
            raise ValueError(f"{key!r} is already registered by {table[key]}")
        table[key] = fn
        return fn

    return decorate


def register_architecture_builder(key: str) -> Callable[[ArchitectureBuilder], ArchitectureBuilder]:
    """Decorator: references holding ``key`` (e.g. "ensemble") are built by this function."""
    return _registrar(ARCHITECTURE_BUILDERS, key)


def register_architecture_layer(key: str) -> Callable[[ArchitectureLayer], ArchitectureLayer]:
    """Decorator: a reference's ``key`` entry (e.g. "quantized") is re-applied by this function."""
    return _registrar(ARCHITECTURE_LAYERS, key)


def register_file_reader(kind: str) -> Callable[[FileReader], FileReader]:
    """Decorator: weights files of ``kind`` (as ``io.file_kind`` names it) are read by this function."""
    return _registrar(FILE_READERS, kind)


def load_builtin_stages() -> None:
    """Import the modules that register torchshrink's own stages (and with them their architecture
    parts and file readers)."""
    for name in BUILTIN_STAGE_MODULES:
        importlib.import_module(name)


def registered(table: dict[str, Any]) -> dict[str, Any]:
    """One of the tables above, once torchshrink's own capabilities have filled it."""
    load_builtin_stages()
    return table


def stages_on_embeddings() -> list[str]:
    """The stage kinds that work on embedding models."""
    load_builtin_stages()
    return sorted(kind for kind, entry in STAGES.items() if entry.embeddings)


def get_stage(kind: str) -> StageEntry:
    """The entry for ``kind``; an unknown kind lists the known ones."""
    load_builtin_stages()
    if kind not in STAGES:
        raise UnknownStageError(f"unknown stage kind {kind!r}; known kinds: {', '.join(sorted(STAGES))}")
    return STAGES[kind]
