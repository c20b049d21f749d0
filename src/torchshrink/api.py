"""One call per capability: ``ts.prune(model, data, sparsity=0.5)``, ``ts.quantize``, ``ts.distill``,
``ts.encode``, ``ts.export``, ``ts.evaluate`` and ``ts.finetune`` (and ``apply_stage`` for any stage
kind, ``train`` included).

Each call validates its options with the very config a recipe's stage uses and runs the very stage
handler a recipe runs (the recipe and the API cannot drift), on a copy of the model (yours is left
as it was). It measures the model before and after and returns a :class:`Result`: the new model,
its metrics beside the original's, the stage's details and the files it wrote (an int8 ONNX file,
a packed ``.tshrink``) in ``out_dir`` (a new temporary folder when not given).

A model is an ``nn.Module`` or anything ``ts.load_model`` / a recipe's ``model:`` takes (a model
spec dict, a zoo name, a file); data is a ``DatasetBundle`` (``ts.load_data``) or a data spec.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn

from torchshrink.data import DatasetBundle, DataSpec, load_data
from torchshrink.digests import combine, model_digest
from torchshrink.errors import RecipeError
from torchshrink.io import prepare_output_folder
from torchshrink.measure import check_model_fits, measure, predict
from torchshrink.models import ModelSpec, open_model, save_model
from torchshrink.parallel import ddp, pipelining
from torchshrink.pipeline import pipeline_settings
from torchshrink.recipe import ParallelSettings, PipelineParallel, stage_config
from torchshrink.registry import StageEntry, get_stage
from torchshrink.seeding import seed_everything
from torchshrink.state import ModelState, RunContext

log = logging.getLogger(__name__)

__all__ = [
    "Result",
    "apply_stage",
    "distill",
    "encode",
    "evaluate",
    "export",
    "finetune",
    "prune",
    "quantize",
    "search",
    "train",
]

ModelLike = nn.Module | ModelSpec | dict | str | Path
DataLike = DatasetBundle | DataSpec | dict | str | Path


@dataclass
class Result:
    """What one capability call made: the model, its metrics beside the original's, the files."""

    model: nn.Module
    metrics: dict[str, float | int]
    baseline: dict[str, float | int]
    details: dict[str, Any]
    artefacts: dict[str, Path]
    out_dir: Path
    state: ModelState = field(repr=False)
    data: DatasetBundle = field(repr=False)

    def save(self, path: str | Path) -> Path:
        """Write the model as a torchshrink ``.safetensors`` file (``ts.load_model`` reads it back)."""
        return save_model(path, self.model, self.state.architecture, self.data.inputs)

    def summary(self) -> str:
        """One line: quality and size before -> after."""
        quality = "cosine" if self.data.embedding else "accuracy" if self.data.labelled else "agreement"
        b, m = self.baseline, self.metrics
        return (
            f"{quality} {b['accuracy']:.4f} -> {m['accuracy']:.4f}, size {b['size_bytes']:,} -> "
            f"{m['size_bytes']:,} bytes, MACs {b['macs']:,} -> {m['macs']:,}"
        )


def _open(model: ModelLike) -> tuple[nn.Module, dict[str, Any] | None, str | None]:
    """A private copy of the model, the architecture reference that rebuilds it, and its task."""
    if isinstance(model, nn.Module):
        return copy.deepcopy(model).eval(), None, None
    loaded = open_model(model)
    return loaded.module.eval(), loaded.architecture, loaded.task


def _options(kind: str, config: BaseModel | dict[str, Any] | None, options: dict[str, Any]) -> BaseModel:
    if config is None:
        return stage_config(kind, options, source=f"ts.{kind}")
    if options:
        merged = (config.model_dump() if isinstance(config, BaseModel) else dict(config)) | options
        return stage_config(kind, merged, source=f"ts.{kind}")
    return stage_config(kind, config, source=f"ts.{kind}")


def _judged(data: DatasetBundle, model: nn.Module, width: int, task: str | None, kind: str) -> DatasetBundle:
    """Targets as a run sets them: an embedding model's own vectors, an unlabelled set's labels from
    the model as given, a model wider than the data's classes keeping its width."""
    if task != "embedding" and not data.labelled and get_stage(kind).role == "reference":
        raise RecipeError(f"ts.{kind}: data {data.name} has no labels to train on; give labels ('y')")
    return data.targets_for(lambda x: predict(model, x, batch_size=64), task == "embedding", width)


def apply_stage(
    kind: str,
    model: ModelLike,
    data: DataLike,
    config: BaseModel | dict[str, Any] | None = None,
    *,
    out_dir: str | Path | None = None,
    seed: int = 0,
    reference: ModelLike | None = None,
    latency_repeats: int = 10,
    pipeline: PipelineParallel | dict[str, Any] | None = None,
    **options: Any,
) -> Result:
    """Run stage ``kind`` (any registered stage: prune, quantize, distill, ...) on ``model`` once.

    ``config`` (the stage's config object or a dict) and keyword ``options`` are validated like a
    recipe's stage options. ``reference`` is the model ratios and "distill back" refer to (default:
    ``model`` as given). The returned metrics are measured after the stage, timed interleaved with
    the reference; ``baseline`` holds the reference's. ``pipeline`` is a recipe's ``parallel.pipeline``
    (``{"stages": 2, "microbatches": 4}``): under torchrun, with one process per stage, training and
    evaluation run pipeline-parallel (every process calls this function).
    """
    entry = get_stage(kind)
    cfg = _options(kind, config, options)
    try:
        split = pipeline_settings(ParallelSettings.model_validate({"pipeline": pipeline}), ddp.current())
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise RecipeError(f"ts.{kind}: {where}: {error['msg']}") from None
    with pipelining.pipelined(split):
        return _apply(kind, entry, cfg, model, data, out_dir, seed, reference, latency_repeats)


