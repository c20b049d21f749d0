"""Weight sharing: 1-D k-means, the shared-weight parametrization, centroid gradients, plain weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchshrink.encoding.kmeans import (
    codebook_of,
    kmeans_1d,
    plain_state_dict,
    share_weights,
    shared_layers,
)
from torchshrink.zoo import build


def test_kmeans_finds_well_separated_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.2, 3.0])
    values = centres[torch.randint(3, (3000,), generator=gen)] + 0.01 * torch.randn(3000, generator=gen)
    for init in ("linear", "density", "random"):
        centroids, assign = kmeans_1d(values, 3, init=init)
        assert torch.allclose(centroids.float(), centres, atol=0.01), init
        # every value sits with its nearest centroid (the Lloyd fixed point)
        nearest = (values[:, None].double() - centroids[None]).abs().argmin(1)
        assert torch.equal(assign, nearest)


def test_kmeans_hand_computed() -> None:
    # linear init over [0, 10] with k=2 -> centroids 0 and 10; midpoint 5 splits {0,1,2} from {9,10}
    centroids, assign = kmeans_1d(torch.tensor([0.0, 1.0, 2.0, 9.0, 10.0]), 2)
    assert centroids.tolist() == [1.0, 9.5]
    assert assign.tolist() == [0, 0, 0, 1, 1]


def test_kmeans_keeps_empty_centroids_and_handles_few_values() -> None:
    centroids, assign = kmeans_1d(torch.tensor([1.0, 1.0, 5.0]), 8)
    assert len(centroids) == 8
    assert centroids[assign].tolist() == [1.0, 1.0, 5.0]  # exact when values are fewer than centroids


def _pruned_lenet() -> nn.Module:
    torch.manual_seed(0)
    model = build("lenet300")
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.8)  # 80% pruned
    return model


def test_share_weights_uses_2_to_the_b_values_and_keeps_zeros() -> None:
    model = _pruned_lenet()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    shared = share_weights(model, {"1": 4, "3": 3, "5": 5})
    assert set(shared) == {"1", "3", "5"} == set(shared_layers(model))
    for name, bits in (("1", 4), ("3", 3), ("5", 5)):
        w = model[int(name)].weight.detach()
        assert torch.equal(w == 0, before[name] == 0)  # pruned stay pruned, kept stay kept
        assert len(torch.unique(w[w != 0])) <= 2**bits
        assert shared[name].bits == bits
        # sharing is a reasonable approximation: error well below the weights' spread
        err = (w - before[name])[before[name] != 0].abs().max()
        assert err < 0.25 * before[name].abs().max()


def test_centroid_gradient_is_the_sum_of_the_shared_weights_gradients() -> None:
    model = _pruned_lenet()
    share_weights(model, {"5": 2})
    x = torch.randn(8, 1, 28, 28)
    model(x).square().sum().backward()
    book = codebook_of(model, "5")
    layer = model[5]
    # the dense weight's gradient, by hand: d/dW of the same loss through a plain copy
    plain = build("lenet300")
    plain.load_state_dict(plain_state_dict(model))
    plain(x).square().sum().backward()
    grad_w = plain[5].weight.grad
    p = layer.parametrizations.weight[0]
    expected = torch.zeros(4).index_add_(0, p.indices[p.mask].long(), grad_w[p.mask])
    assert torch.allclose(book.grad, expected, rtol=1e-4, atol=1e-6)
    # only the codebook is a parameter of the shared layer
    assert {n for n, _ in layer.named_parameters()} == {"bias", "parametrizations.weight.original"}


def test_training_moves_centroids_only_and_pruned_weights_stay_zero() -> None:
    model = _pruned_lenet()
    share_weights(model, {"1": 3})
    zeros = model[1].weight.detach() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 1, 28, 28)).square().mean().backward()
        opt.step()
    w = model[1].weight.detach()
    assert torch.equal(w == 0, zeros)
    assert len(torch.unique(w[~zeros])) <= 8


def test_plain_state_dict_loads_into_the_plain_model_with_identical_outputs() -> None:
    model = _pruned_lenet()
    share_weights(model, {"1": 4, "3": 4})
    x = torch.rand(2, 1, 28, 28)
    plain_weights = plain_state_dict(model)
    assert shared_layers(model)  # the shared model itself is left as it was
    plain = build("lenet300")
    plain.load_state_dict(plain_weights)  # strict: exactly the plain model's keys
    for i in (1, 3):
        p = model[i].parametrizations.weight
        expected = torch.where(p[0].mask, p.original[p[0].indices.long()], torch.zeros(()))
        assert torch.equal(plain[i].weight, expected)
    assert torch.equal(plain(x), model(x))


def test_share_weights_rejects_bad_requests() -> None:
    model = _pruned_lenet()
    with pytest.raises(ValueError, match="1 to 8 bits"):
        share_weights(model, {"1": 9})
    with pytest.raises(ValueError, match="'nope' has no weight"):
        share_weights(model, {"nope": 4})
    share_weights(model, {"1": 4})
    with pytest.raises(ValueError, match="already parametrized"):
        share_weights(model, {"1": 4})
