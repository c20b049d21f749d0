"""The ``ensemble`` and ``distill`` stages: members that differ, a reloadable ensemble, teachers that
never change, feature distillation through adapters, teachers from files, clear errors."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from testkit import DIGITS_CNN, digits_recipe

from torchshrink import load_model, run
from torchshrink.distillation.ensemble import Ensemble
from torchshrink.distillation.losses import StepOutputs
from torchshrink.distillation.stage import DistillConfig, distill_stage
from torchshrink.errors import RecipeError
from torchshrink.measure import accuracy
from torchshrink.models import open_model, save_model
from torchshrink.state import ModelState, RunContext

SMALL = {"zoo": "resnet", "kwargs": {"width": 4}}
recipe = functools.partial(digits_recipe, model=DIGITS_CNN)
FAST = {"epochs": 3, "lr": 0.003}


@pytest.fixture(scope="module")
def ensemble_then_distill(tmp_path_factory):
    out = tmp_path_factory.mktemp("kd")
    report = run(
        recipe({"ensemble": {"members": 3, **FAST}}, {"distill": {"student": SMALL, **FAST}}),
        out,
    )
    return out, report


def test_ensemble_stage_trains_distinct_members_and_beats_their_mean(ensemble_then_distill, digits) -> None:
    out, report = ensemble_then_distill
    ensemble_stage = report.stages[0]
    members = ensemble_stage["details"]["members"]
    assert (
        len(members) == 3 and len({m["accuracy"] for m in members}) > 1
    )  # different seeds, different models
    mean_member = sum(m["accuracy"] for m in members) / 3
    assert ensemble_stage["details"]["ensemble_accuracy"] >= mean_member
    assert ensemble_stage["metrics"]["accuracy"] == ensemble_stage["details"]["ensemble_accuracy"]
    # the baseline of the report is the ensemble (the reference stage)
    assert report.baseline["params"] == 3 * members[0]["params"]
    assert "## ensemble: members" in (out / "report.md").read_text()


def test_distilled_student_becomes_the_model_and_the_report_shows_all(ensemble_then_distill, digits) -> None:
    out, report = ensemble_then_distill
    stage = report.stages[1]
    models = stage["details"]["models"]
    assert set(models) == {"teacher 0", "teacher 1", "teacher 2", "ensemble", "student"}
    assert models["student"]["params"] < models["teacher 0"]["params"]
    assert models["ensemble"]["accuracy"] == report.stages[0]["details"]["ensemble_accuracy"]
    assert stage["details"]["terms"] == ["ce", "kd"]
    student = load_model(out / "model.safetensors")
    assert not isinstance(student, Ensemble)
    assert accuracy(student, digits.test) == models["student"]["accuracy"] == report.final["accuracy"]
    assert models["student"]["accuracy"] > 0.5  # learned (10 classes)
    assert "## distill: models" in (out / "report.md").read_text()


def _ctx(tmp_path, data, index: int = 1) -> RunContext:
    return RunContext(data=data, out_dir=tmp_path, seed=5, stage_index=index, stage_name="distill")


def test_teachers_are_never_updated(tmp_path, digits) -> None:
    torch.manual_seed(0)
    teachers = Ensemble([open_model(DIGITS_CNN).module, open_model(DIGITS_CNN).module], "mean_probs")
    with torch.no_grad():  # non-trivial batch-norm statistics: train mode would move them
        for m in teachers.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    before = copy.deepcopy(teachers.state_dict())
    state = ModelState(model=teachers, architecture=None)
    cfg = DistillConfig(student=SMALL, epochs=1, lr=0.01, features=[["layers.1", "members.0.layers.1"]])
    new = distill_stage(state, cfg, _ctx(tmp_path, digits))
    after = teachers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in teachers.parameters())  # the caller's model is untouched
    assert new.model is not teachers and new.architecture == {"zoo": "resnet", "kwargs": {"width": 4}}


@pytest.mark.parametrize(
    ("teacher", "student", "pairs"),
    [
        ({"zoo": "lenet5"}, {"zoo": "lenet5_half"}, [["3", "3"], ["7", "7"]]),  # conv 25 -> 50, fc 250 -> 500
        (
            {"zoo": "resnet", "kwargs": {"width": 8}},
            {"zoo": "resnet", "kwargs": {"width": 4}},
            [["layers.2", "layers.2"]],
        ),
    ],
)
def test_feature_distillation_between_different_widths(
    tmp_path, mnist_small, teacher, student, pairs
) -> None:
    torch.manual_seed(0)
    teacher_model = open_model(teacher).module
    state = ModelState(model=teacher_model, architecture=None)
    cfg = DistillConfig(student=student, epochs=3, lr=0.003, features=pairs, alpha=0.5)
    ctx = _ctx(tmp_path / "hint", mnist_small)
    new = distill_stage(state, cfg, ctx)
    assert ctx.details["terms"] == ["ce", "feature", "kd"]
    assert new.model(mnist_small.test.tensors[0][:4]).shape == (4, 10)
    losses = [epoch["feature"] for epoch in ctx.details["epoch_losses"]]
    assert losses[-1] < 0.8 * losses[0]  # the student (through its adapters) learns the teacher's features
    conv_pairs = [p for p in pairs if p != ["7", "7"]]
    if conv_pairs != pairs:  # attention transfer takes conv features only, and says so up front
        with pytest.raises(RecipeError, match=r"attention transfer needs conv features .* \['7', '7'\]"):
            distill_stage(
                state, cfg.model_copy(update={"feature_loss": "attention"}), _ctx(tmp_path, mnist_small)
            )
    cfg = cfg.model_copy(update={"features": conv_pairs, "feature_loss": "attention"})
    ctx = _ctx(tmp_path / "attention", mnist_small)
    distill_stage(state, cfg, ctx)
    losses = [epoch["attention"] for epoch in ctx.details["epoch_losses"]]
    assert losses[-1] < losses[0]


def test_teachers_from_files_with_a_combine_rule(tmp_path, digits) -> None:
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        loaded = open_model(DIGITS_CNN)
        path = tmp_path / f"t{seed}.safetensors"
        save_model(path, loaded.module, loaded.architecture, digits.input_shape)
        paths.append({"path": str(path)})
    report = run(
        recipe({"distill": {"student": SMALL, "teachers": paths, "combine": "vote", "epochs": 1}}),
        tmp_path / "out",
    )
    assert set(report.stages[0]["details"]["models"]) == {"teacher 0", "teacher 1", "ensemble", "student"}


def test_distill_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"distill.features: no layer\(s\) \['nope'\]"):
        run(
            recipe({"distill": {"student": SMALL, "features": [["nope", "layers.0"]], "epochs": 1}}), tmp_path
        )
    with pytest.raises(RecipeError, match="student"):
        run(recipe({"distill": {"epochs": 1}}), tmp_path)
    with pytest.raises(RecipeError, match="vary: arch needs 'archs'"):
        run(recipe({"ensemble": {"vary": "arch"}}), tmp_path)


def test_ensemble_varies_by_bootstrap_and_by_architecture_and_fits_weights(tmp_path, digits) -> None:
    report = run(
        recipe({"ensemble": {"members": 2, "vary": "bootstrap", "combine": "weighted", "epochs": 1}}),
        tmp_path / "a",
    )
    weights = [m["weight"] for m in report.stages[0]["details"]["members"]]
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)
    archs = [DIGITS_CNN, {"zoo": "lenet300", "kwargs": {"in_features": 64}}]
    report = run(recipe({"ensemble": {"vary": "arch", "archs": archs, "epochs": 1}}), tmp_path / "b")
    assert [m["model"] for m in report.stages[0]["details"]["members"]] == ["resnet", "lenet300"]
    reloaded = load_model(tmp_path / "b" / "model.safetensors")
    assert isinstance(reloaded, Ensemble) and len(reloaded.members) == 2
    x = digits.test.tensors[0][:8]
    assert reloaded(x).shape == (8, 10)


def test_mixup_distillation_teaches_on_the_blended_view_with_blended_labels(
    tmp_path, digits, monkeypatch
) -> None:
    import torchshrink.distillation.stage as stage_module

    augment = stage_module.augment_batch
    views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(*args):
        views.append(augment(*args))
        return views[-1]

    monkeypatch.setattr(stage_module, "augment_batch", recording)
    step_labels: list[torch.Tensor] = []

    def step_outputs(**fields):
        step_labels.append(fields["labels"])
        return StepOutputs(**fields)

    monkeypatch.setattr(stage_module, "StepOutputs", step_outputs)
    torch.manual_seed(0)
    teacher = open_model(DIGITS_CNN).module
    seen: list[torch.Tensor] = []
    teacher.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))  # the frozen copy keeps it
    ctx = _ctx(tmp_path, digits)
    cfg = DistillConfig(student=SMALL, epochs=1, alpha=0.5, augment={"shift": 1, "mixup": 1.0})
    distill_stage(ModelState(model=teacher, architecture=None), cfg, ctx)
    assert ctx.details["teacher_outputs"].startswith("live")
    assert len(views) == -(-len(digits.train) // 64)  # one view per training step
    # the teacher scored exactly the student's views during training (then the test set, for the report)
    assert len(seen) > len(views)
    assert all(torch.equal(t, v[0]) for t, v in zip(seen, views, strict=False))
    assert all(
        a is v[1] for a, v in zip(step_labels, views, strict=True)
    )  # the objective gets the blended labels
    labels = torch.cat([v[1] for v in views])
    assert labels.shape[1] == digits.num_classes and torch.allclose(labels.sum(1), torch.ones(len(labels)))
    assert (labels.max(1).values < 0.99).float().mean() > 0.5  # most targets blend two classes


def test_augmented_distillation_runs_the_teacher_on_the_students_view(tmp_path, digits) -> None:
    torch.manual_seed(0)
    teacher = open_model(DIGITS_CNN).module
    state = ModelState(model=teacher, architecture=None)
    cached, shifted = _ctx(tmp_path / "a", digits), _ctx(tmp_path / "b", digits)
    a = distill_stage(state, DistillConfig(student=SMALL, epochs=1, augment={}), cached)
    b = distill_stage(state, DistillConfig(student=SMALL, epochs=1, augment={"shift": 1}), shifted)
    assert cached.details["teacher_outputs"].startswith("cached")
    assert shifted.details["teacher_outputs"].startswith("live")
    assert not torch.equal(a.model.fc.weight, b.model.fc.weight)  # different inputs, different training
