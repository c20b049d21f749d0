"""The one way to obtain a model: from the zoo, a user factory, or a file; and to save one.

A torchshrink model file is a safetensors file whose metadata carries the architecture reference
(a zoo name or factory plus its keyword arguments) and the input shape, so it loads back without
executing any code from the file. TorchScript files load as they are. A whole pickled module is
loaded only when the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import pickle
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator
from torch import nn

from torchshrink import zoo
from torchshrink.errors import (
    CorruptFileError,
    ModelLoadError,
    ShapeMismatchError,
    TorchshrinkError,
    UntrustedPickleError,
)
from torchshrink.hf import Task
from torchshrink.inputs import InputSpec, as_spec
from torchshrink.io import (
    encode_sparse,
    file_kind,
    load_state_dict_file,
    read_safetensors_metadata,
    save_tensors,
)
from torchshrink.registry import ARCHITECTURE_BUILDERS, ARCHITECTURE_LAYERS, FILE_READERS, registered
from torchshrink.shapes import apply_resized

log = logging.getLogger(__name__)

MODEL_FORMAT = "torchshrink-model"
MODEL_FORMAT_VERSION = 1

__all__ = [
    "ModelSpec",
    "LoadedModel",
    "open_model",
    "load_model",
    "save_model",
    "load_weights_into",
    "load_weights_file",
]


class ModelSpec(BaseModel, extra="forbid"):
    """Where a model comes from: exactly one of ``zoo``, ``factory`` ("pkg.mod:fn"), ``path`` or ``hf``.

    ``weights`` (safetensors or a torch state_dict) may follow a zoo or factory model.
    ``path`` is a torchshrink model file, a TorchScript file, or (with ``trust_pickle``) a pickled module.
    ``hf`` is a local transformers model directory, loaded offline for ``task``.
    """

    zoo: str | None = None
    factory: str | None = None
    path: Path | None = None
    hf: Path | None = Field(
        None, description="a local transformers model directory (config.json, model.safetensors)"
    )
    task: Task | None = Field(
        None,
        description="hf: what the model is for; 'embedding' outputs mean-pooled, normalised sentence "
        "embeddings and quality becomes fidelity to the original (cosine, nearest-neighbour agreement)",
    )
    weights: Path | None = None
    kwargs: dict[str, Any] = {}
    trust_pickle: bool = False
    import_path: Path | None = Field(
        None,
        description="folder searched first for a factory's module (in a recipe: the recipe's folder by default)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("zoo", "factory", "path", "hf") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'zoo' ({', '.join(sorted(zoo.ZOO))}), 'factory' ('pkg.module:function'), "
                f"'path' (model file) or 'hf' (transformers model directory); got {given or 'none'}"
            )
        if (self.hf is None) != (self.task is None):
            raise ValueError(
                "'hf' (a transformers model directory) and 'task' (embedding | sequence-classification | "
                "image-classification) go together"
            )
        if self.hf is not None and (self.weights is not None or self.kwargs):
            raise ValueError(
                "an 'hf' model directory carries its own weights and config: drop 'weights' / 'kwargs'"
            )
        if self.zoo is not None and self.zoo not in zoo.ZOO:
            raise ValueError(f"unknown zoo model {self.zoo!r}; known: {', '.join(sorted(zoo.ZOO))}")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")
        if self.import_path is not None and self.factory is None:
            raise ValueError("'import_path' says where a factory's module lives; it goes with 'factory'")
        if self.path is not None and self.weights is not None:
            raise ValueError(
                "'weights' goes with 'zoo' or 'factory'; a 'path' model file carries its own weights"
            )
        return self


@dataclass
class LoadedModel:
    """A model plus the JSON architecture reference that rebuilds it (None if it cannot be rebuilt)."""

    module: nn.Module
    architecture: dict[str, Any] | None
    inputs: InputSpec | None = None

    @property
    def task(self) -> str | None:
        """The transformers task of an ``hf`` model (None for the others: classifiers)."""
        return task_of(self.architecture)


def task_of(architecture: dict[str, Any] | None) -> str | None:
    """The task an architecture reference records (``hf`` models), else None."""
    return ((architecture or {}).get("hf") or {}).get("task")


def recorded_inputs(record: dict[str, Any]) -> InputSpec | None:
    """The input description a model file recorded ("inputs"; older files: a float "input_shape")."""
    if record.get("inputs"):
        return InputSpec.from_dict(record["inputs"])
    if record.get("input_shape"):
        return InputSpec.of_shape(record["input_shape"])
    return None


@contextmanager
def _search_first(import_path: str | None) -> Iterator[None]:
    """``import_path`` at the front of sys.path for the duration (the factory may import siblings)."""
    added = import_path is not None and str(import_path) not in sys.path
    if added:
        sys.path.insert(0, str(import_path))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(import_path))


def _import_factory(ref: str, import_path: str | None) -> Any:
    """The factory function named ``pkg.module:function``, its module looked up in ``import_path`` first."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f"in {import_path} and on the Python path" if import_path else "on the Python path"
        raise ModelLoadError(
            f"factory {ref!r}: module {module_name!r} cannot be imported ({type(exc).__name__}: {exc}); "
            f"it was looked for {where}. Put {module_name.replace('.', '/')}.py next to the recipe, "
            "set model.import_path to its folder, or pip install the package that provides it"
        ) from exc
    wanted = Path(import_path or "") / (module_name.replace(".", "/") + ".py")
    loaded_from = Path(getattr(module, "__file__", None) or "")
    if import_path is not None and wanted.is_file() and loaded_from.resolve() != wanted.resolve():
        if "." in module_name:
            raise ModelLoadError(
                f"factory {ref!r}: a module {module_name!r} from {loaded_from} is already imported in this "
                f"process, so {wanted} cannot be; give the factory module a name of its own"
            )
        # Another recipe's module of the same name: this recipe means the one beside it.
        log.info("factory module %r re-imported from %s (was %s)", module_name, wanted, loaded_from)
        del sys.modules[module_name]
        module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise ModelLoadError(
            f"factory {ref!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute "
            f"{attr!r}; its public names include {sorted(n for n in vars(module) if not n.startswith('_'))[:12]}"
        )
    return getattr(module, attr)


