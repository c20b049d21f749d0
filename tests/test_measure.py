"""measure.py: each metric against values computed by hand."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from torchshrink import zoo
from torchshrink.measure import (
    METRIC_NAMES,
    accuracy,
    count_activations,
    count_macs,
    count_params,
    interleaved_medians,
    latency_ms,
    measure,
    serialized_size,
)


def test_accuracy_counts_correct_predictions():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # predicts the larger coordinate
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(model, TensorDataset(x, y), batch_size=3) == 0.75


def test_params_and_nonzeros():
    model = nn.Linear(10, 5)
    with torch.no_grad():
        model.weight[:2] = 0
    assert count_params(model) == (55, 55 - 20)
    tied = nn.Sequential(model, nn.ReLU(), model)  # shared parameters count once
    assert count_params(tied)[0] == 55


def test_macs_match_hand_counts():
    assert count_macs(zoo.build("lenet300"), (1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
    conv1 = 20 * 24 * 24 * 25
    conv2 = 50 * 8 * 8 * 20 * 25
    assert count_macs(zoo.build("lenet5"), (1, 28, 28)) == conv1 + conv2 + 800 * 500 + 500 * 10


def test_activations_count_every_written_element_but_views():
    # conv1 -> relu -> pool, conv2 -> relu -> pool, flatten (a view: free), fc1 -> relu, fc2
    conv1, conv2 = 20 * 24 * 24, 50 * 8 * 8
    expected = 2 * conv1 + conv1 // 4 + 2 * conv2 + conv2 // 4 + 2 * 500 + 10
    assert count_activations(zoo.build("lenet5"), (1, 28, 28)) == expected
    # one conv1 channel fewer: its output, its ReLU and its pooled map are not written
    fewer = count_activations(zoo.build("lenet5", conv1=19), (1, 28, 28))
    assert expected - fewer == 24 * 24 * 2 + 12 * 12


def test_serialized_size_is_the_safetensors_file_size(tmp_path):
    model = zoo.build("lenet5")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    assert serialized_size(model) == (tmp_path / "m.safetensors").stat().st_size
    assert 431_080 * 4 < serialized_size(model) < 431_080 * 4 + 4096


class _Sleeper(torch.nn.Module):
    """Takes 2 ms per sample and no CPU: its latency has a known lower bound on any machine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002 * len(x))
        return x


def test_latency_is_the_time_of_a_forward_pass_in_ms():
    b1 = latency_ms(_Sleeper(), (1, 4), 1, repeats=5, warmup=1)
    b16 = latency_ms(_Sleeper(), (1, 4), 16, repeats=5, warmup=1)
    assert 2.0 <= b1 < 32.0 <= b16  # milliseconds, and the batch is really fed through
    assert latency_ms(zoo.build("lenet5"), (1, 28, 28), 1, repeats=3, warmup=1) > 0


def test_measure_returns_every_metric_and_counts_the_artefact(tmp_path, digits):
    model = zoo.build("lenet300", in_features=64)
    artefact = tmp_path / "shipped.bin"
    artefact.write_bytes(b"x" * 1234)
    metrics = measure(model, digits.test, artefact=artefact, latency_repeats=3)
    assert tuple(metrics) == METRIC_NAMES
    assert metrics["size_bytes"] == 1234
    assert metrics["params"] == metrics["nonzero_params"] == 64 * 300 + 300 + 30_100 + 1010
    assert metrics["accuracy"] == pytest.approx(accuracy(model, digits.test))
    assert model.training  # measuring does not leave the model in another mode


def test_interleaved_medians_orders_and_calls_each_variant():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    def fast():
        calls["fast"] += 1

    medians = interleaved_medians({"slow": slow, "fast": fast}, repeats=7, warmup=2)
    assert calls == {"slow": 9, "fast": 9}
    assert medians["slow"] >= 4.0 > medians["fast"]


def test_reference_gives_side_by_side_speedup(digits):
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    big = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )
    metrics = measure(small, digits.test, latency_repeats=15, reference=big)
    assert metrics["speedup_b32"] > 1.5  # ~4M MACs against 640 per sample
    assert "speedup_b1" in measure(big, digits.test, latency_repeats=3, reference=small)
    assert "speedup_b1" not in measure(small, digits.test, latency_repeats=3)


def test_neighbour_agreement_compares_nearest_neighbours_in_row_chunks() -> None:
    from torchshrink.measure import _nearest, neighbour_agreement

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(50, 8, generator=gen)
    assert torch.equal(_nearest(v, rows=7), _nearest(v, rows=1000))  # chunking changes nothing
    brute = torch.nn.functional.normalize(v, dim=1) @ torch.nn.functional.normalize(v, dim=1).T
    brute.fill_diagonal_(-2)
    assert torch.equal(_nearest(v, rows=7), brute.argmax(1))
    assert neighbour_agreement(v, v) == 1.0
    assert neighbour_agreement(torch.randn(50, 8, generator=gen), v) < 0.3  # unrelated embeddings
