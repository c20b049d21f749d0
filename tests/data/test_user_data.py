"""The user's own data: .npz files and folders of images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchshrink.data import load_image_folder, load_npz
from torchshrink.errors import CorruptFileError, DataError, MissingFileError

# --- npz --------------------------------------------------------------------------------


def test_npz_x_y_split_stratified(tmp_path: Path) -> None:
    n_classes, per_class = 4, 25
    y = np.repeat(np.arange(n_classes), per_class)
    x = np.zeros((len(y), 3), dtype=np.float32)
    x[:, 0] = np.arange(len(y))  # a unique id per sample
    x[:, 1] = y  # the label, to check pairs stay together
    path = tmp_path / "table.npz"
    np.savez(path, x=x, y=y)

    bundle = load_npz(path, test_fraction=0.2, seed=0)
    assert bundle.name == "table"
    assert (len(bundle.train), len(bundle.test)) == (80, 20)
    assert bundle.num_classes == n_classes
    assert bundle.input_shape == (3,)
    assert torch.bincount(bundle.test.tensors[1]).tolist() == [5] * n_classes
    assert torch.bincount(bundle.train.tensors[1]).tolist() == [20] * n_classes
    # a partition of the samples, labels still attached to their inputs
    ids = torch.cat([bundle.train.tensors[0][:, 0], bundle.test.tensors[0][:, 0]])
    assert sorted(ids.long().tolist()) == list(range(len(y)))
    for split in (bundle.train, bundle.test):
        assert torch.equal(split.tensors[0][:, 1].long(), split.tensors[1])
    # the split follows the seed
    assert torch.equal(load_npz(path, seed=0).test.tensors[0], bundle.test.tensors[0])
    assert not torch.equal(load_npz(path, seed=1).test.tensors[0], bundle.test.tensors[0])


def test_npz_with_explicit_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 5)).astype(np.float32), np.arange(30) % 3
    x_test, y_test = rng.random((7, 5)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2, 2])
    path = tmp_path / "given.npz"
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)

    bundle = load_npz(path, test_fraction=0.5)  # test_fraction unused when a test split is given
    assert torch.equal(bundle.train.tensors[0], torch.from_numpy(x))
    assert torch.equal(bundle.train.tensors[1], torch.from_numpy(y).long())
    assert torch.equal(bundle.test.tensors[0], torch.from_numpy(x_test))
    assert torch.equal(bundle.test.tensors[1], torch.from_numpy(y_test).long())
    assert bundle.train.tensors[1].dtype == torch.int64
    assert bundle.num_classes == 3


def test_npz_uint8_images_get_scaled_and_a_channel_axis(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(20, 6, 5), dtype=np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, 255
    x_test = rng.integers(0, 256, size=(4, 6, 5), dtype=np.uint8)
    path = tmp_path / "gray.npz"
    np.savez(path, x=x, y=np.arange(20) % 2, x_test=x_test, y_test=np.array([0, 1, 0, 1]))

    bundle = load_npz(path)
    x_train = bundle.train.tensors[0]
    assert x_train.dtype == torch.float32
    assert x_train.shape == (20, 1, 6, 5)
    assert bundle.test.tensors[0].shape == (4, 1, 6, 5)
    assert bundle.input_shape == (1, 6, 5)
    assert x_train.min().item() == 0.0 and x_train.max().item() == 1.0
    assert torch.allclose(x_train[:, 0], torch.from_numpy(x).float() / 255.0)
    assert torch.allclose(bundle.test.tensors[0][:, 0], torch.from_numpy(x_test).float() / 255.0)


def test_npz_nhwc_becomes_nchw(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(8, 5, 7, 3), dtype=np.uint8)  # N, H, W, C
    x_test = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    path = tmp_path / "rgb.npz"
    np.savez(path, x=x, y=np.arange(8) % 2, x_test=x_test, y_test=np.array([0, 1]))

    bundle = load_npz(path)
    assert bundle.input_shape == (3, 5, 7)
    expected = torch.from_numpy(x).float().permute(0, 3, 1, 2) / 255.0
    assert torch.allclose(bundle.train.tensors[0], expected)
    # a specific pixel: sample 3, row 4, column 6, blue channel
    assert bundle.train.tensors[0][3, 2, 4, 6].item() == pytest.approx(x[3, 4, 6, 2] / 255.0)
    assert bundle.test.tensors[0].shape == (2, 3, 5, 7)


def test_npz_float_labels_that_are_whole_numbers_become_int64(tmp_path: Path) -> None:
    path = tmp_path / "floaty.npz"
    np.savez(path, x=np.zeros((10, 2), np.float32), y=np.array([0.0, 1.0] * 5))
    bundle = load_npz(path)
    assert bundle.train.tensors[1].dtype == torch.int64
    assert bundle.num_classes == 2


def test_npz_unknown_key_names_path_and_key(tmp_path: Path) -> None:
    # Labels under another name must not be taken for unlabelled data.
    path = tmp_path / "no_labels.npz"
    np.savez(path, x=np.zeros((10, 2)), labels=np.zeros(10))
    with pytest.raises(DataError, match=re.escape(str(path))) as excinfo:
        load_npz(path)
    message = str(excinfo.value)
    assert "unknown key(s) ['labels']" in message and "'y'" in message
    np.savez(path, x=np.zeros((10, 2)), y=np.arange(10) % 2, classes=np.array(["a", "b"]))
    assert load_npz(path).labelled  # with labels, extra arrays (class names, say) are fine


def test_npz_without_labels_is_unlabelled_and_split_by_seed(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.arange(40, dtype=np.float32).reshape(20, 2))
    first, again, other = load_npz(path, seed=0), load_npz(path, seed=0), load_npz(path, seed=1)
    assert not first.labelled and len(first.train) == 16 and len(first.test) == 4
    assert torch.equal(first.test.tensors[0], again.test.tensors[0])
    assert not torch.equal(first.test.tensors[0], other.test.tensors[0])
    inputs = torch.cat([first.train.tensors[0], first.test.tensors[0]])
    assert sorted(inputs[:, 0].tolist()) == list(range(0, 40, 2))  # a split, nothing lost or repeated
    with pytest.raises(DataError, match="'y_test' but no 'y'"):
        np.savez(path, x=np.zeros((4, 2)), y_test=np.zeros(2))
        load_npz(path)


def test_npz_length_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "uneven.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.zeros(9, dtype=np.int64))
    with pytest.raises(DataError, match="x has 10 samples but y has 9"):
        load_npz(path)


def _labels_with(value: object, n: int = 20) -> np.ndarray:
    y = np.arange(n) % 4
    y = y.astype(type(value)) if not isinstance(value, str) else y.astype(str)
    y[7] = value
    return y


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (np.array(["cat", "dog"] * 10), r"'y' must hold integer class indices, got <U3 values"),
        (
            np.zeros((20, 2), dtype=np.int64),
            r"'y' must hold one class index per sample \(1-D\), got shape \(20, 2\)",
        ),
        (_labels_with(float("nan")), r"'y' must hold integer class indices; sample 7 has nan"),
        (_labels_with(1.5), r"'y' must hold integer class indices; sample 7 has 1.5"),
        (_labels_with(-1), r"'y' must hold class indices >= 0; sample 7 has -1"),
        (
            np.array([0] * 10 + [1] * 9 + [2]),
            r"class 2 has only one sample, and the test split is stratified",
        ),
    ],
)
def test_npz_bad_labels_are_named_before_any_split(tmp_path: Path, y: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((20, 3), dtype=np.float32), y=y)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        load_npz(path)


def test_npz_with_no_samples_is_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 3), dtype=np.float32), y=np.zeros(0, dtype=np.int64))
    with pytest.raises(DataError, match="x holds no samples"):
        load_npz(path)


def test_npz_random_bytes_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CorruptFileError, match=re.escape(str(path))):
        load_npz(path)


def test_npz_truncated_archive_is_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((50, 4)), y=np.arange(50) % 2)
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match=re.escape(str(path))):
        load_npz(path)


def test_npz_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.npz"
    with pytest.raises(MissingFileError, match=re.escape(str(path))):
        load_npz(path)


# --- image folders ------------------------------------------------------------------------

# creation order differs from sorted order on purpose; each class has its own gray level
CLASS_LEVELS = {"cat": 200, "ant": 20, "bee": 110}


def _make_folder(root: Path, mode: str = "L", size: tuple[int, int] = (6, 4), per_class: int = 5) -> Path:
    """root/<class>/<i>.png; pixel value = class level + i (size is (width, height) as in PIL)."""
    for cls, level in CLASS_LEVELS.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = level + i if mode == "L" else (level + i, level + i, level + i)
            Image.new(mode, size, color=color).save(root / cls / f"img{i}.png")
    return root


def _level_to_label(x: torch.Tensor) -> torch.Tensor:
    """Recover the class index from a sample's first pixel (classes sorted: ant, bee, cat)."""
    levels = sorted(CLASS_LEVELS.values())  # ant 20, bee 110, cat 200 -> labels 0, 1, 2
    pixel = (x.flatten(1)[:, 0] * 255).round()
    return torch.tensor([max(i for i, lv in enumerate(levels) if p >= lv) for p in pixel.tolist()])


