"""The pipeline: runs a recipe's stages in order, measures after each, checkpoints between them
(``resume`` skips finished stages) and writes the model and the report."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from torchshrink._version import __version__
from torchshrink.data import DatasetBundle, load_data
from torchshrink.digests import combine, model_digest
from torchshrink.errors import CorruptFileError, DataError, RecipeError, TorchshrinkError
from torchshrink.inputs import InputSpec
from torchshrink.io import load_tensors, read_safetensors_metadata, save_tensors, write_text_atomic
from torchshrink.measure import check_model_fits, measure, predict, timing_pass
from torchshrink.models import (
    build_architecture,
    check_named_code,
    check_record_fits,
    load_weights_into,
    open_model,
    save_model,
)
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.parallel import ddp, pipelining
from torchshrink.recipe import ParallelSettings, Recipe, StageSpec, load_recipe, parse_recipe
from torchshrink.registry import StageEntry, get_stage, layer_names, replaces_model, stages_on_embeddings
from torchshrink.report import REPORT_FILES, Report, write_report
from torchshrink.run_folder import OutputFolder, claim
from torchshrink.seeding import seed_everything
from torchshrink.state import ModelState, RunContext

log = logging.getLogger(__name__)

CHECKPOINT_DIR = ".checkpoints"
WORK_DIR = ".work"
CACHE_DIR = ".cache"  # kept between runs: its files are keyed by their inputs' content (text tokens)
MODEL_FILE = "model.safetensors"

__all__ = ["run", "MODEL_FILE"]


def _checkpoint_path(out_dir: Path, index: int, name: str) -> Path:
    return out_dir / CHECKPOINT_DIR / f"stage-{index:02d}-{name}.safetensors"


def _save_stage(path: Path, state: ModelState, record: dict[str, Any], fingerprint: str) -> None:
    meta = {
        "fingerprint": fingerprint,
        "digest": model_digest(state.model, state.architecture),
        "record": json.dumps(record, default=str),
        "architecture": json.dumps(state.architecture),
        "state": json.dumps(
            {
                "artefact": str(state.artefact) if state.artefact else None,
                "attachments": state.attachments,
                "pruned_weights": list(state.pruned_weights),
                "lineage": list(state.lineage),
                "runtime": str(state.runtime.path) if isinstance(state.runtime, OnnxRuntimeModel) else None,
            },
            default=str,
        ),
    }
    save_tensors(path, state.model.state_dict(), meta)


def _load_stage(path: Path, current: ModelState) -> tuple[ModelState, dict[str, Any]]:
    meta = read_safetensors_metadata(path)
    architecture = json.loads(meta["architecture"])
    weights = load_tensors(path)
    if architecture:
        check_named_code(architecture, current.architecture, str(path))
        check_record_fits(path, architecture, weights)
    model = build_architecture(architecture) if architecture else current.model
    load_weights_into(model, weights, str(path))
    model.eval()
    if model_digest(model, architecture) != meta.get("digest"):
        raise CorruptFileError(
            path,
            "its weights do not match the digest recorded when it was written (changed since?)",
            "delete the .checkpoints folder, or run without --resume",
        )
    saved = json.loads(meta["state"])
    runtime = saved.get("runtime")
    state = ModelState(
        model=model,
        architecture=architecture,
        artefact=Path(saved["artefact"]) if saved["artefact"] else None,
        attachments={k: v for k, v in saved["attachments"].items() if k != "pruned_weights"},
        # older checkpoints kept the names among the attachments
        pruned_weights=tuple(saved.get("pruned_weights", saved["attachments"].get("pruned_weights", []))),
        lineage=tuple(saved["lineage"]),
        runtime=OnnxRuntimeModel(runtime) if runtime else None,
    )
    return state, json.loads(meta["record"])


def _resumable_prefix(recipe: Recipe, out_dir: Path, keys: list[str]) -> int:
    """How many leading stages have a checkpoint written with their very key (recipe prefix, seed,
    model and data content)."""
    done = 0
    for i, spec in enumerate(recipe.stages):
        path = _checkpoint_path(out_dir, i, spec.name)
        if not path.is_file():
            break
        try:
            if read_safetensors_metadata(path).get("fingerprint") != keys[i]:
                log.info(
                    "resume: %s was made from other inputs; stages from %r on are recomputed", path, spec.name
                )
                break
        except TorchshrinkError:
            break
        done = i + 1
    return done


def _on_onnx_runtime(
    model: nn.Module, name: str, inputs: InputSpec, out_dir: Path, info: ddp.DistInfo
) -> nn.Module | None:
    """``model`` exported to ONNX and run by ONNX Runtime (the timing pass's second runtime); None,
    with a warning, when it does not export."""
    path = out_dir / WORK_DIR / "timing" / f"{name.strip('()')}.onnx"
    try:
        if info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            export_onnx(copy.deepcopy(model), path, inputs)
        ddp.barrier()
        return OnnxRuntimeModel(path)
    except TorchshrinkError as exc:
        log.warning("%s does not export to ONNX (%s): not timed on ONNX Runtime", name, exc)
        return None


def _fit_labels(
    data: DatasetBundle,
    model: nn.Module,
    width: int,
    recipe: Recipe,
    entries: list[StageEntry],
    task: str | None,
) -> DatasetBundle:
    """Labels for the run: unlabelled data is labelled by the model as given (quality is then
    top-1 agreement with it); a model wider than the data's classes keeps its own width. An
    embedding model's targets are its own output vectors (quality: fidelity to it)."""
    roles = [e.role for e in entries]
    if task == "embedding":
        unfit = [spec.name for spec, e in zip(recipe.stages, entries, strict=True) if not e.embeddings]
        if unfit:
            raise RecipeError(
                f"stage {unfit[0]!r} trains or scores with class labels and does not "
                f"work on an embedding model yet; stages that do: {', '.join(stages_on_embeddings())}"
            )
        if data.labelled:
            log.info(
                "data %s: labels are not used; an embedding model is scored by fidelity to itself", data.name
            )
        log.info(
            "embedding model: quality is fidelity to the model as given (mean cosine, neighbour agreement)"
        )
    elif not data.labelled:
        training = [spec.kind for spec, role in zip(recipe.stages, roles, strict=True) if role == "reference"]
        if training:
            raise DataError(
                f"data {data.name}: has no labels, so stage {training[0]!r} cannot train a model on it; "
                "give labels ('y') or start from a trained model"
            )
        log.info("data %s has no labels: quality is top-1 agreement with the model as given", data.name)
    elif width > data.num_classes:
        log.info(
            "model %s outputs %d classes; the data uses %d of them", recipe.model, width, data.num_classes
        )
    return data.targets_for(lambda x: predict(model, x, batch_size=64), task == "embedding", width)


WORK_KEY_FILE = ".key"


def _claim_work_dir(work_dir: Path, key: str) -> str:
    """Keep a stage's work folder (an interrupted training's state, generated pools) only if it was
    made from the very same inputs (``key``); otherwise empty it. Returns "continued" when files
    were kept, else "computed"."""
    key_file = work_dir / WORK_KEY_FILE
    # a stage's helpers may work beside it (ensemble members: NN-ensemble-member0, ...): one unit
    siblings = sorted(work_dir.parent.glob(f"{work_dir.name}-*")) if work_dir.parent.is_dir() else []
    if work_dir.is_dir() or siblings:
        kept = [p for p in work_dir.iterdir() if p.name != WORK_KEY_FILE] if work_dir.is_dir() else []
        kept += siblings
        if key_file.is_file() and key_file.read_text(encoding="utf-8").strip() == key:
            if kept:
                log.info("resume: %s continues from its work files in %s", work_dir.name, work_dir)
                return "continued"
        elif kept:
            log.warning(
                "resume: the work files in %s were made from another recipe, model or data; discarded, "
                "the stage starts afresh",
                work_dir,
            )
        for folder in (work_dir, *siblings):
            shutil.rmtree(folder, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(key_file, key)
    return "computed"


def _check_layer_names(recipe: Recipe, model: nn.Module) -> None:
    """Layer names in stage options (prune.ignore, quantize.skip, ...) must name layers of the model,
    checked before the first stage runs; a stage that replaces the model (a new student) ends the
    check, as later names refer to that model."""
    layers = [name for name, _ in model.named_modules() if name]
    known = set(layers)
    pipeline = recipe.parallel.pipeline
    if pipeline is not None and pipeline.split:
        try:
            pipelining.check_split(model, pipeline.split, pipeline.stages)
        except TorchshrinkError as exc:
            raise RecipeError(str(exc)) from None
    for i, spec in enumerate(recipe.stages):
        for option, names in layer_names(spec.config).items():
            unknown = [n for n in names if n not in known]
            if unknown:
                shown = ", ".join(layers[:20]) + (f", ... ({len(layers)} in all)" if len(layers) > 20 else "")
                raise RecipeError(
                    f"stages[{i}].{spec.kind}.{option}: no layer named {unknown[0]!r} in the model; its "
                    f"layers are: {shown}"
                )
        if replaces_model(spec.config):
            return


def _declared_files(recipe: Recipe) -> list[str]:
    """The files the recipe's stages will write into the output folder (their ``file`` options)."""
    return [
        str(spec.config.file) for spec in recipe.stages if isinstance(getattr(spec.config, "file", None), str)
    ]


def _runtimes(state: ModelState) -> dict[str, nn.Module]:
    """What a stage's result runs on: its torch model (a copy: later stages train in place) and the
    runtime of the file it ships, if any."""
    out: dict[str, nn.Module] = {"torch": copy.deepcopy(state.model)}
    if state.runtime is not None:
        out["onnx"] = state.runtime
    return out


def _time_rows(
    given: nn.Module,
    timed: dict[str, dict[str, nn.Module]],
    records: list[dict[str, Any]],
    baseline: dict[str, Any],
    recipe: Recipe,
    inputs: InputSpec,
    out_dir: Path,
    info: ddp.DistInfo,
) -> dict[str, Any]:
    """One interleaved timing pass of the model as given and every stage's result, on each runtime
    it runs on (PyTorch eager; ONNX Runtime: the file a stage ships, else the float model exported
    for timing when ``measure.onnx_fp32``); fills every record's latency (median and IQR of the
    runtime it ships on), its ONNX Runtime latency, and its speed-ups over the model as given
    (in PyTorch, and on ONNX Runtime against the given model's fp32 export)."""
    rows: dict[str, dict[str, nn.Module]] = {"(given)": {"torch": given}, **timed}
    ships_onnx = {name for name, row in timed.items() if "onnx" in row}  # a file the stage wrote
    for name, row in rows.items():
        wanted = recipe.measure.onnx_fp32 or (name == "(given)" and bool(ships_onnx))
        if wanted and "onnx" not in row and "torch" in row:
            onnx = _on_onnx_runtime(row["torch"], name, inputs, out_dir, info)
            if onnx is not None:
                row["onnx"] = onnx
    sizes = tuple(recipe.measure.batch_sizes)
    result = timing_pass(
        rows, inputs, sizes, rounds=recipe.measure.latency_repeats, threads=recipe.measure.threads
    )
    if result.busy:
        log.warning(
            "the machine was busy while timing (other processes used %.2f of %d cores): latencies are "
            "paired within this report's timing pass; do not compare them with other runs",
            result.other_load,
            result.cores,
        )
    base = result.rows["(given)"]
    metrics_of = {r["name"]: r["metrics"] for r in records}
    targets = [(name, metrics_of[name]) for name in timed]
    if not any(m is baseline for _, m in targets):
        targets.append(("(given)", baseline))
    for name, metrics in targets:
        row = result.rows[name]
        shipped = "onnx" if name in ships_onnx else "torch"
        for b in sizes:
            metrics[f"latency_ms_b{b}"] = row[shipped][b].paired
            metrics[f"latency_iqr_ms_b{b}"] = row[shipped][b].iqr
            if "onnx" in row:
                metrics[f"onnx_latency_ms_b{b}"] = row["onnx"][b].paired
                metrics[f"onnx_latency_iqr_ms_b{b}"] = row["onnx"][b].iqr
            if name == "(given)":
                continue
            metrics[f"speedup_b{b}"] = base["torch"][b].paired / row[shipped][b].paired
            if shipped == "onnx" and "torch" in row:
                metrics[f"torch_latency_ms_b{b}"] = row["torch"][b].paired
            if "onnx" in row and "onnx" in base:
                metrics[f"speedup_onnx_fp32_b{b}"] = base["onnx"][b].paired / row["onnx"][b].paired
    # a stage that only looked at the model has the latency of the model it looked at: the last timed
    # stage's, or the model as given when none came before (a recipe of evaluate alone)
    previous: dict[str, Any] = baseline
    for r in records:
        if r["name"] in timed:
            previous = r["metrics"] if not r.get("branch") else previous
        else:
            r["metrics"].update({k: v for k, v in previous.items() if "latency" in k or "speedup" in k})
    return result.to_dict()


def pipeline_settings(parallel: ParallelSettings, info: ddp.DistInfo) -> pipelining.PipelineSettings | None:
    """A recipe's (or an API call's) pipeline parallelism, checked against the processes torchrun started."""
    wanted = parallel.pipeline
    if wanted is None:
        return None
    if info.world_size != wanted.stages:
        raise RecipeError(
            f"parallel.pipeline.stages is {wanted.stages}, but {info.world_size} process(es) run this job: "
            f"start it with torchrun --nproc_per_node {wanted.stages} (one process per stage; pipeline x "
            "data parallelism is not supported)"
        )
    return pipelining.PipelineSettings(**{**wanted.model_dump(), "split": tuple(wanted.split)})


def _owner(recipe: Recipe) -> dict[str, Any]:
    """What makes an output folder one recipe's: its name and the model it compresses."""
    return {"recipe": recipe.name, "model": recipe.model.model_dump(mode="json", exclude_defaults=True)}


def run(
    recipe: Recipe | dict | str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
) -> Report:
    """Run ``recipe`` and write ``out_dir``/{model.safetensors, report.json, report.md, pareto.png}.

    With ``resume``, stages whose checkpoint was made from the same recipe, seed, model and data are
    loaded instead of re-run, and an interrupted training stage continues from its last training
    checkpoint. ``out_dir`` is locked while the run writes; one holding another recipe's outputs is
    refused unless ``force`` (which deletes them first).
    """
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    out_dir = Path(out_dir)
    info = ddp.init_from_env()
    split = pipeline_settings(recipe.parallel, info)
    folder = claim(out_dir, _owner(recipe), force=force) if info.is_main else None
    try:
        with pipelining.pipelined(split):
            report = _run_in(recipe, out_dir, resume, info, folder)
        if folder is not None:
            folder.finish([*report.artefacts.values(), *REPORT_FILES.values()])
    finally:
        if folder is not None:
            folder.release()
    ddp.barrier()
    return report


def _run_in(
    recipe: Recipe, out_dir: Path, resume: bool, info: ddp.DistInfo, folder: OutputFolder | None
) -> Report:
    """The run itself, in a folder already claimed (``folder``: on the main process). Data, model and
    recipe are checked before anything in the folder changes."""
    started = time.perf_counter()
    seed_everything(recipe.seed)
    data = load_data(recipe.data, cache_dir=out_dir / CACHE_DIR)
    loaded = open_model(recipe.model)
    _check_layer_names(recipe, loaded.module)
    width = check_model_fits(
        loaded.module,
        data.inputs,
        data.num_classes,
        source=f"model {recipe.model.model_dump(exclude_defaults=True)} on data {data.name}",
    )
    entries = [get_stage(spec.kind) for spec in recipe.stages]
    data_digest = data.digest()  # the data as given: targets made from it follow from the model digest
    data = _fit_labels(data, loaded.module, width, recipe, entries, loaded.task)
    state = ModelState(model=loaded.module.eval(), architecture=loaded.architecture)
    if folder is not None:  # every input checked: from here on the run writes into its folder
        folder.begin([MODEL_FILE, *REPORT_FILES.values(), *_declared_files(recipe)])
        if not resume:
            for stale in (CHECKPOINT_DIR, WORK_DIR):
                shutil.rmtree(out_dir / stale, ignore_errors=True)
    ddp.barrier()
    # Every checkpoint is keyed by the recipe up to its stage and the content of the model and data.
    origin = combine(model_digest(state.model, state.architecture), data_digest)
    keys = [combine(recipe.fingerprint(i), origin) for i in range(len(recipe.stages))]

    # Latency is not timed stage by stage (each at another moment of the machine): every stage's
    # model is kept, and one interleaved pass at the end times them all (see _time_rows).
    as_given = copy.deepcopy(state.model)
    timed: dict[str, dict[str, nn.Module]] = {}

    def measure_state(s: ModelState) -> dict[str, float | int]:
        """Everything but latency: that comes from the final timing pass."""
        return measure(
            s.model, data.test, runtime=s.runtime, artefact=s.artefact, batch_sizes=(), inputs=data.inputs
        )

    # The baseline model is what later stages may distil back from (ctx.baseline).
    baseline: dict[str, float | int] | None = None
    baseline_model: nn.Module | None = None
    if entries[0].role != "reference":
        baseline = measure_state(state)
        baseline_model = copy.deepcopy(state.model)
    baseline_open = True
    artefacts: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    skip = _resumable_prefix(recipe, out_dir, keys) if resume else 0
    if skip:
        last = recipe.stages[skip - 1]
        state, _ = _load_stage(_checkpoint_path(out_dir, skip - 1, last.name), state)
        log.info("resuming: %d finished stage(s) loaded from %s", skip, out_dir / CHECKPOINT_DIR)

    for i, (spec, entry) in enumerate(zip(recipe.stages, entries, strict=True)):
        path = _checkpoint_path(out_dir, i, spec.name)
        sets_baseline = entry.role == "reference" and baseline_open
        if i < skip:
            record, runtimes = _reused(path, spec, entry, state, out_dir)
            artefacts.update(record.get("artefacts", {}))
            if runtimes:
                timed[spec.name] = runtimes
        else:
            ctx = RunContext(
                data=data,
                out_dir=out_dir,
                seed=recipe.seed + i + 1,
                stage_index=i,
                stage_name=spec.name,
                fingerprint=keys[i],
                dist=info,
                baseline=None if sets_baseline else baseline_model,
            )
            result, record = _computed(spec, entry, state, ctx, len(recipe.stages), started, measure_state)
            if entry.role != "observe" or result.runtime is not None:
                timed[spec.name] = _runtimes(result)
            # A branch's result is reported and its files kept; the model goes on unchanged.
            if not spec.branch:
                state = result
            artefacts.update(ctx.artefacts)
            if info.is_main:
                _save_stage(path, state, record, keys[i])
        records.append(record)
        if sets_baseline:
            baseline = record["metrics"]
            baseline_model = copy.deepcopy(state.model if i >= skip else _load_stage(path, state)[0].model)
        elif entry.role == "transform" and not spec.branch:
            baseline_open = False

    if resume:
        _log_resume(records)
    assert baseline is not None
    timing = _time_rows(as_given, timed, records, baseline, recipe, data.inputs, out_dir, info)
    if info.is_main:
        save_model(out_dir / MODEL_FILE, state.model, state.architecture, data.inputs)
    report = _report(recipe, data, baseline, records, {"model": MODEL_FILE, **artefacts}, timing, started)
    if info.is_main:
        write_report(report, out_dir)
    return report


def _reused(
    path: Path, spec: StageSpec, entry: StageEntry, state: ModelState, out_dir: Path
) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """A finished stage's record from its checkpoint, and what its result runs on for the timing
    pass (a branch's model is not kept, the ONNX file it shipped is)."""
    record = json.loads(read_safetensors_metadata(path)["record"])
    record["resumed"] = True
    record["resume"] = "reused"
    if entry.role != "observe" and not spec.branch:
        return record, _runtimes(_load_stage(path, state)[0])
    if spec.branch:
        shipped = [f for f in record.get("artefacts", {}).values() if str(f).endswith(".onnx")]
        if shipped and (out_dir / shipped[0]).is_file():
            return record, {"onnx": OnnxRuntimeModel(out_dir / shipped[0])}
    return record, {}


def _computed(
    spec: StageSpec,
    entry: StageEntry,
    state: ModelState,
    ctx: RunContext,
    stages: int,
    started: float,
    measure_state: Callable[[ModelState], dict[str, float | int]],
) -> tuple[ModelState, dict[str, Any]]:
    """Run one stage (on a copy when it is a branch) in its claimed work folder; its result and record."""
    log.info("stage %d/%d: %s%s", ctx.stage_index + 1, stages, spec.name, " (branch)" if spec.branch else "")
    seed_everything(ctx.seed)
    t0 = time.perf_counter()
    given = state.replace(model=copy.deepcopy(state.model)) if spec.branch else state
    how = "computed"
    if ctx.dist.is_main:
        how = _claim_work_dir(
            ctx.work_dir, combine(ctx.fingerprint, model_digest(given.model, given.architecture))
        )
    ddp.barrier()
    result = entry.handler(given, spec.config, ctx)
    seconds = time.perf_counter() - t0
    log.info(
        "stage %d/%d: %s done in %.1f s (%.1f s since the run started)",
        ctx.stage_index + 1,
        stages,
        spec.name,
        seconds,
        time.perf_counter() - started,
    )
    record = {
        "name": spec.name,
        "kind": spec.kind,
        "branch": spec.branch,
        "seconds": round(seconds, 3),
        "metrics": measure_state(result),
        "details": ctx.details,
        "artefacts": ctx.artefacts,
        "resume": how,
    }
    return result, record


def _log_resume(records: list[dict[str, Any]]) -> None:
    by_kind = {
        k: [r["name"] for r in records if r.get("resume", "computed") == k]
        for k in ("reused", "continued", "computed")
    }
    log.info(
        "resume: reused %s; continued from work files %s; computed %s",
        *(", ".join(names) or "none" for names in by_kind.values()),
    )


def _report(
    recipe: Recipe,
    data: DatasetBundle,
    baseline: dict[str, Any],
    records: list[dict[str, Any]],
    artefacts: dict[str, str],
    timing: dict[str, Any],
    started: float,
) -> Report:
    """The run's report: baseline, one entry per stage, the final (last non-branch) stage's metrics."""
    final = next((r["metrics"] for r in reversed(records) if not r.get("branch")), baseline)
    return Report(
        torchshrink_version=__version__,
        recipe=recipe.to_dict(),
        seed=recipe.seed,
        baseline=baseline,
        stages=[
            {k: r[k] for k in ("name", "kind", "seconds", "metrics", "details")}
            | {
                "resumed": r.get("resumed", False),
                "resume": r.get("resume", "computed"),
                "branch": r.get("branch", False),
            }
            for r in records
        ],
        final=final,
        artefacts=artefacts,
        seconds=round(time.perf_counter() - started, 3),
        quality="cosine" if data.embedding else "accuracy" if data.labelled else "agreement",
        timing=timing,
    )
