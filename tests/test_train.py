"""The one training loop: learning, determinism, exact resume, NaN errors, DDP equivalence."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from torchshrink import zoo
from torchshrink.checkpoint import CHECKPOINT_NAME
from torchshrink.errors import TrainingError
from torchshrink.io import load_tensors, read_safetensors_metadata
from torchshrink.measure import accuracy
from torchshrink.train import DatasetBatches, TrainConfig, classification_loss, fit

HELPER = Path(__file__).parent / "helpers" / "ddp_train.py"


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.build("lenet300", in_features=64)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((x - y).abs().max())
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_training_learns_real_digits(digits):
    model = _mlp()
    before = accuracy(model, digits.test)
    result = fit(
        model, DatasetBatches(digits.train, 64), config=TrainConfig(epochs=5, lr=2e-3, progress=False)
    )
    after = accuracy(model, digits.test)
    assert before < 0.3
    assert after > 0.9
    assert result.steps == 5 * 23  # ceil(1437 / 64) batches per epoch
    assert result.epoch_losses[-1]["ce"] < result.epoch_losses[0]["ce"]
    assert not model.training


@pytest.mark.parametrize("optimizer,schedule", [("adam", "cosine"), ("sgd", "constant")])
def test_same_seed_same_weights(digits, optimizer, schedule):
    cfg = TrainConfig(epochs=1, lr=0.01, optimizer=optimizer, schedule=schedule, seed=3, progress=False)
    a, b, c = _mlp(), _mlp(), _mlp()
    fit(a, DatasetBatches(digits.train, 32, seed=3), config=cfg)
    fit(b, DatasetBatches(digits.train, 32, seed=3), config=cfg)
    fit(c, DatasetBatches(digits.train, 32, seed=4), config=cfg)
    assert _max_diff(a, b) == 0.0
    assert _max_diff(a, c) > 0.0  # a different shuffle gives different weights


def test_after_step_runs_once_per_optimizer_step(digits):
    model = _mlp()
    seen = []
    fit(
        model,
        DatasetBatches(digits.train, 256),
        config=TrainConfig(epochs=2, lr=0.1, optimizer="sgd", progress=False),
        after_step=lambda m: seen.append(1),
    )
    assert len(seen) == 2 * 6  # after_step runs once per optimizer step


def test_resume_is_bit_exact(digits, tmp_path):
    train = Subset(digits.train, range(640))
    cfg = TrainConfig(epochs=3, lr=3e-3, checkpoint_every=4, seed=5, progress=False)

    class Crash(Exception):
        pass

    reference = _mlp(1)
    fit(reference, DatasetBatches(train, 64, seed=5), config=cfg)

    interrupted = _mlp(1)
    steps = []

    def crash_at_15(model):
        steps.append(1)
        if len(steps) == 15:
            raise Crash

    with pytest.raises(Crash):
        fit(
            interrupted,
            DatasetBatches(train, 64, seed=5),
            config=cfg,
            checkpoint_dir=tmp_path,
            after_step=crash_at_15,
        )
    assert (tmp_path / CHECKPOINT_NAME).is_file()

    resumed = _mlp(99)  # different initial weights: everything must come from the checkpoint
    result = fit(resumed, DatasetBatches(train, 64, seed=5), config=cfg, checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 12  # the last checkpoint before the crash
    assert result.steps == 30
    assert _max_diff(reference, resumed) == 0.0
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # removed once training finished


def test_resume_refuses_other_settings(digits, tmp_path):
    train = Subset(digits.train, range(256))
    steps = []

    def stop(model):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            _mlp(),
            DatasetBatches(train, 32),
            config=TrainConfig(epochs=2, checkpoint_every=2, progress=False),
            checkpoint_dir=tmp_path,
            after_step=stop,
        )
    with pytest.raises(TrainingError, match="lr"):
        fit(
            _mlp(),
            DatasetBatches(train, 32),
            config=TrainConfig(epochs=2, lr=0.5, progress=False),
            checkpoint_dir=tmp_path,
        )


def test_nan_loss_names_step_and_term(digits):
    def bad_loss(model, batch):
        terms = classification_loss(model, batch)
        return terms | {"penalty": torch.tensor(float("nan"))}

    with pytest.raises(TrainingError, match=r"'penalty' is nan at step 1 \(epoch 1, batch 1\)"):
        fit(_mlp(), DatasetBatches(digits.train, 64), bad_loss, TrainConfig(progress=False))


def test_an_exploding_learning_rate_stops_with_step_term_and_rate(digits):
    """Adam at lr 1e6 keeps every loss finite but grows it by orders of magnitude: stopped, named."""
    config = TrainConfig(epochs=2, lr=1e6, progress=False, desc="finetune")
    with pytest.raises(
        TrainingError,
        match=r"finetune: training diverged: loss .* at step 2 .*'ce'.*learning rate \(now 9.99e\+05\)",
    ):
        fit(_mlp(), DatasetBatches(digits.train, 64), config=config)
    # allowed on request: the same run ends, with a loss far above where it started
    allowed = fit(
        _mlp(),
        DatasetBatches(digits.train, 64),
        config=TrainConfig(epochs=2, lr=1e6, progress=False, divergence=None),
    )
    assert allowed.epoch_losses[-1]["ce"] > 1e3 * 2.5


def test_a_normal_run_is_not_called_divergent(digits):
    result = fit(
        _mlp(),
        DatasetBatches(digits.train, 64),
        config=TrainConfig(epochs=2, lr=0.01, progress=False, divergence=2, num_classes=10),
    )
    assert result.epoch_losses[-1]["ce"] < result.epoch_losses[0]["ce"]
    assert result.epoch_losses[0]["train_accuracy"] < 0.9  # from scratch: it started at chance


def test_accuracy_falling_to_chance_stops_with_epoch_and_rate(digits):
    """SGD at lr 3 wrecks a trained model (93% -> 10%) while its loss stays under 1000x the first
    one: the loss rule misses it, the chance rule stops it after the epoch."""
    trained = _mlp()
    fit(trained, DatasetBatches(digits.train, 64), config=TrainConfig(epochs=5, lr=2e-3, progress=False))
    assert accuracy(trained, digits.test) > 0.9
    config = TrainConfig(epochs=2, lr=3.0, optimizer="sgd", progress=False, desc="finetune", num_classes=10)
    with pytest.raises(
        TrainingError,
        match=r"finetune: training diverged: accuracy on the training batches fell to 0\.1\d+ in epoch 1 "
        r"\(chance for 10 classes: 0\.100\) from 0\.9\d+ at the start; lower the learning rate",
    ):
        fit(copy.deepcopy(trained), DatasetBatches(digits.train, 64), config=config)
    wrecked = copy.deepcopy(trained)
    fit(wrecked, DatasetBatches(digits.train, 64), config=dataclasses.replace(config, divergence=None))
    assert accuracy(wrecked, digits.test) < 0.3  # what the guard kept from being shipped silently
    no_classes = dataclasses.replace(config, num_classes=None)  # unknown chance level: no guard
    fit(copy.deepcopy(trained), DatasetBatches(digits.train, 64), config=no_classes)


def test_inf_data_is_caught(digits):
    x = digits.train.tensors[0].clone()
    x[:] = float("inf")
    with pytest.raises(TrainingError, match="'ce'"):
        fit(
            _mlp(),
            DatasetBatches(TensorDataset(x, digits.train.tensors[1]), 64),
            config=TrainConfig(progress=False),
        )


def test_empty_data_and_frozen_model_are_refused(digits):
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TrainingError, match="no batches"):
        fit(_mlp(), DatasetBatches(empty, 8), config=TrainConfig(progress=False))
    frozen = _mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        fit(frozen, DatasetBatches(digits.train, 64), config=TrainConfig(progress=False))


def test_lr_groups_train_named_parts_at_their_own_rate(digits):
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, lr=1e-2, optimizer="sgd", momentum=0.0, schedule="constant", progress=False,
                      lr_groups={"5.": 0.0})  # fmt: skip
    fit(model, DatasetBatches(Subset(digits.train, range(128)), 64), config=cfg)
    after = dict(model.named_parameters())
    assert torch.equal(after["5.weight"], before["5.weight"])  # the last layer's group has lr 0
    assert not torch.equal(after["1.weight"], before["1.weight"])  # the rest trains at lr
    with pytest.raises(
        TrainingError, match=r"lr_groups prefix\(es\) \['decoder.'\] name no trainable parameter"
    ):
        fit(_mlp(), DatasetBatches(digits.train, 64), config=TrainConfig(lr_groups={"decoder.": 1e-3}))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, launch):
    """torchrun with 2 gloo processes and the same global batch ends with the same weights."""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for nproc, out in ((1, one), (2, two)):
        done = launch([str(HELPER), str(out)], nproc=nproc)
        assert done.returncode == 0, done.stderr[-2000:]
    assert read_safetensors_metadata(two)["world_size"] == "2"
    a, b = load_tensors(one), load_tensors(two)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5
    initial = _mlp(0).state_dict()
    assert max(float((a[k] - initial[k]).abs().max()) for k in a) > 1e-3  # it really trained
