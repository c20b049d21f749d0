"""Data-free distillation: generators for every input shape, the gradient reversal, DAFL's terms by
hand, latent batches that repeat per epoch, the batch-norm prior, and the ``datafree`` stage: a
student that learns from generated inputs only (the training split is NaN), teachers that never
change, the adversarial generator ascending what the student descends, the VAE route, clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from testkit import DIGITS_CNN, digits_recipe
from torch import nn
from torch.utils.data import TensorDataset

import torchshrink.distillation.datafree_stage as stage_module
from torchshrink import run
from torchshrink.data import DatasetBundle
from torchshrink.distillation.datafree import (
    BatchNormStatistics,
    ConditionalGenerator,
    Generator,
    LatentBatches,
    class_draw,
    dafl_terms,
    draw_offset,
    mode_seeking,
    reverse_gradient,
    to_range,
)
from torchshrink.distillation.datafree_stage import (
    DataFreeConfig,
    DataFreeLearner,
    choose_real_inputs,
    datafree_stage,
)
from torchshrink.distillation.losses import logit_mae
from torchshrink.distillation.restarts import cross_agreement, pick_restart
from torchshrink.distillation.stage import StudentWithAdapters
from torchshrink.errors import TrainingError
from torchshrink.measure import accuracy
from torchshrink.models import open_model
from torchshrink.state import ModelState, RunContext

STUDENT = {"zoo": "lenet300", "kwargs": {"in_features": 64}}


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 30, 30), (1, 40), (64,)])
def test_generators_make_inputs_of_every_shape_inside_the_range(shape) -> None:
    torch.manual_seed(0)
    x = Generator(16, shape, width=8, input_range=(-1.0, 2.0))(torch.randn(32, 16))
    assert x.shape == (32, *shape)
    assert x.min() >= -1.0 and x.max() <= 2.0 and x.std() > 0.01


def test_an_unknown_range_standardises_each_channel_over_the_batch() -> None:
    torch.manual_seed(0)
    x = Generator(16, (3, 8, 8), width=8, input_range=None)(torch.randn(64, 16))
    per_channel = x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-3)
    assert torch.allclose(
        to_range(torch.zeros(2, 3), (0.0, 4.0)), torch.full((2, 3), 2.0)
    )  # sigmoid(0) = 1/2


def test_gradient_reversal_is_the_identity_forward_and_negates_backward() -> None:
    x = torch.randn(5, requires_grad=True)
    w = torch.randn(5)
    y = reverse_gradient(x)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.equal(x.grad, -w)


def test_dafl_terms_match_hand_computed_values() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    features = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    terms = dafl_terms(logits, [features])
    p0 = math.exp(2) / (math.exp(2) + 2)  # the teacher's confidence in its argmax, sample 0
    p1 = math.exp(3) / (math.exp(3) + 2)
    assert float(terms["one_hot"]) == pytest.approx((-math.log(p0) - math.log(p1)) / 2, rel=1e-6)
    assert float(terms["activation"]) == pytest.approx(-(1 + 2 + 3 + 0) / 4)
    q0, q1 = (1 - p0) / 2, (1 - p1) / 2  # the other classes' shares
    mean = [(p0 + q1) / 2, (q0 + p1) / 2, (q0 + q1) / 2]
    assert float(terms["entropy"]) == pytest.approx(sum(m * math.log(m) for m in mean), rel=1e-6)
    uniform = dafl_terms(torch.zeros(4, 3), [features])["entropy"]
    assert float(uniform) == pytest.approx(-math.log(3), rel=1e-6)  # the minimum: classes evenly used


def test_latent_batches_repeat_per_epoch_whatever_came_before_and_differ_between_epochs() -> None:
    source = LatentBatches((7,), batch_size=16, steps=3, seed=4)
    first = list(source.epoch(0))
    torch.manual_seed(123)  # the global generator plays no part
    again = list(LatentBatches((7,), batch_size=16, steps=3, seed=4).epoch(0))
    assert len(source) == 3 and first[0][0].shape == (16, 7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], next(iter(source.epoch(1)))[0])
    assert not torch.equal(first[0][0], first[1][0])


def test_the_batch_norm_prior_vanishes_at_the_running_statistics() -> None:
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    z = torch.randn(256, 2, 4, 4)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), unbiased=False, keepdim=True)
    matching = z * torch.tensor([2.0, 0.5]).view(1, 2, 1, 1) + bn.running_mean.view(1, 2, 1, 1)
    prior = BatchNormStatistics(nn.Sequential(bn))
    bn(matching)
    assert float(prior.take()) == pytest.approx(0.0, abs=1e-4)
    bn(matching + 1.0)  # every channel's mean off by one
    assert float(prior.take()) == pytest.approx(math.sqrt(2), rel=1e-4)
    assert prior.take() is None  # nothing since the last call
    prior.remove()


def test_the_adversarial_step_raises_the_discrepancy_for_the_generator_and_lowers_it_for_the_student() -> (
    None
):
    torch.manual_seed(0)
    teacher = open_model(DIGITS_CNN).module.eval().requires_grad_(False)
    student = open_model(STUDENT).module
    generator = Generator(8, (1, 8, 8), width=8)
    learner = DataFreeLearner(
        StudentWithAdapters(student, {}), "adversarial", generator, (0.0, 1.0), adversarial=1.0
    )
    z = torch.randn(64, 8)

    def discrepancy() -> torch.Tensor:
        _, view, logits, _ = learner(z)
        return logit_mae(logits, teacher(view))

    def after_step(params: list[nn.Parameter]) -> float:
        saved = copy.deepcopy(learner.state_dict())
        learner.zero_grad()
        discrepancy().backward()
        with torch.no_grad():  # a plain gradient step on one side only
            for p in params:
                p -= 0.05 * p.grad
        value = float(discrepancy().detach())
        learner.load_state_dict(saved)
        return value

    learner.train()
    before = float(discrepancy().detach())
    assert after_step(list(generator.parameters())) > before  # the generator ascends the discrepancy
    assert after_step(list(student.parameters())) < before  # the student descends it


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A trained ResNet teacher for the 8x8 digits (with batch-norm)."""
    out = tmp_path_factory.mktemp("teacher")
    run(digits_recipe({"train": {"epochs": 8, "lr": 0.003}}, model=DIGITS_CNN), out)
    return open_model(out / "model.safetensors").module