def _apply(
    kind: str,
    entry: StageEntry,
    cfg: BaseModel,
    model: ModelLike,
    data: DataLike,
    out_dir: str | Path | None,
    seed: int,
    reference: ModelLike | None,
    latency_repeats: int,
) -> Result:
    seed_everything(seed)  # a model built here (a zoo spec) starts from seeded weights
    bundle = data if isinstance(data, DatasetBundle) else load_data(data)
    module, architecture, task = _open(model)
    source = f"ts.{kind}: model on data {bundle.name}"
    width = check_model_fits(module, bundle.inputs, bundle.num_classes, source=source)
    ref_module = module if reference is None else _open(reference)[0]
    if reference is not None:
        check_model_fits(ref_module, bundle.inputs, bundle.num_classes, source=f"ts.{kind}: reference")
    bundle = _judged(bundle, ref_module, width, task, kind)
    out = prepare_output_folder(
        out_dir if out_dir is not None else tempfile.mkdtemp(prefix=f"torchshrink-{kind}-")
    )
    key = combine(
        kind,
        json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        model_digest(module, architecture),
        bundle.digest(),
    )
    baseline_model = copy.deepcopy(ref_module)
    ctx = RunContext(
        data=bundle,
        out_dir=out,
        seed=seed,
        stage_index=0,
        stage_name=kind,
        fingerprint=key,
        dist=ddp.current(),
        baseline=None if entry.role == "reference" else baseline_model,
    )
    timing = {"latency_repeats": latency_repeats, "inputs": bundle.inputs}
    baseline = measure(baseline_model, bundle.test, **timing)
    seed_everything(seed)
    state = entry.handler(ModelState(model=module, architecture=architecture), cfg, ctx)
    metrics = measure(
        state.model,
        bundle.test,
        runtime=state.runtime,
        artefact=state.artefact,
        reference=baseline_model,
        **timing,
    )
    artefacts = {name: out / file for name, file in ctx.artefacts.items()}
    log.info("ts.%s: done; files in %s", kind, out)
    return Result(state.model, metrics, baseline, ctx.details, artefacts, out, state, bundle)


def prune(model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any) -> Result:
    """Prune ``model``: masks (``granularity: unstructured``) or a physically smaller model
    (``structured``: channels, neurons, heads, layers), by ``sparsity``, ``macs_reduction``,
    ``params_reduction`` or ``speedup``; see docs/pruning.md for every option."""
    return apply_stage("prune", model, data, config, **options)


def quantize(
    model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any
) -> Result:
    """Quantize ``model``: ``mode`` static | dynamic | qat | weight_only, ``bits`` 2-8, mixed precision;
    with ONNX Runtime the int8 file is written and measured (``result.artefacts['int8_onnx']``)."""
    return apply_stage("quantize", model, data, config, **options)


def encode(
    model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any
) -> Result:
    """Deep-Compression storage: k-means weight sharing (+ fine-tuning) and Huffman coding into a
    packed ``.tshrink`` file (``result.artefacts['packed']``)."""
    return apply_stage("encode", model, data, config, **options)


def search(
    model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any
) -> Result:
    """Search compression plans for the fastest (``objective: latency``), smallest (``size``) or
    cheapest (``macs``) model within ``max_drop`` accuracy points on a held-out split; the chosen
    model, fully fine-tuned, is ``result.model``; ``result.details['search']`` lists every candidate
    with the recipe stages that reproduce it (docs/search.md)."""
    return apply_stage("search", model, data, config, **options)


def export(
    model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any
) -> Result:
    """Export ``model`` to ONNX (checked against PyTorch on test inputs): ``result.artefacts['onnx']``."""
    return apply_stage("export", model, data, config, **options)


def evaluate(
    model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any
) -> Result:
    """Score ``model`` on ``data``: metrics, per-class accuracy and confusion matrix in ``details``."""
    return apply_stage("evaluate", model, data, config, **options)


def train(model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any) -> Result:
    """Train ``model`` on ``data`` (``epochs``, ``lr``, ``optimizer``, ``augment``, ...)."""
    return apply_stage("train", model, data, config, **options)


def finetune(
    model: ModelLike, data: DataLike, config: BaseModel | dict | None = None, **options: Any
) -> Result:
    """Fine-tune ``model`` (pruned weights stay zero); shorter, gentler defaults than ``train``."""
    return apply_stage("finetune", model, data, config, **options)


def distill(
    teacher: ModelLike,
    data: DataLike,
    config: BaseModel | dict | None = None,
    *,
    student: ModelLike,
    **options: Any,
) -> Result:
    """Distil ``teacher`` into ``student`` (an ``nn.Module`` of yours, or a model spec). ``teachers``
    (a list of model specs) makes an ensemble the teacher; ``features``, ``temperature``, ``alpha``
    and the rest as in docs/distillation.md. ``baseline`` is the teacher's metrics."""
    if isinstance(student, nn.Module):  # the student is trained in place of the current model
        return apply_stage("distill", student, data, config, reference=teacher, student="current", **options)
    spec = student if isinstance(student, (ModelSpec, dict)) else _spec_of(student)
    return apply_stage("distill", teacher, data, config, student=spec, **options)


def _spec_of(model: str | Path) -> dict[str, Any]:
    """A zoo name or a model file as a model spec dict."""
    return {"path": str(model)} if Path(str(model)).suffix else {"zoo": str(model)}
