"""Distillation loss terms against hand-computed values; the T^2 scaling; feature taps and adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchshrink.distillation.losses import (
    FeatureAdapter,
    FeatureTap,
    Objective,
    StepOutputs,
    attention_map,
    attention_map_loss,
    attention_transfer,
    confidence_penalty,
    hidden_state_loss,
    logit_mae,
    make_term,
    soft_target_loss,
    weight_penalty,
)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_soft_target_loss_hand_computed() -> None:
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: teacher probabilities (3/4, 1/4), student (1/2, 1/2)
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(
        _kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6
    )
    # T = 2: teacher logits halved -> (sqrt3, 1) / (sqrt3 + 1); the KL is multiplied by T^2 = 4
    r3 = math.sqrt(3.0)
    expected = 4 * _kl([r3 / (r3 + 1), 1 / (r3 + 1)], [0.5, 0.5])
    assert soft_target_loss(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # batch mean, and zero when student equals teacher
    both = soft_target_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), 1.0)
    assert both.item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]) / 2, rel=1e-6)


def test_t_squared_keeps_the_gradient_scale_independent_of_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 10, generator=gen)
    base = torch.randn(16, 10, generator=gen)
    norms = {}
    for t in (8.0, 16.0, 32.0):
        s = base.clone().requires_grad_(True)
        soft_target_loss(s, teacher, t).backward()
        norms[t] = s.grad.norm().item()
    # d/ds [T^2 KL] = T (softmax(s/T) - softmax(t/T)) / batch -> (s - t - mean) / (K * batch) as T grows
    assert norms[16.0] / norms[8.0] == pytest.approx(1.0, abs=0.03)
    assert norms[32.0] / norms[16.0] == pytest.approx(1.0, abs=0.01)
    centred = (base - teacher) - (base - teacher).mean(1, keepdim=True)
    assert norms[32.0] == pytest.approx((centred / (10 * 16)).norm().item(), rel=0.02)


def test_logit_mae_hand_computed_and_registered() -> None:
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 0.0], [5.0, 4.0]])
    assert logit_mae(student, teacher).item() == pytest.approx((1 + 2 + 2 + 0) / 4)
    out = StepOutputs(student_logits=student, labels=torch.zeros(2, dtype=torch.long), teacher_logits=teacher)
    assert make_term("mae")(out).item() == pytest.approx(1.25)
    # unlike KL, its gradient keeps its size as the student approaches the teacher
    near = (teacher + 1e-3).requires_grad_()
    logit_mae(near, teacher).backward()
    assert torch.allclose(near.grad.abs(), torch.full((2, 2), 0.25))


def test_confidence_penalty_is_minus_the_entropy() -> None:
    assert confidence_penalty(torch.zeros(3, 4)).item() == pytest.approx(-math.log(4), rel=1e-6)
    assert confidence_penalty(torch.tensor([[50.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    p = [0.7, 0.2, 0.1]
    logits = torch.tensor([[math.log(v) for v in p]])
    assert confidence_penalty(logits).item() == pytest.approx(sum(v * math.log(v) for v in p), rel=1e-6)


def test_weight_penalty_counts_conv_and_linear_weights_only() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(-2.0)
        model[3].weight.copy_(torch.tensor([[3.0], [-1.0]]))
        model[1].weight.fill_(100.0)  # batch-norm scale: not a weight penalty target
    assert weight_penalty(model, 1).item() == 2 + 3 + 1
    assert weight_penalty(model, 2).item() == 4 + 9 + 1


def test_attention_map_and_transfer_hand_computed() -> None:
    f = torch.zeros(1, 2, 1, 2)
    f[0, 0, 0] = torch.tensor([1.0, 0.0])
    f[0, 1, 0] = torch.tensor([1.0, 2.0])
    # mean over channels of F^2: [(1 + 1) / 2, (0 + 4) / 2] = [1, 2] -> normalised [1, 2] / sqrt(5)
    assert torch.allclose(attention_map(f), torch.tensor([[1.0, 2.0]]) / math.sqrt(5))
    g = torch.zeros(1, 3, 1, 2)
    g[0, :, 0, 0] = 1.0  # all attention on the first position
    expected = (1 / math.sqrt(5) - 1) ** 2 + (2 / math.sqrt(5)) ** 2
    assert attention_transfer(f, g).item() == pytest.approx(expected, rel=1e-6)
    # different spatial sizes: the larger map is pooled to the smaller
    big = torch.rand(2, 4, 8, 8)
    assert attention_transfer(big, torch.nn.functional.avg_pool2d(big, 2)).item() < 1e-3
    with pytest.raises(ValueError, match="conv features"):
        attention_map(torch.rand(2, 5))


def test_feature_adapter_matches_widths_and_learns() -> None:
    conv = FeatureAdapter((2, 4, 8, 8), (2, 16, 4, 4))
    assert conv(torch.rand(2, 4, 8, 8)).shape == (2, 16, 4, 4) and isinstance(conv.map, nn.Conv2d)
    lin = FeatureAdapter((2, 10), (2, 20))
    assert lin(torch.rand(2, 10)).shape == (2, 20) and isinstance(lin.map, nn.Linear)
    same = FeatureAdapter((2, 8), (2, 8))
    assert isinstance(same.map, nn.Identity) and not list(same.parameters())
    with pytest.raises(ValueError, match="differ in rank"):
        FeatureAdapter((2, 8), (2, 8, 4, 4))
    # an adapter can learn a linear map from student to teacher features
    torch.manual_seed(0)
    target_map = torch.randn(20, 10)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    x = torch.randn(256, 10)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(lin(x), x @ target_map.T)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3


def test_feature_tap_keeps_named_outputs_and_names_missing_layers() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with FeatureTap(model, ["0", "1"]) as tap:
        model(x)
        assert torch.equal(tap.outputs["0"], model[0](x)) and torch.equal(
            tap.outputs["1"], model[0](x).relu()
        )
    tap.outputs.clear()
    model(x)
    assert not tap.outputs  # hooks removed on exit
    with pytest.raises(ValueError, match=r"no layer\(s\) \['fc'\] in Sequential; layers: 0, 1, 2"):
        FeatureTap(model, ["fc"])


def test_objective_is_a_weighted_sum_of_named_terms() -> None:
    out = StepOutputs(
        student_logits=torch.tensor([[2.0, 0.0]]),
        labels=torch.tensor([0]),
        teacher_logits=torch.tensor([[0.0, 1.0]]),
    )
    objective = Objective({"ce": (0.25, make_term("ce")), "kd": (0.75, make_term("kd", temperature=2.0)),
                           "confidence": (0.0, make_term("confidence"))})  # fmt: skip
    terms = objective(out)
    assert set(terms) == {"ce", "kd"}  # a zero weight drops the term
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert terms["ce"].item() == pytest.approx(0.25 * ce, rel=1e-6)
    assert terms["kd"].item() == pytest.approx(
        0.75 * soft_target_loss(out.student_logits, out.teacher_logits, 2.0).item()
    )
    with pytest.raises(ValueError, match="unknown loss term 'dropout'"):
        make_term("dropout")
    with pytest.raises(ValueError, match="need the teacher's outputs"):
        make_term("kd")(StepOutputs(student_logits=out.student_logits, labels=out.labels))


def test_hidden_state_loss_counts_real_tokens_only() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = sum(
        ((student[b, t] - teacher[b, t]) ** 2).mean() for b in range(2) for t in range(5) if mask[b, t]
    ) / int(mask.sum())
    assert hidden_state_loss(student, teacher, mask).item() == pytest.approx(float(expected), rel=1e-6)
    padded = student.clone()
    padded[0, 3:] = 100.0  # what padding positions hold does not matter
    assert hidden_state_loss(padded, teacher, mask).item() == pytest.approx(float(expected), rel=1e-6)
    assert hidden_state_loss(teacher, teacher, mask).item() == 0.0
    with pytest.raises(ValueError, match="same width"):
        hidden_state_loss(student[..., :3], teacher, mask)


def test_attention_map_loss_is_the_kl_of_head_averaged_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.softmax(torch.randn(1, 3, 2, 4, generator=gen), -1)  # 3 heads
    teacher = torch.softmax(torch.randn(1, 2, 2, 4, generator=gen), -1)  # 2 heads: averaged, it still fits
    mask = torch.tensor([[1, 0]])  # only the first query token is real
    t, s_ = teacher.mean(1)[0, 0], student.mean(1)[0, 0]
    expected = float((t * (t / s_).log()).sum())
    assert attention_map_loss(student, teacher, mask).item() == pytest.approx(expected, rel=1e-5)
    assert attention_map_loss(teacher, teacher, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_cosine_match_and_the_task_loss_on_vector_targets() -> None:
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    out = StepOutputs(student_logits=student, labels=teacher, teacher_logits=teacher)
    expected = 1 - (1 / math.sqrt(2) + 1) / 2
    assert make_term("cosine")(out).item() == pytest.approx(expected, rel=1e-6)
    assert make_term("ce")(out).item() == pytest.approx(expected, rel=1e-6)  # vector targets: cosine distance


def test_the_config_names_only_registered_terms():
    """The distill config's term names (match, regularizers) are keys of the one term registry."""
    import typing

    from torchshrink.distillation.losses import TERMS
    from torchshrink.distillation.stage import DistillConfig

    fields = DistillConfig.model_fields
    match = {a for a in typing.get_args(fields["match"].annotation) for a in typing.get_args(a)} or set()
    regularizers = set(typing.get_args(typing.get_args(fields["regularizers"].annotation)[0]))
    assert match == {"kd", "mae", "cosine"} and match <= set(TERMS)
    assert regularizers == {"confidence", "l1", "l2"} and regularizers <= set(TERMS)
    with pytest.raises(ValueError, match="unknown loss term 'nope'; known: ce, kd"):
        make_term("nope")
