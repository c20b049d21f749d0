"""Atomic, safe file I/O (torchshrink.io) and obtaining/saving models (torchshrink.models)."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from torchshrink.errors import (
    CorruptFileError,
    MissingFileError,
    ModelLoadError,
    ShapeMismatchError,
    UntrustedPickleError,
)
from torchshrink.io import (
    atomic_path,
    file_kind,
    load_state_dict_file,
    load_tensors,
    read_safetensors_metadata,
    save_tensors,
)
from torchshrink.measure import check_model_fits
from torchshrink.models import ModelSpec, load_model, open_model, save_model
from torchshrink.zoo import lenet5, lenet5_half


class TinyNet(nn.Module):
    """Defined at module level so that ``torch.save(model)`` can pickle it by reference."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


FACTORY_SOURCE = """
from torch import nn


def build(hidden=8, num_classes=10):
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_model():
    return 42
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, never-imported module in tmp_path holding factory functions; returns its name."""
    name = f"tsfactory_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic_path --------------------------------------------------------------------------


def test_atomic_path_file_appears_only_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "result.txt"  # the folder is created too
    with atomic_path(dest) as tmp:
        assert tmp != dest and tmp.parent == dest.parent
        tmp.write_text("complete")
        assert not dest.exists()
    assert dest.read_text() == "complete"
    assert _listing(dest.parent) == ["result.txt"]


def test_atomic_path_failure_keeps_old_content_and_cleans_up(tmp_path: Path) -> None:
    dest = tmp_path / "result.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(dest) as tmp:
        tmp.write_text("half-written new")
        raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert _listing(tmp_path) == ["result.txt"]


def test_atomic_path_failure_creates_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "never.bin"
    with pytest.raises(KeyError), atomic_path(dest) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyError("x")
    assert _listing(tmp_path) == []


# --- safetensors ------------------------------------------------------------------------------


def test_save_load_tensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shared = torch.randn(3, 4)
    tensors = {
        "w": torch.randn(5, 7),
        "b": torch.arange(6, dtype=torch.int64),
        "half": torch.randn(2, 2).half(),
        "tied_a": shared,
        "tied_b": shared,  # shared storage, as in a model with tied weights
        "view": torch.randn(4, 6).t(),  # non-contiguous
    }
    path = save_tensors(tmp_path / "t.safetensors", tensors, {"note": "hello"})
    loaded = load_tensors(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t), name
    assert read_safetensors_metadata(path) == {"note": "hello"}
    assert _listing(tmp_path) == ["t.safetensors"]


def test_truncated_safetensors_is_corrupt(tmp_path: Path) -> None:
    good = save_tensors(tmp_path / "good.safetensors", {"w": torch.randn(20, 20)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=re.escape(str(bad))):
        load_tensors(bad)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorruptFileError, match=re.escape(str(tiny))):
        load_tensors(tiny)
    with pytest.raises(CorruptFileError, match=re.escape(str(tiny))):
        read_safetensors_metadata(tiny)


def test_load_tensors_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.safetensors"
    with pytest.raises(MissingFileError, match=re.escape(str(path))):
        load_tensors(path)


# --- file_kind ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")
def test_file_kind_detects_formats(tmp_path: Path) -> None:
    st = save_tensors(tmp_path / "weights.bin", {"w": torch.ones(2)})  # content, not suffix
    assert file_kind(st) == "safetensors"

    script = tmp_path / "scripted.pt"
    torch.jit.script(lenet5()).save(str(script))
    assert file_kind(script) == "torchscript"

    sd = tmp_path / "sd.pt"
    torch.save(TinyNet().state_dict(), sd)
    assert file_kind(sd) == "torch"

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07anything")
    assert file_kind(onnx) == "onnx"

    other = tmp_path / "notes.dat"
    other.write_bytes(b"hello world, not a model")
    assert file_kind(other) == "unknown"

    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "none.pt"))):
        file_kind(tmp_path / "none.pt")


# --- load_state_dict_file -------------------------------------------------------------------------


def test_load_state_dict_file_from_torch_save(tmp_path: Path) -> None:
    model = TinyNet()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    sd = load_state_dict_file(path)
    assert set(sd) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(sd[name], t)
    # a checkpoint dict with a "state_dict" entry is unwrapped
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    assert torch.equal(load_state_dict_file(ckpt)["fc1.weight"], model.fc1.weight)


def test_load_state_dict_file_from_safetensors(tmp_path: Path) -> None:
    model = TinyNet()
    path = save_tensors(tmp_path / "w.safetensors", model.state_dict())
    assert torch.equal(load_state_dict_file(path)["fc2.bias"], model.fc2.bias)


