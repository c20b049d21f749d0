"""Random shifts move each sample within bounds; mixup blends inputs and labels with the same weights."""

from __future__ import annotations

import pytest
import torch

from torchshrink.augment import AugmentConfig, augment_batch, mixup, random_shift
from torchshrink.train import classification_loss


def test_each_image_moves_by_at_most_the_shift_and_keeps_its_content() -> None:
    x = torch.zeros(200, 2, 9, 9)
    x[:, 0, 4, 4], x[:, 1, 4, 4] = 1.0, 2.0  # a dot in the middle of each channel
    torch.manual_seed(0)
    y = random_shift(x, 2)
    assert y.shape == x.shape
    ones = (y[:, 0] == 1.0).nonzero()
    twos = (y[:, 1] == 2.0).nonzero()
    assert len(ones) == 200 and torch.equal(ones, twos)  # one dot per image, both channels moved together
    offsets = ones[:, 1:] - 4
    assert offsets.abs().max() == 2 and {tuple(o) for o in offsets.tolist()} == {
        (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
    }  # every offset in [-2, 2]^2 occurs
    assert torch.equal(y.sum((1, 2, 3)), torch.full((200,), 3.0))  # nothing lost away from the border


def test_border_content_falls_off_and_zeros_come_in() -> None:
    x = torch.ones(50, 1, 4, 4)
    torch.manual_seed(1)
    y = random_shift(x, 1)
    assert set(y.unique().tolist()) <= {0.0, 1.0} and (y == 0).any()


def test_one_dimensional_signals_and_determinism() -> None:
    x = torch.zeros(10, 1, 12)
    x[:, 0, 6] = 1.0
    torch.manual_seed(3)
    a = random_shift(x, 3)
    torch.manual_seed(3)
    b = random_shift(x, 3)
    assert torch.equal(a, b)
    assert ((a.argmax(-1).squeeze(1) - 6).abs() <= 3).all()
    labels = torch.arange(10)
    inputs, targets = augment_batch(x, labels, AugmentConfig(), 10)  # off by default
    assert torch.equal(inputs, x) and torch.equal(targets, labels)
    with pytest.raises(ValueError, match=r"\(N, C, L\) or \(N, C, H, W\)"):
        random_shift(torch.zeros(2, 5), 1)


def test_shifted_batches_have_row_major_strides() -> None:
    # one channel: a permuted size-1 axis keeps an odd stride through contiguous(), which crashed conv backward
    for shape, pixels in (((4, 1, 8, 8), 2), ((4, 1, 12), 3), ((4, 3, 8, 8), 1)):
        y = random_shift(torch.rand(shape), pixels)
        assert y.stride() == torch.empty(shape).stride()


def _partner(mixed: torch.Tensor, i: int) -> tuple[float, int | None]:
    """Sample i's own weight and its partner in a mixed batch of single-spike samples (spike i = sample i);
    ``None`` when it was blended with itself."""
    spikes = mixed[i].flatten()
    others = [j for j in spikes.nonzero().flatten().tolist() if j != i]
    assert len(others) <= 1
    return float(spikes[i]), (others[0] if others else None)


def test_mixup_blends_each_input_and_its_label_with_the_same_partner_and_weight() -> None:
    n, classes = 64, 4
    x = torch.eye(n).reshape(n, 1, 8, 8)  # sample i is a single bright pixel at position i
    labels = torch.arange(n) % classes
    torch.manual_seed(0)
    mixed, targets = augment_batch(x, labels, AugmentConfig(mixup=1.0), classes)
    assert mixed.shape == x.shape and targets.shape == (n, classes)
    assert torch.allclose(targets.sum(1), torch.ones(n))
    blends = 0
    for i in range(n):
        lam, j = _partner(mixed, i)
        expected = torch.zeros(classes)
        if j is None:  # mixed with itself
            expected[labels[i]] = 1.0
        else:  # blended with sample j: its pixel carries 1 - lam, its label too
            assert float(mixed[i].flatten()[j]) == pytest.approx(1 - lam, abs=1e-6)
            expected[labels[i]] += lam
            expected[labels[j]] += 1 - lam
            blends += 1
        assert torch.allclose(targets[i], expected, atol=1e-6)
    assert blends > n // 2


def test_mixup_weights_follow_the_beta_concentration_and_the_seed() -> None:
    n = 1000
    # one class per sample: target[i, i] is sample i's own weight
    x, labels = torch.rand(n, 3), torch.arange(n)

    def spread(concentration: float) -> float:
        torch.manual_seed(1)
        _, targets = mixup(x, labels, concentration, n)
        return float((targets.diagonal() - 0.5).abs().mean())

    assert spread(0.2) > 0.35  # weights near 0 or 1
    assert spread(1.0) == pytest.approx(0.25, abs=0.03)  # uniform: E|U - 1/2| = 1/4
    assert spread(50.0) < 0.06  # weights near 1/2
    torch.manual_seed(2)
    a = mixup(x, labels, 1.0, n)
    torch.manual_seed(2)
    b = mixup(x, labels, 1.0, n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_classification_loss_of_a_mixed_batch_is_the_blend_of_two_cross_entropies() -> None:
    n, classes = 12, 3
    x = torch.eye(n).reshape(n, 1, n)  # 1-D signals: sample i is a spike at position i
    labels = torch.arange(n) % classes
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n, classes))
    mixed, targets = augment_batch(x, labels, AugmentConfig(mixup=1.0), classes)
    with torch.no_grad():
        logits = model(mixed)
        by_hand = []
        for i in range(n):
            lam, j = _partner(mixed, i)
            ce = torch.nn.functional.cross_entropy(logits[i : i + 1], labels[[i]])
            if j is None:
                by_hand.append(ce)
            else:
                by_hand.append(
                    lam * ce + (1 - lam) * torch.nn.functional.cross_entropy(logits[i : i + 1], labels[[j]])
                )
        loss = classification_loss(model, (mixed, targets))["ce"]
    assert float(loss) == pytest.approx(float(torch.stack(by_hand).mean()), rel=1e-5)


