"""The user's own data: an ``.npz`` file, or a folder of images with one sub-folder per class."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from torchshrink.data.bundle import DatasetBundle, make_bundle, make_unlabelled_bundle
from torchshrink.errors import CorruptFileError, DataError, MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _to_channels_first(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Scale uint8 pixels to [0, 1] and give images a channel axis.

    (N, D) features stay as they are; (N, H, W) images become (N, 1, H, W) unless axis 1 has 1 or
    3 entries, which is read as (N, C, L) signals; (N, H, W, C) with C in {1, 3} becomes NCHW.
    """
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{path}: key {key!r} must hold numbers, got {x.dtype} values")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.ndim < 2:
        raise DataError(f"{path}: key {key!r} must have a sample axis and features, got shape {x.shape}")
    if x.ndim == 3 and x.shape[1] not in (1, 3):
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = np.transpose(x, (0, 3, 1, 2))
    return x.astype(np.float32)


def _named_input(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """A named input array: integer and boolean arrays (token ids, masks) stay integers, uint8 and
    float arrays are read as images or features like ``x``."""
    if arr.dtype == np.bool_ or (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8):
        if arr.ndim < 1:
            raise DataError(f"{path}: key {key!r} must have a sample axis, got shape {arr.shape}")
        return arr.astype(np.int64)
    return _to_channels_first(arr, path, key)


def load_npz(
    path: str | Path,
    test_fraction: float = 0.2,
    seed: int = 0,
    inputs: Sequence[str] | None = None,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> DatasetBundle:
    """Load ``x`` and ``y`` (and optionally ``x_test``, ``y_test``) from an ``.npz`` file.

    With ``inputs`` (names of arrays, in the order the model's ``forward`` takes them), each named
    array is one model input and ``<name>_test`` its test split: token ids and attention masks,
    or an image with side information.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "npz data file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (
        zipfile.BadZipFile,
        ValueError,
        OSError,
        EOFError,
    ) as exc:  # not npz / npy (pickles are never read)
        raise CorruptFileError(path, f"not a readable .npz archive: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path}: holds a single array, not an .npz archive; save it with np.savez(path, x=x, y=y)"
        )
    with loaded as archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" not in str(exc):
                    raise CorruptFileError(path, f"array {key!r} cannot be read: {exc}") from None
                raise DataError(
                    f"{path}: array {key!r} holds Python objects (pickled, which could run code, so it is "
                    "not read); save numbers: np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64))"
                ) from None
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise CorruptFileError(path, f"array {key!r} cannot be read: {exc}") from None
    names = list(inputs) if inputs else ["x"]
    missing = [n for n in names if n not in arrays]
    if missing:
        if inputs:
            raise DataError(
                f"{path}: data.inputs names {missing}, which the file does not hold; it holds {sorted(arrays)}"
            )
        raise DataError(
            f"{path}: missing key 'x'; an npz dataset needs 'x' (inputs), optionally 'y' (integer labels; "
            f"without them quality is agreement with the original model), 'x_test' and 'y_test' (or list "
            f"the input arrays in data.inputs); found {sorted(arrays)}"
        )
    known = {*names, *(f"{n}_test" for n in names), "y", "y_test"}
    unknown = sorted(set(arrays) - known)
    if unknown and "y" not in arrays:
        raise DataError(
            f"{path}: unknown key(s) {unknown}; an npz dataset holds {names}, optionally 'y' (integer labels) "
            f"and test splits {[f'{n}_test' for n in names]} and 'y_test'; without 'y' it would be taken as "
            "unlabelled (rename the labels to 'y', or list the arrays in data.inputs)"
        )
    has_test = [f"{n}_test" in arrays for n in names]
    if any(has_test) and not all(has_test):
        raise DataError(
            f"{path}: give a test split for every input or for none: {[f'{n}_test' for n in names]}"
        )
    if inputs:
        x = {n: _named_input(arrays[n], path, n) for n in names}
        x_test = (
            {n: _named_input(arrays[f"{n}_test"], path, f"{n}_test") for n in names}
            if all(has_test)
            else None
        )
    else:
        x = _to_channels_first(arrays["x"], path, "x")
        x_test = _to_channels_first(arrays["x_test"], path, "x_test") if "x_test" in arrays else None
    if "y" not in arrays and "y_test" in arrays:
        raise DataError(f"{path}: has 'y_test' but no 'y'; give labels for both splits or for neither")
    try:
        if "y" not in arrays:
            return make_unlabelled_bundle(
                path.stem, x, x_test, test_fraction=test_fraction, seed=seed, input_ranges=input_ranges
            )
        return make_bundle(
            path.stem,
            x,
            arrays["y"],
            x_test,
            arrays.get("y_test"),
            test_fraction=test_fraction,
            seed=seed,
            input_ranges=input_ranges,
        )
    except DataError as exc:  # the bundle's checks name the dataset: name the file instead
        message = str(exc)
        prefix = f"{path.stem}: "
        raise DataError(
            f"{path}: {message[len(prefix) :] if message.startswith(prefix) else message}"
        ) from None


def load_image_folder(
    path: str | Path,
    image_size: tuple[int, int] | None = None,
    grayscale: bool | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetBundle:
    """Load ``path/<class>/<image>`` files; classes are the sorted sub-folder names.

    ``grayscale=None`` keeps one channel when every image is single-channel, else uses RGB.
    Without ``image_size`` every image must have the same size.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: needs one sub-folder per class (at least 2), found {classes or 'none'}")
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{root / cls}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files.extend((f, label) for f in found)
    images = []
    for file, _ in files:
        try:
            with Image.open(file) as img:
                img.load()
                images.append(img.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise CorruptFileError(file, f"not a readable image: {exc}") from exc
    if grayscale is None:
        grayscale = all(img.mode in ("L", "1", "I;16", "I") for img in images)
    mode = "L" if grayscale else "RGB"
    arrays = []
    expected = image_size
    for (file, _), img in zip(files, images, strict=True):
        img = img.convert(mode)
        if image_size is not None:
            img = img.resize((image_size[1], image_size[0]))
        size = (img.height, img.width)
        if expected is None:
            expected = size
        elif size != tuple(expected):
            raise DataError(
                f"{file}: image is {size[0]}x{size[1]} but earlier images are {expected[0]}x{expected[1]}; "
                "set data.image_size: [H, W] to resize them all"
            )
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arrays.append(arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1)))
    x = np.stack(arrays)
    y = np.array([label for _, label in files], dtype=np.int64)
    return make_bundle(root.name, x, y, test_fraction=test_fraction, seed=seed)