def test_load_state_dict_file_refuses_pickled_module(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(TinyNet(), path)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle") as excinfo:
        load_state_dict_file(path)
    assert str(path) in str(excinfo.value)


class _Hostile:
    def __reduce__(self):  # unpickling would call os.system
        return (os.system, ("echo pwned",))


def test_a_hostile_pickle_is_called_untrusted_not_damaged(tmp_path: Path) -> None:
    """torch says "unsupported GLOBAL posix.system ... is blocked": that is a pickle of code, not damage."""
    path = tmp_path / "hostile.pt"
    torch.save({"w": torch.ones(1), "x": _Hostile()}, path)
    with pytest.raises(UntrustedPickleError, match="can execute code"):
        load_state_dict_file(path)


def test_load_state_dict_file_rejects_non_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(CorruptFileError, match=re.escape(str(path))):
        load_state_dict_file(path)


# --- ModelSpec / open_model ---------------------------------------------------------------------


def test_open_model_zoo_name() -> None:
    loaded = open_model("lenet5")
    assert loaded.architecture == {"zoo": "lenet5", "kwargs": {}}
    assert loaded.module(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert open_model({"zoo": "lenet5", "kwargs": {"num_classes": 4}}).architecture == {
        "zoo": "lenet5",
        "kwargs": {"num_classes": 4},
    }


def test_model_spec_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        ModelSpec()
    with pytest.raises(ValidationError, match=re.escape("['zoo', 'factory']")):
        ModelSpec(zoo="lenet5", factory="pkg.mod:fn")
    with pytest.raises(ValidationError, match=re.escape("['zoo', 'path']")):
        ModelSpec(zoo="lenet5", path=tmp_path / "m.safetensors")


def test_model_spec_unknown_zoo_lists_known() -> None:
    with pytest.raises(ValidationError, match="'alexnet'") as excinfo:
        ModelSpec(zoo="alexnet")
    assert "lenet5_half" in str(excinfo.value) and "resnet" in str(excinfo.value)


def test_model_spec_factory_needs_colon() -> None:
    with pytest.raises(ValidationError, match=re.escape("'mypkg.build'")):
        ModelSpec(factory="mypkg.build")


def test_model_spec_path_with_weights_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="'weights'"):
        ModelSpec(path=tmp_path / "a.safetensors", weights=tmp_path / "b.safetensors")


# --- factories ------------------------------------------------------------------------------------


def test_factory_with_kwargs_and_weights(tmp_path: Path, factory_module: str) -> None:
    ref = f"{factory_module}:build"
    kwargs = {"hidden": 5, "num_classes": 3}
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    weights = save_tensors(tmp_path / "factory_w.safetensors", trained.state_dict())

    loaded = open_model({"factory": ref, "kwargs": kwargs, "weights": str(weights)})
    assert loaded.architecture == {"factory": ref, "kwargs": kwargs}
    x = torch.randn(6, 4)
    assert torch.equal(loaded.module(x), trained(x))
    assert loaded.module[0].out_features == 5


def test_factory_errors(factory_module: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"{factory_module}:nope")):
        load_model({"factory": f"{factory_module}:nope"})
    with pytest.raises(ModelLoadError, match="no_such_module_xyz"):
        load_model({"factory": "no_such_module_xyz:build"})
    with pytest.raises(ModelLoadError, match="int, not a torch.nn.Module"):
        load_model({"factory": f"{factory_module}:not_a_model"})
    with pytest.raises(ModelLoadError, match="depth"):
        load_model({"factory": f"{factory_module}:build", "kwargs": {"depth": 3}})


# --- save_model / load_model ------------------------------------------------------------------


def test_save_model_load_model_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = lenet5(num_classes=4)
    path = tmp_path / "lenet.safetensors"
    save_model(path, model, {"zoo": "lenet5", "kwargs": {"num_classes": 4}}, inputs=(1, 28, 28))

    loaded = open_model(path)
    assert loaded.architecture == {"zoo": "lenet5", "kwargs": {"num_classes": 4}}
    assert loaded.inputs is not None and loaded.inputs.shape == (1, 28, 28)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert torch.equal(load_model(path).eval()(x), model(x))
    assert torch.equal(load_model(str(path)).eval()(x), model(x))


def test_save_model_round_trip_with_batchnorm_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = open_model({"zoo": "resnet", "kwargs": {"width": 4}})
    net = model.module
    net.train()
    net(torch.randn(8, 1, 28, 28))  # update running statistics
    path = save_model(tmp_path / "r.safetensors", net, model.architecture)
    net.eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(load_model(path).eval()(x), net(x))


