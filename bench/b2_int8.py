"""B2: real int8 speed on ONNX Runtime, torchshrink vs ONNX Runtime's own quantizers, plus bits vs accuracy.

Same trained models (LeNet-5 and the ResNet, MNIST-5k, 8 epochs), same 16 calibration batches of
32 training images for every static quantizer. torchshrink runs its recipe stage (defaults:
per-channel MSE weight ranges, min-max activation ranges, 7-bit weights on CPUs without VNNI). Peers:
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, u8 activations / s8 weights, after
``quant_pre_process``) and ``quantize_dynamic`` with default settings. Latency: batch 1 and 32,
2 threads, all rows of one model timed interleaved in the same run.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import machine_line, trained, write_section
from torchshrink import load_model, run
from torchshrink.data import DatasetBundle, load_data
from torchshrink.measure import accuracy, interleaved_medians
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.quantization.onnx_int8 import needs_reduced_range

MODELS = ("lenet5", "resnet")
TRAIN_EPOCHS = 8
CALIBRATION = (16, 32)  # batches, batch size
BITS = (8, 6, 4, 3, 2)
QAT_EPOCHS = 3


def _calibration(data: DatasetBundle, seed: int) -> np.ndarray:
    n = CALIBRATION[0] * CALIBRATION[1]
    return data.subset("train", n, seed=seed).tensors[0].numpy().astype(np.float32)


def ort_calibration_reader(images: np.ndarray, batch: int):  # noqa: ANN201 - onnxruntime's reader type
    """ONNX Runtime's calibration reader over ``images`` in batches of ``batch`` (input name "input")."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i : i + batch] for i in range(0, len(images), batch))

        def get_next(self) -> dict | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {"input": chunk}

    return Reader()