def _without_training_inputs(data: DatasetBundle) -> DatasetBundle:
    """The same data with every training input NaN: any that reached the student would stop training."""
    x, y = data.train.tensors
    return DatasetBundle(
        data.name, TensorDataset(torch.full_like(x, math.nan), y), data.test, data.num_classes
    )


def _datafree(teacher, data, tmp_path, **options) -> tuple[ModelState, RunContext]:
    cfg = DataFreeConfig(student=STUDENT, lr=0.003, batch_size=64, checkpoint_every=0, **options)
    ctx = RunContext(data=data, out_dir=tmp_path, seed=0, stage_index=1, stage_name="datafree")
    return datafree_stage(ModelState(model=teacher, architecture=None), cfg, ctx), ctx


def test_dafl_teaches_a_student_that_never_sees_a_training_input(digits_teacher, digits, tmp_path) -> None:
    data = _without_training_inputs(digits)
    before = copy.deepcopy(digits_teacher.state_dict())
    budget = {"epochs": 10, "steps_per_epoch": 30, "temperature": 1.0, "augment": {"shift": 1}}
    state, ctx = _datafree(digits_teacher, data, tmp_path / "dafl", generator="dafl", **budget)
    _, noise_ctx = _datafree(digits_teacher, data, tmp_path / "noise", generator="noise", **budget)
    models = ctx.details["models"]
    assert models["teacher"]["accuracy"] > 0.9
    assert accuracy(state.model, digits.test) == models["student"]["accuracy"]
    assert models["student"]["accuracy"] > 0.6  # 10 classes: learnt from generated inputs alone
    assert models["student"]["accuracy"] > noise_ctx.details["models"]["student"]["accuracy"] + 0.2
    assert set(ctx.details["epoch_losses"][-1]) == {
        "generator_one_hot",
        "generator_activation",
        "generator_entropy",
        "kd",
        "train_accuracy",  # monitored: agreement with the teacher's top-1 on the generated batch
    }
    after = digits_teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics included


def test_the_vae_route_inverts_a_pool_the_teacher_recognises_and_teaches_from_samples(
    digits_teacher, digits, tmp_path, monkeypatch
) -> None:
    data = _without_training_inputs(digits)
    options = {
        "generator": "vae",
        "epochs": 4,
        "steps_per_epoch": 25,
        "latent_dim": 16,
        "inversion": {"pool": 320, "epochs": 20, "batch_size": 64, "lr": 0.2, "jitter": 0},  # 8x8: no jitter
        "vae": {"epochs": 60},
    }
    state, ctx = _datafree(digits_teacher, data, tmp_path, **options)
    inversion = ctx.details["inversion"]
    assert inversion["teacher_agrees"] > 0.9  # the pool holds every class, as the teacher sees it
    assert ctx.details["models"]["student"]["accuracy"] > 0.3
    work = tmp_path / ".work" / "01-datafree"
    assert (
        len(list(work.glob("inverted-pool-*.safetensors"))) == len(list(work.glob("vae-*.safetensors"))) == 1
    )
    # resumed with the same settings, both phases come from the work folder
    monkeypatch.setattr(stage_module, "_invert", lambda *a: pytest.fail("the pool was inverted again"))
    monkeypatch.setattr(stage_module, "vae_terms", lambda *a: pytest.fail("the VAE was fitted again"))
    _, again = _datafree(digits_teacher, data, tmp_path, **options)
    assert "inversion" not in again.details and "vae_final_loss" not in again.details


