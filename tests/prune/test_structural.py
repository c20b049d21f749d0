"""Structured pruning: groups found by tracing, rebuilt models equal to their masked twins,
concat / depthwise / flatten / residual handling, targets, save and load."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from testkit import ZOO_INPUTS, randomise_bn
from torch import nn

from torchshrink import zoo
from torchshrink.measure import count_macs, count_params
from torchshrink.models import load_model, open_model, save_model
from torchshrink.pruning.graph import StructureError, find_groups
from torchshrink.pruning.structural import (
    mask_channels,
    plan_global,
    plan_layer,
    rebind,
    remove_channels,
    resized_shapes,
    search_plan,
)


def _twin_and_small(model, example, ratio=0.5, seed=0):
    groups = find_groups(model, example)
    gen = torch.Generator().manual_seed(seed)
    plan = plan_layer(groups, [torch.rand(g.size, generator=gen) for g in groups], ratio, 0.9)
    twin, small = copy.deepcopy(model), copy.deepcopy(model)
    mask_channels(twin, rebind(groups, model, twin), plan)
    remove_channels(small, rebind(groups, model, small), plan)
    return groups, twin, small


@pytest.mark.parametrize("name", sorted(ZOO_INPUTS))
def test_every_zoo_model_shrinks_and_equals_its_masked_twin(name):
    torch.manual_seed(0)
    model = randomise_bn(zoo.build(name))
    x = torch.randn(6, *ZOO_INPUTS[name])
    groups, twin, small = _twin_and_small(model, x[:2])
    assert groups
    with torch.no_grad():
        assert torch.allclose(twin(x), small(x), atol=1e-5)
    assert count_params(small)[0] < 0.75 * count_params(model)[0]
    assert count_macs(small, ZOO_INPUTS[name]) < count_macs(model, ZOO_INPUTS[name])
    assert small(x).shape == (6, 10)  # the classifier's outputs are never pruned


def test_lenet5_groups_and_flatten_mapping():
    groups = find_groups(zoo.build("lenet5"), torch.zeros(2, 1, 28, 28))
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"0", "3", "7"}  # conv1, conv2, fc1; fc2 (the output) is pinned
    fc1_in = next(m for m in by_name["3"].members if m.name == "7.weight")
    assert fc1_in.dim == 1 and fc1_in.index.shape == (50, 16)  # each conv2 channel feeds 4x4 features
    assert fc1_in.index[1].tolist() == list(range(16, 32))


def test_resnet_residual_adds_couple_channels():
    groups = find_groups(zoo.build("resnet"), torch.zeros(2, 1, 28, 28))
    names = [g.name for g in groups]
    assert "stem.0+layers.0.conv2" in names  # the identity shortcut ties stem and block output
    assert "layers.1.conv2+layers.1.shortcut.0" in names  # projection shortcut and block output


class InceptionLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.c = nn.Conv2d(14, 10, 3)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        y = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.head(self.c(y).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """A MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1, residual add."""

    def __init__(self, c: int = 8, t: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(c, c * t, 1, bias=False), nn.BatchNorm2d(c * t), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(c * t, c * t, 3, padding=1, groups=c * t, bias=False), nn.BatchNorm2d(c * t), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(c * t, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.project(self.dw(self.expand(x))))


def test_concatenation_is_cut_consistently():
    model = randomise_bn(InceptionLike())
    x = torch.randn(4, 3, 9, 9)
    groups, twin, small = _twin_and_small(model, x[:2], ratio=0.5)
    assert {g.name for g in groups} == {"a", "b", "c"}
    bn_members = [m for g in groups for m in g.members if m.name == "bn.weight"]
    assert len(bn_members) == 2  # the batch-norm after the concat serves both branches
    with torch.no_grad():
        assert torch.allclose(twin(x), small(x), atol=1e-5)
    assert small.bn.num_features == small.a.out_channels + small.b.out_channels == small.c.in_channels


def test_depthwise_conv_follows_its_input_channels():
    model = randomise_bn(InvertedResidual())
    x = torch.randn(4, 3, 8, 8)
    groups, twin, small = _twin_and_small(model, x[:2], ratio=0.5)
    expand_group = next(g for g in groups if g.name == "expand.0")
    assert {m.name for m in expand_group.members} >= {"dw.0.weight", "dw.1.weight", "project.0.weight"}
    with torch.no_grad():
        assert torch.allclose(twin(x), small(x), atol=1e-5)
    dw = small.dw[0]
    assert dw.groups == dw.in_channels == dw.out_channels == small.expand[0].out_channels == 16


class FixedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.view(-1, 64))  # a literal size: conv2's channels must not change


class DynamicView(FixedView):
    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.view(x.size(0), -1))


def test_reshape_with_a_literal_size_pins_the_channels():
    x = torch.zeros(2, 1, 8, 8)
    assert [g.name for g in find_groups(FixedView(), x)] == ["conv1"]
    assert sorted(g.name for g in find_groups(DynamicView(), x)) == ["conv1", "conv2"]


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on values: not traceable
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.gate = Gate()
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.gate(self.a(x)))))


def test_untraceable_submodule_is_kept_whole_and_the_rest_pruned(caplog):
    model = GatedNet()
    with caplog.at_level("WARNING"):
        groups = find_groups(model, torch.randn(2, 4))
    assert "module 'gate' (Gate) cannot be traced" in caplog.text
    assert [g.name for g in groups] == ["b"]  # 'a' feeds the opaque gate: pinned; 'b' -> 'c' is free
    x = torch.randn(5, 4)
    _, twin, small = _twin_and_small(model, x[:2])
    with torch.no_grad():
        assert torch.allclose(twin(x), small(x), atol=1e-6)


def test_untraceable_top_level_forward_is_an_error():
    with pytest.raises(StructureError, match=re.escape("the forward() of Gate itself cannot be traced")):
        find_groups(Gate(), torch.zeros(2, 4))


def test_ignored_layers_keep_their_channels():
    groups = find_groups(zoo.build("lenet5"), torch.zeros(2, 1, 28, 28), ignore=["3"])
    assert {g.name for g in groups} == {"0", "7"}


def test_transformer_mlp_block_prunes_the_hidden_neurons_only():
    class Block(nn.Module):
        def __init__(self, d: int = 16) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2, self.norm = (
                nn.Linear(d, 4 * d),
                nn.GELU(),
                nn.Linear(4 * d, d),
                nn.LayerNorm(d),
            )

        def forward(self, x):
            return self.norm(x + self.fc2(self.act(self.fc1(x))))

    model = Block().eval()
    x = torch.randn(3, 5, 16)
    groups, twin, small = _twin_and_small(model, x[:1])
    assert [g.name for g in groups] == ["fc1"]  # the residual stream is normalised by LayerNorm: pinned
    with torch.no_grad():
        assert torch.allclose(twin(x), small(x), atol=1e-5)
    assert small.fc1.out_features == small.fc2.in_features == 32


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_search_reaches_the_macs_target(scope):
    model = zoo.build("resnet")
    example = torch.zeros(2, 1, 28, 28)
    base = count_macs(model, (1, 28, 28))
    groups = find_groups(model, example)
    scores = [
        g_scores
        for g_scores in (torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in groups)
    ]
    plan = search_plan(
        model, example, groups, scores, scope=scope, max_ratio=0.9, reached=lambda size: size.macs <= base / 2
    )
    remove_channels(model, groups, plan)
    macs = count_macs(model, (1, 28, 28))
    assert base / 2.4 < macs <= base / 2  # reached, and not by pruning far more than asked


def test_pruned_model_saves_smaller_and_loads_back_exactly(tmp_path):
    loaded = open_model("resnet")
    model = randomise_bn(loaded.module)
    x = torch.randn(4, 1, 28, 28)
    original = copy.deepcopy(model)
    groups, _, _ = _twin_and_small(model, x[:2])
    plan = plan_layer(groups, [torch.rand(g.size) for g in groups], 0.5, 0.9)
    remove_channels(model, groups, plan)
    architecture = dict(loaded.architecture, resized=resized_shapes(model, original))
    save_model(tmp_path / "small.safetensors", model, architecture, (1, 28, 28))
    save_model(tmp_path / "full.safetensors", original, loaded.architecture, (1, 28, 28))
    assert (tmp_path / "small.safetensors").stat().st_size < 0.4 * (
        tmp_path / "full.safetensors"
    ).stat().st_size
    again = load_model(tmp_path / "small.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_group_macs_are_hand_counts_and_drive_cost_aware_ranking():
    groups = find_groups(zoo.build("lenet5"), torch.zeros(2, 1, 28, 28))
    macs = {g.name: g.macs for g in groups}
    assert macs == {"0": 24 * 24 * 25 + 8 * 8 * 25 * 50, "3": 8 * 8 * 20 * 25 + 16 * 500, "7": 800 + 10}
    names = [g.name for g in groups]
    # conv channels matter about equally; fc1 neurons range from nearly useless to important.
    scores = [
        torch.linspace(0.1, 1.9, g.size) if g.name == "7" else torch.linspace(0.9, 1.1, g.size)
        for g in groups
    ]
    plain = plan_global(groups, scores, 10, 0.9)
    aware = plan_global(groups, scores, 10, 0.9, cost_aware=True)
    assert names.index("0") not in plain  # by importance alone the weakest fc1 neurons go
    assert len(aware[names.index("0")]) == 10  # per MAC saved, conv1's channels are the cheapest to lose


def test_batchnorm_recalibration_matches_the_calibration_statistics():
    from torchshrink.pruning.structural import recalibrate_batchnorm

    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(8, 2, 4, 4) * 3 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        features = torch.cat([model[0](x) for x in batches])
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training  # settings restored
    assert not recalibrate_batchnorm(nn.Sequential(nn.Linear(2, 2)), batches)
