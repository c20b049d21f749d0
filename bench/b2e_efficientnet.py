"""B2e: a real pretrained CNN, EfficientNet-Lite0 (ImageNet weights), static int8 on ONNX Runtime.

The model comes through torchshrink's factory route exactly as a user's would
(``examples/efficientnet/factory.py``); the data are seeded random crops of the real photos that
scikit-image ships (``examples/efficientnet/make_photos.py``), unlabelled, so quality is top-1
agreement with the fp32 model (and the mean cosine of the logits). Every static quantizer gets the
same calibration crops. Rows: torch fp32 (eager), ONNX Runtime fp32 (the same exported graph),
torchshrink static int8 (its recipe stage with defaults), ONNX Runtime ``quantize_static`` (QDQ,
per-channel, u8/s8; default settings and with ``reduce_range``, the setting for CPUs without
VNNI), NNCF ``nncf.quantize`` on the ONNX graph (default preset). Latency: batch 1 and 8, 2 threads,
all rows timed interleaved in one run; speed-ups are ratios of those medians.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.b2_int8 import ort_calibration_reader, ort_prepared
from bench.common import ROOT, machine_line, time_rows, write_section
from torchshrink import run
from torchshrink.models import open_model
from torchshrink.onnx_export import OnnxRuntimeModel, export_onnx
from torchshrink.quantization.onnx_int8 import int8_kernel_counts
from torchshrink.report import markdown_table

EXAMPLE = ROOT / "examples" / "efficientnet"
CALIBRATION = 128  # crops, in batches of 32, for every static quantizer
TEST = 256
BATCHES = (1, 8)


def _photos(tmp: Path) -> Path:
    path = tmp / "photos.npz"
    subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "make_photos.py"),
            str(path),
            "--train",
            str(CALIBRATION),
            "--test",
            str(TEST),
        ],
        check=True,
    )
    return path


def _model() -> nn.Module:
    """The model through torchshrink's own factory route, as the recipe stage gets it."""
    return open_model({"factory": "factory:efficientnet_lite0", "import_path": str(EXAMPLE)}).module.eval()


def _peers(fp32: Path, calibration: np.ndarray, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    prepared = ort_prepared(fp32, tmp)
    out = {}
    for label, reduce_range in (("ORT quantize_static", False), ("ORT quantize_static reduce_range", True)):
        path = tmp / f"ort_{reduce_range}.onnx"
        quantize_static(
            str(prepared), str(path), ort_calibration_reader(calibration, 32), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
        )  # fmt: skip
        out[label] = path
    if importlib.util.find_spec("nncf") is not None:
        import nncf
        import onnx

        dataset = nncf.Dataset([{"input": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])
        quantized = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=len(calibration))
        out["NNCF quantize"] = tmp / "nncf.onnx"
        onnx.save(quantized, str(out["NNCF quantize"]))
    return out


def run_case() -> dict:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        photos = _photos(tmp)
        arrays = np.load(photos)
        calibration, test = arrays["x"], torch.from_numpy(arrays["x_test"])
        model = _model()
        fp32 = tmp / "fp32.onnx"
        export_onnx(model, fp32, tuple(test.shape[1:]))
        report = run(
            {
                "name": "b2e",
                "model": {"factory": "factory:efficientnet_lite0", "import_path": str(EXAMPLE)},
                "data": {"npz": str(photos)},
                "measure": {"latency_repeats": 3, "batch_sizes": [1, 2]},
                "stages": [
                    {
                        "quantize": {
                            "mode": "static",
                            "calibration_batches": CALIBRATION // 32,
                            "batch_size": 32,
                        }
                    }
                ],
            },
            tmp / "ours",
        )
        files = {"ORT fp32": fp32, "torchshrink static int8": tmp / "ours" / "model.int8.onnx"}
        files.update(_peers(fp32, calibration, tmp))
        runners: dict[str, nn.Module] = {"torch fp32": model.eval()}
        runners.update({k: OnnxRuntimeModel(p) for k, p in files.items()})
        with torch.inference_mode():
            reference = torch.cat([model(test[i : i + 32]) for i in range(0, len(test), 32)])
        rows: dict[str, dict] = {}
        for key, runner in runners.items():
            with torch.inference_mode():
                out = torch.cat([runner(test[i : i + 32]) for i in range(0, len(test), 32)])
            kernels = int8_kernel_counts(files[key]) if key in files else {}
            rows[key] = {
                "agreement": float((out.argmax(1) == reference.argmax(1)).float().mean()),
                "cosine": float(torch.nn.functional.cosine_similarity(out, reference).mean()),
                "bytes": files[key].stat().st_size if key in files else None,
                "float_convs": sum(kernels.get(op, 0) for op in ("Conv", "FusedConv"))
                if key in files
                else None,
                "int8_convs": kernels.get("QLinearConv", 0) if key in files else None,
                "transposes": kernels.get("Transpose", 0) if key in files else None,
            }
        for batch in BATCHES:
            time_rows(rows, runners, test[:batch], batch, 30 if batch == 1 else 15, 3)
        rows["torchshrink static int8"]["report_seconds"] = report.stages[-1]["seconds"]
    return rows


def _cell(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def run_all(command: str = "python -m bench b2e") -> dict:
    rows = run_case()
    header = [
        "EfficientNet-Lite0", "agreement", "cosine", "b1 ms", "b1 vs torch", "b1 vs ORT fp32", "b8 ms",
        "b8 vs torch", "b8 vs ORT fp32", "int8 / float convs", "transposes", "file",
    ]  # fmt: skip
    table = markdown_table(
        header,
        [
            [
                key,
                f"{r['agreement'] * 100:.1f}%",
                f"{r['cosine']:.4f}",
                f"{r['ms_b1']:.1f}",
                f"{r['vs_torch_b1']:.2f}x",
                f"{r['vs_ort_b1']:.2f}x",
                f"{r['ms_b8']:.1f}",
                f"{r['vs_torch_b8']:.2f}x",
                f"{r['vs_ort_b8']:.2f}x",
                "-" if r["int8_convs"] is None else f"{r['int8_convs']} / {r['float_convs']}",
                _cell(r["transposes"], "d"),
                "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.2f} MB",
            ]  # fmt: skip
            for key, r in rows.items()
        ],
    )
    markdown = "\n".join(
        [
            "## B2e: EfficientNet-Lite0 (real ImageNet weights), static int8 on ONNX Runtime",
            "",
            f"Command: `{command}`. Machine: {machine_line()}.",
            "",
            f"Data: {TEST} seeded random crops (224x224) of scikit-image's photos, unlabelled: agreement is top-1",
            f"agreement with torch fp32, cosine the mean cosine of the logits. Calibration: {CALIBRATION} other crops",
            "for every static quantizer. Latency: median of interleaved runs, 2 threads; ratios from the same run.",
            "",
            table,
        ]
    )
    write_section("b2e_efficientnet", markdown, {"rows": rows, "machine": machine_line(), "command": command})
    return rows
