"""The fault corpus: bad model files, data, recipes and output folders, each through the command a
user would type. Every case must exit 2 with one line that names the file or key (never a
traceback, never exit 1), and leave an existing ``--out`` folder exactly as it was."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from testkit import DIGITS_MLP, digits_recipe

from torchshrink import run
from torchshrink.cli import main
from torchshrink.io import read_safetensors_metadata


def cli(capsys, *args: str) -> tuple[int, str]:
    """The command's exit code and stderr. An exception escaping ``main`` is what a user would see
    as a traceback: the test then fails with it."""
    capsys.readouterr()
    try:
        code = main(["-q", *map(str, args)])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_refused(code: int, err: str, *named: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("torchshrink: error:")]
    assert len(lines) == 1 and err.startswith("torchshrink: error:"), err
    for part in named:
        assert str(part) in err, (part, err)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A finished run: model.safetensors, model.tshrink and model.onnx of a digits MLP."""
    out = tmp_path_factory.mktemp("shipped")
    run(
        digits_recipe(
            {"train": {"epochs": 1}},
            {"encode": {"bits": 4, "finetune_epochs": 0}},
            {"export": {}},
            model=DIGITS_MLP,
        ),
        out,
    )
    return out


# ---- model files -------------------------------------------------------------------------------


def _safetensors_sections(data: bytes) -> dict[str, int]:
    header = struct.unpack("<Q", data[:8])[0]
    return {"length field": 0, "length high byte": 7, "header start": 8, "header end": 8 + header - 1}


def _tshrink_sections(data: bytes) -> dict[str, int]:
    header = struct.unpack("<I", data[10:14])[0]
    return {
        "magic": 0, "version": 8, "header length": 10, "header crc": 14, "header start": 18,
        "header end": 18 + header - 1, "first section": 18 + header, "last byte": len(data) - 1,
    }  # fmt: skip


SECTIONS = {"model.safetensors": _safetensors_sections, "model.tshrink": _tshrink_sections}


@pytest.mark.parametrize(
    "name,section",
    [("model.safetensors", s) for s in ("length field", "length high byte", "header start", "header end")]
    + [
        ("model.tshrink", s)
        for s in (
            "magic",
            "version",
            "header length",
            "header crc",
            "header start",
            "header end",
            "first section",
            "last byte",
        )
    ],  # fmt: skip
)
def test_a_byte_flipped_at_a_section_boundary_is_named(shipped, tmp_path, capsys, name, section):
    data = bytearray((shipped / name).read_bytes())
    data[SECTIONS[name](bytes(data))[section]] ^= 0xFF
    path = tmp_path / name
    path.write_bytes(bytes(data))
    assert_refused(*cli(capsys, "eval", path, "--data", "digits"), path)


