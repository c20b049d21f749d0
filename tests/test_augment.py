"""Random shifts: each sample moves by an integer offset within bounds, deterministically per seed."""

from __future__ import annotations

import pytest
import torch

from torchshrink.augment import AugmentConfig, augment_batch, random_shift


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
    assert torch.equal(augment_batch(x, AugmentConfig()), x)  # off by default
    with pytest.raises(ValueError, match=r"\(N, C, L\) or \(N, C, H, W\)"):
        random_shift(torch.zeros(2, 5), 1)


def test_shifted_batches_have_row_major_strides() -> None:
    # one channel: a permuted size-1 axis keeps an odd stride through contiguous(), which crashed conv backward
    for shape, pixels in (((4, 1, 8, 8), 2), ((4, 1, 12), 3), ((4, 3, 8, 8), 1)):
        y = random_shift(torch.rand(shape), pixels)
        assert y.stride() == torch.empty(shape).stride()
