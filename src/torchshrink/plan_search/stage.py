"""Stage ``search``: the best compression plan within an accuracy budget, and the Pareto front.

Cheap to expensive (successive refinement):

1. **look**: every plan of the space is built without recovery (pruned, quantized or packed, no
   fine-tuning). Its latency, size and MACs are then already exact (fine-tuning changes none of
   them), and its held-out accuracy says how much the plan hurts before any training. It takes
   a seeded random sample first, then in turn the plan a cost model fitted to its measurements
   predicts cheapest and the next random one (``look_order``), so a look the budget cuts short has
   seen the cheap end of the space and an even sample of the rest.
2. **short**: in order of the objective (best first), plans get a short fine-tune
   (``short_epochs``) while the time budget allows.
3. **full**: the plans on the short round's Pareto front (accuracy against the objective) whose
   drop is within reach (``max_drop + slack``) get the full fine-tune (``epochs``), again best
   objective first; the first that stays within ``max_drop`` is the best plan of the front, since
   none after it can be faster or smaller. Up to ``finalists`` full fine-tunes in one pass.

The three rounds run in passes: when a pass ends with time left and something left to try (plans
the look, the short round, the time or the ``finalists`` cap left out), the next pass shares out
the time still left in the same way, looks at the plans not yet seen and fine-tunes only plans
cheaper than the best that passed, until nothing is left to try or nothing fits in the time. So
``finalists`` bounds the full fine-tunes of a pass, not of the search; only the best passing
model so far is kept in memory.

The accuracy budget is measured on a held-out share of the training split (``holdout``) that no
candidate trains on; the pipeline then measures the chosen model once on the test split, so the
report keeps the two apart. Every evaluation is kept in the stage's work folder (keyed by the input
model, data, seed and settings): a resumed run reuses them. The chosen model becomes the pipeline's
model, with its files; ``details.search`` lists every candidate with the recipe stages that
reproduce it, and report.md shows the table.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from torch import nn

from torchshrink.data import DatasetBundle
from torchshrink.digests import model_digest
from torchshrink.errors import RecipeError, TrainingError
from torchshrink.io import write_json_atomic
from torchshrink.measure import accuracy, count_macs, serialized_size, timing_pass
from torchshrink.onnx_export import OnnxRuntimeModel
from torchshrink.parallel.tasks import run_in_processes
from torchshrink.plan_search.front import pareto_front
from torchshrink.plan_search.holdout import held_out_split, seen_in_training
from torchshrink.plan_search.look_order import at_least_as_hard, next_to_look
from torchshrink.plan_search.space import Plan, SearchSpace, plans
from torchshrink.recipe import stage_config
from torchshrink.registry import get_stage, register_stage
from torchshrink.seeding import seed_everything
from torchshrink.state import ModelState, RunContext
from torchshrink.tables import markdown_table

log = logging.getLogger(__name__)

__all__ = ["SearchConfig", "search_stage", "Candidate"]

Objective = Literal["latency", "size", "macs"]
LEVELS = ("look", "short", "full")


class SearchConfig(BaseModel, extra="forbid"):
    """Options of the ``search`` stage."""

    max_drop: float = Field(
        0.5, ge=0, description="accuracy points the chosen model may lose (held-out split)"
    )
    objective: Objective = Field("latency", description="what the chosen model minimises")
    budget_minutes: float = Field(20.0, gt=0, description="wall-clock time for the whole search")
    space: SearchSpace = Field(default_factory=SearchSpace)
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of the training split kept out to judge")
    holdout_seed: int = Field(
        0,
        description="seed of the held-out share: fixed (not the stage's seed, which moves with its place in "
        "the recipe), so a model can be trained without it first: plan_search.held_out_split(data, holdout, "
        "holdout_seed)",
    )
    short_epochs: int = Field(1, ge=1, description="fine-tune epochs of the short round")
    epochs: int = Field(5, ge=1, description="fine-tune epochs of the full round (the chosen model's)")
    lr: float = Field(3e-4, gt=0, description="fine-tune learning rate")
    slack: float = Field(
        1.0, ge=0, description="points beyond max_drop a short-round candidate may miss by and still go on"
    )
    finalists: int = Field(3, ge=1, description="full fine-tunes at most in one pass")
    latency_batch: int = Field(32, ge=1, description="batch size of the latency objective")
    latency_repeats: int = Field(10, ge=3, description="interleaved timing rounds per candidate")
    jobs: int = Field(
        1,
        ge=1,
        description="short-round fine-tunes run this many at a time in worker processes (the cores shared "
        "out); the look, which times every plan, and the full round stay in this process",
    )
    strategy: Literal["rounds", "random"] = Field(
        "rounds",
        description="rounds: look, short, full (cheap to expensive); random: plans in random order, each "
        "fully fine-tuned (the baseline B8 compares against)",
    )

    @model_validator(mode="after")
    def _some_plan(self) -> SearchConfig:
        plans(self.space, self.max_drop)  # an empty or contradictory space is an error before anything runs
        return self


@dataclass
class Candidate:
    """One plan evaluated at one level, on the held-out split."""

    plan: Plan
    level: str
    accuracy: float
    latency_ms: float
    size_bytes: int
    macs: int
    minutes: float

    def cost(self, objective: Objective) -> float:
        return {"latency": self.latency_ms, "size": float(self.size_bytes), "macs": float(self.macs)}[
            objective
        ]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["plan"] = self.plan.key
        return out


class _Store:
    """Evaluations on disk, one JSON per (plan, level), so a resumed search skips them."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key

    def _path(self, plan: Plan, level: str) -> Path:
        return self.folder / f"{plan.key}-{level}.json"

    def get(self, plan: Plan, level: str) -> Candidate | None:
        path = self._path(plan, level)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn or foreign file: evaluate again
        if record.get("key") != self.key:
            return None
        values = {k: record[k] for k in ("accuracy", "latency_ms", "size_bytes", "macs", "minutes")}
        return Candidate(plan, level, **values)

    def put(self, candidate: Candidate) -> None:
        record = candidate.to_dict() | {"key": self.key, "plan_options": candidate.plan.as_dict()}
        write_json_atomic(self._path(candidate.plan, candidate.level), record)


