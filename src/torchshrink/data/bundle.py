"""The in-memory form every dataset takes: train and test tensors plus what a model needs to know."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from torchshrink.digests import combine, tensors_digest
from torchshrink.errors import DataError
from torchshrink.inputs import DEFAULT_NAME, InputSpec, ModelInput, samples, take
from torchshrink.measure import is_embedding_target


@dataclass(frozen=True)
class DatasetBundle:
    """A classification dataset held in memory: model inputs (one tensor, or a tuple for a model that
    takes several, named by ``input_names``) and int64 labels.

    ``labelled`` is False for data that came without labels: its label tensors are placeholders
    until :meth:`labelled_by` fills them with a model's top-1 predictions, and quality is then
    top-1 agreement with that model rather than accuracy.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    labelled: bool = True
    input_names: tuple[str, ...] = (DEFAULT_NAME,)
    input_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @functools.cached_property
    def inputs(self) -> InputSpec:
        """What a model takes from this data: names, dtypes, shapes, integer ranges (observed in both
        splits, or as declared in ``input_ranges``)."""
        train, test = self.train.tensors[0], self.test.tensors[0]
        if isinstance(train, torch.Tensor):
            train, test = (train,), (test,)
        if len(train) != len(self.input_names):
            raise DataError(f"{self.name}: {len(train)} input tensor(s) but names {list(self.input_names)}")
        named = {n: (a, b) for n, a, b in zip(self.input_names, train, test, strict=True)}
        return InputSpec.observe(named, self.input_ranges)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the only float input (without the batch dimension)."""
        return self.inputs.shape

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
        return samples(*(take(t, idx) for t in dataset.tensors))

    def labelled_by(self, predict: Callable[[ModelInput], torch.Tensor], num_classes: int) -> DatasetBundle:
        """The same inputs labelled with ``predict``'s top-1 class (the original model's view of them)."""
        train, test = (
            samples(d.tensors[0], predict(d.tensors[0]).argmax(dim=1)) for d in (self.train, self.test)
        )
        return dataclasses.replace(self, train=train, test=test, num_classes=num_classes, labelled=False)

    def embedded_by(self, predict: Callable[[ModelInput], torch.Tensor]) -> DatasetBundle:
        """The same inputs with ``predict``'s output vectors as targets (an embedding model's view of
        them): quality is then fidelity to that model (cosine, nearest-neighbour agreement)."""
        train, test = (samples(d.tensors[0], predict(d.tensors[0]).float()) for d in (self.train, self.test))
        width = int(train.tensors[1].shape[1])
        return dataclasses.replace(self, train=train, test=test, num_classes=width, labelled=False)

    def judged_by(
        self, predict: Callable[[ModelInput], torch.Tensor], embedding: bool, num_classes: int
    ) -> DatasetBundle:
        """Targets from a reference model: its output vectors (``embedding``) or its top-1 classes."""
        return self.embedded_by(predict) if embedding else self.labelled_by(predict, num_classes)

    def targets_for(
        self, predict: Callable[[ModelInput], torch.Tensor], embedding: bool, width: int
    ) -> DatasetBundle:
        """Targets as a run sets them for a model as given (``predict``, output ``width``): an
        embedding model's own output vectors; unlabelled inputs labelled by the model (quality is
        then agreement with it); labelled data keeps its labels, with the model's width when wider."""
        if embedding or not self.labelled:
            return self.judged_by(predict, embedding, width)
        return dataclasses.replace(self, num_classes=width) if width > self.num_classes else self

    @property
    def embedding(self) -> bool:
        """True when the targets are vectors (see :meth:`embedded_by`), not class labels."""
        return is_embedding_target(self.train.tensors[1])

    def digest(self) -> str:
        """A hash of every sample, target and setting: keys resumable work to exactly this data."""
        named: list[tuple[str, torch.Tensor]] = []
        for split, dataset in (("train", self.train), ("test", self.test)):
            for i, part in enumerate(dataset.tensors):
                parts = part if isinstance(part, (tuple, list)) else (part,)
                named += [(f"{split}.{i}.{j}", t) for j, t in enumerate(parts)]
        settings = json.dumps(
            [self.num_classes, self.labelled, list(self.input_names), dict(self.input_ranges)], default=str
        )
        return combine(settings, tensors_digest(named))

    def calibration(self, n: int = 256, seed: int = 0) -> ModelInput:
        """Up to ``n`` training inputs (no labels) for calibration or importance estimation."""
        return self.subset("train", n, seed).tensors[0]


