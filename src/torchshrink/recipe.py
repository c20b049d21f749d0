"""Recipes: YAML (or a dict) describing model, data and an ordered list of stages, validated with
pydantic. Every error names the key path, the value found and what is allowed.

```yaml
seed: 0
model: {zoo: lenet5}
data: {name: mnist5k}
stages:
  - train: {epochs: 10, lr: 0.001}
  - export: {format: onnx}
```
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from torchshrink.data import DataSpec
from torchshrink.errors import MissingFileError, RecipeError, UnknownStageError
from torchshrink.models import ModelSpec
from torchshrink.registry import get_stage

__all__ = ["Recipe", "StageSpec", "MeasureSettings", "load_recipe", "parse_recipe", "stage_config"]


class MeasureSettings(BaseModel, extra="forbid"):
    """How the pipeline measures each stage."""

    latency_repeats: int = Field(30, ge=3, description="timed forward passes per latency number (median)")
    threads: int = Field(2, ge=1, description="torch threads while timing")
    onnx_fp32: bool = Field(
        True,
        description="also time the model as given and every stage's float result on ONNX Runtime (each "
        "exported once into .work/timing/), beside PyTorch; files a stage ships (int8 ONNX) are timed on "
        "ONNX Runtime either way",
    )
    batch_sizes: tuple[int, int] = Field(
        (1, 32),
        description="the small and the large batch latency is timed at (e.g. [1, 8] for 224x224 images)",
    )

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _two(cls, value: object) -> object:
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError(f"give two batch sizes, small then large, e.g. [1, 32]; got {list(value)}")
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] < value[1]:
            raise ValueError("give two batch sizes, small then large, e.g. [1, 32]")
        return value


class PipelineParallel(BaseModel, extra="forbid"):
    """Model (pipeline) parallelism: the model split into consecutive stages, one per process."""

    stages: int = Field(2, ge=2, description="processes (torchrun --nproc_per_node / --nnodes) = stages")
    microbatches: int = Field(4, ge=1, description="micro-batches each batch is cut into")
    split: list[str] = Field(
        default_factory=list,
        description="module names where stages 2, 3, ... begin; empty: balanced by the measured time of "
        "each block",
    )
    schedule: Literal["gpipe", "1f1b"] = "gpipe"
    balance: Literal["time", "memory"] = Field(
        "time",
        description="an automatic split evens out the stages' measured time, or their parameter bytes "
        "(what each process's training state grows with)",
    )


class ParallelSettings(BaseModel, extra="forbid"):
    """How the training stages of a run are parallelised beyond data parallelism under torchrun."""

    pipeline: PipelineParallel | None = None


class _RecipeHead(BaseModel, extra="forbid"):
    name: str = "recipe"
    seed: int = 0
    model: ModelSpec
    data: DataSpec
    measure: MeasureSettings = MeasureSettings()
    parallel: ParallelSettings = ParallelSettings()
    stages: list[Any]


@dataclass(frozen=True)
class StageSpec:
    """One validated stage: its kind, a unique name within the recipe, and its config."""

    kind: str
    name: str
    config: BaseModel
    branch: bool = False  # a side branch: measured and reported, its files kept, the model not passed on

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {self.kind: self.config.model_dump(mode="json")}
        if self.branch:
            out["branch"] = True
        return out


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe` (YAML file) or :func:`parse_recipe` (dict)."""

    name: str
    seed: int
    model: ModelSpec
    data: DataSpec
    measure: MeasureSettings
    stages: tuple[StageSpec, ...]
    parallel: ParallelSettings = field(default_factory=ParallelSettings)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON-able data, with every default filled in."""
        return {
            "name": self.name,
            "seed": self.seed,
            "model": self.model.model_dump(mode="json", exclude_defaults=True),
            "data": self.data.model_dump(mode="json", exclude_defaults=True),
            "measure": self.measure.model_dump(mode="json"),
            "parallel": self.parallel.model_dump(mode="json", exclude_none=True),
            "stages": [s.to_dict() for s in self.stages],
        }

    def fingerprint(self, upto: int) -> str:
        """A hash of everything that determines the state after stage ``upto`` (for resume)."""
        full = self.to_dict()
        key = {k: full[k] for k in ("seed", "model", "data")} | {"stages": full["stages"][: upto + 1]}
        if tuple(self.measure.batch_sizes) != (1, 32):  # records hold latency_ms_b{n}: other n, other records
            key["batch_sizes"] = list(self.measure.batch_sizes)
        if self.parallel.pipeline is not None:  # micro-batches: other batch-norm statistics, float order
            key["parallel"] = full["parallel"]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        return load_recipe(path)


def _join(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_at(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that the key path ``loc`` points into (for listing allowed keys)."""
    current: Any = model_cls
    for part in loc:
        if (
            not (isinstance(current, type) and issubclass(current, BaseModel))
            or part not in current.model_fields
        ):
            return None
        annotation = current.model_fields[part].annotation
        candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _explain(exc: ValidationError, prefix: str, model_cls: type[BaseModel], source: str) -> RecipeError:
    lines = []
    members = model_cls.members() if hasattr(model_cls, "members") else {}  # a config picked by a tag
    for err in exc.errors():
        loc, owner_cls = tuple(err["loc"]), model_cls
        if members and loc and loc[0] in members:
            owner_cls, loc = members[loc[0]], loc[1:]
        where = _join(prefix, loc)
        if err["type"] == "union_tag_invalid":
            tag, expected = err["ctx"]["tag"], err["ctx"]["expected_tags"]
            lines.append(f"{where}: {tag!r} is not one of {expected}")
        elif err["type"] == "extra_forbidden":
            owner = _model_at(owner_cls, loc[:-1])
            allowed = ", ".join(owner.model_fields) if owner else "see the docs"
            lines.append(f"{where}: unknown key; allowed keys here: {allowed}")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict) or len(repr(value)) < 80 else "{...}"
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where} = {shown}: {message}")
    if len(lines) == 1:
        return RecipeError(f"{source}: {lines[0]}")
    return RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines))


