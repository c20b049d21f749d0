"""Accuracy-aware search: the plans a space holds and the stages that build them, Pareto fronts, and
the ``search`` stage end to end on the digits: the chosen plan meets the budget on the held-out
split, the front is non-dominated, a resumed search reuses what it evaluated, the time budget ends
it, clear errors for spaces and budgets that cannot work."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
from pydantic import ValidationError
from testkit import DIGITS_CNN, digits_recipe

import torchshrink.plan_search.stage as search_module
from torchshrink import run
from torchshrink.errors import RecipeError, TrainingError
from torchshrink.models import open_model
from torchshrink.plan_search import look_order
from torchshrink.plan_search.front import pareto_front
from torchshrink.plan_search.holdout import held_out_split, seen_in_training
from torchshrink.plan_search.space import Plan, SearchSpace, plans
from torchshrink.plan_search.stage import SearchConfig


def test_plans_cover_the_space_without_contradictions_or_duplicates() -> None:
    space = SearchSpace(
        macs_reduction=[1, 2], sparsity=[0, 0.5], bits=[None, 8], encode_bits=[None, 5], distill=[False, True]
    )
    found = plans(space)
    keys = [p.key for p in found]
    assert len(keys) == len(set(keys))
    assert not any(p.bits is not None and p.encode_bits is not None for p in found)  # ONNX int8 is not packed
    assert not any(p.distill and not p.pruned for p in found)  # nothing to recover: the plain plan
    # 2 x 2 pruning choices; distill doubles the three pruned ones; x 3 (float, w8, enc5)
    assert len(found) == (1 + 3 * 2) * 3
    assert "macs2-sp0.5-kd-w8" in keys and "float" in keys


def test_a_plan_builds_its_stages_in_the_pipeline_order() -> None:
    plan = Plan(macs_reduction=2.0, sparsity=0.5, bits=8, distill=True)
    assert plan.stages(epochs=3, lr=1e-3) == [
        {"prune": {"granularity": "structured", "macs_reduction": 2.0}},
        {"prune": {"granularity": "unstructured", "sparsity": 0.5}},
        {"distill": {"student": "current", "epochs": 3, "lr": 1e-3}},
        {"quantize": {"mode": "static", "bits": 8, "activation_bits": 8}},
    ]
    # the first look: built without recovery
    assert [next(iter(s)) for s in plan.stages(epochs=0)] == ["prune", "prune", "quantize"]
    assert Plan(encode_bits=5).stages(epochs=2) == [{"encode": {"bits": 5, "finetune_epochs": 2}}]
    assert Plan(encode_bits=5).trains and not Plan(bits=8).trains  # packed centroids are fine-tuned


def test_quantization_kinds_are_plans_of_their_own_and_share_the_look_where_they_can() -> None:
    found = {
        p.key: p
        for p in plans(
            SearchSpace(macs_reduction=[1], bits=[None, 8], quantize=["static", "qat", "mixed"]), 0.7
        )
    }
    assert set(found) == {"float", "w8", "w8-qat", "w8-mix0.7"}  # a float plan has no quantization kind
    qat, mixed = found["w8-qat"], found["w8-mix0.7"]
    assert qat.trains and not found["w8"].trains and not mixed.trains  # QAT is trained; mixed is measured
    assert qat.stages(epochs=2, lr=1e-3) == [
        {"quantize": {"mode": "qat", "bits": 8, "activation_bits": 8, "epochs": 2, "lr": 1e-3}}
    ]
    pruned_qat = Plan(macs_reduction=2.0, bits=8, quantize="qat")
    assert [next(iter(s)) for s in pruned_qat.stages(epochs=2)] == [
        "prune",
        "quantize",
    ]  # QAT is the recovery
    assert qat.untrained() == found["w8"] and qat.stages(epochs=0) == found["w8"].stages(epochs=0)
    assert mixed.untrained() == mixed  # the look builds the mixed plan itself
    assert mixed.stages(epochs=0) == [
        {
            "quantize": {
                "mode": "static",
                "bits": 8,
                "activation_bits": 8,
                "mixed": {"max_drop": 0.7, "candidates": [8]},
            }
        }
    ]


def test_the_short_round_leaves_time_for_the_full_fine_tunes() -> None:
    cfg = SearchConfig(budget_minutes=10, epochs=5, short_epochs=1, finalists=3)
    clock = search_module._Clock(cfg.budget_minutes, cfg)
    results = {"look": [], "short": [], "full": []}
    assert clock.short_share(results) == 1.0  # nothing to go by yet
    results["short"] = [
        search_module.Candidate(Plan(macs_reduction=2.0), "short", 0.9, 1.0, 100, 10, minutes)
        for minutes in (0.05, 0.1)
    ]
    # 3 finalists x 5 epochs x 0.1 minutes per epoch = 1.5 of 10 minutes kept for the full round
    assert clock.short_share(results) == pytest.approx(0.85)
    assert clock.at(0.85) == pytest.approx(clock.started + 0.85 * 600)
    results["short"][1].minutes = 1.0  # 15 minutes of full fine-tunes cannot be kept: half the budget is
    assert clock.short_share(results) == 0.5
    # a later pass shares out what is left: at half the budget, 1.5 minutes are 30% of the 5 left
    results["short"][1].minutes = 0.1
    clock.pass_started = clock.started + 300
    assert clock.short_share(results) == pytest.approx(0.7)
    assert clock.at(0.7) == pytest.approx(clock.started + 300 + 0.7 * 300)


def test_a_plan_that_fails_the_full_fine_tune_gives_the_front_back_to_the_plans_it_hid() -> None:
    # accuracy after the short and the full fine-tune; B is dominated by A after the short one
    table = {"macs4": (0.96, 0.93), "macs3": (0.955, 0.96), "macs2": (0.97, 0.97)}
    plans_ = [Plan(macs_reduction=float(k[4:])) for k in table]

    class Searcher:
        full: list[str] = []

        def evaluate(self, plan: Plan, level: str) -> search_module.Candidate:
            short, full = table[plan.key]
            if level == "full":
                self.full.append(plan.key)
            accuracy = {"look": 0.5, "short": short, "full": full}[level]
            macs = int(1000 / plan.macs_reduction)
            return search_module.Candidate(plan, level, accuracy, 1.0, 100, macs, 0.0)

        def forget(self, plan: Plan, level: str) -> None:
            pass  # nothing is built here

    cfg = SearchConfig(objective="macs", max_drop=1.0, slack=1.0)
    searcher = Searcher()
    run_ = search_module._Search(
        plans_, searcher, search_module._Clock(10, cfg), {"look": [], "short": [], "full": []}, 0.95, cfg, 0
    )
    chosen, stopped = search_module._rounds(run_)
    assert searcher.full == ["macs4", "macs3"]  # A failed; B, which only A dominated, is next (not C)
    assert chosen.plan.key == "macs3" and chosen.level == "full" and stopped is None


class _Timed:
    """A searcher whose evaluations move a fake clock on (``minutes`` per level) and are logged; a
    plan's MACs are 1000 / its reduction, and ``passes(plan)`` says whether it keeps the accuracy
    once trained."""

    def __init__(self, monkeypatch, minutes: dict[str, float], passes) -> None:
        self.now = 0.0
        monkeypatch.setattr(search_module.time, "monotonic", lambda: self.now * 60)
        self.minutes, self.passes = minutes, passes
        self.events: list[tuple[str, str]] = []
        self.kept: set[tuple[str, str]] = set()  # full fine-tunes held in memory

    def evaluate(self, plan: Plan, level: str) -> search_module.Candidate:
        self.now += self.minutes[level]
        self.events.append((plan.key, level))
        if level == "full":
            self.kept.add((plan.key, level))
        accuracy = {"look": 0.5, "short": 0.97, "full": 0.97 if self.passes(plan) else 0.9}[level]
        macs = int(1000 / plan.macs_reduction)
        return search_module.Candidate(plan, level, accuracy, 1.0, 100, macs, self.minutes[level])

    def forget(self, plan: Plan, level: str) -> None:
        self.kept.discard((plan.key, level))

    def search(self, every: list[Plan], cfg: SearchConfig, budget: float, seed: int = 0):
        results = {"look": [], "short": [], "full": []}
        run_ = search_module._Search(every, self, search_module._Clock(budget, cfg), results, 0.96, cfg, seed)
        return search_module._rounds(run_), results


def test_time_the_first_pass_leaves_goes_to_more_passes_over_the_plans_not_yet_seen(monkeypatch) -> None:
    # a look takes 3 minutes, a short fine-tune 0.5, a full one 1; of 40 minutes the first look may take 16,
    # so it sees 5 of the 8 plans, and the first pass ends long before the budget (as B8's ResNet did)
    searcher = _Timed(monkeypatch, {"look": 3.0, "short": 0.5, "full": 1.0}, lambda p: p.macs_reduction <= 6)
    cfg = SearchConfig(objective="macs", max_drop=1.0, epochs=2, short_epochs=1, finalists=2)
    every = [Plan(macs_reduction=r) for r in (1.5, 2, 2.5, 3, 4, 5, 6, 8)]
    # a seed whose first look misses the two cheapest plans
    seed = next(
        s for s in range(100) if {"macs6", "macs8"} <= {p.key for p in random.Random(s).sample(every, 8)[5:]}
    )
    (chosen, stopped), results = searcher.search(every, cfg, 40, seed)
    events = searcher.events
    looks = [i for i, (_, level) in enumerate(events) if level == "look"]
    fulls = [i for i, (_, level) in enumerate(events) if level == "full"]
    assert len([i for i in looks if i < fulls[0]]) == 5  # the first pass's look stopped at its share
    assert len(results["look"]) == 8  # later passes looked at the rest
    assert chosen.plan.key == "macs6" and chosen.level == "full"  # the cheapest that passes, found late
    assert ("macs8", "full") in events  # tried first in its pass, failed, so macs6 was next
    # after the first passing plan a pass fine-tunes only cheaper plans
    first_pass = events[fulls[0]][0]
    cheaper = {p.key for p in every if p.macs_reduction > float(first_pass[4:])}
    assert {key for key, level in events[fulls[0] + 1 :] if level != "look"} <= cheaper
    assert len(events) == len(set(events))  # nothing evaluated twice
    assert searcher.kept == {("macs6", "full")}  # failed and beaten models are let go
    assert searcher.now <= 40 and stopped is None


def test_once_a_plan_passed_the_look_skips_plans_predicted_well_above_it(monkeypatch) -> None:
    searcher = _Timed(monkeypatch, {"look": 1.0, "short": 0.5, "full": 1.0}, lambda p: True)
    cfg = SearchConfig(objective="macs", max_drop=1.0, epochs=2, short_epochs=1)
    every = [Plan(macs_reduction=1 + r / 4) for r in range(1, 25)]  # 24 plans, 800 to 143 MACs
    # 40% of 30 minutes holds 12 looks (8 random, then the predicted cheapest): the first pass passes macs7
    (chosen, stopped), results = searcher.search(every, cfg, 30)
    unseen = [p for p in every if p.key not in {c.plan.key for c in results["look"]}]
    assert unseen  # the look ended before the end of the space...
    assert all(1000 / p.macs_reduction > look_order.MARGIN * chosen.macs for p in unseen)
    assert chosen.plan.key == "macs7" and stopped is None  # ... complete: nothing left could win


def test_a_pass_with_nothing_that_fits_ends_the_search_and_says_so(monkeypatch) -> None:
    searcher = _Timed(monkeypatch, {"look": 1.0, "short": 2.0, "full": 4.0}, lambda p: p.macs_reduction <= 2)
    cfg = SearchConfig(objective="macs", max_drop=1.0, epochs=2, short_epochs=1, finalists=1)
    every = [Plan(macs_reduction=r) for r in (1.5, 2, 3, 4)]
    # pass 1: 4 looks, 4 short fine-tunes, macs4 fails its full one; pass 2: macs3 fails; no time for macs2
    (chosen, stopped), results = searcher.search(every, cfg, 20)
    assert [c.plan.key for c in results["full"]] == ["macs4", "macs3"] and chosen is None
    assert stopped == (
        "the time budget ended the search after 2 passes: 4 of 4 plans looked at, 4 short and 2 full "
        "fine-tunes (each pass keeps back the time of 1 full fine-tunes)"
    )
    assert searcher.now <= 20


def test_the_short_round_leaves_out_plans_at_least_as_hard_as_one_that_missed(monkeypatch) -> None:
    searcher = _Timed(monkeypatch, {"look": 0.1, "short": 0.1, "full": 0.2}, lambda p: True)
    cfg = SearchConfig(objective="macs", max_drop=1.0, epochs=2, short_epochs=1)
    every = [Plan(macs_reduction=r) for r in (1.5, 2, 3, 4, 6)]
    results = {"look": [searcher.evaluate(p, "look") for p in every], "short": [], "full": []}
    run_ = search_module._Search(every, searcher, search_module._Clock(60, cfg), results, 0.96, cfg, 0)
    missed = searcher.evaluate(Plan(macs_reduction=4.0), "short")
    missed.accuracy = 0.5  # far below 0.96 - slack
    results["short"] = [missed]
    # macs6 compresses harder than macs4, which missed: it is left out; the rest go cheapest first
    assert [p.key for p in search_module._short_queue(run_, None)] == ["macs3", "macs2", "macs1.5"]


def test_plans_the_finalists_cap_left_out_get_their_full_fine_tune_in_the_next_pass(monkeypatch) -> None:
    searcher = _Timed(monkeypatch, {"look": 0.1, "short": 0.1, "full": 0.2}, lambda p: p.macs_reduction <= 2)
    cfg = SearchConfig(objective="macs", max_drop=1.0, epochs=2, short_epochs=1, finalists=1)
    every = [Plan(macs_reduction=r) for r in (1.5, 2, 3, 4)]
    (chosen, stopped), results = searcher.search(every, cfg, 60)
    assert [c.plan.key for c in results["full"]] == ["macs4", "macs3", "macs2"]  # one per pass
    assert chosen.plan.key == "macs2" and stopped is None


def test_pareto_front_keeps_exactly_the_non_dominated_points() -> None:
    rng = random.Random(0)
    points = [(rng.randint(0, 20), rng.randint(0, 20)) for _ in range(60)]
    front = pareto_front(points)

    def dominated(i: int) -> bool:
        (c, a) = points[i]
        return any(
            (c2 <= c and a2 >= a and (c2, a2) != (c, a)) or ((c2, a2) == (c, a) and j < i)
            for j, (c2, a2) in enumerate(points)
            if j != i
        )

    assert set(front) == {i for i in range(len(points)) if not dominated(i)}
    costs = [points[i][0] for i in front]
    assert costs == sorted(costs)
    assert all(points[a][1] < points[b][1] for a, b in itertools.pairwise(front))


def test_the_held_out_share_is_seeded_disjoint_and_complete(digits) -> None:
    split = held_out_split(digits, 0.1, seed=3)
    again = held_out_split(digits, 0.1, seed=3)
    other = held_out_split(digits, 0.1, seed=4)
    n = len(digits.train)
    assert len(split.test) == round(0.1 * n) and len(split.train) == n - len(split.test)
    assert torch.equal(split.test.tensors[0], again.test.tensors[0])  # a model can be trained on the rest
    assert not torch.equal(split.test.tensors[0], other.test.tensors[0])

    def rows(part) -> Counter:
        return Counter(tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(*part.tensors, strict=True))

    assert rows(split.test) + rows(split.train) == rows(digits.train)  # every sample once, none twice
    with pytest.raises(TrainingError, match="leaves no held-out"):
        held_out_split(digits, 1e-6, seed=0)


@pytest.mark.slow
def test_the_held_out_share_does_not_move_with_the_recipe_seed_or_the_stage_place(digits, tmp_path) -> None:
    import torchshrink as ts
    from torchshrink.measure import accuracy

    model = ts.apply_stage("train", DIGITS_CNN, digits, epochs=2, lr=0.003).model
    share = held_out_split(digits, 0.1, seed=0).test  # what a user trains without, beforehand
    only_float = SEARCH | {"space": {"macs_reduction": [1], "bits": [None]}}
    only_float = {k: v for k, v in only_float.items() if k != "latency_repeats"}
    given = {}
    for seed in (0, 5):  # the stage's seed was the share's before (a model trained without it still met it)
        result = ts.search(
            model, digits, seed=seed, latency_repeats=3, out_dir=tmp_path / f"s{seed}", **only_float
        )
        given[seed] = result.details["search"]["held_out"]["given_accuracy"]
    assert given[0] == given[5] == accuracy(model, share)


def test_memorised_held_out_points_are_told_from_sampling_noise() -> None:
    assert seen_in_training(0.9975, 0.969, 400, 1000)  # B8's LeNet-5 trained on every training image
    assert not seen_in_training(0.975, 0.969, 400, 1000)  # within the noise of 400 points
    assert not seen_in_training(0.90, 0.95, 400, 1000)  # worse on the share: nothing memorised


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"macs_reduction": []}, "macs_reduction: an empty list leaves nothing to search"),
        ({"macs_reduction": [0.5]}, "would add MACs"),
        ({"sparsity": [1.0]}, r"not a share of zeros in \[0, 1\)"),
        ({"bits": [8], "encode_bits": [5]}, r"every one both quantizes \(bits\) and packs \(encode_bits\)"),
    ],
)
def test_spaces_that_cannot_work_are_refused_clearly(space, message) -> None:
    with pytest.raises(ValidationError, match=message):
        SearchConfig(space=space)


def _recipe(search: dict) -> dict:
    return digits_recipe({"train": {"epochs": 6, "lr": 0.003}}, {"search": search}, model=DIGITS_CNN)


SEARCH = {
    "max_drop": 4.0,
    "objective": "macs",
    "budget_minutes": 10,
    "epochs": 3,
    "latency_repeats": 3,
    "space": {"macs_reduction": [1, 1.5, 3], "bits": [None, 8]},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    return out, run(_recipe(SEARCH), out)


@pytest.mark.slow
def test_the_chosen_plan_is_the_cheapest_on_the_front_within_the_budget(searched) -> None:
    out, report = searched
    stage = report.stages[-1]
    search = stage["details"]["search"]
    base = search["held_out"]["given_accuracy"]
    chosen = search["chosen"]
    assert chosen["accuracy"] >= base - SEARCH["max_drop"] / 100  # on the held-out split
    assert chosen["level"] != "short"  # a trained plan is chosen only after the full fine-tune
    candidates = search["candidates"]
    # non-dominated front, and nothing cheaper than the chosen one both meets the budget and was trained fully
    points = [(c["macs"], c["accuracy"]) for c in candidates]
    assert {i for i in pareto_front(points)} == {i for i, c in enumerate(candidates) if c["front"]}
    assert not any(
        c["macs"] < chosen["macs"]
        and c["accuracy"] >= base - SEARCH["max_drop"] / 100
        and c["level"] != "short"
        for c in candidates
    )
    assert chosen["macs"] < candidates[-1]["macs"]  # a plan that prunes, not the model as given
    assert search["held_out"]["samples"] == round(0.1 * 1437)
    # the model was trained on every training image, the held-out share included: the stage says so
    held = search["held_out"]
    memorised = seen_in_training(held["given_accuracy"], held["given_test_accuracy"], held["samples"], 360)
    warned = any("trained on those points" in w for w in stage["details"].get("warnings", []))
    assert warned == memorised
    # the pipeline measured the chosen model once more, on the test split: the two stay apart
    model = open_model(out / "model.safetensors").module
    assert stage["metrics"]["macs"] == chosen["macs"] == search_module.count_macs(model, (1, 8, 8))
    assert "held-out accuracy" in stage["details"]["candidates_table"]
    assert "candidates" in (out / "report.md").read_text()
    # every candidate says how to reproduce it
    assert all(isinstance(c["recipe"], list) for c in candidates)


@pytest.mark.slow
def test_a_resumed_search_reuses_every_evaluation(searched, tmp_path, monkeypatch) -> None:
    out, report = searched
    judged: list[str] = []
    built: list[str] = []
    judge, build = search_module._Searcher.judge, search_module._Searcher.build

    def spy_judge(self, plan, level, state):
        judged.append(f"{plan.key}-{level}")
        return judge(self, plan, level, state)

    def spy_build(self, plan, level):
        built.append(f"{plan.key}-{level}")
        return build(self, plan, level)

    monkeypatch.setattr(search_module._Searcher, "judge", spy_judge)
    monkeypatch.setattr(search_module._Searcher, "build", spy_build)
    # as if killed before the search stage finished: its checkpoint gone, its work folder kept
    (out / ".checkpoints" / "stage-01-search.safetensors").unlink()
    rerun = run(_recipe(SEARCH), out, resume=True)
    chosen = report.stages[-1]["details"]["search"]["chosen"]
    assert judged == []  # every evaluation came from the work folder
    assert built == [f"{chosen['plan']}-{chosen['level']}"]  # only the chosen model is rebuilt
    again = rerun.stages[-1]
    assert again["details"]["search"]["chosen"] == chosen
    assert again["metrics"]["accuracy"] == report.stages[-1]["metrics"]["accuracy"]  # the same model


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """The plans the search builds from now on, as ``key-level``."""
    seen: list[str] = []
    build = search_module._Searcher.build

    def spy_build(self, plan, level):
        seen.append(f"{plan.key}-{level}")
        return build(self, plan, level)

    monkeypatch.setattr(search_module._Searcher, "build", spy_build)
    return seen


@pytest.mark.slow
def test_a_plan_that_distils_shares_its_look_with_the_plan_that_fine_tunes(tmp_path, built) -> None:
    space = {"macs_reduction": [2], "bits": [None], "distill": [False, True]}
    report = run(_recipe(SEARCH | {"space": space, "max_drop": 100, "epochs": 1}), tmp_path)
    search = report.stages[-1]["details"]["search"]
    assert [b for b in built if b.endswith("-look")] == ["macs2-look"]  # one untrained model, judged once
    assert {"macs2-short", "macs2-kd-short"} <= set(built)  # then each recovers its own way
    assert {c["plan"] for c in search["candidates"]} == {"macs2", "macs2-kd"}


@pytest.mark.slow
def test_qat_and_mixed_precision_plans_are_built_and_judged_on_the_held_out_share(tmp_path, built) -> None:
    space = {"macs_reduction": [1], "bits": [8], "quantize": ["static", "qat", "mixed"]}
    # max_drop 0: the mixed plan must leave as many layers float as it takes to lose nothing
    report = run(
        _recipe(SEARCH | {"space": space, "max_drop": 0.0, "epochs": 1, "objective": "size"}), tmp_path
    )
    search = report.stages[-1]["details"]["search"]
    assert sorted(b for b in built if b.endswith("-look")) == ["w8-look", "w8-mix0-look"]  # QAT shares w8's
    assert "w8-qat-short" in built  # then QAT trains its own way
    rows = {(c["plan"], c["level"]): c for c in search["candidates"]}
    mixed = rows[("w8-mix0", "look")]
    assert (
        mixed["accuracy"] >= search["held_out"]["given_accuracy"]
    )  # its budget, judged on the held-out share
    assert mixed["size_bytes"] >= rows[("w8", "look")]["size_bytes"]  # float layers cost bytes
    qat = next(c for c in search["candidates"] if c["plan"] == "w8-qat")
    assert [s["quantize"]["mode"] for s in qat["recipe"] if "quantize" in s] == ["qat"]


@pytest.mark.slow
def test_short_fine_tunes_in_worker_processes_match_the_ones_in_this_process(searched, tmp_path) -> None:
    _, report = searched
    apart = run(_recipe(SEARCH | {"jobs": 2}), tmp_path)

    def short(rep) -> dict[str, tuple]:
        rows = rep.stages[-1]["details"]["search"]["candidates"]
        return {c["plan"]: (c["accuracy"], c["size_bytes"], c["macs"]) for c in rows if c["level"] == "short"}

    assert short(apart) and short(apart) == short(report)  # the same plans, the same models
    assert (
        apart.stages[-1]["details"]["search"]["chosen"]["plan"]
        == report.stages[-1]["details"]["search"]["chosen"]["plan"]
    )


@pytest.mark.slow
def test_the_time_budget_ends_the_search_with_the_best_so_far(tmp_path) -> None:
    search = SEARCH | {
        "budget_minutes": 0.25,
        "space": {"macs_reduction": [1, 1.2, 1.5, 2, 3], "bits": [None, 8]},
    }
    report = run(_recipe(search), tmp_path)
    details = report.stages[-1]["details"]
    result = details["search"]
    assert result["stopped_early"] and "time budget" in result["stopped_early"]
    assert any("time budget" in w for w in details["warnings"])
    slowest = max(c["minutes"] for c in result["candidates"])
    assert result["minutes"] <= 0.25 + slowest + 0.05  # over by at most the evaluation under way


@pytest.mark.slow
def test_a_budget_too_small_for_one_candidate_and_an_unmet_drop_are_said(tmp_path) -> None:
    with pytest.raises(TrainingError, match="too small for one candidate"):
        run(_recipe(SEARCH | {"budget_minutes": 0.0001}), tmp_path / "tiny")
    hard = SEARCH | {"max_drop": 0.0, "space": {"macs_reduction": [3], "bits": [None]}}
    report = run(_recipe(hard), tmp_path / "hard")
    details = report.stages[-1]["details"]
    assert any("no candidate stayed within max_drop 0" in w for w in details["warnings"])
    assert details["search"]["chosen"]["plan"] == "macs3"


def test_a_contradictory_space_in_a_recipe_is_a_recipe_error(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"stages\[1\]\.search .*space: no consistent plan"):
        run(_recipe(SEARCH | {"space": {"bits": [8], "encode_bits": [4]}}), tmp_path)


@pytest.mark.slow
def test_the_python_api_searches_for_the_smallest_model(digits) -> None:
    import torchshrink as ts

    trained = ts.apply_stage("train", DIGITS_CNN, digits, epochs=6, lr=0.003).model
    result = ts.search(
        trained,
        digits,
        max_drop=3.0,
        objective="size",
        epochs=2,
        latency_repeats=3,
        space={"macs_reduction": [1, 2], "bits": [None], "encode_bits": [None, 5]},
    )
    search = result.details["search"]
    chosen = search["chosen"]
    assert chosen["plan"] != "float" and chosen["size_bytes"] < result.baseline["size_bytes"]
    assert chosen["accuracy"] >= search["held_out"]["given_accuracy"] - 0.03
    if chosen["plan"].endswith("enc5"):  # the packed file is the run's, measured as shipped
        assert result.artefacts["packed"].is_file()
        assert result.metrics["size_bytes"] == result.artefacts["packed"].stat().st_size


@pytest.mark.slow
def test_random_search_fully_trains_plans_in_a_seeded_order_and_keeps_the_cheapest_passing(tmp_path) -> None:
    search = SEARCH | {
        "strategy": "random",
        "epochs": 2,
        "space": {"macs_reduction": [1, 1.5, 3], "bits": [None]},
    }
    result = run(_recipe(search), tmp_path).stages[-1]["details"]["search"]
    candidates = result["candidates"]
    assert {c["level"] for c in candidates if c["plan"] != "float"} == {"full"}  # no look, no short round
    allowed = result["held_out"]["given_accuracy"] - SEARCH["max_drop"] / 100
    passing = [c for c in candidates if c["accuracy"] >= allowed]
    assert result["chosen"]["plan"] == min(passing, key=lambda c: c["macs"])["plan"]
    assert result["strategy"] == "random" and result["rounds"]["short"] == 0