def test_the_same_seed_gives_the_same_student(digits_teacher, digits, tmp_path) -> None:
    options = {"generator": "adversarial", "match": "mae", "epochs": 1, "steps_per_epoch": 5}
    a, ctx = _datafree(digits_teacher, digits, tmp_path / "a", **options)
    b, _ = _datafree(digits_teacher, digits, tmp_path / "b", **options)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )
    # the generator's samples, one row per class the teacher assigns: the same picture for the same seed
    samples = ctx.details["samples"]
    assert ctx.artefacts["datafree_samples"] == samples["file"] == "samples-01.png"
    assert len(samples["per_class"]) == digits.num_classes and samples["classes_drawn"] >= 1
    png_a, png_b = ((tmp_path / run / samples["file"]).read_bytes() for run in ("a", "b"))
    assert png_a == png_b
    from matplotlib.image import imread

    height, width = imread(tmp_path / "a" / samples["file"]).shape[:2]
    columns = max(samples["per_class"])
    assert (height, width) == (
        round(80 * (0.9 * digits.num_classes + 0.5)),
        round(80 * (0.9 * columns + 0.6)),
    )


def test_restarts_are_scored_on_the_other_restarts_samples_only() -> None:
    teacher = nn.Identity()
    teacher.register_parameter("anchor", nn.Parameter(torch.zeros(1)))  # a device to run on

    class Constant(nn.Module):
        def __init__(self, label: int) -> None:
            super().__init__()
            self.label = label

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(torch.full((len(x),), self.label), 2).float()

    def of_class(label: int):
        def draw(n: int, seed: int) -> torch.Tensor:
            x = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed))
            x[:, label] += 1.0  # the teacher (argmax of x) names this class
            return x

        return draw

    # each constant student is right on all of its own generator's samples and none of the other's:
    # scored on its own samples too, both would score 0.5
    draws = [of_class(0), of_class(1)]
    assert cross_agreement([Constant(0), Constant(1)], draws, teacher, 64, seed=0) == [0.0, 0.0]
    scores = cross_agreement([Constant(0), nn.Identity(), Constant(1)], [*draws, of_class(0)], teacher, 64, 0)
    assert scores == [0.5, 1.0, 0.5]
    assert pick_restart(scores) == 1 and pick_restart([0.5, 0.5]) == 0  # equals: the lowest seed


def test_the_kept_restart_is_the_picked_one_and_the_same_as_its_seed_run_alone(
    digits_teacher, digits, tmp_path
) -> None:
    options = {"generator": "adversarial", "epochs": 1, "steps_per_epoch": 5, "pick_samples": 64}
    state, ctx = _datafree(digits_teacher, digits, tmp_path / "two", restarts=2, **options)
    restarts = ctx.details["restarts"]
    assert restarts["seeds"] == [0, 1000] and len(restarts["cross_agreement"]) == 2
    assert restarts["picked"] == pick_restart(restarts["cross_agreement"])
    # the kept student is the one that seed trains on its own
    cfg = DataFreeConfig(student=STUDENT, lr=0.003, batch_size=64, checkpoint_every=0, **options)
    seed = restarts["seeds"][restarts["picked"]]
    alone_ctx = RunContext(
        data=digits, out_dir=tmp_path / "alone", seed=seed, stage_index=1, stage_name="datafree"
    )
    alone = datafree_stage(ModelState(model=digits_teacher, architecture=None), cfg, alone_ctx)
    assert all(
        torch.equal(x, y)
        for x, y in zip(state.model.state_dict().values(), alone.model.state_dict().values(), strict=True)
    )


