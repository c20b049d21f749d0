"""Importance criteria checked against scores computed by hand with plain torch: magnitude,
taylor, snip, random, bn_scale, channel entropy, entropy importance, and the group reduction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchshrink import zoo
from torchshrink.pruning.graph import find_groups
from torchshrink.pruning.importance import (
    ENTROPY_BINS,
    IMPORTANCE,
    EntropyImportance,
    Importance,
    bn_scale,
    channel_entropy,
    magnitude,
    make_importance,
    random_scores,
    snip,
    taylor,
)


def lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return zoo.build("lenet300", in_features=64)


def conv_bn_net(seed: int = 0) -> nn.Module:
    """conv -> BN -> ReLU -> conv -> flatten -> linear, for 1x8x8 digits."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 10),
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.1, 3.0]))
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        model[1].running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    return model


@pytest.fixture(scope="module")
def batches(digits):
    x, y = digits.train.tensors
    return [(x[:64], y[:64]), (x[64:128], y[64:128])]


def hand_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """dL/dw of the cross-entropy in eval mode, via torch.autograd.grad (never touches .grad)."""
    was_training = model.training
    model.eval()
    named = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(named.values()))
    model.train(was_training)
    return dict(zip(named, grads, strict=True))


def hand_entropy(values: torch.Tensor, bins: int = ENTROPY_BINS) -> float:
    """Shannon entropy (nats) of a 1-D sample's histogram over [min, max] with torch.histc."""
    v = values.double().reshape(-1)
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return 0.0
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def group_named(groups, name):
    matches = [g for g in groups if g.name == name]
    assert len(matches) == 1, [g.name for g in groups]
    return matches[0]


# --- magnitude -------------------------------------------------------------------------------------


def test_magnitude_l1_and_l2_per_element():
    model = lenet()
    l1, l2 = magnitude(model, "l1"), magnitude(model, "l2")
    assert l1.name == "magnitude-l1" and l2.name == "magnitude-l2"
    named = dict(model.named_parameters())
    assert set(l1.scores) == set(named) == set(l2.scores)
    for n, p in named.items():
        w = p.detach()
        torch.testing.assert_close(l1.elements(n), w.abs())
        torch.testing.assert_close(l2.elements(n), w * w)
        assert l1.elements(n).shape == w.shape
        assert not l1.elements(n).requires_grad


def test_magnitude_on_a_hand_written_tensor():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-3.0, 0.5], [0.0, 2.0]]))
        layer.bias.copy_(torch.tensor([-1.0, 4.0]))
    assert torch.equal(magnitude(layer, "l1").elements("weight"), torch.tensor([[3.0, 0.5], [0.0, 2.0]]))
    assert torch.equal(magnitude(layer, "l2").elements("weight"), torch.tensor([[9.0, 0.25], [0.0, 4.0]]))
    assert torch.equal(magnitude(layer, "l2").elements("bias"), torch.tensor([1.0, 16.0]))


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_lenet_group_score_sums_rows_bias_and_consumer_columns(digits, norm):
    model = lenet()
    example = digits.train.tensors[0][:4]
    groups = find_groups(model, example)
    group = group_named(groups, "1")
    assert group.size == 300
    w1, b1, w2 = model[1].weight.detach(), model[1].bias.detach(), model[3].weight.detach()
    f = (lambda t: t.abs()) if norm == "l1" else (lambda t: t * t)
    expected = f(w1).sum(1) + f(b1) + f(w2).sum(0)
    scores = magnitude(model, norm)(group)
    assert scores.dtype == torch.float64 and scores.shape == (300,)
    torch.testing.assert_close(scores, expected.double(), rtol=1e-6, atol=1e-9)
    # neuron by neuron, the plain-Python way, for a few of them
    for j in (0, 17, 299):
        by_hand = sum(float(f(w1[j, i])) for i in range(64)) + float(f(b1[j]))
        by_hand += sum(float(f(w2[i, j])) for i in range(100))
        assert float(scores[j]) == pytest.approx(by_hand, rel=1e-6)
    # the second hidden layer's group: rows of layer 3, its bias, columns of layer 5
    group3 = group_named(groups, "3")
    w3, b3, w5 = model[3].weight.detach(), model[3].bias.detach(), model[5].weight.detach()
    torch.testing.assert_close(
        magnitude(model, norm)(group3), (f(w3).sum(1) + f(b3) + f(w5).sum(0)).double(), rtol=1e-6, atol=1e-9
    )


