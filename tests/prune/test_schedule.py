"""Pruning schedules: fraction of the final target reached after each step, and sparsity_at."""

from __future__ import annotations

import pytest

from torchshrink.pruning.schedule import SCHEDULES, agp, linear, oneshot, sparsity_at


def test_registry_holds_the_three_schedules():
    assert {"oneshot": oneshot, "linear": linear, "agp": agp} == SCHEDULES


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_oneshot_reaches_the_target_at_the_first_step(steps):
    assert oneshot(1, steps) == 1.0
    assert sparsity_at("oneshot", 1, steps, final=0.8) == pytest.approx(0.8)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_linear_is_t_over_n(steps):
    for t in range(1, steps + 1):
        assert linear(t, steps) == pytest.approx(t / steps)
    # equal increments
    diffs = [linear(t, steps) - linear(t - 1, steps) for t in range(1, steps + 1)]
    assert diffs == pytest.approx([1 / steps] * steps)


def test_agp_values_by_hand():
    assert agp(1, 3) == pytest.approx(1 - (2 / 3) ** 3)  # 19/27
    assert agp(1, 3) == pytest.approx(19 / 27)
    assert agp(2, 3) == pytest.approx(1 - (1 / 3) ** 3)  # 26/27
    assert agp(1, 2) == pytest.approx(7 / 8)
    for n in (1, 2, 3, 5, 10):
        assert agp(n, n) == pytest.approx(1.0)
    assert agp(0, 4) == pytest.approx(0.0)


@pytest.mark.parametrize("steps", [3, 5, 10])
def test_agp_is_increasing_and_concave(steps):
    values = [agp(t, steps) for t in range(0, steps + 1)]
    increments = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert all(inc > 0 for inc in increments)
    # large steps early, small steps late: every increment strictly smaller than the previous one
    assert all(later < earlier for earlier, later in zip(increments, increments[1:], strict=False))
    # front-loaded: it is ahead of the linear schedule at every intermediate step
    assert all(agp(t, steps) > linear(t, steps) for t in range(1, steps))


@pytest.mark.parametrize("kind", ["oneshot", "linear", "agp"])
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_sparsity_at_ends_at_the_final_target(kind, steps):
    assert sparsity_at(kind, steps, steps, final=0.9) == pytest.approx(0.9)
    assert sparsity_at(kind, steps, steps, final=0.9, initial=0.2) == pytest.approx(0.9)


@pytest.mark.parametrize("steps", [2, 4, 9])
def test_sparsity_at_agp_matches_zhu_gupta(steps):
    s_i, s_f = 0.2, 0.9
    for t in range(0, steps + 1):
        expected = s_f + (s_i - s_f) * (1 - t / steps) ** 3  # Zhu & Gupta 2017, t0 = 0, dt = 1
        assert sparsity_at("agp", t, steps, final=s_f, initial=s_i) == pytest.approx(expected)
    assert sparsity_at("agp", 0, steps, final=s_f, initial=s_i) == pytest.approx(s_i)


def test_sparsity_at_linear_interpolates_between_initial_and_final():
    assert sparsity_at("linear", 1, 4, final=0.9, initial=0.1) == pytest.approx(0.1 + 0.8 * 0.25)
    assert sparsity_at("linear", 3, 4, final=0.5) == pytest.approx(0.375)


def test_sparsity_at_unknown_kind_raises():
    with pytest.raises(KeyError):
        sparsity_at("cosine", 1, 2, final=0.5)
