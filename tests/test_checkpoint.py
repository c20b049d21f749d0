"""Training checkpoints: one safetensors file (tensors) with JSON metadata (the rest), no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torchshrink.checkpoint import CHECKPOINT_NAME, LoopState, TrainCheckpoint, pack_state, unpack_state
from torchshrink.errors import CorruptFileError, TrainingError
from torchshrink.io import read_safetensors_metadata


def _trained_adam() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_optimizer_state_round_trips_through_tensors_and_json():
    _, optimizer, _ = _trained_adam()
    skeleton, tensors = pack_state(optimizer.state_dict())
    text = json.dumps(skeleton)  # the non-tensor rest is plain JSON
    back = unpack_state(json.loads(text), tensors)
    assert set(back["state"]) == {0, 1, 2, 3}  # integer parameter keys survive
    for key, entry in optimizer.state_dict()["state"].items():
        assert all(torch.equal(entry[n], back["state"][key][n]) for n in entry)
    with pytest.raises(TypeError, match="cannot hold a object"):
        pack_state({"x": object()})


def test_a_resumed_optimizer_takes_the_same_next_step(tmp_path):
    model, optimizer, scheduler = _trained_adam()
    checkpoint = TrainCheckpoint(tmp_path, {"lr": 1e-2})
    checkpoint.save(model, optimizer, scheduler, LoopState(step=3, first_loss=0.5, opening=[(0.9, 32)]))
    assert read_safetensors_metadata(tmp_path / CHECKPOINT_NAME)["format"] == "torchshrink-train-state"

    fresh, fresh_opt, fresh_sched = _trained_adam()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # everything must come from the file
    loop = checkpoint.load(fresh, fresh_opt, fresh_sched)
    assert loop is not None and loop.step == 3 and loop.first_loss == 0.5 and loop.opening == [(0.9, 32)]
    x = torch.randn(5, 4)
    for net, opt, sched in ((model, optimizer, scheduler), (fresh, fresh_opt, fresh_sched)):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_other_settings_and_foreign_files_are_refused(tmp_path):
    model, optimizer, scheduler = _trained_adam()
    TrainCheckpoint(tmp_path, {"lr": 1e-2}).save(model, optimizer, scheduler, LoopState(step=1))
    with pytest.raises(TrainingError, match=r"settings \{'lr': 0.01\}, which differ from \{'lr': 0.02\}"):
        TrainCheckpoint(tmp_path, {"lr": 2e-2}).load(model, optimizer, scheduler)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CorruptFileError, match=CHECKPOINT_NAME):
        TrainCheckpoint(tmp_path, {"lr": 1e-2}).load(model, optimizer, scheduler)