def test_options_that_cannot_work_are_refused_clearly() -> None:
    with pytest.raises(ValidationError, match="augment.mixup blends labelled training inputs"):
        DataFreeConfig(student=STUDENT, augment={"mixup": 1.0})
    with pytest.raises(ValidationError, match=r"input_range must be \[lo, hi\] with lo < hi"):
        DataFreeConfig(student=STUDENT, input_range=(1.0, 0.0))
    with pytest.raises(ValidationError, match="dafl.*adversarial.*vae.*noise"):
        DataFreeConfig(student=STUDENT, generator="gan")
    with pytest.raises(ValidationError, match="generator: noise has none to train"):
        DataFreeConfig(student=STUDENT, generator="noise", generator_loss={"entropy": 1.0})
    with pytest.raises(ValidationError, match="every weight is 0, so the generator would never learn"):
        DataFreeConfig(student=STUDENT, generator="dafl", generator_loss={})
    adversarial = DataFreeConfig(student=STUDENT, generator="adversarial")
    assert adversarial.generator_weights.adversarial == 1.0
    assert (adversarial.match, adversarial.generator_lr) == ("mae", 2e-4)  # B5's settings by default
    assert DataFreeConfig(student=STUDENT, generator="adversarial", match="kd").match == "kd"
    assert DataFreeConfig(student=STUDENT).generator_weights.entropy == 5.0  # DAFL's weights by default
    with pytest.raises(ValidationError, match="generator: real trains on real inputs: say how many"):
        DataFreeConfig(student=STUDENT, generator="real")
    with pytest.raises(ValidationError, match="generator: dafl reads none"):
        DataFreeConfig(student=STUDENT, generator="dafl", inputs=100)
    with pytest.raises(ValidationError, match="only generator: conditional draws the classes"):
        DataFreeConfig(student=STUDENT, generator="adversarial", classes="disagreement")
    with pytest.raises(ValidationError, match="real_share splits the batches of generator: vae with inputs"):
        DataFreeConfig(student=STUDENT, generator="vae", real_share=0.3)
    with pytest.raises(ValidationError, match="class_ce scores a requested class"):
        DataFreeConfig(student=STUDENT, generator="adversarial", generator_loss={"class_ce": 1.0})
    with pytest.raises(
        ValidationError, match="restarts: 3 retrains a generator with its student; generator: vae"
    ):
        DataFreeConfig(student=STUDENT, generator="vae", restarts=3)
    conditional = DataFreeConfig(student=STUDENT, generator="conditional")
    assert conditional.generator_weights.class_ce == conditional.generator_weights.adversarial == 1.0
    assert (conditional.match, conditional.generator_lr) == ("mae", 2e-4)


def test_a_route_asking_for_more_real_inputs_than_there_are_says_so(digits_teacher, digits, tmp_path) -> None:
    with pytest.raises(
        TrainingError, match=r"inputs: 5000 real inputs asked for, but the training split holds"
    ):
        _datafree(digits_teacher, digits, tmp_path, generator="real", inputs=5000, epochs=1)


def test_class_draw_gives_exact_proportions_without_random_numbers() -> None:
    balanced = class_draw(torch.ones(10), 128)
    counts = torch.bincount(balanced, minlength=10)
    assert counts.sum() == 128 and counts.max() - counts.min() <= 1
    skewed = torch.bincount(class_draw(torch.tensor([3.0, 1.0]), 100), minlength=2)
    assert skewed.tolist() == [75, 25]
    torch.manual_seed(5)
    assert torch.equal(class_draw(torch.ones(10), 128), balanced)
    # successive offsets spread the remainders, and more classes than samples, over the batches
    over_batches = torch.cat([class_draw(torch.ones(100), 64, draw_offset(step)) for step in range(50)])
    counts = torch.bincount(over_batches, minlength=100)
    assert counts.min() >= 30 and counts.max() <= 34  # 3,200 draws, 32 each up to the rotation's spread
    small = torch.stack(
        [torch.bincount(class_draw(torch.ones(10), 16, draw_offset(s)), minlength=10) for s in range(40)]
    ).sum(0)
    assert small.max() - small.min() <= 2  # not a fixed 2:1 split of 16 over 10 classes
    assert draw_offset(3, rank=1, world_size=2) != draw_offset(3, rank=0, world_size=2)


def test_mode_seeking_punishes_codes_that_collapse_onto_one_input() -> None:
    torch.manual_seed(0)
    z = torch.randn(64, 8)
    classes = torch.zeros(64, dtype=torch.long)
    diverse = torch.rand(64, 1, 8, 8)
    collapsed = diverse[:1].expand(64, 1, 8, 8) + 1e-3 * torch.rand(64, 1, 8, 8)
    assert float(mode_seeking(collapsed, z, classes)) > 50 * float(mode_seeking(diverse, z, classes))
    # only neighbours of the same class are compared: alternating classes compare none
    assert float(mode_seeking(diverse, z, torch.arange(64) % 2)) == 0.0