def test_group_score_after_flatten_sums_each_channels_block_of_features():
    model = conv_bn_net()
    group = group_named(find_groups(model, torch.randn(2, 1, 8, 8)), "3")  # conv 3 -> flatten -> linear 5
    assert group.size == 3
    w3, b3, w5 = model[3].weight.detach(), model[3].bias.detach(), model[5].weight.detach()
    # channel c of conv 3 feeds the 6*6 flattened features c*36 .. c*36+35 of linear 5
    expected = torch.stack(
        [w3[c].abs().sum() + b3[c].abs() + w5[:, c * 36 : (c + 1) * 36].abs().sum() for c in range(3)]
    )
    torch.testing.assert_close(magnitude(model)(group), expected.double(), rtol=1e-6, atol=1e-9)


def test_group_score_skips_tensors_without_scores():
    model = conv_bn_net()
    group = group_named(find_groups(model, torch.randn(2, 1, 8, 8)), "0")
    scores = Importance({"0.weight": model[0].weight.detach().abs()}, "partial")(group)
    torch.testing.assert_close(scores, model[0].weight.detach().abs().sum((1, 2, 3)).double())


# --- gradient criteria -----------------------------------------------------------------------------


def test_taylor_on_one_batch_is_abs_w_times_grad(batches):
    model = lenet()
    x, y = batches[0]
    grads = hand_grads(model, x, y)
    imp = taylor(model, [(x, y)])
    assert imp.name == "taylor"
    assert set(imp.scores) == set(grads)
    for n, p in model.named_parameters():
        torch.testing.assert_close(imp.elements(n), (p.detach() * grads[n]).abs())


def test_taylor_over_two_batches_is_the_mean_of_per_batch_scores(batches):
    model = lenet()
    g0, g1 = (hand_grads(model, x, y) for x, y in batches)
    imp = taylor(model, batches)
    for n, p in model.named_parameters():
        w = p.detach()
        expected = ((w * g0[n]).abs() + (w * g1[n]).abs()) / 2
        torch.testing.assert_close(imp.elements(n), expected)
    # a mean of absolute values, not the absolute value of the mean gradient
    w1 = model[1].weight.detach()
    assert not torch.allclose(imp.elements("1.weight"), (w1 * (g0["1.weight"] + g1["1.weight"]) / 2).abs())


def test_snip_is_normalised_abs_w_times_mean_grad(batches):
    model = lenet()
    g0, g1 = (hand_grads(model, x, y) for x, y in batches)
    named = {n: p.detach() for n, p in model.named_parameters()}
    saliency = {n: (w * (g0[n] + g1[n]) / 2).abs() for n, w in named.items()}
    total = sum(float(s.double().sum()) for s in saliency.values())
    imp = snip(model, batches)
    assert imp.name == "snip"
    assert math.fsum(float(s.double().sum()) for s in imp.scores.values()) == pytest.approx(1.0, abs=1e-5)
    for n in named:
        torch.testing.assert_close(imp.elements(n), saliency[n] / total, rtol=1e-5, atol=1e-12)
        assert (imp.elements(n) >= 0).all()


# --- side effects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(IMPORTANCE))
@pytest.mark.parametrize("training", [True, False])
def test_scorers_change_no_weights_buffers_mode_or_grads(kind, training, batches):
    model = conv_bn_net()
    model.train(training)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    make_importance(kind, model, batches)
    after = model.state_dict()
    assert set(after) == set(before)
    for n, t in before.items():
        assert torch.equal(after[n], t), n  # weights and BN running statistics alike
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == training for m in model.modules())


def test_gradient_scorers_drop_grads_that_were_there_before(batches):
    model = lenet()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    taylor(model, batches)
    assert all(p.grad is None for p in model.parameters())


# --- random and bn_scale ---------------------------------------------------------------------------


def test_random_scores_are_deterministic_per_seed_and_differ_between_seeds():
    model = lenet()
    a, b, c = random_scores(model, seed=3), random_scores(model, seed=3), random_scores(model, seed=4)
    assert a.name == "random"
    for n, p in model.named_parameters():
        assert a.elements(n).shape == p.shape
        assert torch.equal(a.elements(n), b.elements(n))
        assert not torch.equal(a.elements(n), c.elements(n))
        assert (a.elements(n) >= 0).all() and (a.elements(n) < 1).all()
    # independent of the global RNG state
    torch.manual_seed(123)
    d = random_scores(model, seed=3)
    assert all(torch.equal(a.elements(n), d.elements(n)) for n in a.scores)


