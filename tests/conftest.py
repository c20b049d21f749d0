"""Shared fixtures: small real datasets so tests run in seconds."""

from __future__ import annotations

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