def test_folder_grayscale_classes_sorted_and_labels(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "insects")
    bundle = load_image_folder(root)
    assert bundle.name == "insects"
    assert bundle.num_classes == 3
    assert bundle.input_shape == (1, 4, 6)  # channels, height, width
    assert (len(bundle.train), len(bundle.test)) == (12, 3)
    # stratified: one image per class in the test split
    assert sorted(bundle.test.tensors[1].tolist()) == [0, 1, 2]
    for split in (bundle.train, bundle.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min().item() >= 0.0 and x.max().item() <= 1.0
        assert torch.equal(_level_to_label(x), y)  # ant -> 0, bee -> 1, cat -> 2
    # a specific value: the image is uniform, value/255
    pooled = torch.cat([bundle.train.tensors[0], bundle.test.tensors[0]])
    assert any(torch.allclose(img, torch.full_like(img, 22 / 255)) for img in pooled)


def test_folder_rgb_gives_three_channels(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "colour", mode="RGB")
    bundle = load_image_folder(root)
    x = bundle.train.tensors[0]
    assert bundle.input_shape == (3, 4, 6)
    assert torch.equal(_level_to_label(x), bundle.train.tensors[1])


def test_folder_mixed_modes_auto_uses_rgb_and_grayscale_flag_forces_one_channel(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "mixed")
    Image.new("RGB", (6, 4), color=(255, 0, 0)).save(root / "ant" / "red.png")
    assert load_image_folder(root).input_shape == (3, 4, 6)
    gray = load_image_folder(root, grayscale=True)
    assert gray.input_shape == (1, 4, 6)
    assert len(gray.train) + len(gray.test) == 16
    # an all-gray folder forced to RGB repeats the value in three channels
    rgb = load_image_folder(_make_folder(tmp_path / "gray"), grayscale=False)
    x = rgb.train.tensors[0]
    assert x.shape[1] == 3
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_folder_differing_sizes_names_the_offending_file(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "sizes")
    odd = root / "bee" / "img9.png"
    Image.new("L", (9, 7), color=110).save(odd)
    with pytest.raises(DataError, match=re.escape(str(odd))) as excinfo:
        load_image_folder(root)
    assert "7x9" in str(excinfo.value) and "4x6" in str(excinfo.value)
    assert "image_size" in str(excinfo.value)


def test_folder_image_size_resizes_everything(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "resize")
    Image.new("L", (9, 7), color=110).save(root / "bee" / "img9.png")
    bundle = load_image_folder(root, image_size=(5, 3))
    assert bundle.input_shape == (1, 5, 3)
    assert len(bundle.train) + len(bundle.test) == 16
    # a uniform image stays uniform with the same value after resizing
    assert torch.equal(_level_to_label(bundle.train.tensors[0]), bundle.train.tensors[1])


def test_folder_non_image_with_image_suffix_is_corrupt(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "broken")
    fake = root / "cat" / "notes.png"
    fake.write_text("this is not a png")
    with pytest.raises(CorruptFileError, match=re.escape(str(fake))):
        load_image_folder(root)


def test_folder_ignores_files_without_image_suffix(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "extra")
    (root / "cat" / "README.txt").write_text("not an image")
    bundle = load_image_folder(root)
    assert len(bundle.train) + len(bundle.test) == 15


def test_folder_needs_two_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "single"
    (root / "only").mkdir(parents=True)
    Image.new("L", (4, 4)).save(root / "only" / "a.png")
    Image.new("L", (4, 4)).save(root / "loose.png")
    with pytest.raises(DataError, match=re.escape(str(root))) as excinfo:
        load_image_folder(root)
    assert "at least 2" in str(excinfo.value) and "'only'" in str(excinfo.value)


def test_folder_empty_class_folder(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "gap")
    (root / "dog").mkdir()
    with pytest.raises(DataError, match=re.escape(str(root / "dog"))):
        load_image_folder(root)


def test_folder_missing(tmp_path: Path) -> None:
    root = tmp_path / "absent"
    with pytest.raises(MissingFileError, match=re.escape(str(root))):
        load_image_folder(root)


def test_npy_file_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*np.savez"):
        load_npz(path)


def test_signals_with_a_channel_axis_keep_their_shape(tmp_path):
    path = tmp_path / "sig.npz"
    np.savez(path, x=np.zeros((20, 1, 40), np.float32), y=np.arange(20) % 2)
    assert load_npz(path).input_shape == (1, 40)