def test_bn_scale_group_scores_are_abs_gamma():
    model = conv_bn_net()
    groups = find_groups(model, torch.randn(2, 1, 8, 8))
    group = group_named(groups, "0")  # conv 0 -> BN 1 -> ReLU -> conv 3
    assert {(m.name, m.role) for m in group.members} >= {
        ("0.weight", "out"),
        ("1.weight", "pass"),
        ("3.weight", "in"),
    }
    imp = bn_scale(model)
    assert imp.name == "bn_scale"
    assert set(imp.scores) == {"1.weight"}
    torch.testing.assert_close(imp(group), torch.tensor([0.5, 2.0, 0.1, 3.0], dtype=torch.float64))
    # a group with no batch norm scores zero
    group3 = group_named(groups, "3")
    assert torch.equal(imp(group3), torch.zeros(3, dtype=torch.float64))


# --- channel entropy -------------------------------------------------------------------------------


def test_channel_entropy_of_a_constant_channel_is_zero():
    values = torch.stack([torch.full((100,), 5.0), torch.zeros(100), torch.linspace(-1, 1, 100)], dim=1)
    h = channel_entropy(values, dim=1)
    assert h.shape == (3,)
    assert h[0] == 0 and h[1] == 0
    assert h[2] > 0


def test_channel_entropy_even_spread_over_all_bins_is_log_bins():
    spread = torch.arange(float(ENTROPY_BINS)).repeat(3)  # every bin equally often
    h = channel_entropy(spread.unsqueeze(1), dim=1)
    assert float(h[0]) == pytest.approx(math.log(32))
    assert ENTROPY_BINS == 32


def test_channel_entropy_grows_with_spread():
    n = 96
    two = torch.arange(n) % 2  # two values, half and half -> log 2
    eight = torch.arange(n) % 8  # eight evenly spaced values -> log 8
    all_bins = torch.arange(n) % 32  # -> log 32
    skewed = torch.cat([torch.zeros(90), torch.ones(6)])  # two values, unbalanced
    values = torch.stack([skewed, two, eight, all_bins], dim=1).float()
    h = channel_entropy(values, dim=1)
    p = torch.tensor([90 / 96, 6 / 96], dtype=torch.float64)
    expected = [float(-(p * p.log()).sum()), math.log(2), math.log(8), math.log(32)]
    assert h.tolist() == pytest.approx(expected)
    assert h[0] < h[1] < h[2] < h[3]


def test_channel_entropy_matches_histc_on_real_valued_channels():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(64, 3, 5, 5, generator=gen)
    values[:, 1] = values[:, 1].exp()  # a skewed channel
    h = channel_entropy(values, dim=1)
    expected = [hand_entropy(values[:, c]) for c in range(3)]
    assert h.tolist() == pytest.approx(expected, rel=1e-9)
    assert all(0 < v < math.log(32) for v in h.tolist())
    # the same channels along the last axis
    assert channel_entropy(values.movedim(1, -1), dim=3).tolist() == pytest.approx(expected, rel=1e-9)


# --- entropy importance ----------------------------------------------------------------------------


