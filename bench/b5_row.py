"""One B5 row for one seed with any ``datafree`` options: the runs behind docs/distillation.md's
"what was tried" notes.

``python -m bench.b5_row EPOCHS SEED NAME '{"generator": "conditional", ...}' [STAGE_SEED]``: B5's
teacher for the seed, B5's budget with EPOCHS epochs, the training inputs NaN (but for ``inputs``
chosen ones); prints one JSON line with the test accuracy, the teacher's, seconds and the stage's
class and restart details. ``STAGE_SEED`` (default SEED) seeds the stage alone: SEED + 1000 k trains
restart k of a ``restarts`` run by itself, to see what the pick chose between.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bench.b5_datafree import BUDGET, SHIFT, STUDENT, TEACHER_EPOCHS, TEACHER_LR, _no_training_inputs
from bench.common import trained
from torchshrink.api import apply_stage
from torchshrink.data import load_data
from torchshrink.measure import accuracy


def main() -> None:
    epochs, seed, name, options = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    stage_seed = int(sys.argv[5]) if len(sys.argv) > 5 else seed
    torch.set_num_threads(1)
    data = load_data("mnist5k")
    teacher, _ = trained("lenet5", data, TEACHER_EPOCHS, 100 * seed, lr=TEACHER_LR, shift=SHIFT)
    teacher.eval()
    started = time.time()
    result = apply_stage(
        "datafree",
        teacher,
        _no_training_inputs(data, options.get("inputs", 0), seed),
        student=STUDENT,
        **(BUDGET | {"epochs": epochs}),
        **options,
        seed=stage_seed,
        out_dir=f"out/b5-row/{name}-s{seed}-{stage_seed}",
        latency_repeats=1,
    )
    details = {
        k: result.details.get(k) for k in ("class_agreement", "class_weights", "training_inputs", "restarts")
    }
    print(json.dumps({
        "name": name, "seed": seed, "stage_seed": stage_seed, "epochs": epochs, "accuracy": accuracy(result.model, data.test),
        "teacher": accuracy(teacher, data.test), "seconds": round(time.time() - started), "details": details,
        "options": options,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