def ort_prepared(fp32: Path, tmp: Path) -> Path:
    """``quant_pre_process`` of the fp32 graph, as ONNX Runtime recommends before its quantizers."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, tmp = tmp.resolve() / "prepared.onnx", tmp.resolve()
    cwd = os.getcwd()
    os.chdir(tmp)  # quant_pre_process may leave temporary files in the working directory
    try:
        quant_pre_process(str(fp32.resolve()), str(prepared), skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    return prepared


def ort_peers(fp32: Path, data: DatasetBundle, seed: int, tmp: Path) -> dict[str, Path]:
    """ONNX Runtime's own static (QDQ, per-channel) and dynamic quantization of the same fp32 graph."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    prepared = ort_prepared(fp32, tmp)
    static, dynamic = tmp.resolve() / "ort_static.onnx", tmp.resolve() / "ort_dynamic.onnx"
    quantize_static(
        str(prepared),
        str(static),
        ort_calibration_reader(_calibration(data, seed), CALIBRATION[1]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    quantize_dynamic(str(prepared), str(dynamic))
    return {"ORT quantize_static": static, "ORT quantize_dynamic": dynamic}


def _ours(base_file: Path, stage: dict, seed: int, out: Path) -> tuple[Path, nn.Module, dict]:
    report = run(
        {
            "name": "b2",
            "seed": seed,
            "model": {"path": str(base_file)},
            "data": {"name": "mnist5k"},
            "measure": {"latency_repeats": 3},
            "stages": [
                {"quantize": {"calibration_batches": CALIBRATION[0], "batch_size": CALIBRATION[1], **stage}}
            ],
        },
        out,
    )
    return out / "model.int8.onnx", load_model(out / "model.safetensors"), report.stages[-1]["details"]


def speed_case(name: str, seed: int) -> dict:
    data = load_data("mnist5k")
    base, base_file = trained(name, data, TRAIN_EPOCHS, seed)
    base.eval()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        fp32 = tmp / "fp32.onnx"
        export_onnx(base, fp32, data.input_shape)
        files = {"ORT fp32": fp32}
        files["torchshrink static int8"], _, details = _ours(
            base_file, {"mode": "static"}, seed, tmp / "static"
        )
        files["torchshrink dynamic int8"], _, _ = _ours(base_file, {"mode": "dynamic"}, seed, tmp / "dynamic")
        files.update(ort_peers(fp32, data, seed, tmp))
        runners: dict[str, nn.Module] = {"torch fp32": base}
        runners.update({k: OnnxRuntimeModel(p) for k, p in files.items()})
        rows: dict[str, dict] = {}
        for key, runner in runners.items():
            rows[key] = {
                "accuracy": accuracy(runner, data.test),
                "bytes": files[key].stat().st_size if key in files else None,
            }
        for batch in (1, 32):
            x = data.test.tensors[0][:batch]
            with torch.inference_mode():
                times = interleaved_medians(
                    {k: functools.partial(r, x) for k, r in runners.items()}, repeats=40, warmup=5
                )
            for key in runners:
                rows[key][f"ms_b{batch}"] = times[key]
                rows[key][f"vs_torch_b{batch}"] = times["torch fp32"] / times[key]
                rows[key][f"vs_ort_b{batch}"] = times["ORT fp32"] / times[key]
        rows["torchshrink static int8"]["int8_kernels"] = details["int8_kernels"]
    return rows


def bits_case(seed: int) -> dict:
    """LeNet-5 accuracy at 8..2 bits: PTQ, QAT and mixed precision, from the same trained model."""
    data = load_data("mnist5k")
    base, base_file = trained("lenet5", data, TRAIN_EPOCHS, seed)
    out: dict = {"float": accuracy(base.eval(), data.test)}
    settings = {
        "PTQ W{b}A8": lambda b: {"mode": "static", "bits": b},
        "PTQ W{b}A{b}": lambda b: {"mode": "static", "bits": b, "activation_bits": b},
        "QAT W{b}A{b}": lambda b: {"mode": "qat", "bits": b, "activation_bits": b, "epochs": QAT_EPOCHS},
        "mixed avg_bits={b} A8": lambda b: {"mode": "static", "mixed": {"avg_bits": b, "split": "train"}},
    }
    for label, make in settings.items():
        for b in BITS:
            with tempfile.TemporaryDirectory() as tmp:
                _, model, details = _ours(base_file, make(b), seed, Path(tmp))
                out[f"{label}|{b}"] = {
                    "accuracy": accuracy(model.eval(), data.test),
                    "avg_bits": details["average_weight_bits"],
                }
    with tempfile.TemporaryDirectory() as tmp:
        _, model, details = _ours(base_file, {"mode": "static", "mixed": {"max_drop": 0.5}}, seed, Path(tmp))
        out["mixed max_drop=0.5"] = {
            "accuracy": accuracy(model.eval(), data.test),
            "avg_bits": details["average_weight_bits"],
            "plan": details["plan"],
        }
    return out


def _acc(values: list[float]) -> str:
    v = [x * 100 for x in values]
    return f"{statistics.median(v):.1f}% [{min(v):.1f}, {max(v):.1f}]"


def run_all(seeds: tuple[int, ...] = (0, 1, 2), command: str = "make bench") -> dict:
    torch.set_num_threads(2)
    speed = {name: [speed_case(name, s) for s in seeds] for name in MODELS}
    bits = [bits_case(s) for s in seeds]
    med = statistics.median
    lines = [
        "## B2  Real int8 speed on ONNX Runtime",
        "",
        f"Command: `{command}`. Machine: {machine_line()}. int8 kernels saturate here without VNNI: "
        f"{'yes, torchshrink used 7-bit weights' if needs_reduced_range() else 'no (VNNI present)'}.",
        f"Models trained {TRAIN_EPOCHS} epochs on MNIST-5k (seeds {list(seeds)}); every static quantizer calibrated on the same "
        f"{CALIBRATION[0]} batches of {CALIBRATION[1]} training images. Accuracy: median [min, max] over seeds. Latency: "
        "2 threads, median of 40 interleaved rounds of all rows; speed-ups are medians over seeds of same-run ratios.",
        "",
        "| model | runtime | accuracy | ms b1 | ms b32 | vs torch b32 | vs ORT fp32 b32 | vs ORT fp32 b1 | file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_seed in speed.items():
        for key in per_seed[0]:
            rows = [r[key] for r in per_seed]
            size = f"{rows[0]['bytes'] / 1024:,.0f} kB" if rows[0]["bytes"] else "-"
            lines.append(
                f"| {name} | {key} | {_acc([r['accuracy'] for r in rows])} | {med(r['ms_b1'] for r in rows):.3f} "
                f"| {med(r['ms_b32'] for r in rows):.2f} | {med(r['vs_torch_b32'] for r in rows):.2f}x "
                f"| {med(r['vs_ort_b32'] for r in rows):.2f}x | {med(r['vs_ort_b1'] for r in rows):.2f}x | {size} |"
            )
    lines += [
        "",
        f"### Bits vs accuracy (LeNet-5, float {_acc([b['float'] for b in bits])})",
        "",
        f"W = weight bits, A = activation bits. PTQ: static, calibrated; QAT: {QAT_EPOCHS} epochs from the PTQ start, "
        "learned scales (LSQ); mixed: per-layer weight bits chosen by measured sensitivity to meet the average "
        "(parameter-weighted) bit budget, activations 8-bit.",
        "",
        "| bits | "
        + " | ".join(
            label.replace("{b}", "b")
            for label in ("PTQ W{b}A8", "PTQ W{b}A{b}", "QAT W{b}A{b}", "mixed avg_bits={b} A8")
        )
        + " |",
        "|---|---|---|---|---|",
    ]
    for b in BITS:
        cells = []
        for label in ("PTQ W{b}A8", "PTQ W{b}A{b}", "QAT W{b}A{b}", "mixed avg_bits={b} A8"):
            cells.append(_acc([s[f"{label}|{b}"]["accuracy"] for s in bits]))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    mixed = [s["mixed max_drop=0.5"] for s in bits]
    lines += [
        "",
        f"Mixed precision with `max_drop: 0.5` (measured on the test split): accuracy {_acc([m['accuracy'] for m in mixed])}, "
        f"average weight bits {med(m['avg_bits'] for m in mixed):.2f} (seed plans: "
        + "; ".join(str(m["plan"]) for m in mixed)
        + ").",
    ]
    write_section("b2_int8", "\n".join(lines), {"machine": machine_line(), "speed": speed, "bits": bits})
    return {"speed": speed, "bits": bits}