def test_entropy_importance_scores_a_dead_neuron_zero(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    dead = 5
    with torch.no_grad():
        model[1].bias[dead] = -1e4  # ReLU output is always 0
    x, y = digits.train.tensors
    calib = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    xs = torch.cat([b[0] for b in calib])

    imp = EntropyImportance(model, calib)
    assert imp.name == "entropy"
    with torch.no_grad():
        hidden = torch.relu(model[1](xs.flatten(1)))
    assert (hidden[:, dead] == 0).all()
    h_hidden = torch.tensor([hand_entropy(hidden[:, j]) for j in range(16)])
    torch.testing.assert_close(imp.input_entropy["3"], h_hidden.float())

    group = group_named(find_groups(model, x[:4]), "1")
    scores = imp(group)
    assert scores.shape == (16,)
    assert scores[dead] == 0
    assert int(scores.argmin()) == dead
    assert (torch.cat([scores[:dead], scores[dead + 1 :]]) > 0).all()
    torch.testing.assert_close(scores, h_hidden.double(), rtol=1e-6, atol=1e-7)

    # weight level: |w| times the entropy of the weight's input
    w3 = model[3].weight.detach()
    assert (imp.elements("3.weight")[:, dead] == 0).all()
    torch.testing.assert_close(imp.elements("3.weight"), w3.abs() * h_hidden.float(), rtol=1e-5, atol=1e-7)
    pixels = xs.flatten(1)
    h_pixels = torch.tensor([hand_entropy(pixels[:, i]) for i in range(64)])
    constant = pixels.amax(0) == pixels.amin(0)
    assert constant.any()  # digits has blank border pixels
    assert (imp.elements("1.weight")[:, constant] == 0).all()
    torch.testing.assert_close(
        imp.elements("1.weight"), model[1].weight.detach().abs() * h_pixels.float(), rtol=1e-5, atol=1e-7
    )


def test_entropy_group_score_after_flatten_is_the_mean_over_the_channels_features(batches):
    model = conv_bn_net()
    model.train()
    imp = EntropyImportance(model, batches)
    model.eval()
    with torch.no_grad():
        features = model[:5](torch.cat([b[0] for b in batches]))  # what linear 5 receives (eval mode)
    assert features.shape[1] == 108
    h = torch.tensor([hand_entropy(features[:, i]) for i in range(108)], dtype=torch.float64)
    group = group_named(find_groups(model, batches[0][0][:2]), "3")
    expected = torch.stack([h[c * 36 : (c + 1) * 36].mean() for c in range(3)])
    torch.testing.assert_close(imp(group), expected, rtol=1e-6, atol=1e-7)


def test_entropy_elements_of_a_depthwise_conv_use_each_filters_own_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, groups=2))
    x = torch.randn(16, 2, 4, 4)
    x[:, 0] = 1.0  # channel 0 constant (entropy 0), channel 1 varied
    imp = EntropyImportance(model, [(x, torch.zeros(16, dtype=torch.long))])
    h1 = hand_entropy(x[:, 1])
    assert h1 > 0
    w = model[0].weight.detach()
    expected = torch.stack([w[0].abs() * 0.0, w[1].abs() * h1])
    torch.testing.assert_close(imp.elements("0.weight"), expected, rtol=1e-5, atol=1e-7)


# --- dispatch --------------------------------------------------------------------------------------


def test_make_importance_dispatches_every_key(batches):
    model = conv_bn_net()
    direct = {
        "magnitude": lambda: magnitude(model, "l2"),
        "taylor": lambda: taylor(model, batches),
        "snip": lambda: snip(model, batches),
        "entropy": lambda: EntropyImportance(model, batches),
        "random": lambda: random_scores(model, 7),
        "bn_scale": lambda: bn_scale(model),
    }
    names = {
        "magnitude": "magnitude-l2",
        "taylor": "taylor",
        "snip": "snip",
        "entropy": "entropy",
        "random": "random",
        "bn_scale": "bn_scale",
    }
    assert set(IMPORTANCE) == set(direct)
    for kind in IMPORTANCE:
        got = make_importance(kind, model, batches, norm="l2", seed=7)
        want = direct[kind]()
        assert isinstance(got, Importance)
        assert got.name == names[kind], kind
        assert set(got.scores) == set(want.scores), kind
        assert got.scores, kind
        for n in want.scores:
            torch.testing.assert_close(got.scores[n], want.scores[n], msg=f"{kind} {n}")
    assert isinstance(make_importance("entropy", model, batches), EntropyImportance)
    assert make_importance("magnitude", model, batches).name == "magnitude-l1"  # default norm
    assert not torch.equal(
        make_importance("random", model, batches, seed=1).scores["0.weight"],
        make_importance("random", model, batches, seed=2).scores["0.weight"],
    )
    with pytest.raises(KeyError):
        make_importance("nope", model, batches)


def test_the_config_names_exactly_the_registered_criteria():
    """One list of criteria: the recipe's `importance` choices are the registry's keys, and a
    criterion without data (magnitude, random, bn_scale) is the kind that needs none."""
    import typing

    from torchshrink.pruning.config import PruneOptions

    allowed = set(typing.get_args(PruneOptions.model_fields["importance"].annotation))
    assert allowed == set(IMPORTANCE)
    assert {k for k, c in IMPORTANCE.items() if not c.needs_data} == {"magnitude", "random", "bn_scale"}
