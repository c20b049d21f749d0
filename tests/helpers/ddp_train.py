"""Train a small MLP on 1,280 real digits and save its weights; run alone or under torchrun.

Used by tests/test_train.py to show that 2 processes (gloo) end where 1 process does.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Subset

from torchshrink import zoo
from torchshrink.data import load_data
from torchshrink.io import save_tensors
from torchshrink.parallel import ddp
from torchshrink.train import DatasetBatches, TrainConfig, fit


def main(out_path: str) -> None:
    info = ddp.init_from_env()
    torch.manual_seed(0)
    model = zoo.build("lenet300", in_features=64)
    data = load_data("digits")
    train = Subset(data.train, range(1280))
    fit(
        model,
        DatasetBatches(train, batch_size=64, seed=7),
        config=TrainConfig(epochs=2, lr=1e-3, seed=7, progress=False),
    )
    if info.is_main:
        save_tensors(out_path, model.state_dict(), {"world_size": str(info.world_size)})
    ddp.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
