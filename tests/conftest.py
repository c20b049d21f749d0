"""Shared fixtures: small real datasets so tests run in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from torchshrink.data import DatasetBundle, load_data

# `make test` runs two xdist workers on two cores: more than one torch thread per worker
# oversubscribes the CPU, and OpenMP's waiting then makes small ops up to 100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits() -> DatasetBundle:
    """scikit-learn's 8x8 digits: real data, loads in well under a second."""
    return load_data("digits")


@pytest.fixture(scope="session")
def mnist_small() -> DatasetBundle:
    """MNIST-5k cut to 1,000 training and 500 test images."""
    return load_data({"name": "mnist5k", "train_limit": 1000, "test_limit": 500})


@pytest.fixture
def launch() -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python ARGS`` alone (``nproc=1``) or under torchrun with ``nproc`` gloo processes on loopback."""

    def run(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = "1"
        prefix = [sys.executable]
        if nproc > 1:
            # --standalone: torchrun binds a free port itself; a port picked here and closed again
            # could be taken by a test launching at the same time (the other xdist worker)
            prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        return subprocess.run(prefix + args, env=env, capture_output=True, text=True, timeout=timeout)

    return run