def test_disagreement_draws_more_of_the_classes_the_student_gets_wrong() -> None:
    learner = DataFreeLearner(
        StudentWithAdapters(nn.Linear(4, 3), {}),
        "conditional",
        ConditionalGenerator(4, 3, (4,), width=2),
        (0.0, 1.0),
        num_classes=3,
        classes="disagreement",
    )
    assert torch.allclose(learner.class_weights(), torch.full((3,), 1 / 3))
    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    teacher = torch.eye(3)[classes] * 8
    student = teacher.clone()
    student[classes == 2] = torch.tensor([8.0, 0.0, 0.0])  # wrong on class 2 only
    for _ in range(30):
        learner.note_disagreement(classes, student, teacher)
    weights = learner.class_weights()
    assert weights[2] > 0.6 and weights[0] < 0.2 and weights.sum() == pytest.approx(1.0)
    assert "disagreement" in learner.state_dict()  # checkpoints keep it: a resumed run draws the same
    drawn = torch.bincount(learner(torch.randn(30, 4)).classes, minlength=3)
    assert drawn[2] > drawn[0] + drawn[1]


def test_the_conditional_generator_makes_inputs_of_the_class_asked_for(
    digits_teacher, digits, tmp_path, monkeypatch
) -> None:
    made: list[DataFreeLearner] = []

    class Spied(DataFreeLearner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(stage_module, "DataFreeLearner", Spied)
    data = _without_training_inputs(digits)
    # a short run: the generator at the student's pace (its default, 0.0002, suits B5's 3,000 steps)
    options = {"generator": "conditional", "epochs": 6, "steps_per_epoch": 30, "latent_dim": 16}
    options |= {"generator_lr": 0.003}
    state, ctx = _datafree(digits_teacher, data, tmp_path, **options)
    generator = made[0].generator.eval()
    classes = torch.arange(10).repeat_interleave(30)
    with torch.no_grad():
        assigned = digits_teacher(generator(torch.randn(300, 16), classes)).argmax(1)
    per_class = [(assigned[classes == c] == c).float().mean() for c in range(10)]
    assert float((assigned == classes).float().mean()) > 0.9
    assert min(per_class) > 0.6  # every class, not nine and a collapse
    assert ctx.details["class_agreement"] > 0.9 and ctx.details["class_weights"] == [0.1] * 10
    assert {"generator_class_ce", "generator_diversity", "generator_bn_statistics"} <= set(
        ctx.details["epoch_losses"][-1]
    )
    assert ctx.details["models"]["student"]["accuracy"] > 0.6
    assert accuracy(state.model, digits.test) == ctx.details["models"]["student"]["accuracy"]


class _Spy(TensorDataset):
    """A training split that records which samples are read by index (the inputs outside the chosen
    ones are NaN besides, so one reaching the student by another path would stop training)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__(*tensors)
        self.read: set[int] = set()

    def __getitem__(self, index: int):
        self.read.add(int(index))
        return super().__getitem__(index)


@pytest.mark.parametrize("generator", ["vae", "real"])
def test_the_real_input_routes_read_only_the_inputs_they_were_given(
    digits_teacher, digits, tmp_path, monkeypatch, generator
) -> None:
    x, y = digits.train.tensors
    keep = choose_real_inputs(len(x), 100, seed=0)
    blank = torch.full_like(x, math.nan)
    blank[keep] = x[keep]  # any other input would be NaN and stop training
    spy = _Spy(blank, y)
    data = DatasetBundle(digits.name, spy, digits.test, digits.num_classes)
    fitted: list[torch.Tensor] = []
    real_vae_terms = stage_module.vae_terms

    def vae_terms(model, x, beta):
        fitted.append(x)
        return real_vae_terms(model, x, beta)

    monkeypatch.setattr(stage_module, "vae_terms", vae_terms)
    options = {"generator": generator, "inputs": 100, "epochs": 4, "steps_per_epoch": 25, "latent_dim": 16}
    options |= {"vae": {"epochs": 30}} if generator == "vae" else {}
    state, ctx = _datafree(digits_teacher, data, tmp_path, **options)
    assert spy.read == set(keep.tolist())
    assert ctx.details["training_inputs"].startswith("100 real unlabelled training inputs (of ")
    # no real training input goes into the report's picture
    assert (generator == "real") == ("samples-01.png" not in ctx.artefacts.values())
    if generator == "vae":
        seen = torch.cat(fitted)
        assert len(seen) == 30 * 100 and "inversion" not in ctx.details  # fitted to the 100, not inverted
        assert all(bool((row == x[keep]).flatten(1).all(1).any()) for row in seen[:50])
    assert ctx.details["models"]["student"]["accuracy"] > 0.5