def test_mixup_takes_label_distributions_and_refuses_what_it_cannot_blend() -> None:
    x = torch.rand(6, 1, 4, 4)
    soft = torch.softmax(torch.randn(6, 3), 1)
    _, targets = mixup(x, soft, 1.0, 3)
    assert torch.allclose(targets.sum(1), torch.ones(6)) and targets.dtype == torch.float32
    with pytest.raises(ValueError, match="floating point"):
        mixup(torch.ones(6, 1, 4, 4, dtype=torch.uint8), torch.zeros(6, dtype=torch.long), 1.0, 3)
    with pytest.raises(ValueError, match=r"float distributions \(N, 3\)"):
        mixup(x, torch.eye(3, dtype=torch.long)[[0, 1, 2, 0, 1, 2]], 1.0, 3)  # integer one-hot
    with pytest.raises(ValueError, match=r"shape \(6, 4\)"):
        mixup(x, torch.rand(6, 4), 1.0, 3)


def test_the_train_stage_learns_from_mixed_up_batches(tmp_path) -> None:
    from testkit import DIGITS_CNN, digits_recipe

    from torchshrink import run

    def train(augment: dict) -> tuple[float, float]:
        stage = {"train": {"epochs": 4, "lr": 0.003, "augment": augment}}
        report = run(digits_recipe(stage, model=DIGITS_CNN), tmp_path / str(len(augment)))
        return report.final["accuracy"], report.stages[0]["details"]["final_loss"]["ce"]

    plain_accuracy, plain_loss = train({})
    mixed_accuracy, mixed_loss = train({"mixup": 1.0})
    assert mixed_accuracy > 0.85  # it learns the digits from blended inputs and labels
    assert mixed_loss > plain_loss + 0.1  # blended targets cannot be fitted to zero loss: they were used
