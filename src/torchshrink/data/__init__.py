"""Datasets: the built-in offline ones and the user's own (arrays, images, text), described by a
:class:`DataSpec`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from torchshrink.data.builtin import BUILTIN, digits, mnist1d, mnist5k
from torchshrink.data.bundle import DatasetBundle, make_bundle
from torchshrink.data.text import load_text
from torchshrink.data.user import load_image_folder, load_npz

__all__ = [
    "DataSpec",
    "DatasetBundle",
    "load_data",
    "make_bundle",
    "mnist5k",
    "digits",
    "mnist1d",
    "load_npz",
    "load_image_folder",
    "load_text",
]


class DataSpec(BaseModel, extra="forbid"):
    """Where the data comes from: exactly one of ``name`` (built-in), ``npz``, ``folder`` or ``text``
    (with ``tokenizer``)."""

    name: Literal["mnist5k", "digits", "mnist1d"] | None = None
    npz: Path | None = None
    folder: Path | None = None
    text: Path | None = Field(
        None, description='a .txt corpus (one text a line) or .jsonl ("text", optional "label")'
    )
    tokenizer: Path | None = Field(None, description="text: a local tokenizer directory (tokenizer.json)")
    max_length: int = Field(
        128, ge=2, description="text: tokens per text (longer ones are cut, shorter padded)"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="held-out share when the data has no test split"
    )
    image_size: tuple[int, int] | None = Field(None, description="folder images are resized to [H, W]")
    grayscale: bool | None = Field(None, description="folder images: force 1 channel (true) or RGB (false)")
    split_seed: int = 0
    train_limit: int | None = Field(None, gt=0, description="use only this many training samples")
    test_limit: int | None = Field(None, gt=0, description="use only this many test samples")
    inputs: list[str] | None = Field(
        None,
        min_length=1,
        description="npz: the arrays that are the model's inputs, in forward's order (default: 'x')",
    )
    input_ranges: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="integer inputs: the range [low, high) of their values, e.g. [0, vocabulary size] "
        "(default: the range the data spans)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("name", "npz", "folder", "text") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'name' ({', '.join(BUILTIN)}), 'npz' (path), 'folder' (path) or 'text' "
                f"(path, with 'tokenizer'); got {given or 'none'}"
            )
        if (self.text is None) != (self.tokenizer is None):
            raise ValueError("'text' (a corpus) and 'tokenizer' (its tokenizer directory) go together")
        if (self.inputs or self.input_ranges) and self.npz is None:
            raise ValueError("'inputs' and 'input_ranges' describe the arrays of an 'npz' file")
        return self


def load_data(spec: DataSpec | dict | str, cache_dir: str | Path | None = None) -> DatasetBundle:
    """Load a dataset from a spec, a dict, a built-in name, or a path to an ``.npz`` file or folder.

    ``cache_dir`` keeps the tokens of a text corpus (keyed by content) for the next load."""
    if isinstance(spec, str):
        if spec in BUILTIN:
            spec = DataSpec(name=spec)
        elif Path(spec).is_dir():
            spec = DataSpec(folder=Path(spec))
        else:
            spec = DataSpec(npz=Path(spec))
    elif isinstance(spec, dict):
        spec = DataSpec.model_validate(spec)
    if spec.name is not None:
        bundle = BUILTIN[spec.name](seed=spec.split_seed)
    elif spec.npz is not None:
        bundle = load_npz(
            spec.npz,
            test_fraction=spec.test_fraction,
            seed=spec.split_seed,
            inputs=spec.inputs,
            input_ranges=spec.input_ranges,
        )
    elif spec.text is not None:
        assert spec.tokenizer is not None
        bundle = load_text(
            spec.text,
            spec.tokenizer,
            max_length=spec.max_length,
            test_fraction=spec.test_fraction,
            seed=spec.split_seed,
            cache_dir=cache_dir,
        )
    else:
        assert spec.folder is not None
        bundle = load_image_folder(
            spec.folder,
            spec.image_size,
            spec.grayscale,
            test_fraction=spec.test_fraction,
            seed=spec.split_seed,
        )
    if spec.train_limit or spec.test_limit:
        bundle = dataclasses.replace(
            bundle,
            train=bundle.subset("train", spec.train_limit or len(bundle.train), spec.split_seed),
            test=bundle.subset("test", spec.test_limit or len(bundle.test), spec.split_seed),
        )
    return bundle
