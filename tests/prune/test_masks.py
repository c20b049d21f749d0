"""Unstructured masks: which weights are prunable, global / per-layer budgets, min_density,
already-pruned positions, applying and recovering masks, MaskKeeper through real training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink import zoo
from torchshrink.pruning.masks import (
    MaskKeeper,
    apply_masks,
    compute_masks,
    density,
    masks_from_zeros,
    prunable_weights,
)
from torchshrink.train import DatasetBatches, TrainConfig, fit


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv1d(2, 2, 1))
        self.ab = nn.Linear(3, 3)
        self.c3 = nn.Conv3d(1, 1, 1)
        self.head = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(3)


def distinct_scores(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores that are a random permutation of 0..N-1 spread over the tensors (no ties)."""
    total = sum(math.prod(s) for s in shapes.values())
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).float()
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = perm[offset : offset + n].reshape(shape)
        offset += n
    return out


SHAPES = {"conv": (4, 3, 3, 3), "fc": (10, 12), "out": (7,)}
N_TOTAL = sum(math.prod(s) for s in SHAPES.values())  # 108 + 120 + 7 = 235


# --- prunable_weights ------------------------------------------------------------------------------


def test_prunable_weights_are_conv_and_linear_weights_only():
    net = Net()
    params = prunable_weights(net)
    assert set(params) == {"a.0.weight", "a.2.weight", "ab.weight", "c3.weight", "head.weight"}
    # the very same Parameter objects (so in-place masking reaches the model)
    assert params["a.0.weight"] is net.a[0].weight
    assert params["head.weight"] is net.head.weight
    assert not any(name.endswith(".bias") for name in params)
    assert "a.1.weight" not in params  # batch norm
    assert "norm.weight" not in params  # layer norm


def test_prunable_weights_honours_ignore_including_nested_names():
    net = Net()
    assert set(prunable_weights(net, ignore=["a"])) == {"ab.weight", "c3.weight", "head.weight"}
    assert set(prunable_weights(net, ignore=["a.0"])) == {
        "a.2.weight",
        "ab.weight",
        "c3.weight",
        "head.weight",
    }
    assert set(prunable_weights(net, ignore=("head", "c3"))) == {"a.0.weight", "a.2.weight", "ab.weight"}
    # "a" is a name prefix of "ab" but not its parent module: "ab" stays prunable
    assert "ab.weight" in prunable_weights(net, ignore=["a"])
    # ignoring a name that does not exist changes nothing
    assert set(prunable_weights(net, ignore=["zzz"])) == set(prunable_weights(net))


def test_prunable_weights_of_a_bare_layer():
    layer = nn.Linear(4, 2)
    params = prunable_weights(layer)
    assert list(params) == ["weight"]
    assert params["weight"] is layer.weight


# --- compute_masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_global_masks_remove_exactly_the_lowest_fraction(sparsity):
    scores = distinct_scores(SHAPES)
    masks = compute_masks(scores, sparsity, scope="global")
    k = round(sparsity * N_TOTAL)
    assert set(masks) == set(scores)
    assert all(masks[n].dtype == torch.bool and masks[n].shape == scores[n].shape for n in scores)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == k
    # scores are a permutation of 0..N-1: the k lowest are exactly those below k
    for n, s in scores.items():
        assert torch.equal(masks[n], s >= k)
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    gone = torch.cat([scores[n][~masks[n]] for n in scores])
    if len(kept) and len(gone):
        assert kept.min() > gone.max()


def test_global_masks_spread_unevenly_over_tensors():
    # one tensor with all the small scores: a global budget takes it all, a layer budget does not
    scores = {"small": torch.arange(1.0, 11.0), "large": torch.arange(100.0, 110.0)}
    masks = compute_masks(scores, 0.5, scope="global")
    assert not masks["small"].any()
    assert masks["large"].all()


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
def test_layer_scope_prunes_each_tensor_to_the_sparsity(sparsity):
    scores = distinct_scores(SHAPES, seed=1)
    masks = compute_masks(scores, sparsity, scope="layer")
    for n, s in scores.items():
        k = round(sparsity * s.numel())
        assert int((~masks[n]).sum()) == k
        # exactly the k lowest of this tensor
        lowest = torch.argsort(s.reshape(-1))[:k]
        expected = torch.ones(s.numel(), dtype=torch.bool)
        expected[lowest] = False
        assert torch.equal(masks[n], expected.reshape(s.shape))


def test_min_density_keeps_the_best_weights_of_a_tensor_with_tiny_scores():
    gen = torch.Generator().manual_seed(0)
    scores = {"tiny": torch.rand(50, generator=gen) * 1e-6, "big": 1.0 + torch.rand(50, generator=gen)}
    without = compute_masks(scores, 0.5, scope="global")
    assert int(without["tiny"].sum()) == 0  # the whole tensor would go
    masks = compute_masks(scores, 0.5, scope="global", min_density=0.1)
    need = math.ceil(0.1 * 50)
    assert int(masks["tiny"].sum()) == need
    top = torch.topk(scores["tiny"], need).indices
    assert masks["tiny"][top].all()
    assert torch.equal(masks["big"], without["big"])  # untouched
    assert masks["big"].all()