def _resolve(path: Path | None, base: Path | None) -> Path | None:
    if path is None or base is None or path.is_absolute():
        return path
    return base / path


def _resolve_spec(spec: ModelSpec, base: Path | None) -> ModelSpec:
    """Relative paths from the recipe's folder; a factory's module is looked for there first."""
    import_path = _resolve(spec.import_path, base)
    if spec.factory is not None and import_path is None and base is not None:
        import_path = base.resolve()
    return spec.model_copy(
        update={
            "path": _resolve(spec.path, base),
            "weights": _resolve(spec.weights, base),
            "hf": _resolve(spec.hf, base),
            "import_path": import_path,
        }
    )


def stage_config(
    kind: str, options: dict[str, Any] | BaseModel, where: str = "", source: str = "options"
) -> BaseModel:
    """Stage ``kind``'s validated config from ``options`` (a dict, or its config object): the one
    validation a recipe's stage and the Python API share; errors name ``where`` (the key path)."""
    entry = get_stage(kind)
    if isinstance(options, entry.config):
        return options
    if isinstance(options, BaseModel) and not _is_member(entry.config, options):
        raise RecipeError(
            f"{source}: {where or kind}: a {type(options).__name__} is not the config of stage {kind!r} "
            f"({entry.config.__name__})"
        )
    try:
        return entry.config.model_validate(options)
    except ValidationError as exc:
        raise _explain(exc, where or kind, entry.config, source) from None


def _is_member(config: type[BaseModel], options: BaseModel) -> bool:
    """Whether ``options`` is one of the parts a tag-picked config (``members()``) validates."""
    members = config.members().values() if hasattr(config, "members") else ()
    return any(isinstance(options, m) for m in members)


def _resolve_stage_specs(config: BaseModel, base: Path | None) -> BaseModel:
    """Model specs inside stage options (distill.student, distill.teachers, ensemble.archs) take
    their relative paths from the recipe's folder too."""
    updates: dict[str, Any] = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, ModelSpec):
            updates[name] = _resolve_spec(value, base)
        elif isinstance(value, list) and value and all(isinstance(v, ModelSpec) for v in value):
            updates[name] = [_resolve_spec(v, base) for v in value]
    return config.model_copy(update=updates) if updates else config


def parse_recipe(data: Any, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as a dict; relative file paths are taken from ``base_dir``."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe must be a mapping with keys model, data, stages; got {type(data).__name__}"
        )
    try:
        head = _RecipeHead.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, "", _RecipeHead, source) from None
    if not head.stages:
        raise RecipeError(
            f"{source}: stages: the list is empty; add at least one stage such as '- evaluate: {{}}'"
        )
    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(head.stages):
        where = f"stages[{i}]"
        branch = False
        if isinstance(item, dict) and "branch" in item:
            item = dict(item)
            branch = item.pop("branch")
            if not isinstance(branch, bool):
                raise RecipeError(f"{source}: {where}.branch = {branch!r}: must be true or false")
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(
                f"{source}: {where} = {item!r}: each stage must be a one-key mapping such as '- train: {{epochs: 5}}' "
                "(plus, optionally, 'branch: true')"
            )
        kind, options = next(iter(item.items()))
        try:
            entry = get_stage(str(kind))
        except UnknownStageError as exc:
            raise UnknownStageError(f"{source}: {where}: {exc}") from None
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise RecipeError(
                f"{source}: {where}.{kind} = {options!r}: stage options must be a mapping, e.g. {{}}"
            )
        config = stage_config(str(kind), options, f"{where}.{kind}", source)
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"
        if branch and entry.role == "reference":
            raise RecipeError(
                f"{source}: {where}.branch: a {kind!r} stage makes the reference model; it cannot branch"
            )
        config = _resolve_stage_specs(config, base_dir)
        specs.append(StageSpec(kind=kind, name=name, config=config, branch=branch))
    model = _resolve_spec(head.model, base_dir)
    data_spec = head.data.model_copy(
        update={
            key: _resolve(getattr(head.data, key), base_dir) for key in ("npz", "folder", "text", "tokenizer")
        }
    )
    return Recipe(head.name, head.seed, model, data_spec, head.measure, tuple(specs), head.parallel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (plain YAML keeps the last one,
    so a repeated ``stages:`` or ``lr:`` would silently drop what came first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice in one mapping (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file; errors name the file and the key path."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "recipe file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return parse_recipe(data, source=str(path), base_dir=path.parent)