def test_saved_factory_model_refuses_to_load_alone(tmp_path: Path, factory_module: str) -> None:
    ref = f"{factory_module}:build"
    model = load_model({"factory": ref, "kwargs": {"hidden": 3}})
    sys.modules.pop(factory_module, None)
    path = save_model(tmp_path / "f.safetensors", model, {"factory": ref, "kwargs": {"hidden": 3}})
    with pytest.raises(ModelLoadError, match=re.escape(repr(ref))) as excinfo:
        load_model(path)
    assert str(path) in str(excinfo.value)
    assert factory_module not in sys.modules  # the file's factory was not imported
    # the suggested way works
    again = load_model({"factory": ref, "kwargs": {"hidden": 3}, "weights": str(path)})
    x = torch.randn(2, 4)
    assert torch.equal(again(x), model(x))


def test_plain_safetensors_weights_need_an_architecture(tmp_path: Path) -> None:
    path = save_tensors(tmp_path / "plain.safetensors", lenet5().state_dict())
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        load_model(path)


def test_weights_of_wrong_shape(tmp_path: Path) -> None:
    sd = lenet5().state_dict()
    sd["7.weight"] = torch.zeros(500, 400)  # only this layer is off
    path = save_tensors(tmp_path / "odd.safetensors", sd)
    with pytest.raises(ShapeMismatchError, match=re.escape("'7.weight'")) as excinfo:
        load_model({"zoo": "lenet5", "weights": str(path)})
    message = str(excinfo.value)
    assert "(500, 800)" in message  # in the model
    assert "(500, 400)" in message  # in the weights
    assert str(path) in message


def test_weights_of_a_smaller_model_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save(lenet5_half().state_dict(), path)
    with pytest.raises(ShapeMismatchError, match=r"layer '\d+\.(weight|bias)' has shape"):
        load_model({"zoo": "lenet5", "weights": str(path)})


def test_weights_with_missing_keys(tmp_path: Path) -> None:
    sd = lenet5().state_dict()
    del sd["9.bias"]
    path = save_tensors(tmp_path / "partial.safetensors", sd)
    with pytest.raises(ModelLoadError, match=re.escape("'9.bias'")):
        load_model({"zoo": "lenet5", "weights": str(path)})


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.jit")
def test_torchscript_file_loads_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = lenet5().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    loaded = open_model(path)
    assert loaded.architecture is None
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(loaded.module(x), model(x), atol=1e-6)


def test_pickled_module_needs_trust_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    path = tmp_path / "whole.pt"
    torch.save(model, path)

    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_model(path)
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        load_model(ModelSpec(path=path))

    loaded = load_model(ModelSpec(path=path, trust_pickle=True))
    assert isinstance(loaded, TinyNet)
    x = torch.randn(5, 4)
    assert torch.equal(loaded(x), model(x))


def test_torch_state_dict_file_as_path_needs_an_architecture(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))) as excinfo:
        load_model(path)
    assert not isinstance(excinfo.value, UntrustedPickleError)
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model(ModelSpec(path=path, trust_pickle=True))


def test_onnx_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08\x07")
    with pytest.raises(ModelLoadError, match="ONNX"):
        load_model(path)


# --- check_model_fits ---------------------------------------------------------------------------


def test_check_model_fits_accepts_matching_data() -> None:
    model = lenet5()
    model.train()
    check_model_fits(model, (1, 28, 28), 10, "lenet5")
    assert model.training  # mode restored


def test_check_model_fits_wrong_input_shape() -> None:
    model = lenet5()
    with pytest.raises(ShapeMismatchError, match=re.escape("(1, 8, 8)")) as excinfo:
        check_model_fits(model, (1, 8, 8), 10, "digits vs lenet5")
    assert "digits vs lenet5" in str(excinfo.value)
    assert model.training


def test_check_model_fits_too_few_classes() -> None:
    with pytest.raises(ShapeMismatchError, match="outputs 3 classes") as excinfo:
        check_model_fits(lenet5(num_classes=3), (1, 28, 28), 10, "src")
    message = str(excinfo.value)
    assert "up to 9" in message and "(1, 10)" in message and "num_classes" in message


def test_check_model_fits_returns_a_wider_models_width() -> None:
    # An ImageNet-style model on data that uses a few of its classes is fine: its own width counts.
    assert check_model_fits(lenet5(), (1, 28, 28), 3, "src") == 10


def test_garbage_torch_files_are_corrupt_not_untrusted(tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CorruptFileError, match=re.escape(str(random_bytes))) as err:
        load_state_dict_file(random_bytes)
    assert not isinstance(err.value, UntrustedPickleError)
    text = tmp_path / "notes.dat"
    text.write_bytes(b"hello world, not a model")
    with pytest.raises(CorruptFileError, match=re.escape(str(text))):
        load_state_dict_file(text)
