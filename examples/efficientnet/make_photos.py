"""Build an unlabelled image set from the real photos scikit-image ships: seeded random crops.

``python make_photos.py OUT.npz [--size 224] [--train 256] [--test 256]`` writes ``x`` and
``x_test`` (N, 3, size, size) float32 in [-1, 1], the EfficientNet-Lite preprocessing. Train and
test crops come from disjoint halves of each photo's crop positions' random stream, never the
same crop twice. No labels: torchshrink measures top-1 agreement with the original model.
"""

from __future__ import annotations

import argparse

import numpy as np

# The photos inside the scikit-image wheel (chelsea and cat are the same picture; kept once).
COLOUR = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "colorwheel",
    "retina",
    "hubble_deep_field",
    "logo",
)
GREY = ("camera", "brick", "grass", "gravel", "coins", "moon", "clock")


def _photos() -> list[np.ndarray]:
    from skimage import data

    out = [data.stereo_motorcycle()[0]]
    for name in COLOUR:
        out.append(np.asarray(getattr(data, name)())[..., :3])
    for name in GREY:
        out.append(np.repeat(np.asarray(getattr(data, name)())[..., None], 3, axis=-1))
    return out


def crops(n: int, size: int, rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """``n`` random square crops (scale 0.3-1 of the short side), resized to ``size``, some mirrored."""
    from PIL import Image

    batch = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        batch[i] = ((arr - 0.5) / 0.5).transpose(2, 0, 1)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    photos = _photos()
    x = crops(args.train, args.size, np.random.default_rng([args.seed, 0]), photos)
    x_test = crops(args.test, args.size, np.random.default_rng([args.seed, 1]), photos)
    np.savez(args.out, x=x, x_test=x_test)
    print(
        f"{args.out}: {len(x)} train and {len(x_test)} test crops of {len(photos)} photos, {args.size}x{args.size}"
    )


if __name__ == "__main__":
    main()
