"""The distill stage's defaults: shifted views on image and signal inputs, nothing on other inputs, and a warning in the log and the report when a recipe distils the teacher's
outputs on its own training images without augmentation (B4's defaults rows measured that setting
below the student trained alone)."""

from __future__ import annotations

import pytest
import torch
from testkit import DIGITS_CNN, digits_recipe

from torchshrink import run
from torchshrink.data import DatasetBundle
from torchshrink.distillation.stage import DistillConfig, distill_augment
from torchshrink.inputs import samples
from torchshrink.state import RunContext

SMALL = {"zoo": "resnet", "kwargs": {"width": 4}}


def _bundle(shape: tuple[int, ...], dtype=torch.float32) -> DatasetBundle:
    x = torch.zeros(8, *shape, dtype=dtype)
    y = torch.arange(8) % 2
    return DatasetBundle("fake", samples(x, y), samples(x, y), num_classes=2)


@pytest.mark.parametrize(
    "shape,epochs,shift,mixup",
    [
        ((1, 28, 28), 6, 2, 0.0),  # a digit: B4's 2 pixels
        ((1, 28, 28), 30, 2, 0.0),  # mixup stays opt-in at any schedule
        ((1, 8, 8), 6, 1, 0.0),  # scikit-learn's digits
        ((1, 40), 6, 3, 0.0),  # an MNIST-1D signal
        ((64,), 6, 0, 0.0),  # flat features: nothing to shift
    ],
)
def test_auto_augmentation_follows_the_inputs_and_the_schedule(tmp_path, shape, epochs, shift, mixup):
    ctx = RunContext(data=_bundle(shape), out_dir=tmp_path, seed=0, stage_index=0, stage_name="distill")
    views, why = distill_augment(DistillConfig(student=SMALL, epochs=epochs), ctx)
    assert (views.shift, views.mixup) == (shift, mixup) and why.startswith("auto")
    given, why = distill_augment(DistillConfig(student=SMALL, epochs=epochs, augment={}), ctx)
    assert not given.active and why == "as given"


def test_token_inputs_are_not_augmented(tmp_path):
    ctx = RunContext(
        data=_bundle((16,), torch.int64), out_dir=tmp_path, seed=0, stage_index=0, stage_name="distill"
    )
    assert not distill_augment(DistillConfig(student=SMALL, epochs=6), ctx)[0].active


@pytest.mark.slow
def test_distilling_memorised_outputs_without_augmentation_is_flagged(tmp_path):
    teacher = {"train": {"epochs": 12, "lr": 0.003}}  # learns the 1,437 training digits (>= 97% right)
    tried = run(
        digits_recipe(teacher, {"distill": {"student": SMALL, "epochs": 1, "augment": {}}}, model=DIGITS_CNN),
        tmp_path / "tried",
    )
    (warning,) = tried.stages[1]["details"]["warnings"]
    assert "has learnt them" in warning and "leave 'augment' out" in warning
    assert "## Warnings" in (tmp_path / "tried" / "report.md").read_text()
    assert tried.stages[1]["details"]["teacher_outputs"].startswith("cached")

    default = run(
        digits_recipe(teacher, {"distill": {"student": SMALL, "epochs": 1}}, model=DIGITS_CNN),
        tmp_path / "default",
    )
    details = default.stages[1]["details"]
    assert "warnings" not in details and details["teacher_outputs"].startswith("live")
    assert details["augment"]["shift"] == 1 and details["augment"]["chosen"].startswith("auto")


@pytest.mark.slow
def test_the_defaults_distil_a_student_at_least_as_good_as_training_it_alone(tmp_path):
    """Issue 20's short setting on MNIST-1D (B4 defaults' third row, 30 epochs): a 3-member ensemble
    teaches a half-width 1-D CNN; with every distill option at its default the student is, on the
    mean of three seeds, at least as accurate as the same student trained alone for as many epochs."""
    student = {"zoo": "cnn1d", "kwargs": {"channels": 12}}
    base = {"data": {"name": "mnist1d"}, "measure": {"latency_repeats": 3, "onnx_fp32": False}}
    ensemble = {"ensemble": {"members": 3, "epochs": 30}}
    run({**base, "seed": 0, "model": {"zoo": "cnn1d"}, "stages": [ensemble]}, tmp_path / "teacher")
    teachers = [{"path": str(tmp_path / "teacher" / "model.safetensors")}]
    gains = []
    for seed in (0, 1, 2):
        alone = run(
            {**base, "seed": seed, "model": student, "stages": [{"train": {"epochs": 30}}]},
            tmp_path / f"alone-{seed}",
        )
        distilled = run(
            {
                **base,
                "seed": seed,
                "model": {"zoo": "cnn1d"},
                "stages": [{"distill": {"student": student, "teachers": teachers, "epochs": 30}}],
            },
            tmp_path / f"distilled-{seed}",
        )
        gains.append(distilled.final["accuracy"] - alone.final["accuracy"])
    assert sum(gains) / len(gains) >= 0, gains
