"""The ``encode`` recipe stage: prune -> share -> fine-tune centroids -> packed file, measured on the
model decoded from the file; bits by layer type, by layer or from a mixed-precision search; errors."""

from __future__ import annotations

import functools

import pytest
import torch
from testkit import DIGITS_CNN, DIGITS_MLP, digits_recipe

from torchshrink import load_model, run
from torchshrink.encoding.packfile import read_packed
from torchshrink.errors import EncodeError, RecipeError
from torchshrink.measure import accuracy
from torchshrink.recipe import parse_recipe

recipe = functools.partial(digits_recipe, model=DIGITS_MLP)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    out = tmp_path_factory.mktemp("encode")
    report = run(
        recipe(
            {"train": {"epochs": 8, "lr": 0.003}},
            {"prune": {"sparsity": 0.8}},
            {"finetune": {"epochs": 2}},
            {"encode": {"bits": {"linear": 4, "5": 3}, "finetune_epochs": 2}},
        ),
        out,
    )
    return out, report


def test_encode_ships_a_packed_file_measured_as_decoded(encoded, digits) -> None:
    out, report = encoded
    trained, _, finetuned, stage = report.stages
    path = out / "model.tshrink"
    details, metrics = stage["details"], stage["metrics"]
    assert metrics["size_bytes"] == path.stat().st_size == details["file_bytes"]
    assert details["bits"] == {"1": 4, "3": 4, "5": 3}
    # 20% of the weights at 4 bits + positions: far smaller than the float file and the pruned one
    assert details["compression_ratio"] > 10
    assert metrics["size_bytes"] < finetuned["metrics"]["size_bytes"] / 3
    # pruned weights stay pruned; sharing costs little accuracy after centroid fine-tuning
    assert metrics["nonzero_params"] <= finetuned["metrics"]["nonzero_params"]
    assert metrics["accuracy"] >= finetuned["metrics"]["accuracy"] - 0.03
    # what the report measured is what the file loads back to, and the pipeline's model is it
    from_file = load_model(path)
    final = load_model(out / "model.safetensors")
    x = digits.test.tensors[0]
    assert torch.equal(from_file(x), final(x))
    assert metrics["accuracy"] == accuracy(from_file, digits.test)
    for name in ("1", "3", "5"):
        w = from_file[int(name)].weight
        assert len(torch.unique(w[w != 0])) <= 2 ** details["bits"][name]
    assert "## encode: layers" in (out / "report.md").read_text()
    assert read_packed(path).architecture == {"zoo": "lenet300", "kwargs": {"in_features": 64}}


def test_centroid_fine_tuning_changes_the_codebook_only(tmp_path) -> None:
    common = [{"train": {"epochs": 4, "lr": 0.003}}, {"prune": {"sparsity": 0.8}}]
    tuned = run(recipe(*common, {"encode": {"bits": 3, "finetune_epochs": 2, "lr": 1e-3}}), tmp_path / "a")
    plain = run(recipe(*common, {"encode": {"bits": 3, "finetune_epochs": 0}}), tmp_path / "b")
    a, b = load_model(tmp_path / "a" / "model.tshrink"), load_model(tmp_path / "b" / "model.tshrink")
    for i in (1, 3, 5):
        wa, wb = a[i].weight, b[i].weight
        assert torch.equal(wa == 0, wb == 0)  # same kept positions
        assert not torch.equal(wa, wb)  # trained centroids moved
        # same clustering: weights that share a centroid before tuning still share one after it
        _, groups_b = torch.unique(wb, return_inverse=True)
        _, groups_a = torch.unique(wa, return_inverse=True)
        pairs = torch.unique(torch.stack([groups_b.flatten(), groups_a.flatten()]), dim=1)
        assert pairs.shape[1] == len(torch.unique(groups_b))
    assert tuned.stages[-1]["metrics"]["accuracy"] >= plain.stages[-1]["metrics"]["accuracy"] - 0.01


def test_mixed_bits_from_measured_sensitivity(tmp_path) -> None:
    report = run(
        recipe(
            {"train": {"epochs": 4, "lr": 0.003}},
            {"encode": {"mixed": {"avg_bits": 4}, "finetune_epochs": 0}},
        ),
        tmp_path,
    )
    bits = report.stages[-1]["details"]["bits"]
    sizes = {"1": 64 * 300, "3": 300 * 100, "5": 100 * 10}
    assert sum(bits[n] * sizes[n] for n in sizes) / sum(sizes.values()) <= 4
    assert len(set(bits.values())) > 1  # not uniform: the plan follows sensitivity


def test_encode_works_on_a_structurally_pruned_residual_cnn(tmp_path, digits) -> None:
    report = run(
        digits_recipe(
            {"train": {"epochs": 2, "lr": 0.003}},
            {"prune": {"granularity": "structured", "macs_reduction": 1.5}},
            {"encode": {"finetune_epochs": 1}},
            model=DIGITS_CNN,
        ),
        tmp_path,
    )
    details = report.stages[-1]["details"]
    assert set(details["bits"].values()) == {8, 5}  # convs 8 bits, the linear head 5 (the defaults)
    path = tmp_path / "model.tshrink"
    model = load_model(path)
    x = digits.test.tensors[0][:4]
    assert model(x).shape == (4, 10)
    # as weights of the zoo model, the file's recorded (smaller) layer shapes are used too
    as_weights = load_model({**DIGITS_CNN, "weights": str(path)})
    assert torch.equal(as_weights(x), model(x))


def test_bits_errors_name_the_key_and_the_layers(tmp_path) -> None:
    with pytest.raises(
        EncodeError, match=r"unknown key\(s\) \['fc9'\].*'conv', 'linear' or a layer name \(1, 3, 5\)"
    ):
        run(recipe({"encode": {"bits": {"fc9": 4}}}), tmp_path / "a")
    with pytest.raises(EncodeError, match="layer '1' \\(Linear\\) has no bits: add 'linear' or '1'"):
        run(recipe({"encode": {"bits": {"conv": 4}}}), tmp_path / "b")
    with pytest.raises(RecipeError, match="1 to 8 bits"):
        parse_recipe(recipe({"encode": {"bits": {"linear": 12}}}))
    with pytest.raises(RecipeError, match="file"):
        parse_recipe(recipe({"encode": {"file": "model.bin"}}))


def test_encode_after_quantize_is_refused(tmp_path) -> None:
    with pytest.raises(EncodeError, match="put the encode stage before quantize"):
        run(recipe({"quantize": {"mode": "weight_only", "backend": "torch"}}, {"encode": {}}), tmp_path)