def _columns(name: str, x: object, what: str) -> dict[str, np.ndarray]:
    """Input arrays by name: one unnamed array is the model's only input (float32); named integer or
    boolean arrays (token ids, masks) become int64, the rest float32. All need the same sample count."""
    named = dict(x) if isinstance(x, Mapping) else {DEFAULT_NAME: x}
    if not named:
        raise DataError(f"{name}: no input arrays")
    out = {}
    for key, value in named.items():
        arr = np.asarray(value)
        integer = isinstance(x, Mapping) and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_)
        if arr.ndim == 0:
            raise DataError(f"{name}: {what} array {key!r} is a single value; give one row per sample")
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise DataError(f"{name}: {what} array {key!r} must hold numbers, got {arr.dtype} values")
        out[key] = arr.astype(np.int64 if integer else np.float32)
        if not integer and arr.size:
            bad = ~np.isfinite(out[key].reshape(len(arr), -1)).all(axis=1)
            if bad.any():
                raise DataError(
                    f"{name}: {what} array {key!r} holds NaN or infinite values (first in sample "
                    f"{int(np.flatnonzero(bad)[0])}); clean or drop those samples"
                )
    lengths = {key: len(a) for key, a in out.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{name}: {what} arrays hold different numbers of samples: {lengths}")
    return out


def _check_same_samples(name: str, train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> None:
    for key in train:
        if test[key].shape[1:] != train[key].shape[1:]:
            suffix = "" if key == DEFAULT_NAME else f" of {key!r}"
            raise DataError(
                f"{name}: test samples{suffix} have shape {test[key].shape[1:]} but training samples have "
                f"{train[key].shape[1:]}"
            )


def _model_input(columns: dict[str, np.ndarray]) -> ModelInput:
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in columns.values())
    return tensors[0] if len(tensors) == 1 else tensors


def make_bundle(
    name: str,
    x: np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor],
    y: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor] | None = None,
    y_test: np.ndarray | torch.Tensor | None = None,
    *,
    test_fraction: float = 0.2,
    test_size: int | None = None,
    seed: int = 0,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> DatasetBundle:
    """Build a bundle, splitting off a stratified test set with ``seed`` when none is given.

    ``x`` is one array (the model's only input) or a mapping of named arrays, in the order the
    model's ``forward`` takes them.
    """
    columns, y_arr = _columns(name, x, "input"), _labels(name, y, "y")
    n = len(next(iter(columns.values())))
    if n == 0:
        raise DataError(f"{name}: x holds no samples")
    if n != len(y_arr):
        raise DataError(f"{name}: x has {n} samples but y has {len(y_arr)}")
    if x_test is None:
        if y_test is not None:
            raise DataError(f"{name}: y_test given without x_test")
        classes, counts = np.unique(y_arr, return_counts=True)
        if counts.min() < 2:
            raise DataError(
                f"{name}: class {int(classes[counts.argmin()])} has only one sample, and the test split is "
                "stratified (each class needs at least 2); add samples or give x_test / y_test"
            )
        train_idx, test_idx = train_test_split(
            np.arange(n), test_size=test_size or test_fraction, stratify=y_arr, random_state=seed
        )
        test_columns = {k: a[test_idx] for k, a in columns.items()}
        columns = {k: a[train_idx] for k, a in columns.items()}
        y_arr, y_te = y_arr[train_idx], y_arr[test_idx]
    else:
        if y_test is None:
            raise DataError(f"{name}: x_test given without y_test")
        test_columns, y_te = _columns(name, x_test, "test input"), _labels(name, y_test, "y_test")
        if set(test_columns) != set(columns):
            raise DataError(
                f"{name}: test inputs {sorted(test_columns)} differ from training inputs {sorted(columns)}"
            )
        test_columns = {k: test_columns[k] for k in columns}
        n_test = len(next(iter(test_columns.values())))
        if n_test != len(y_te):
            raise DataError(f"{name}: x_test has {n_test} samples but y_test has {len(y_te)}")
        _check_same_samples(name, columns, test_columns)
    labels = np.concatenate([y_arr, y_te])
    num_classes = int(labels.max()) + 1
    train = samples(_model_input(columns), torch.as_tensor(y_arr, dtype=torch.long))
    test = samples(_model_input(test_columns), torch.as_tensor(y_te, dtype=torch.long))
    bundle = DatasetBundle(
        name=name,
        train=train,
        test=test,
        num_classes=num_classes,
        input_names=tuple(columns),
        input_ranges=dict(input_ranges or {}),
    )
    bundle.inputs  # noqa: B018 - a declared range that does not hold the data fails here, at load time
    return bundle


def _labels(name: str, y: np.ndarray | torch.Tensor, key: str) -> np.ndarray:
    """``y`` as int64 class indices, checked before anything is split or trained: one label per sample
    (1-D), numbers (not strings or objects), whole, finite and not negative."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise DataError(f"{name}: {key!r} must hold one class index per sample (1-D), got shape {arr.shape}")
    if not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool
    ):
        raise DataError(f"{name}: {key!r} must hold integer class indices, got {arr.dtype} values")
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (np.mod(arr, 1) != 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{name}: {key!r} must hold integer class indices; sample {i} has {float(arr[i])}"
            )
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        i = int(arr.argmin())
        raise DataError(f"{name}: {key!r} must hold class indices >= 0; sample {i} has {arr[i]}")
    return arr


def make_unlabelled_bundle(
    name: str,
    x: np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor],
    x_test: np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor] | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> DatasetBundle:
    """A bundle of inputs without labels (placeholders, ``labelled=False``), split with ``seed`` if no test set."""
    columns = _columns(name, x, "input")
    if x_test is None:
        n = len(next(iter(columns.values())))
        order = np.random.default_rng(seed).permutation(n)
        n_test = max(1, round(n * test_fraction))
        test_columns = {k: a[order[:n_test]] for k, a in columns.items()}
        columns = {k: a[order[n_test:]] for k, a in columns.items()}
    else:
        test_columns = _columns(name, x_test, "test input")
        if set(test_columns) != set(columns):
            raise DataError(
                f"{name}: test inputs {sorted(test_columns)} differ from training inputs {sorted(columns)}"
            )
        test_columns = {k: test_columns[k] for k in columns}
        _check_same_samples(name, columns, test_columns)
    sizes = [len(next(iter(c.values()))) for c in (columns, test_columns)]
    if min(sizes) == 0:
        raise DataError(f"{name}: needs training and test inputs; got {sizes[0]} and {sizes[1]}")
    train, test = (
        samples(_model_input(c), torch.zeros(size, dtype=torch.long))
        for c, size in zip((columns, test_columns), sizes, strict=True)
    )
    bundle = DatasetBundle(
        name=name,
        train=train,
        test=test,
        num_classes=0,
        labelled=False,
        input_names=tuple(columns),
        input_ranges=dict(input_ranges or {}),
    )
    bundle.inputs  # noqa: B018 - fail at load time on a declared range that does not hold the data
    return bundle
