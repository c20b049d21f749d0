"""Which distill settings pay off at short schedules? The runs behind the choice of the distill
stage's defaults (docs/distillation.md, "The defaults, as a new user runs them").

``python -m bench.b4d_choices EPOCHS [DATA [CONFIG,CONFIG,... [SEED]]]``: a 3-member ensemble of the
teacher architecture trained EPOCHS epochs once (seed 0's teacher for every seed), then each named
configuration (CONFIGS below) as a student run of EPOCHS epochs with that seed; prints each test
accuracy and a RESULT line. MNIST-5k: LeNet-5 -> LeNet-5-half; mnist1d: 1-D CNN 25 -> 12 channels.
"""

import json
import sys
import time
from pathlib import Path

import torchshrink as ts


def main() -> None:
    EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    DATA = sys.argv[2] if len(sys.argv) > 2 else "mnist5k"
    ONLY = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    STUDENT = {"zoo": "lenet5_half"} if DATA == "mnist5k" else {"zoo": "cnn1d", "kwargs": {"channels": 12}}
    TEACH = {"zoo": "lenet5"} if DATA == "mnist5k" else {"zoo": "cnn1d"}
    root = Path("out") / "b4d-choices" / f"{DATA}-{EPOCHS}"
    root.mkdir(parents=True, exist_ok=True)
    teacher = root / "teacher" / "model.safetensors"
    if not teacher.exists():
        ts.run(
            {
                "name": "t",
                "model": TEACH,
                "data": {"name": DATA},
                "measure": {"latency_repeats": 3, "onnx_fp32": False},
                "stages": [{"ensemble": {"members": 3, "epochs": EPOCHS}}],
            },
            root / "teacher",
        )
    CONFIGS = {
        "alone": {"train": {"epochs": EPOCHS}},
        "issue": {"distill": {"temperature": 4, "alpha": 0.7}},
        "defaults": {"distill": {}},
        "shift": {"distill": {"augment": {"shift": 2}}},
        "shift_a05": {"distill": {"augment": {"shift": 2}, "alpha": 0.5}},
        "fm": {"distill": {"augment": {"shift": 2, "mixup": 1.0}, "alpha": 1.0}},
        "fm_a05": {"distill": {"augment": {"shift": 2, "mixup": 1.0}, "alpha": 0.5}},
        "t1_a05": {"distill": {"temperature": 1, "alpha": 0.5}},
        "shift_a03": {"distill": {"augment": {"shift": 2}, "alpha": 0.3}},
        "shift_t2_a05": {"distill": {"augment": {"shift": 2}, "alpha": 0.5, "temperature": 2}},
        "shift1_a05": {"distill": {"augment": {"shift": 1}, "alpha": 0.5}},
        "fm_t1_a05": {"distill": {"augment": {"shift": 2, "mixup": 1.0}, "alpha": 0.5, "temperature": 1}},
        "alone_lr2": {"train": {"epochs": EPOCHS, "lr": 0.002}},
        "shift_a05_lr2": {"distill": {"augment": {"shift": 2}, "alpha": 0.5, "lr": 0.002}},
        "fm_a05_lr2": {"distill": {"augment": {"shift": 2, "mixup": 1.0}, "alpha": 0.5, "lr": 0.002}},
        "noaug_a05": {"distill": {"augment": {}}},
        "t2": {"distill": {"temperature": 2}},
        "t1": {"distill": {"temperature": 1}},
        "a08": {"distill": {"alpha": 0.8}},
        "alone_lr10": {"train": {"epochs": EPOCHS, "lr": 0.01}},
        "defaults_lr10": {"distill": {"lr": 0.01}},
        "t1_lr10": {"distill": {"lr": 0.01, "temperature": 1}},
    }
    SEED = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    results = {}
    for name, stage in CONFIGS.items():
        if ONLY and name not in ONLY:
            continue
        kind, opts = next(iter(stage.items()))
        if kind == "distill":
            opts = {"student": STUDENT, "teachers": [{"path": str(teacher)}], "epochs": EPOCHS, **opts}
        started = time.time()
        rep = ts.run(
            {
                "name": name,
                "seed": SEED,
                "model": STUDENT if kind == "train" else TEACH | {},
                "data": {"name": DATA},
                "measure": {"latency_repeats": 3, "onnx_fp32": False},
                "stages": [{kind: opts}],
            },
            root / f"{name}-s{SEED}",
        )
        results[name] = (round(rep.final["accuracy"] * 100, 2), round(time.time() - started))
        print(name, results[name], flush=True)
    print("RESULT", SEED, json.dumps(results))


if __name__ == "__main__":
    main()
