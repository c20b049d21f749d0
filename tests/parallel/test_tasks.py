"""Task parallelism: recipes run side by side in worker processes give the results they give alone;
a failing recipe is reported and does not stop the others; the CLI writes a summary."""

from __future__ import annotations

import json

import pytest
import yaml
from testkit import DIGITS_MLP, digits_recipe

import torchshrink as ts
from torchshrink import run
from torchshrink.cli import main
from torchshrink.parallel.tasks import Task, default_threads, run_tasks


def _recipe(lr: float) -> dict:
    return digits_recipe({"train": {"epochs": 2, "lr": lr}}, model=DIGITS_MLP)


@pytest.mark.slow
def test_parallel_tasks_match_their_sequential_runs_and_survive_a_failure(tmp_path) -> None:
    broken = dict(_recipe(0.01), data={"npz": str(tmp_path / "missing.npz")})
    tasks = [
        Task(_recipe(0.01), tmp_path / "a"),
        Task(broken, tmp_path / "broken"),
        Task(_recipe(0.003), tmp_path / "b"),
    ]
    results = run_tasks(tasks, run, jobs=2, threads=1)
    assert [r.name for r in results] == ["a", "broken", "b"]  # the order of the tasks
    assert [r.ok for r in results] == [True, False, True]
    assert "missing.npz" in results[1].error and "not found" in results[1].error
    for task, result in zip(tasks[::2], results[::2], strict=True):
        alone = run(task.recipe, tmp_path / f"alone-{task.name}")  # this process: one thread too
        assert result.final["accuracy"] == alone.final["accuracy"]
        assert (task.out_dir / "report.json").is_file()
    assert results[0].final["accuracy"] != results[2].final["accuracy"]  # two different runs


def test_tasks_refuse_one_folder_twice_and_share_the_cores(tmp_path) -> None:
    with pytest.raises(ValueError, match="two tasks would write the same folder"):
        run_tasks([Task(_recipe(0.01), tmp_path / "x"), Task(_recipe(0.02), tmp_path / "x")], run)
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        run_tasks([Task(_recipe(0.01), tmp_path / "x")], run, jobs=0)
    assert default_threads(1) >= default_threads(2) >= 1


@pytest.mark.slow
def test_sweep_command_writes_a_summary_and_fails_when_a_recipe_fails(tmp_path, capsys) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_recipe(0.01)))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(_recipe(0.01), model={"zoo": "nosuchnet"})))
    code = main(["-q", "sweep", str(good), str(bad), "--out", str(tmp_path / "sweep"), "--jobs", "2"])
    assert code == 1
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    by_name = {t["name"]: t for t in summary["tasks"]}
    assert by_name["good"]["ok"] and by_name["good"]["final"]["accuracy"] > 0.5
    assert not by_name["bad"]["ok"] and "nosuchnet" in by_name["bad"]["error"]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert "| good | ok |" in table and "| bad | failed |" in table
    assert "1 of 2 recipes done" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sweep", str(good), "--out", str(tmp_path / "s2"), "--jobs", "0"])


@pytest.mark.slow
def test_the_ray_backend_gives_the_process_pools_results(tmp_path, capsys) -> None:
    """A local Ray instance (2 CPUs, no dashboard) runs the same tasks: same numbers, same summary."""
    pytest.importorskip("ray", reason="the [ray] extra is not installed (make test installs it)")
    recipes = []
    for name, lr in (("a", 0.01),):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_recipe(lr)))
        recipes.append(str(path))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(_recipe(0.01), model={"zoo": "nosuchnet"})))
    # the pool from the command line, Ray from the Python API: the same sweep either way
    code = main(["-q", "sweep", *recipes, str(bad), "--out", str(tmp_path / "processes"), "--jobs", "2"])
    done = ts.sweep([*recipes, bad], tmp_path / "ray", jobs=2, backend="ray")
    assert code == 1 and not done.ok and [r.ok for r in done.results] == [True, False]
    pool, ray = (json.loads((tmp_path / b / "sweep.json").read_text()) for b in ("processes", "ray"))
    assert ray["backend"] == "ray" and [t["name"] for t in ray["tasks"]] == ["a", "bad"]
    for mine, theirs in zip(pool["tasks"], ray["tasks"], strict=True):
        assert mine["ok"] == theirs["ok"]
        if mine["ok"]:  # every number but the timings, which depend on the moment
            for key in ("accuracy", "size_bytes", "params", "nonzero_params", "macs"):
                assert (
                    mine["final"][key] == theirs["final"][key]
                    and mine["baseline"][key] == theirs["baseline"][key]
                )
    assert "nosuchnet" in ray["tasks"][1]["error"]
    assert "| a | ok |" in (tmp_path / "ray" / "sweep.md").read_text()


def test_a_sweep_backend_that_does_not_exist_is_a_named_error(tmp_path) -> None:
    from torchshrink.errors import RecipeError

    with pytest.raises(RecipeError, match="sweep backend 'dask' is not one of"):
        ts.sweep([], tmp_path / "out", backend="dask")
    assert not (tmp_path / "out").exists()


def test_the_ray_backend_without_ray_is_a_named_error(tmp_path, monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    recipe = tmp_path / "a.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(0.01)))
    code = main(["sweep", str(recipe), "--out", str(tmp_path / "out"), "--backend", "ray"])
    assert code == 2
    assert "--backend ray needs Ray: pip install 'torchshrink[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sweep.json").exists()
