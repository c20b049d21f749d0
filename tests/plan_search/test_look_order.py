"""The look's order: a seeded random sample first, then the plans a fitted cost model predicts
cheapest."""

from __future__ import annotations

import itertools
import random

import pytest

from torchshrink.plan_search import stage as search_module
from torchshrink.plan_search.look_order import EXPLORE, MARGIN, CostModel, at_least_as_hard, next_to_look
from torchshrink.plan_search.space import Plan
from torchshrink.plan_search.stage import SearchConfig


def _size(plan: Plan) -> float:
    """A packed file's size: the weights kept, times the bits each, times what structured pruning leaves."""
    bits = plan.encode_bits or plan.bits or 32
    return 1e5 / plan.macs_reduction * (1 - plan.sparsity) * bits / 32


SPACE = [
    Plan(macs_reduction=m, sparsity=s, encode_bits=e)
    for m, s, e in itertools.product((1.0, 1.5, 2.0, 3.0), (0.0, 0.5, 0.8, 0.9), (None, 2, 4, 6))
]


def test_the_cost_model_predicts_unseen_plans_of_a_multiplicative_cost_within_a_percent() -> None:
    seen = random.Random(0).sample(SPACE, 20)
    model = CostModel([(plan, _size(plan)) for plan in seen])
    for plan in SPACE:
        if plan not in seen:
            assert model.predict(plan) == pytest.approx(_size(plan), rel=0.01)


def test_the_cost_model_leaves_out_costs_it_cannot_take_the_log_of() -> None:
    seen = random.Random(0).sample(SPACE, 20)
    clean = CostModel([(plan, _size(plan)) for plan in seen])
    spoiled = CostModel([(plan, _size(plan)) for plan in seen] + [(SPACE[0], 0.0), (SPACE[1], float("nan"))])
    assert spoiled.predict(SPACE[2]) == pytest.approx(clean.predict(SPACE[2]))
    with pytest.raises(ValueError, match="finite, positive cost"):
        CostModel([(SPACE[0], float("inf"))])


def test_values_no_measured_plan_had_are_predicted_from_the_kept_shares() -> None:
    plans_ = [Plan(macs_reduction=r) for r in (1.0, 1.5, 2.0, 3.0)]
    model = CostModel([(plan, 1000 / plan.macs_reduction) for plan in plans_])
    assert model.predict(Plan(macs_reduction=4.0)) == pytest.approx(250, rel=0.05)


def test_a_plan_is_as_hard_as_another_when_it_keeps_no_more_of_anything_and_recovers_alike() -> None:
    base = Plan(macs_reduction=2.0, sparsity=0.5, encode_bits=5)
    assert at_least_as_hard(Plan(macs_reduction=3.0, sparsity=0.5, encode_bits=4), base)
    assert at_least_as_hard(base, base)
    assert not at_least_as_hard(Plan(macs_reduction=3.0, sparsity=0.0, encode_bits=4), base)  # more weights
    assert not at_least_as_hard(Plan(macs_reduction=3.0, sparsity=0.5, encode_bits=5, distill=True), base)


def test_once_a_plan_passed_the_look_stops_at_plans_predicted_well_above_it() -> None:
    measured = [(plan, _size(plan)) for plan in SPACE[:20]]
    waiting = sorted(SPACE[20:], key=_size)
    cheapest = _size(waiting[0])
    assert next_to_look(waiting, measured, best=cheapest) == waiting[0]
    assert next_to_look(waiting, measured, best=0.9 * cheapest / MARGIN) is None


def test_the_first_looks_follow_the_seeded_order_then_the_predicted_cheapest() -> None:
    order = random.Random(1).sample(SPACE, len(SPACE))
    measured = [(plan, _size(plan)) for plan in order[: EXPLORE - 1]]
    assert next_to_look(order[EXPLORE - 1 :], measured) == order[EXPLORE - 1]  # still exploring
    measured = [(plan, _size(plan)) for plan in order[:20]]
    waiting = order[20:]
    assert _size(next_to_look(waiting, measured)) == pytest.approx(min(map(_size, waiting)))


def test_a_look_the_budget_cuts_short_sees_the_cheapest_plans_and_an_even_sample(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(search_module.time, "monotonic", lambda: now[0] * 60)
    looked: list[Plan] = []

    class Searcher:
        def evaluate(self, plan: Plan, level: str) -> search_module.Candidate:
            now[0] += 1.0
            looked.append(plan)
            return search_module.Candidate(plan, level, 0.5, 1.0, int(_size(plan)), 100, 1.0)

    cfg = SearchConfig(objective="size")
    # 40% of 50 minutes holds 20 of the 64 looks
    run_ = search_module._Search(
        SPACE, Searcher(), search_module._Clock(50, cfg), {"look": [], "short": [], "full": []}, 0.4, cfg, 0
    )
    order = random.Random(0).sample(SPACE, len(SPACE))
    assert not search_module._look(run_, order, None)
    assert len(looked) == 20
    cheap, even = looked[EXPLORE::2], looked[EXPLORE + 1 :: 2]  # after the random 8, in turn
    # the model's picks are (nearly all) among the cheapest of the plans the random sample left
    threshold = sorted(_size(p) for p in SPACE if p not in looked[:EXPLORE])[len(cheap) - 1]
    assert sum(_size(p) <= threshold for p in cheap) >= len(cheap) - 1
    assert sum(_size(p) <= threshold for p in order[EXPLORE : EXPLORE + len(cheap)]) <= len(cheap) // 2
    # the other turns keep the seeded random order: half the look stays an even sample
    assert even == [p for p in order if p not in cheap and p not in looked[:EXPLORE]][: len(even)]