def test_min_density_does_nothing_when_already_satisfied():
    scores = distinct_scores(SHAPES, seed=2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            compute_masks(scores, 0.3, scope="layer").values(),
            compute_masks(scores, 0.3, scope="layer", min_density=0.5).values(),
            strict=True,
        )
    )


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_already_pruned_positions_stay_pruned_even_with_high_scores(scope):
    scores = {"w": torch.arange(20.0)}  # 0..19
    already = {"w": torch.ones(20, dtype=torch.bool)}
    already["w"][[17, 18, 19]] = False  # previously pruned, now with the highest scores
    masks = compute_masks(scores, 0.25, scope=scope, already_pruned=already)  # k = 5
    assert not masks["w"][[17, 18, 19]].any()
    # the budget counts them: only the 2 lowest of the rest go in addition
    expected = torch.ones(20, dtype=torch.bool)
    expected[[0, 1, 17, 18, 19]] = False
    assert torch.equal(masks["w"], expected)


def test_already_pruned_exceeding_the_budget_keeps_everything_else():
    scores = {"w": torch.arange(10.0)}
    already = {"w": torch.tensor([True] * 5 + [False] * 5)}
    masks = compute_masks(scores, 0.2, already_pruned=already)  # budget 2 < 5 already pruned
    assert torch.equal(masks["w"], already["w"])


def test_compute_masks_does_not_modify_the_scores():
    scores = distinct_scores(SHAPES)
    before = {n: s.clone() for n, s in scores.items()}
    already = {n: torch.rand(s.shape) > 0.5 for n, s in scores.items()}
    compute_masks(scores, 0.5, already_pruned=already)
    assert all(torch.equal(scores[n], before[n]) for n in scores)


def test_global_masks_with_tied_scores_still_remove_only_the_budget():
    scores = {"zeros": torch.zeros(10), "pos": torch.arange(1.0, 11.0)}
    masks = compute_masks(scores, 0.3, scope="global")  # budget round(0.3 * 20) = 6
    assert sum(int((~m).sum()) for m in masks.values()) == 6


# --- apply / recover / keep ------------------------------------------------------------------------


def test_apply_masks_zeros_in_place_and_masks_from_zeros_recovers_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(12, 5))
    params = prunable_weights(model)
    originals = {n: p.detach().clone() for n, p in params.items()}
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    masks = compute_masks({n: p.detach().abs() for n, p in params.items()}, 0.6)
    apply_masks(params, masks)
    for n, p in params.items():
        assert p.data_ptr() == ptrs[n]  # in place
        assert p is dict(model.named_parameters())[n]
        assert (p[~masks[n]] == 0).all()
        assert torch.equal(p[masks[n]], originals[n][masks[n]])
    recovered = masks_from_zeros(params)
    assert set(recovered) == set(masks)
    assert all(torch.equal(recovered[n], masks[n]) for n in masks)
    # the biases were not touched
    assert (model[0].bias != 0).all() and (model[2].bias != 0).all()


def test_density_counts_nonzero_fraction():
    params = {
        "a": nn.Parameter(torch.tensor([0.0, 1.0, 2.0, 0.0])),
        "b": nn.Parameter(torch.tensor([[0.0, 0.0], [3.0, 0.0]])),
    }
    assert density(params) == pytest.approx(3 / 8)
    assert density({"a": params["a"]}) == pytest.approx(0.5)
    assert density({}) == 0.0


def _pruned_lenet(sparsity: float):
    torch.manual_seed(0)
    model = zoo.build("lenet300", in_features=64)
    params = prunable_weights(model)
    # per-layer budget: a global magnitude budget at initialisation would take all of layer "3"
    # (its weights are the smallest) and leave nothing to train but the head
    masks = compute_masks({n: p.detach().abs() for n, p in params.items()}, sparsity, scope="layer")
    apply_masks(params, masks)
    return model, params, masks


def test_mask_keeper_keeps_zeros_through_training_and_without_it_they_come_back(digits):
    model, params, masks = _pruned_lenet(0.8)
    total = sum(p.numel() for p in params.values())
    kept_count = sum(p.numel() - round(0.8 * p.numel()) for p in params.values())
    assert sum(int(m.sum()) for m in masks.values()) == kept_count
    assert density(params) == pytest.approx(kept_count / total)
    before = {n: p.detach().clone() for n, p in params.items()}

    names = list(params)
    keeper = MaskKeeper(model, names)
    assert all(torch.equal(keeper.masks[n], masks[n]) for n in names)
    config = TrainConfig(epochs=1, progress=False)
    fit(model, DatasetBatches(digits.train, 64), config=config, after_step=keeper)

    changed = 0
    for n, p in params.items():
        assert (p.detach()[~masks[n]] == 0).all(), n  # pruned positions still exactly zero
        changed += int((p.detach()[masks[n]] != before[n][masks[n]]).sum())
    assert changed > 0.5 * kept_count  # the surviving weights did train
    assert density(params) == pytest.approx(kept_count / total)

    # the same pruned model trained without the keeper grows its zeros back
    model2, params2, masks2 = _pruned_lenet(0.8)
    assert all(torch.equal(masks2[n], masks[n]) for n in masks)
    subset = TensorDataset(*(t[:512] for t in digits.train.tensors))  # 8 steps are plenty
    fit(model2, DatasetBatches(subset, 64), config=config)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params2.values())
    assert nonzero > kept_count
    assert density(params2) > kept_count / total
