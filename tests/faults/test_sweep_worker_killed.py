"""A sweep task whose process is killed fails alone: the healthy tasks, running beside it and after
it, finish with their real results."""

from __future__ import annotations

import pytest
from killing import run_or_die
from testkit import DIGITS_MLP, digits_recipe

from torchshrink.parallel.tasks import Task, run_tasks


@pytest.mark.slow
def test_one_killed_worker_fails_only_its_task(tmp_path):
    recipe = digits_recipe({"train": {"epochs": 1}}, model=DIGITS_MLP)
    tasks = [Task(recipe, tmp_path / name) for name in ("a", "doomed", "b", "c")]
    results = run_tasks(tasks, run_or_die, jobs=2, threads=1)
    assert [r.ok for r in results] == [True, False, True, True]
    assert "worker died (killed by signal 9)" in results[1].error
    for r in (results[0], results[2], results[3]):
        assert r.final["accuracy"] > 0.5
        assert (tmp_path / r.name / "report.json").is_file()