@pytest.mark.parametrize("name", ["model.safetensors", "model.tshrink", "model.onnx"])
@pytest.mark.parametrize("cut", ["empty", "half", "one byte short", "garbage"])
def test_truncated_empty_or_garbage_model_files_are_named(shipped, tmp_path, capsys, name, cut):
    data = (shipped / name).read_bytes()
    body = {
        "empty": b"",
        "half": data[: len(data) // 2],
        "one byte short": data[:-1],
        "garbage": os.urandom(4096),
    }[cut]
    path = tmp_path / name
    path.write_bytes(body)
    command = "inspect" if name == "model.onnx" and cut != "one byte short" else "eval"
    args = [command, path] + (["--data", "digits"] if command == "eval" else [])
    assert_refused(*cli(capsys, *args), path)


def _with_meta(shipped: Path, tmp_path: Path, **changes: str) -> Path:
    from safetensors.torch import load_file, save_file

    meta = read_safetensors_metadata(shipped / "model.safetensors") | changes
    path = tmp_path / "edited.safetensors"
    save_file(load_file(shipped / "model.safetensors"), path, metadata=meta)
    return path


def test_hostile_architecture_metadata_runs_no_code(shipped, tmp_path, capsys):
    marker = tmp_path / "ran"
    hostile = json.dumps({"factory": "os:system", "kwargs": {"command": f"touch {marker}"}})
    path = _with_meta(shipped, tmp_path, architecture=hostile)
    assert_refused(*cli(capsys, "eval", path, "--data", "digits"), path, "os:system")
    assert not marker.exists()


@pytest.mark.parametrize(
    "field,value",
    [
        ("architecture", "{not json"),
        ("architecture", json.dumps({"zoo": "lenet300", "kwargs": {"in_features": 10**12}})),
        ("architecture", json.dumps({"zoo": "no_such_net"})),
        ("architecture", json.dumps(["a", "list"])),
        ("inputs", '[{"shape": [1, "x"]}]'),
        ("inputs", '{"name": "input"}'),
    ],
)
def test_damaged_metadata_is_named(shipped, tmp_path, capsys, field, value):
    path = _with_meta(shipped, tmp_path, **{field: value})
    assert_refused(*cli(capsys, "eval", path, "--data", "digits"), path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_as_such(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_Evil(marker)))
    code, err = cli(capsys, "eval", path, "--data", "digits")
    assert_refused(code, err, path, "--trust-pickle")
    assert not marker.exists()


def test_a_zip_pickle_disguised_as_torchscript_is_named(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/constants.pkl", pickle.dumps(_Evil(marker), protocol=2))
        zf.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
        zf.writestr("archive/code/__torch__.py", "def f(): pass")
    assert_refused(*cli(capsys, "eval", path, "--data", "digits"), path, "TorchScript")
    assert not marker.exists()


def test_an_onnx_model_on_data_of_another_shape_is_named(shipped, capsys):
    path = shipped / "model.onnx"
    assert_refused(*cli(capsys, "eval", path, "--data", "mnist1d"), path, "(1, 8, 8)", "(1, 40)")


def test_a_model_on_data_of_another_shape_is_named(shipped, capsys):
    assert_refused(*cli(capsys, "eval", shipped / "model.safetensors", "--data", "mnist1d"), "mnist1d")


# ---- data ----------------------------------------------------------------------------------------

X = np.random.default_rng(0).random((40, 64)).astype(np.float32)
Y = np.arange(40) % 4

BAD_DATA = {
    "string labels": {"x": X, "y": np.array([str(v) for v in Y])},
    "2-D labels": {"x": X, "y": np.stack([Y, Y], axis=1)},
    "object labels": {"x": X, "y": np.array([{"a": 1}] * 40, dtype=object)},
    "NaN label": {"x": X, "y": np.where(np.arange(40) == 7, np.nan, Y)},
    "fractional label": {"x": X, "y": Y + 0.5},
    "negative label": {"x": X, "y": np.where(np.arange(40) == 3, -1, Y)},
    "label beyond the model's classes": {"x": X, "y": np.where(np.arange(40) == 5, 15, Y)},
    "huge label": {"x": X, "y": np.where(np.arange(40) == 5, 10**12, Y)},
    "class with one sample": {"x": X, "y": np.where(np.arange(40) == 0, 9, Y)},
    "empty x": {"x": X[:0], "y": Y[:0]},
    "x and y of other lengths": {"x": X, "y": Y[:30]},
    "NaN input": {"x": np.where(np.arange(64) == 2, np.nan, X), "y": Y},
    "infinite input": {"x": np.where(np.arange(64) == 2, np.inf, X), "y": Y},
    "text inputs": {"x": np.full((40, 64), "pixel"), "y": Y},
    "scalar x": {"x": np.float32(1.0), "y": Y},
    "no y": {"x": X},
    "no x": {"y": Y},
}


@pytest.fixture(scope="module")
def model_file(shipped) -> Path:
    return shipped / "model.safetensors"


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_named_at_load(model_file, tmp_path, capsys, case):
    path = tmp_path / "data.npz"
    np.savez(path, **BAD_DATA[case], allow_pickle=True)
    assert_refused(*cli(capsys, "eval", model_file, "--data", path), path.name)


def test_a_pickled_npz_runs_no_code(model_file, tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([_Evil(marker)], dtype=object), y=np.array([0]))
    assert_refused(*cli(capsys, "eval", model_file, "--data", path), path.name)
    assert not marker.exists()


# ---- recipes and output folders (run: --out must stay as it was) ----------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


GOOD = yaml.safe_dump(digits_recipe({"train": {"epochs": 1}}, {"prune": {"sparsity": 0.5}}, model=DIGITS_MLP))

BAD_RECIPES = {
    "duplicate key": ("seed: 1\nseed: 2\n" + GOOD.replace("seed: 0\n", ""), "appears twice"),
    "unknown stage": (GOOD.replace("prune:", "prnue:"), "prnue"),
    "unknown option": (GOOD.replace("sparsity: 0.5", "sparsty: 0.5"), "sparsty"),
    "negative lr": (GOOD.replace("epochs: 1", "epochs: 1\n    lr: -1"), "lr"),
    "wrong type": (GOOD.replace("sparsity: 0.5", "sparsity: half"), "sparsity"),
    "prune.ignore names no layer": (GOOD.replace("sparsity: 0.5", "sparsity: 0.5\n    ignore: [no_such_layer]"),
                                    "no_such_layer"),
    "quantize.skip names no layer": (GOOD.replace("prune:\n    sparsity: 0.5",
                                                  "quantize:\n    skip: [no_such_layer]"), "no_such_layer"),
    "python tag": ("!!python/object/apply:os.system ['true']\n", "recipe.yaml"),
    "not a mapping": ("- a\n- b\n", "recipe.yaml"),
    "empty file": ("", "recipe.yaml"),
    "not YAML": ("model: [unclosed\n", "recipe.yaml"),
    "missing data file": (GOOD.replace("name: digits", "npz: nowhere.npz"), "nowhere.npz"),
    "missing model file": (GOOD.replace("zoo: lenet300", "path: nowhere.safetensors").replace(
        "kwargs:\n    in_features: 64\n", ""), "nowhere.safetensors"),
}  # fmt: skip


@pytest.fixture
def existing_out(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    return out


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipes_are_named_and_touch_nothing(tmp_path, existing_out, capsys, case):
    text, named = BAD_RECIPES[case]
    path = _recipe(tmp_path, text)
    before = snapshot(existing_out)
    assert_refused(*cli(capsys, "run", path, "--out", existing_out), named)
    assert snapshot(existing_out) == before


def test_bad_data_in_a_recipe_touches_nothing(tmp_path, existing_out, capsys):
    data = tmp_path / "bad.npz"
    np.savez(data, **BAD_DATA["NaN label"])
    path = _recipe(tmp_path, GOOD.replace("name: digits", f"npz: {data}"))
    before = snapshot(existing_out)
    assert_refused(*cli(capsys, "run", path, "--out", existing_out), "bad.npz")
    assert snapshot(existing_out) == before


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unusable_out_is_named(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "a file" else blocker / "sub"
    assert_refused(*cli(capsys, "run", _recipe(tmp_path, GOOD), "--out", out), blocker)
    assert blocker.read_text() == "x"


def test_export_and_sweep_check_out_first(shipped, tmp_path, capsys):
    assert_refused(*cli(capsys, "export", shipped / "model.safetensors", "--out", tmp_path), tmp_path)
    blocker = tmp_path / "f"
    blocker.write_text("x")
    assert_refused(*cli(capsys, "sweep", _recipe(tmp_path, GOOD), "--out", blocker), blocker)
