"""The ``torchshrink`` command: demo, run, sweep, eval, inspect, export."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from torch import nn

from torchshrink.errors import DataError, TorchshrinkError

log = logging.getLogger("torchshrink")


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _open_for_cli(model: str, factory: str | None, trust_pickle: bool) -> tuple[nn.Module, Path | None, Any]:
    """(module, file to count as the artefact, input description known from the file or None)."""
    from torchshrink.models import ModelSpec, open_model
    from torchshrink.onnx_export import OnnxRuntimeModel

    path = Path(model)
    if path.suffix == ".onnx":
        runner = OnnxRuntimeModel(path)
        return runner, path, None
    if factory:
        loaded = open_model(ModelSpec(factory=factory, weights=path))
        return loaded.module, path, None
    loaded = open_model(
        ModelSpec(path=path, trust_pickle=trust_pickle) if path.exists() or "/" in model else model
    )
    return loaded.module, (path if path.exists() else None), loaded.inputs


def cmd_demo(args: argparse.Namespace) -> int:
    from torchshrink.demo import demo_recipe
    from torchshrink.pipeline import run

    report = run(demo_recipe(quick=args.quick), args.out, resume=args.resume, force=args.force)
    _print_report(report, args.out)
    return 0


def _print_report(report: Any, out_dir: str | Path) -> None:
    from torchshrink.parallel import ddp
    from torchshrink.report import REPORT_FILES, format_table

    if not ddp.current().is_main:
        return
    _out(format_table(report))
    _out()
    for stage in report.stages:  # a stage's one-line result, when it has one worth printing
        if (stage.get("details") or {}).get("summary"):
            _out(f"{stage['name']}: {stage['details']['summary']}")
    _out(
        f"report: {Path(out_dir) / 'report.md'}  ·  json: {Path(out_dir) / 'report.json'}  ·  plot: {Path(out_dir) / 'pareto.png'}"
    )
    _out(f"model:  {Path(out_dir) / report.artefacts['model']}")
    shipped = [f for k, f in report.artefacts.items() if k != "model" and k not in REPORT_FILES]
    if shipped:
        _out("files:  " + "  ·  ".join(str(Path(out_dir) / f) for f in shipped))


def cmd_run(args: argparse.Namespace) -> int:
    from torchshrink.pipeline import run

    report = run(args.recipe, args.out, resume=args.resume, force=args.force)
    _print_report(report, args.out)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from torchshrink.sweep import sweep

    done = sweep(
        args.recipes,
        args.out,
        jobs=args.jobs,
        threads=args.threads,
        backend=args.backend,
        ray_address=args.ray_address,
        resume=args.resume,
        force=args.force,
    )
    _out(done.table)
    _out(
        f"{sum(r.ok for r in done.results)} of {len(done.results)} recipes done in {done.seconds:.0f} s; "
        f"summary: {done.out_dir / 'sweep.md'}"
    )
    return 0 if done.ok else 1


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from torchshrink.data import load_data
    from torchshrink.measure import check_model_fits, measure, predict
    from torchshrink.models import open_model, task_of
    from torchshrink.onnx_export import OnnxRuntimeModel

    model, artefact, _ = _open_for_cli(args.model, args.factory, args.trust_pickle)
    spec: Any = args.data
    if args.tokenizer:
        spec = {"text": args.data, "tokenizer": args.tokenizer}
        if args.max_length is not None:
            spec["max_length"] = args.max_length
    data = load_data(spec)
    if args.reference:  # quality against the original model: fidelity (embeddings) or agreement
        where = Path(args.reference)
        reference = open_model({"hf": where, "task": args.task} if where.is_dir() else args.reference)
        source = f"reference {args.reference} on {data.name}"
        width = check_model_fits(reference.module, data.inputs, data.num_classes, source=source)
        data = dataclasses.replace(data, train=data.test)  # only the test split is measured
        data = data.judged_by(
            lambda x: predict(reference.module, x, batch_size=64),
            embedding=task_of(reference.architecture) == "embedding",
            num_classes=max(width, data.num_classes),
        )
    elif not data.labelled:
        raise DataError(
            f"{args.data}: has no labels; give --reference ORIGINAL_MODEL to score fidelity (embeddings) "
            "or agreement with it"
        )
    if isinstance(model, OnnxRuntimeModel):  # an ONNX graph: its declared inputs against the data's
        model.check_inputs(data.inputs, source=f"{args.model} on {data.name}")
    else:
        check_model_fits(model, data.inputs, data.num_classes, source=f"{args.model} on {data.name}")
    metrics = measure(model, data.test, artefact=artefact, latency_repeats=args.repeats, inputs=data.inputs)
    if args.json:
        _out(json.dumps(metrics, indent=2))
    else:
        for key, value in metrics.items():
            _out(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value:,}")
    return 0


def _inspect_safetensors(path: Path) -> None:
    import torch

    from torchshrink.io import load_tensors, read_safetensors_metadata

    meta = read_safetensors_metadata(path)
    for key, value in meta.items():
        if key not in ("record", "state"):
            _out(f"{key}: {value}")
    total = nonzero = 0
    _out(f"{'tensor':<40} {'shape':<20} {'dtype':<10} {'non-zero':>9}")
    for name, tensor in load_tensors(path).items():
        nz = int(torch.count_nonzero(tensor))
        total += tensor.numel()
        nonzero += nz
        _out(
            f"{name:<40} {str(tuple(tensor.shape)):<20} {str(tensor.dtype).replace('torch.', ''):<10} "
            f"{nz / max(tensor.numel(), 1):>8.1%}"
        )
    _out(f"{total:,} values, {nonzero:,} non-zero, {path.stat().st_size:,} bytes on disk")


def _inspect_onnx(path: Path) -> None:
    from collections import Counter

    import onnx

    from torchshrink.errors import CorruptFileError

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError and others on bad files
        raise CorruptFileError(
            path, f"not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not model.graph.node:
        raise CorruptFileError(path, "an ONNX file with an empty graph (no operators)")
    _out(f"opset: {[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}")
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            _out(f"{kind}: {v.name} {dims}")
    params = sum(math.prod(t.dims) for t in model.graph.initializer)
    _out(f"initializers: {len(model.graph.initializer)} tensors, {params:,} values")
    _out(
        "operators: "
        + ", ".join(f"{op} x{n}" for op, n in Counter(n.op_type for n in model.graph.node).most_common())
    )
    _out(f"{path.stat().st_size:,} bytes on disk")


def _inspect_packed(path: Path) -> None:
    from torchshrink.encoding.packfile import format_layer_table, read_packed

    packed = read_packed(path)
    _out(f"architecture: {json.dumps(packed.architecture, sort_keys=True)}")
    _out(f"inputs: {packed.inputs.describe() if packed.inputs else 'unknown'}")
    _out(format_layer_table(packed))


def cmd_inspect(args: argparse.Namespace) -> int:
    from torchshrink.io import file_kind
    from torchshrink.report import format_table, read_report

    path = Path(args.file)
    if path.suffix == ".json":
        _out(format_table(read_report(path)))
        return 0
    kind = file_kind(path)
    _out(f"{path}: {kind}")
    if kind == "packed":
        _inspect_packed(path)
    elif kind == "safetensors":
        _inspect_safetensors(path)
    elif kind == "onnx":
        _inspect_onnx(path)
    else:
        from torchshrink.models import load_weights_file

        for name, tensor in load_weights_file(path).items():
            _out(f"{name:<40} {tuple(tensor.shape)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from torchshrink.data import load_data
    from torchshrink.errors import ShapeMismatchError
    from torchshrink.inputs import take
    from torchshrink.io import prepare_output_file
    from torchshrink.onnx_export import export_onnx

    prepare_output_file(args.out)
    model, _, known = _open_for_cli(args.model, args.factory, args.trust_pickle)
    check = None
    if args.input_shape:
        shape: Any = tuple(int(v) for v in args.input_shape.split(","))
    elif args.data:
        data = load_data(args.data)
        shape, check = data.inputs, take(data.test.tensors[0], slice(0, 32))
    elif known:
        shape = known
    else:
        raise ShapeMismatchError(
            f"{args.model}: input shape unknown; pass --input-shape C,H,W or --data NAME"
        )
    diff = export_onnx(model, args.out, shape, opset=args.opset, check_inputs=check)
    _out(f"wrote {args.out}" + (f" (max abs diff vs PyTorch {diff:.2e})" if diff is not None else ""))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from torchshrink._version import __version__
    from torchshrink.hf import TASKS

    parser = argparse.ArgumentParser(
        prog="torchshrink", description="Make trained PyTorch models smaller and faster."
    )
    parser.add_argument("--version", action="version", version=f"torchshrink {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the built-in recipe on MNIST-5k and print the report")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke-test version")
    p.add_argument("--resume", action="store_true", help="skip stages finished by an earlier run")
    p.add_argument(
        "--force", action="store_true", help="delete another recipe's outputs in --out and write there"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a YAML recipe")
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="skip stages finished by an earlier run")
    p.add_argument(
        "--force", action="store_true", help="delete another recipe's outputs in --out and write there"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run several recipes side by side in worker processes")
    p.add_argument("recipes", nargs="+", help="recipe YAML files")
    p.add_argument(
        "--out", required=True, help="output folder: one sub-folder per recipe, plus sweep.md/.json"
    )
    p.add_argument("--jobs", type=_positive_int, default=2, help="worker processes (default: 2)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads per recipe (default: the cores shared out among the jobs)",
    )
    p.add_argument(
        "--backend",
        choices=("processes", "ray"),
        default="processes",
        help="processes: a local process pool (default); ray: Ray tasks (extra [ray]), local or a cluster",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="with --backend ray: a cluster to join (default: start a local one)",
    )
    p.add_argument("--resume", action="store_true", help="skip stages finished by an earlier run")
    p.add_argument(
        "--force", action="store_true", help="delete another recipe's outputs in --out and write there"
    )
    p.set_defaults(func=cmd_sweep)

    for name, helptext in (("eval", "measure a model on a dataset"), ("export", "export a model to ONNX")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "model", help="model file (.safetensors, .tshrink, .onnx, TorchScript, .pt) or a zoo name"
        )
        p.add_argument(
            "--factory", help="'pkg.module:function' that builds the model; MODEL is then its weights"
        )
        p.add_argument(
            "--trust-pickle", action="store_true", help="allow loading a whole pickled module (runs code)"
        )
        if name == "eval":
            p.add_argument(
                "--data", required=True, help="mnist5k | digits | mnist1d | path to .npz or image folder"
            )
            p.add_argument("--tokenizer", help="tokenizer directory: --data is then a .txt / .jsonl corpus")
            p.add_argument("--max-length", type=int, help="tokens per text (with --tokenizer; default 128)")
            p.add_argument(
                "--reference",
                help="the original model (a model file, or a transformers model directory): quality becomes "
                "fidelity (embeddings) or top-1 agreement with it",
            )
            p.add_argument(
                "--task",
                default="embedding",
                choices=TASKS,
                help="what a --reference directory's transformers model is for (default: embedding)",
            )
            p.add_argument("--json", action="store_true", help="print the metrics as JSON")
            p.add_argument("--repeats", type=int, default=30, help="latency repeats (median)")
            p.set_defaults(func=cmd_eval)
        else:
            p.add_argument("--out", required=True, help="ONNX file to write")
            p.add_argument("--data", help="dataset whose inputs set the shape and check the export")
            p.add_argument("--input-shape", help="per-sample input shape, e.g. 1,28,28")
            p.add_argument("--opset", type=int, default=17)
            p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="describe a model file (.safetensors, .tshrink, .onnx) or report.json")
    p.add_argument("file")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torchshrink`` console script; bad input exits 2 with a one-line reason."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="torchshrink: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except TorchshrinkError as exc:
        sys.stderr.write(f"torchshrink: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