def _call_factory(ref: str, kwargs: dict[str, Any], import_path: str | None = None) -> nn.Module:
    with _search_first(import_path):
        fn = _import_factory(ref, import_path)
        try:
            model = fn(**kwargs)
        except TypeError as exc:
            raise ModelLoadError(f"factory {ref!r} rejected arguments {kwargs}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {ref!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


_OWN_KEYS = frozenset({"zoo", "factory", "hf", "kwargs", "import_path", "resized"})
"""Architecture-reference keys built here: the base kinds (zoo, factory, transformers config) that
every capability's parts (``resized``, ``quantized``) apply to. Any other key was written by a
capability package and is built through the registry (``ensemble``, ``quantized``)."""


def build_architecture(architecture: dict[str, Any]) -> nn.Module:
    """Build an untrained module from an architecture reference.

    ``{"zoo"|"factory"|"hf": ..., "kwargs": {...}, "resized": {layer: shape}, "quantized": {...}}``;
    ``resized`` (written by structured pruning) replaces the named layers by smaller ones of the
    recorded shapes; ``quantized`` (written by quantization) re-creates the fake-quant structure.
    ``{"ensemble": {"members": [references], "combine": rule}}`` builds an ensemble of them.
    """
    extra = set(architecture) - _OWN_KEYS
    builders = registered(ARCHITECTURE_BUILDERS) if extra else {}
    whole = [key for key in builders if key in architecture]
    if whole:
        return builders[whole[0]](architecture, build_architecture)
    kwargs = dict(architecture.get("kwargs") or {})
    if "zoo" in architecture:
        model = zoo.build(architecture["zoo"], **kwargs)
    elif "hf" in architecture:
        from torchshrink.hf import build_hf  # transformers is an optional extra

        model = build_hf(architecture["hf"]["config"], architecture["hf"]["task"])
    elif "factory" in architecture:
        model = _call_factory(architecture["factory"], kwargs, architecture.get("import_path"))
    else:
        raise ModelLoadError(f"architecture reference {architecture} names none of 'zoo', 'factory', 'hf'")
    if "resized" in architecture:  # written by structured pruning (parametrizations baked, layers resized)
        model = apply_resized(model, architecture["resized"] or {})
    layers = registered(ARCHITECTURE_LAYERS) if extra else {}
    unknown = sorted(extra - set(layers))
    if unknown:
        raise ModelLoadError(
            f"architecture reference names {unknown}, which this torchshrink version cannot build "
            f"(known: {sorted(_OWN_KEYS | set(layers) | set(builders))})"
        )
    for key, apply in layers.items():
        if architecture.get(key):
            model = apply(model, architecture[key])
    return model


_OWN_FILE_KINDS = frozenset({"safetensors", "torch", "torchscript", "onnx", "unknown"})


def _registered_reader(kind: str) -> Any:
    """The reader a capability registered for a file kind this module does not read itself."""
    return None if kind in _OWN_FILE_KINDS else registered(FILE_READERS).get(kind)


@dataclass
class WeightsFile:
    """What a weights file holds: its tensors and, for torchshrink files, the architecture reference
    and input description it records (data: layer shapes, never code)."""

    state_dict: dict[str, torch.Tensor]
    architecture: dict[str, Any] | None = None
    inputs: InputSpec | None = None
    torchshrink: bool = False


def read_weights_file(path: str | Path) -> WeightsFile:
    """Read safetensors, a ``torch.save`` state_dict, or a file kind a capability registered (packed
    ``.tshrink``), once, never running code."""
    path = Path(path)
    read = _registered_reader(file_kind(path))
    if read is not None:
        got = read(path)
        return WeightsFile(got.state_dict, got.architecture, got.inputs, torchshrink=True)
    kind = file_kind(path)
    state_dict = load_state_dict_file(path)
    if kind != "safetensors":
        return WeightsFile(state_dict)
    meta = read_safetensors_metadata(path)
    if meta.get("format") != MODEL_FORMAT:
        return WeightsFile(state_dict)
    try:
        architecture = json.loads(meta["architecture"]) if "architecture" in meta else None
        if architecture is not None and not isinstance(architecture, dict):
            raise ValueError(f"a {type(architecture).__name__}, not a mapping")
        inputs = recorded_inputs({k: json.loads(meta[k]) for k in ("inputs", "input_shape") if meta.get(k)})
    except (ValueError, TypeError, KeyError, AttributeError, TorchshrinkError) as exc:
        raise CorruptFileError(
            path, f"its model metadata is damaged ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None
    return WeightsFile(state_dict, architecture, inputs, torchshrink=True)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors, a ``torch.save`` file or a packed ``.tshrink`` file (never code)."""
    return read_weights_file(path).state_dict


def load_weights_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load a state_dict strictly, naming missing/unexpected keys and mismatched shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ModelLoadError(
            f"{source}: weights do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state_dict.items():
        if own[name].shape != tensor.shape:
            raise ShapeMismatchError(
                f"{source}: layer {name!r} has shape {tuple(own[name].shape)} in the model "
                f"but {tuple(tensor.shape)} in the weights"
            )
    model.load_state_dict(state_dict)
    return model


def _architecture_parts(architecture: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain (zoo or factory) references inside an architecture reference: itself, or an ensemble's members."""
    if "ensemble" in architecture:
        return [p for m in architecture["ensemble"]["members"] for p in _architecture_parts(m)]
    return [architecture]


def check_named_code(architecture: dict[str, Any], trusted: dict[str, Any] | None, source: str) -> None:
    """A file's architecture may name only the factories that ``trusted`` (the architecture of the
    model the user's recipe names) names: code runs because a recipe says so, never because a file does."""
    allowed = {
        (p["factory"], p.get("import_path")) for p in _architecture_parts(trusted or {}) if "factory" in p
    }
    for part in _architecture_parts(architecture):
        if "factory" in part and (part["factory"], part.get("import_path")) not in allowed:
            raise ModelLoadError(
                f"{source}: names factory {part['factory']!r}, which the recipe does not; torchshrink runs no "
                "code that a file names. Delete the file (or the output folder's checkpoints) and run again"
            )


def _from_recorded(
    path: Path, architecture: dict[str, Any] | None, weights: dict[str, torch.Tensor]
) -> nn.Module:
    """The model a torchshrink file records: only zoo architectures and transformers configs (a file
    may not name code to run)."""
    if architecture is None:
        raise ModelLoadError(
            f"{path}: holds weights only (its model had no architecture reference); load it as "
            "{factory: 'pkg.mod:fn', weights: FILE}"
        )
    for part in _architecture_parts(architecture):
        if "hf" in part:
            continue  # a config (data) that transformers turns into one of its own classes
        if "zoo" not in part:
            raise ModelLoadError(
                f"{path}: names the factory {part.get('factory')!r} (code) as its architecture, and torchshrink "
                "runs no code that a file names. If you built this model with a factory of your own and "
                "trust the file, name that factory in your recipe: {factory: 'your.module:function', weights: FILE}"
            )
        if part["zoo"] not in zoo.ZOO:
            raise ModelLoadError(
                f"{path}: records the unknown architecture {part['zoo']!r} (known: {', '.join(sorted(zoo.ZOO))}); "
                "it was written by another torchshrink version"
            )
    check_record_fits(path, architecture, weights)
    model = build_architecture(architecture)
    return load_weights_into(model, weights, str(path))


def check_record_fits(path: Path, architecture: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Build the recorded architecture on the meta device (no memory) and compare it with the file's
    tensors first: a record asking for layers far larger than the weights beside it (damaged, or
    hostile: a 1e12-feature layer) is a named error, not an out-of-memory crash."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_architecture(architecture).state_dict().items()}
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta is checked by the real build
        return
    for name, shape in shapes.items():
        if name in weights and tuple(weights[name].shape) != shape:
            raise ModelLoadError(
                f"{path}: its architecture record builds {name!r} of shape {shape}, but the file holds "
                f"{tuple(weights[name].shape)}; the record does not match the weights (damaged or edited file)"
            )
    wanted, held = sum(math.prod(s) for s in shapes.values()), sum(t.numel() for t in weights.values())
    if wanted > 2 * held + 1_000_000:
        raise ModelLoadError(
            f"{path}: its architecture record asks for {wanted:,} values, the file holds {held:,}; the "
            "record does not match the weights (damaged or edited file)"
        )


def _open_file(path: Path, trust_pickle: bool) -> LoadedModel:
    kind = file_kind(path)
    if kind == "safetensors" or _registered_reader(kind) is not None:
        read = read_weights_file(path)
        if not read.torchshrink:
            raise ModelLoadError(
                f"{path}: plain safetensors weights carry no architecture; use "
                "{zoo: NAME, weights: FILE} or {factory: 'pkg.mod:fn', weights: FILE}"
            )
        model = _from_recorded(path, read.architecture, read.state_dict)
        return LoadedModel(model, read.architecture, read.inputs)
    if kind == "torchscript":
        try:
            return LoadedModel(torch.jit.load(str(path), map_location="cpu"), None)
        except Exception as exc:  # the TorchScript reader raises RuntimeError / ValueError on bad archives
            first = str(exc).strip().splitlines()
            raise CorruptFileError(
                path,
                f"a zip archive laid out like TorchScript that does not load as TorchScript "
                f"({type(exc).__name__}: {' '.join(first[:2])[:200]})",
                "re-export it with torch.jit.save, or save model.state_dict() with safetensors",
            ) from None
    if kind == "onnx":
        raise ModelLoadError(
            f"{path}: ONNX files run on ONNX Runtime, not as a torch module; use 'torchshrink eval'"
        )
    if not trust_pickle:
        try:
            load_state_dict_file(path)
        except UntrustedPickleError:
            raise
        raise ModelLoadError(
            f"{path}: holds a state_dict without an architecture; load it as {{zoo: NAME, weights: FILE}} "
            "or {factory: 'pkg.mod:fn', weights: FILE}"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ModuleNotFoundError) as exc:
        raise ModelLoadError(f"{path}: cannot unpickle the module: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path}: pickled object is a {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(obj, None)


def _recorded_shapes(saved: dict[str, Any] | None, architecture: dict[str, Any]) -> dict[str, Any]:
    """The ``resized`` layer shapes a torchshrink model file records for this same builder, if any.

    They are data (layer sizes), so they may come from the file even when the builder may not.
    """
    if not saved:
        return {}
    same_builder = all(saved.get(k) == architecture.get(k) for k in ("zoo", "factory")) and (
        (saved.get("kwargs") or {}) == architecture["kwargs"]
    )
    return {"resized": saved["resized"]} if same_builder and "resized" in saved else {}


def open_model(spec: ModelSpec | dict | str | Path) -> LoadedModel:
    """Build or load a model from a spec, a dict, a zoo name, or a path to a model file."""
    if isinstance(spec, Path):
        spec = ModelSpec(path=spec)
    elif isinstance(spec, str):
        spec = ModelSpec(zoo=spec) if spec in zoo.ZOO else ModelSpec(path=Path(spec))
    elif isinstance(spec, dict):
        spec = ModelSpec.model_validate(spec)
    if spec.path is not None:
        return _open_file(spec.path, spec.trust_pickle)
    if spec.hf is not None:
        from torchshrink.hf import open_hf  # transformers is an optional extra

        assert spec.task is not None
        module, architecture = open_hf(spec.hf, spec.task)
        return LoadedModel(module, architecture)
    architecture: dict[str, Any] = {"zoo": spec.zoo} if spec.zoo else {"factory": spec.factory}
    architecture["kwargs"] = dict(spec.kwargs)
    if spec.import_path is not None:
        architecture["import_path"] = str(spec.import_path)
    weights = read_weights_file(spec.weights) if spec.weights is not None else None
    if weights is not None:
        architecture.update(_recorded_shapes(weights.architecture, architecture))
    model = build_architecture(architecture)
    if weights is not None:
        load_weights_into(model, weights.state_dict, str(spec.weights))
    return LoadedModel(model, architecture, weights.inputs if weights is not None else None)


def load_model(spec: ModelSpec | dict | str | Path) -> nn.Module:
    """Return the ``nn.Module`` described by ``spec`` (see :class:`ModelSpec`)."""
    return open_model(spec).module


def save_model(
    path: str | Path,
    model: nn.Module,
    architecture: dict[str, Any] | None,
    inputs: InputSpec | Sequence[int] | None = None,
) -> Path:
    """Save a model as a torchshrink model file (safetensors + architecture metadata), atomically.

    Mostly-zero tensors (pruned weights) are stored as bitmask + values, so the file shrinks with sparsity.

    Without an architecture reference only the weights can be saved; the metadata says so.
    """
    meta = {"format": MODEL_FORMAT, "version": str(MODEL_FORMAT_VERSION)}
    if architecture is not None:
        meta["architecture"] = json.dumps(architecture, sort_keys=True)
    if inputs is not None:
        meta["inputs"] = json.dumps(as_spec(inputs).to_dict())
    tensors, sparse_meta = encode_sparse(model.state_dict())
    return save_tensors(path, tensors, meta | sparse_meta)
