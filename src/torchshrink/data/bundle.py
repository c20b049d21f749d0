"""The in-memory form every dataset takes: train and test tensors plus what a model needs to know."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from torchshrink.errors import DataError


@dataclass(frozen=True)
class DatasetBundle:
    """A classification dataset held in memory as float inputs and int64 labels.

    ``labelled`` is False for data that came without labels: its label tensors are placeholders
    until :meth:`labelled_by` fills them with a model's top-1 predictions, and quality is then
    top-1 agreement with that model rather than accuracy.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    labelled: bool = True

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (without the batch dimension)."""
        return tuple(self.train.tensors[0].shape[1:])

    def subset(self, split: str, n: int, seed: int = 0) -> TensorDataset:
        """A random subset of ``n`` samples of ``split`` ("train" or "test"), e.g. for calibration."""
        if split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        dataset = self.train if split == "train" else self.test
        total = len(dataset)
        if n >= total:
            return dataset
        generator = torch.Generator().manual_seed(seed)
        idx = torch.randperm(total, generator=generator)[:n]
        return TensorDataset(*(t[idx] for t in dataset.tensors))

    def labelled_by(self, predict: Callable[[torch.Tensor], torch.Tensor], num_classes: int) -> DatasetBundle:
        """The same inputs labelled with ``predict``'s top-1 class (the original model's view of them)."""
        train, test = (
            TensorDataset(d.tensors[0], predict(d.tensors[0]).argmax(dim=1)) for d in (self.train, self.test)
        )
        return dataclasses.replace(self, train=train, test=test, num_classes=num_classes, labelled=False)

    def calibration(self, n: int = 256, seed: int = 0) -> torch.Tensor:
        """Up to ``n`` training inputs (no labels) for calibration or importance estimation."""
        return self.subset("train", n, seed).tensors[0]


def make_bundle(
    name: str,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor | None = None,
    y_test: np.ndarray | torch.Tensor | None = None,
    *,
    test_fraction: float = 0.2,
    test_size: int | None = None,
    seed: int = 0,
) -> DatasetBundle:
    """Build a bundle, splitting off a stratified test set with ``seed`` when none is given."""
    x_arr, y_arr = np.asarray(x, dtype=np.float32), np.asarray(y)
    if len(x_arr) != len(y_arr):
        raise DataError(f"{name}: x has {len(x_arr)} samples but y has {len(y_arr)}")
    if x_test is None:
        if y_test is not None:
            raise DataError(f"{name}: y_test given without x_test")
        x_arr, x_te, y_arr, y_te = train_test_split(
            x_arr, y_arr, test_size=test_size or test_fraction, stratify=y_arr, random_state=seed
        )
    else:
        if y_test is None:
            raise DataError(f"{name}: x_test given without y_test")
        x_te, y_te = np.asarray(x_test, dtype=np.float32), np.asarray(y_test)
        if len(x_te) != len(y_te):
            raise DataError(f"{name}: x_test has {len(x_te)} samples but y_test has {len(y_te)}")
        if x_te.shape[1:] != x_arr.shape[1:]:
            raise DataError(f"{name}: x_test samples have shape {x_te.shape[1:]} but x has {x_arr.shape[1:]}")
    labels = np.concatenate([y_arr, y_te])
    if not np.issubdtype(labels.dtype, np.integer):
        if np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise DataError(f"{name}: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"{name}: labels must be >= 0, found {labels.min()}")
    num_classes = int(labels.max()) + 1
    train = TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x_arr)), torch.as_tensor(y_arr, dtype=torch.long)
    )
    test = TensorDataset(
        torch.from_numpy(np.ascontiguousarray(x_te)), torch.as_tensor(y_te, dtype=torch.long)
    )
    return DatasetBundle(name=name, train=train, test=test, num_classes=num_classes)


def make_unlabelled_bundle(
    name: str,
    x: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetBundle:
    """A bundle of inputs without labels (placeholders, ``labelled=False``), split with ``seed`` if no test set."""
    x_arr = np.asarray(x, dtype=np.float32)
    if x_test is None:
        order = np.random.default_rng(seed).permutation(len(x_arr))
        n_test = max(1, round(len(x_arr) * test_fraction))
        x_arr, x_te = x_arr[order[n_test:]], x_arr[order[:n_test]]
    else:
        x_te = np.asarray(x_test, dtype=np.float32)
        if x_te.shape[1:] != x_arr.shape[1:]:
            raise DataError(f"{name}: x_test samples have shape {x_te.shape[1:]} but x has {x_arr.shape[1:]}")
    if len(x_arr) == 0 or len(x_te) == 0:
        raise DataError(f"{name}: needs training and test inputs; got {len(x_arr)} and {len(x_te)}")
    train, test = (
        TensorDataset(torch.from_numpy(np.ascontiguousarray(a)), torch.zeros(len(a), dtype=torch.long))
        for a in (x_arr, x_te)
    )
    return DatasetBundle(name=name, train=train, test=test, num_classes=0, labelled=False)
