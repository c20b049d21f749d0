"""Ensemble members trained in parallel processes are the members trained one after another."""

from __future__ import annotations

import pytest
import torch
from testkit import DIGITS_MLP

from torchshrink.api import apply_stage
from torchshrink.errors import TrainingError


def _weights(result):
    return [m.state_dict() for m in result.model.members]


@pytest.mark.slow
def test_parallel_members_equal_sequential_ones(digits, tmp_path):
    options = {"members": 3, "epochs": 1, "lr": 3e-3, "vary": "bootstrap", "combine": "weighted"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the parallel workers: the same float order
    try:
        one_by_one = apply_stage(
            "ensemble", DIGITS_MLP, digits, out_dir=tmp_path / "seq", latency_repeats=3, **options
        )
    finally:
        torch.set_num_threads(threads)
    together = apply_stage(
        "ensemble", DIGITS_MLP, digits, out_dir=tmp_path / "par", latency_repeats=3, parallel=2, **options
    )
    for a, b in zip(_weights(one_by_one), _weights(together), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert together.details["members"] == one_by_one.details["members"]  # accuracies and fitted weights
    assert together.metrics["accuracy"] == one_by_one.metrics["accuracy"]
    assert len({tuple(next(iter(w.values())).flatten()[:4].tolist()) for w in _weights(together)}) == 3


def test_a_failing_member_stops_the_stage_with_its_error(digits, tmp_path):
    with pytest.raises(TrainingError, match=r"ensemble-member\d: .*loss term 'ce' is nan"):
        apply_stage(
            "ensemble", DIGITS_MLP, digits, out_dir=tmp_path, latency_repeats=3,
            members=2, epochs=1, lr=1e30, parallel=2,
        )  # fmt: skip
