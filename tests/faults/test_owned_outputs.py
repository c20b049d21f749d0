"""Output folders are owned: another recipe's outputs are refused (or, with --force, deleted first),
a re-run removes what the previous run of the same recipe wrote and this one did not, and a second
run into a folder being written is refused."""

from __future__ import annotations

import json

import pytest
from testkit import DIGITS_MLP, digits_recipe

from torchshrink import run
from torchshrink.cli import main
from torchshrink.errors import OutputPathError
from torchshrink.run_folder import MANIFEST_FILE, claim

EXPORTING = digits_recipe({"train": {"epochs": 1}}, {"export": {}}, model=DIGITS_MLP)
PLAIN = digits_recipe({"train": {"epochs": 1}}, model=DIGITS_MLP)
OTHER = {
    **digits_recipe({"train": {"epochs": 1}}, model={"zoo": "resnet", "kwargs": {"width": 4}}),
    "name": "other",
}


@pytest.fixture
def exported(tmp_path):
    out = tmp_path / "out"
    run(EXPORTING, out)
    return out


def test_another_recipe_is_refused_and_nothing_is_touched(exported):
    before = {p.name: p.stat().st_mtime_ns for p in exported.iterdir()}
    with pytest.raises(OutputPathError, match=r"outputs of another run \(recipe 'recipe'.*pass --force"):
        run(OTHER, exported)
    assert {p.name: p.stat().st_mtime_ns for p in exported.iterdir()} == before


def test_force_deletes_the_old_run_first(exported):
    (exported / "notes.txt").write_text("mine")  # not torchshrink's: kept
    report = run(OTHER, exported, force=True)
    assert not (exported / "model.onnx").exists()  # no stale export beside a report about another model
    assert (exported / "notes.txt").read_text() == "mine"
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    assert manifest["owner"]["recipe"] == "other" and manifest["status"] == "finished"
    assert set(manifest["files"]) == set(report.artefacts.values())


def test_a_rerun_of_the_edited_recipe_removes_what_it_no_longer_writes(exported):
    assert (exported / "model.onnx").is_file()
    run(PLAIN, exported)  # the same recipe (name and model) without its export stage
    assert not (exported / "model.onnx").exists()
    assert (exported / "model.safetensors").is_file()


def test_a_folder_with_outputs_but_no_manifest_is_refused(exported):
    (exported / MANIFEST_FILE).unlink()
    with pytest.raises(OutputPathError, match="unknown run"):
        run(EXPORTING, exported)


def test_force_replaces_an_unreadable_manifest(exported):
    (exported / MANIFEST_FILE).write_text("{broken")
    with pytest.raises(OutputPathError, match="unreadable.*--force"):
        run(EXPORTING, exported)
    run(OTHER, exported, force=True)
    assert json.loads((exported / MANIFEST_FILE).read_text())["owner"]["recipe"] == "other"
    assert not (exported / "model.onnx").exists()


def test_a_hostile_manifest_cannot_delete_files_outside_the_folder(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    owner = {"recipe": "recipe", "model": DIGITS_MLP}
    manifest = {"owner": owner, "status": "finished", "files": ["../victim.txt", "/etc/hostname"]}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    run(PLAIN, out)
    assert victim.read_text() == "keep me"


def test_a_second_run_into_a_locked_folder_is_refused(tmp_path):
    held = claim(tmp_path, {"recipe": "recipe", "model": DIGITS_MLP})
    try:
        with pytest.raises(OutputPathError, match="another torchshrink run is writing"):
            run(PLAIN, tmp_path)
    finally:
        held.release()
    run(PLAIN, tmp_path)  # free again once the holder let go


def test_cli_refusal_is_one_line_exit_2(exported, tmp_path, capsys):
    recipe = tmp_path / "other.yaml"
    recipe.write_text(json.dumps(OTHER))  # JSON is YAML
    assert main(["run", str(recipe), "--out", str(exported)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(exported) in err and "--force" in err
    assert main(["-q", "run", str(recipe), "--out", str(exported), "--force"]) == 0
