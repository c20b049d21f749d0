"""Structured pruning of architectures torchshrink did not write (Hugging Face transformers models
built from configs with random weights): pruned, equal to their masked twins, saved, loaded, run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from torchshrink import run
from torchshrink.measure import count_params
from torchshrink.models import load_model, save_model
from torchshrink.pruning.graph import find_groups
from torchshrink.pruning.structural import mask_channels, plan_layer, rebind, remove_channels, resized_shapes

pytest.importorskip("transformers")
HERE = Path(__file__).parent

CASES = {
    "hf_resnet": ((1, 28, 28), 3),  # (input shape, at least this many prunable groups)
    "hf_mobilenet_v2": ((1, 28, 28), 20),
    "hf_bert_mlp": ((7, 32), 1),
}


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.mark.parametrize("name", sorted(CASES))
def test_foreign_model_prunes_saves_loads_and_runs(name, tmp_path):
    import foreign_models

    shape, min_groups = CASES[name]
    model = getattr(foreign_models, name)()
    x = torch.randn(3, *shape)
    groups = find_groups(model, x[:2])
    assert len(groups) >= min_groups
    plan = plan_layer(
        groups, [torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in groups], 0.5, 0.9
    )
    original, twin = copy.deepcopy(model), copy.deepcopy(model)
    mask_channels(twin, rebind(groups, model, twin), plan)
    remove_channels(model, groups, plan)
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out, twin(x), atol=1e-4)
        assert out.shape == original(x).shape
    assert count_params(model)[0] < count_params(original)[0]

    architecture = {
        "factory": f"foreign_models:{name}",
        "kwargs": {},
        "resized": resized_shapes(model, original),
    }
    save_model(tmp_path / "pruned.safetensors", model, architecture, shape)
    again = load_model(
        {"factory": f"foreign_models:{name}", "weights": str(tmp_path / "pruned.safetensors")}
    ).eval()
    with torch.no_grad():
        assert torch.equal(again(x), out)


def test_foreign_model_through_the_pipeline(tmp_path):
    report = run(
        {
            "seed": 0,
            "model": {"factory": "foreign_models:hf_mobilenet_v2"},
            "data": {"name": "mnist5k", "train_limit": 256, "test_limit": 128},
            "measure": {"latency_repeats": 3, "onnx_fp32": False},
            "stages": [
                {"prune": {"granularity": "structured", "macs_reduction": 1.5}},
                {"finetune": {"epochs": 1}},
            ],
        },
        tmp_path,
    )
    assert report.final["macs"] <= report.baseline["macs"] / 1.5
    model = load_model(
        {"factory": "foreign_models:hf_mobilenet_v2", "weights": str(tmp_path / "model.safetensors")}
    )
    assert count_params(model)[0] == report.final["params"]