class _Searcher:
    """Builds and judges plans for one search."""

    def __init__(self, state: ModelState, cfg: SearchConfig, ctx: RunContext, data: DatasetBundle) -> None:
        self.state, self.cfg, self.ctx, self.data = state, cfg, ctx, data
        # kept between runs into the same folder (a changed budget or space must not discard them);
        # each evaluation is keyed by what made it, so a stale one is never reused
        self.folder = ctx.cache_dir / "search"
        digest = hashlib.sha256(
            json.dumps(
                {
                    "model": model_digest(state.model, state.architecture),
                    "data": data.digest(),
                    "seed": ctx.seed,
                    "settings": cfg.model_dump(
                        include={"holdout", "holdout_seed", "short_epochs", "epochs", "lr", "latency_batch"}
                    ),
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()[:16]
        self.store = _Store(self.folder, digest)
        self.states: dict[tuple[str, str], ModelState] = {}
        self.latencies: dict[str, float] = {}
        self.given_ms: float | None = None
        self.given = self._runtime(state)

    def portable(self) -> _Searcher:
        """A copy to send to a worker process: the models and data, without the states kept here."""
        twin = copy.copy(self)
        twin.states = {}
        return twin

    def forget(self, plan: Plan, level: str) -> None:
        """Let go of a built plan kept for the result (one that failed or was beaten): memory."""
        self.states.pop((plan.key, level), None)

    def epochs(self, level: str) -> int:
        return {"look": 0, "short": self.cfg.short_epochs, "full": self.cfg.epochs}[level]

    @staticmethod
    def _runtime(state: ModelState) -> nn.Module:
        return state.runtime if state.runtime is not None else state.model

    def build(self, plan: Plan, level: str) -> ModelState:
        """Run the plan's stages on a copy of the input model, into a folder of its own."""
        out = self.folder / f"{plan.key}-{level}"
        out.mkdir(parents=True, exist_ok=True)
        seed_everything(self.ctx.seed)
        state = self.state.replace(model=copy.deepcopy(self.state.model), artefact=None, runtime=None)
        for index, spec in enumerate(plan.stages(self.epochs(level), self.cfg.lr)):
            kind, options = next(iter(spec.items()))
            cfg = stage_config(kind, options, where=f"search.{plan.key}.{kind}", source=self.ctx.stage_name)
            sub = RunContext(
                data=self.data,
                out_dir=out,
                seed=self.ctx.seed,
                stage_index=index,
                stage_name=kind,
                dist=self.ctx.dist,
                baseline=self.state.model,
            )
            state = get_stage(kind).handler(state, cfg, sub)
            state = state.replace(attachments={**state.attachments, "search_files": dict(sub.artefacts)})
        return state

    def latency_ms(self, plan: Plan, runtime: nn.Module) -> float:
        """The plan's latency, timed interleaved with the given model at the look; later rounds reuse
        it (fine-tuning changes no shape or operator, and one timing per plan is less noise)."""
        if plan.key in self.latencies:
            return self.latencies[plan.key]
        batch = self.cfg.latency_batch
        timed = timing_pass(
            {"given": {"rt": self.given}, "candidate": {"rt": runtime}},
            self.data.inputs,
            (batch,),
            rounds=self.cfg.latency_repeats,
        )
        rows = timed.rows
        ratio = rows["candidate"]["rt"][batch].paired / rows["given"]["rt"][batch].paired
        if self.given_ms is None:  # one time for the given model: passes drift, ratios do not
            self.given_ms = rows["given"]["rt"][batch].paired
        return ratio * self.given_ms

    def judge(self, plan: Plan, level: str, state: ModelState) -> Candidate:
        """Held-out accuracy, latency, size and MACs of a built plan (minutes filled in by the caller)."""
        runtime = self._runtime(state)
        acc = accuracy(runtime, self.data.test)
        size = state.artefact.stat().st_size if state.artefact is not None else serialized_size(state.model)
        macs = count_macs(state.model, self.data.inputs)
        return Candidate(plan, level, acc, self.latency_ms(plan, runtime), size, macs, 0.0)

    def evaluate(self, plan: Plan, level: str) -> Candidate:
        """The plan at this level: from the work folder when a run (this or an earlier one) judged it.
        At the look, a plan that distils is the same model as its twin that fine-tunes, and a QAT plan
        the same as its static twin (nothing is trained yet): one evaluation serves both."""
        built = plan.untrained() if level == "look" else plan
        candidate = self.store.get(built, level)
        if candidate is None:
            if level == "full" and plan.quantize == "mixed" and plan.pruned:
                # mixed precision picks its float layers again after the fine-tune: time what ships
                self.latencies.pop(plan.key, None)
            started = time.monotonic()
            state = self.build(built, level)
            candidate = self.judge(built, level, state)
            candidate.minutes = (time.monotonic() - started) / 60
            if self.ctx.dist.is_main:
                self.store.put(candidate)
            if level == "full":  # kept for the result; others are rebuilt if chosen (memory)
                self.states[(plan.key, level)] = state
        candidate = dataclasses.replace(candidate, plan=plan)
        if level == "look":
            self.latencies[plan.key] = candidate.latency_ms
        return candidate


def _table(rows: list[Candidate], front: set[tuple[str, str]], chosen: Candidate | None, base: float) -> str:
    body = [
        [
            c.plan.key + (" (chosen)" if chosen is not None and c is chosen else ""),
            c.level,
            f"{c.accuracy * 100:.2f}%",
            f"{(c.accuracy - base) * 100:+.2f}",
            f"{c.latency_ms:.3f}",
            f"{c.size_bytes / 1000:.1f}",
            f"{c.macs:,}",
            "yes" if (c.plan.key, c.level) in front else "",
            f"{c.minutes:.2f}",
        ]
        for c in rows
    ]
    header = [
        "plan",
        "level",
        "held-out accuracy",
        "drop (points)",
        "latency ms",
        "size kB",
        "MACs",
        "front",
        "minutes",
    ]
    return markdown_table(header, body)


class _Clock:
    """The search's time budget: how long an evaluation of each round is expected to take, and
    whether it still fits."""

    def __init__(self, minutes: float, cfg: SearchConfig) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + minutes * 60
        self.cfg = cfg
        self.pass_started = self.started

    def new_pass(self) -> None:
        """Share out the time still left as the first pass shares out the whole budget."""
        self.pass_started = time.monotonic()

    def elapsed(self) -> float:
        return (time.monotonic() - self.started) / 60

    def over(self) -> bool:
        return time.monotonic() > self.deadline

    def fits(self, level: str, results: dict[str, list[Candidate]], share: float = 1.0) -> bool:
        """Whether one more evaluation at ``level`` ends within ``share`` of the budget: the slowest of
        the round so far, or the previous round's scaled by the epochs (the first fine-tune of a search
        has nothing to go by and may overrun)."""
        expected = max((c.minutes for c in results[level]), default=0.0)
        if not results[level] and level == "full" and results["short"]:
            per_epoch = max(c.minutes for c in results["short"]) / self.cfg.short_epochs
            expected = per_epoch * self.cfg.epochs
        if not results[level] and not expected:
            expected = max((c.minutes for c in results["look"]), default=0.0)
        return time.monotonic() + expected * 60 <= self.at(share)

    def at(self, share: float) -> float:
        """The monotonic time when ``share`` of this pass's time (the budget left when it began) is
        spent."""
        return self.pass_started + share * (self.deadline - self.pass_started)

    def short_share(self, results: dict[str, list[Candidate]]) -> float:
        """The share of this pass's time the short round may end by: what is left after it must hold
        the full fine-tunes of ``finalists`` plans (each expected from the slowest short one, scaled by
        the epochs), but the short round keeps at least half of it."""
        if not results["short"]:
            return 1.0
        per_epoch = max(c.minutes for c in results["short"]) / self.cfg.short_epochs
        pass_minutes = max(self.deadline - self.pass_started, 1e-9) / 60
        reserve = self.cfg.finalists * per_epoch * self.cfg.epochs / pass_minutes
        return max(0.5, 1.0 - reserve)


def _too_small(cfg: SearchConfig, first: Candidate) -> TrainingError:
    return TrainingError(
        f"search.budget_minutes {cfg.budget_minutes:g} is too small for one candidate: building and judging "
        f"the plan {first.plan.key!r} ({first.level}) took {first.minutes:.2f} minutes; give at least "
        f"{max(1.0, 10 * first.minutes):.1f} (a rerun into the same folder reuses what was judged)"
    )


@dataclass
class _Search:
    """What a search strategy works with: the plans, the builder, the clock, the results by round
    (filled in), the lowest held-out accuracy that passes, the settings and the seed."""

    every: list[Plan]
    searcher: _Searcher
    clock: _Clock
    results: dict[str, list[Candidate]]
    allowed: float
    cfg: SearchConfig
    seed: int

    def in_reach(self, candidate: Candidate) -> bool:
        """Whether a candidate misses ``max_drop`` by at most ``slack``: a full fine-tune may still
        bring it within."""
        return candidate.accuracy >= self.allowed - self.cfg.slack / 100


LOOK_SHARE = 0.4
"""The share of the budget the first look may take; the rest is for fine-tuning."""


def _rounds(run: _Search) -> tuple[Candidate | None, str | None]:
    """Look, short, full (module docstring) in passes until the budget ends or nothing is left to
    try: the chosen candidate (None when none passed) and why the budget stopped the search early,
    if it did. Each pass shares out the time still left as the first pass shares out the budget, and
    after a plan passed it only tries plans cheaper than it (the look's order: ``look_order``)."""
    order = random.Random(run.seed).sample(run.every, len(run.every))
    best: Candidate | None = None
    failed: set[str] = set()  # missed max_drop (after the full fine-tune): off the front
    tried: set[str] = set()
    short = _short_round_apart if run.cfg.jobs > 1 else _short_round
    passes = 0
    while True:
        passes += 1
        run.clock.new_pass()
        before = {level: len(run.results[level]) for level in LEVELS}
        looked = _look(run, order, best)
        shorted = short(run, _short_queue(run, best))
        best, finished = _full_round(run, best, failed, tried, before["full"])
        if looked and shorted and finished:
            return best, None
        if all(len(run.results[level]) == before[level] for level in LEVELS):
            break  # nothing fitted in the time left
    counts = {level: len(run.results[level]) for level in LEVELS}
    return best, (
        f"the time budget ended the search after {passes - 1} pass{'es' if passes > 2 else ''}: "
        f"{counts['look']} of {len(run.every)} plans looked at, {counts['short']} short and {counts['full']} full "
        f"fine-tunes (each pass keeps back the time of {run.cfg.finalists} full fine-tunes)"
    )


def _look(run: _Search, order: list[Plan], best: Candidate | None) -> bool:
    """The plans not yet looked at, while the look's share of the pass allows, in the order
    :func:`look_order.next_to_look` gives. Whether the look is complete: every plan looked at, or every plan
    left predicted well above the cost of ``best``."""
    while True:
        seen = {c.plan.key for c in run.results["look"]}
        waiting = [plan for plan in order if plan.key not in seen]
        if not waiting:
            return True
        measured = [(c.plan, c.cost(run.cfg.objective)) for c in run.results["look"]]
        plan = next_to_look(waiting, measured, None if best is None else best.cost(run.cfg.objective))
        if plan is None:
            return True
        if run.results["look"] and not run.clock.fits("look", run.results, LOOK_SHARE):
            return False
        run.results["look"].append(run.searcher.evaluate(plan, "look"))
        if len(run.results["look"]) == 1 and run.clock.over():
            raise _too_small(run.cfg, run.results["look"][0])


def _short_queue(run: _Search, best: Candidate | None) -> list[Plan]:
    """The looked-at plans that train and have no short fine-tune yet, best objective first; once a
    plan passed, only those cheaper than it (fine-tuning changes no plan's cost). A plan that
    compresses at least as hard as one whose short fine-tune missed by more than ``slack`` is left
    out (:func:`at_least_as_hard`): it would miss too."""
    done = {c.plan.key for c in run.results["short"]}
    hopeless = [c.plan for c in run.results["short"] if not run.in_reach(c)]
    objective = run.cfg.objective
    waiting = [
        c
        for c in run.results["look"]
        if c.plan.trains
        and c.plan.key not in done
        and (best is None or c.cost(objective) < best.cost(objective))
        and not any(at_least_as_hard(c.plan, missed) for missed in hopeless)
    ]
    return [c.plan for c in sorted(waiting, key=lambda c: (c.cost(objective), -c.accuracy))]


def _full_round(
    run: _Search, best: Candidate | None, failed: set[str], tried: set[str], full_before: int
) -> tuple[Candidate | None, bool]:
    """Full fine-tunes of the short round's front, cheapest first, up to ``finalists`` in this pass:
    the best candidate so far, and whether nothing is left that this round could still try (a plan
    the time or the ``finalists`` cap left out waits for the next pass). ``failed`` and ``tried``
    carry over between passes."""
    # the short round's view: fine-tuned plans, and plans with nothing to fine-tune as they are
    judged = run.results["short"] + [c for c in run.results["look"] if not c.plan.trains]
    objective = run.cfg.objective
    waiting: set[str] = set()
    while True:
        # a plan that failed leaves the front, and the plans only it dominated come back on
        pool = [c for c in judged if c.plan.key not in failed]
        front = [pool[i] for i in pareto_front([(c.cost(objective), c.accuracy) for c in pool])]
        hopeful = [
            c
            for c in front
            if run.in_reach(c)
            and c.plan.key not in tried | waiting
            and (best is None or c.cost(objective) < best.cost(objective))
        ]
        if not hopeful:
            return best, not waiting
        candidate = min(hopeful, key=lambda c: c.cost(objective))
        if candidate.plan.trains:
            if len(run.results["full"]) - full_before >= run.cfg.finalists or not run.clock.fits(
                "full", run.results
            ):
                waiting.add(candidate.plan.key)  # a plan that needs no fine-tune may still pass
                continue
            candidate = run.searcher.evaluate(candidate.plan, "full")
            run.results["full"].append(candidate)
        tried.add(candidate.plan.key)
        if candidate.accuracy < run.allowed:
            failed.add(candidate.plan.key)
            run.searcher.forget(candidate.plan, candidate.level)
        elif best is not None and candidate.cost(objective) >= best.cost(objective):
            # a packed file's size and a pruned mixed plan's latency are measured again at the full round
            run.searcher.forget(candidate.plan, candidate.level)
        else:
            if best is not None:
                run.searcher.forget(best.plan, best.level)
            return candidate, not waiting


def _short_round(run: _Search, queue: list[Plan]) -> bool:
    """Short fine-tunes in this process, in the given order, while the budget allows; whether every
    plan got one."""
    for plan in queue:
        if not run.clock.fits("short", run.results, run.clock.short_share(run.results)):
            return False
        run.results["short"].append(run.searcher.evaluate(plan, "short"))
    return True


_previous_seconds = 0.0
"""In a worker process: how long its previous short fine-tune took (what the next one is expected to)."""


def _short_in_worker(searcher: _Searcher, plan: Plan, deadline: float, expected: float) -> Candidate | None:
    """One short fine-tune in a worker process, or None when it would not end by ``deadline`` (wall
    clock, seconds since the epoch) going by ``expected`` seconds (the slowest of the round before this
    wave) or this worker's previous one, whichever is longer."""
    global _previous_seconds
    if time.time() + max(expected, _previous_seconds) > deadline:
        return None
    started = time.time()
    candidate = searcher.evaluate(plan, "short")  # latency from the look: nothing is timed here
    _previous_seconds = time.time() - started
    return candidate


def _short_round_apart(run: _Search, queue: list[Plan]) -> bool:
    """Short fine-tunes ``jobs`` at a time in worker processes (task parallelism), in waves of a few
    per worker (each call carries the model and the data); each worker skips a plan it would not
    finish in the budget. Whether every plan got one."""
    if not queue:
        return True
    jobs = run.cfg.jobs
    searcher = run.searcher.portable()
    # the first wave is one plan per worker: until a short fine-tune has been timed, there is nothing to
    # keep the full round's time by
    starts = [0, *range(jobs, len(queue), 4 * jobs)]
    for start, end in zip(starts, [*starts[1:], len(queue)], strict=True):
        share = run.clock.short_share(run.results)
        if not run.clock.fits("short", run.results, share):
            return False
        deadline = time.time() + (run.clock.at(share) - time.monotonic())
        batch = queue[start:end]
        expected = 60 * max((c.minutes for c in run.results["short"]), default=0.0)
        calls = [functools.partial(_short_in_worker, searcher, plan, deadline, expected) for plan in batch]
        outcomes = run_in_processes(calls, jobs, names=[p.key for p in batch], desc="search: short round")
        done = True
        for plan, outcome in zip(batch, outcomes, strict=True):
            if not outcome.ok:
                raise TrainingError(f"search: plan {plan.key} (short round): {outcome.error}")
            if outcome.value is None:
                done = False
            else:
                run.results["short"].append(outcome.value)
        if not done:
            return False
    return True


def _random_search(run: _Search) -> tuple[Candidate | None, str | None]:
    """The baseline a search must beat: plans in a seeded random order, each built and fully
    fine-tuned, until the budget ends; the cheapest that passes."""
    stopped: str | None = None
    order = random.Random(run.seed).sample(run.every, len(run.every))
    for plan in order:
        level = "full" if plan.trains else "look"
        if any(run.results.values()) and not run.clock.fits(level, run.results):
            stopped = (
                f"the time budget ended the random search after {sum(map(len, run.results.values()))} plans"
            )
            break
        run.results[level].append(run.searcher.evaluate(plan, level))
        if sum(map(len, run.results.values())) == 1 and run.clock.over():
            raise _too_small(run.cfg, run.results[level][0])
    passing = [c for level in LEVELS for c in run.results[level] if c.accuracy >= run.allowed]
    return (min(passing, key=lambda c: c.cost(run.cfg.objective)) if passing else None), stopped


@register_stage("search", SearchConfig, role="transform")
def search_stage(state: ModelState, cfg: SearchConfig, ctx: RunContext) -> ModelState:
    """Search ``cfg.space`` for the plan that minimises ``cfg.objective`` within ``cfg.max_drop``;
    the chosen model (fully fine-tuned) becomes the pipeline's model."""
    if ctx.dist.distributed:
        raise RecipeError(
            f"{ctx.stage_name}: the search runs in one process (its timings and choices are per process); "
            "run it without torchrun"
        )
    if state.runtime is not None:
        raise RecipeError(
            f"{ctx.stage_name}: the model already runs from a compressed file ({state.artefact}); put the "
            "search before quantize / encode / export stages, on the float model"
        )
    clock = _Clock(cfg.budget_minutes, cfg)
    data = held_out_split(ctx.data, cfg.holdout, cfg.holdout_seed)
    searcher = _Searcher(state, cfg, ctx, data)
    base = accuracy(searcher.given, data.test)
    given_test = accuracy(searcher.given, ctx.data.test)  # only to warn, never to choose
    if seen_in_training(base, given_test, len(data.test), len(ctx.data.test)):
        ctx.warn(
            f"the model as given scores {base * 100:.2f}% on the held-out share but {given_test * 100:.2f}% on "
            "the test split: it was trained on those points, so the search judges drops on memorised "
            "samples. Train it without them (plan_search.held_out_split(data, holdout, holdout_seed) "
            f"= held_out_split(data, {cfg.holdout:g}, {cfg.holdout_seed}) gives the share) for a budget that tracks unseen data"
        )
    allowed = base - cfg.max_drop / 100
    every = plans(cfg.space, cfg.max_drop)
    results: dict[str, list[Candidate]] = {level: [] for level in LEVELS}
    search = _random_search if cfg.strategy == "random" else _rounds
    chosen, stopped = search(_Search(every, searcher, clock, results, allowed, cfg, ctx.seed))
    final_level = {c.plan.key: c for level in LEVELS for c in results[level]}  # the deepest level wins
    evaluated = list(final_level.values())
    front_all = {
        (evaluated[i].plan.key, evaluated[i].level)
        for i in pareto_front([(c.cost(cfg.objective), c.accuracy) for c in evaluated])
    }
    if chosen is None:
        passing = [c for c in evaluated if c.accuracy >= allowed]
        if passing:  # e.g. the time ran out before the full round: the cheapest that passes as judged
            chosen = min(passing, key=lambda c: (c.cost(cfg.objective), -c.accuracy))
        else:
            chosen = max(evaluated, key=lambda c: (c.accuracy, -c.cost(cfg.objective)))
            ctx.warn(
                f"no candidate stayed within max_drop {cfg.max_drop:g} points on the held-out split; the most "
                f"accurate one ({chosen.plan.key}, {chosen.level}) loses {(base - chosen.accuracy) * 100:.2f}"
            )
    if stopped:
        ctx.warn(f"{stopped}; the result is the best found so far")
    final = searcher.states.get((chosen.plan.key, chosen.level))
    if final is None:  # resumed, or not kept: rebuilt from the plan (same seed, same model)
        final = searcher.build(chosen.plan, chosen.level)
    final = _shipped(final, ctx)
    rows = sorted(evaluated, key=lambda c: c.cost(cfg.objective))
    ctx.details["search"] = {
        "objective": cfg.objective,
        "strategy": cfg.strategy,
        "max_drop": cfg.max_drop,
        "latency_batch": cfg.latency_batch,
        "held_out": {"samples": len(data.test), "given_accuracy": base, "given_test_accuracy": given_test},
        "chosen": chosen.to_dict() | {"drop": round((base - chosen.accuracy) * 100, 3)},
        "recipe": chosen.plan.stages(searcher.epochs(chosen.level), cfg.lr),
        "candidates": [
            c.to_dict()
            | {
                "front": (c.plan.key, c.level) in front_all,
                "recipe": c.plan.stages(searcher.epochs(c.level), cfg.lr),
            }
            for c in rows
        ],
        "rounds": {level: len(results[level]) for level in LEVELS},
        "stopped_early": stopped,
        "minutes": round(clock.elapsed(), 3),
    }
    ctx.details["candidates_table"] = _table(rows, front_all, chosen, base)
    return final.replace(lineage=(*state.lineage, ctx.stage_name))


def _shipped(state: ModelState, ctx: RunContext) -> ModelState:
    """The chosen candidate's files copied from the work folder into the run's folder."""
    files = dict(state.attachments.get("search_files", {}))
    attachments = {k: v for k, v in state.attachments.items() if k != "search_files"}
    if state.artefact is None:
        return state.replace(attachments=attachments)
    target = ctx.out_dir / state.artefact.name
    shutil.copyfile(state.artefact, target)
    for name, file in files.items():
        if Path(file).name == state.artefact.name:
            ctx.artefacts[name] = state.artefact.name
    runtime = OnnxRuntimeModel(target) if isinstance(state.runtime, OnnxRuntimeModel) else state.runtime
    return state.replace(artefact=target, runtime=runtime, attachments=attachments)
