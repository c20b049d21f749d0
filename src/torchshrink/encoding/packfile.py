"""The packed ``.tshrink`` file: a weight-shared (and usually pruned) model in as few bytes as it takes.

Layout (all integers little-endian)::

    preamble  b"TSHRINK\\0" | u16 format version | u32 header length | u32 CRC-32 of the header
    header    zlib-compressed JSON: architecture reference, input shape, the layer table (shape,
              bits, kept weights, how each stream is coded, Huffman code lengths), the other
              tensors (biases, norms), and the length and CRC-32 of every section
    sections  concatenated bytes: per shared layer a codebook, an index stream and a position
              stream; per other tensor its raw values

Shared layers store their kept weights' centroid indices and their positions (gaps with fillers,
see :mod:`torchshrink.encoding.positions`), each Huffman-coded or fixed-width, whichever the writer
was told; the gap width is chosen per layer to make the stream smallest. Reading parses only JSON
and numbers (nothing can execute), checks every checksum and size, and rebuilds the exact weights:
``codebook[index]`` at the kept positions and zero elsewhere.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from torchshrink.encoding import huffman
from torchshrink.encoding.kmeans import codebook_of, plain_state_dict, shared_layers
from torchshrink.encoding.positions import MAX_WIDTH, from_gaps, gap_histogram, to_gaps
from torchshrink.errors import CorruptFileError, MissingFileError
from torchshrink.inputs import InputSpec, as_spec
from torchshrink.io import PACKED_MAGIC, atomic_path
from torchshrink.registry import register_file_reader
from torchshrink.tables import markdown_table

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "FloatDtype",
    "LayerRow",
    "PackedModel",
    "snap_to_storage",
    "write_packed",
    "read_packed",
    "format_layer_table",
]

MAGIC = PACKED_MAGIC
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sHII")
FloatDtype = Literal["float16", "float32"]
# Raw tensors may only have these dtypes: a file cannot ask numpy for object arrays.
_RAW_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_TABLE_COST_BITS = 8  # estimated header bits per used Huffman symbol (its code length, compressed)


@dataclass
class LayerRow:
    """One shared layer of a packed file: what it keeps and what each part costs in bytes."""

    name: str
    shape: tuple[int, ...]
    kept: int
    bits: int
    index_bytes: int
    position_bytes: int
    codebook_bytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.position_bytes + self.codebook_bytes

    @property
    def ratio(self) -> float:
        """Dense float32 bytes of this weight over its packed bytes."""
        return 4 * self.numel / max(self.total_bytes, 1)


@dataclass
class PackedModel:
    """What a packed file holds, decoded: weights, architecture and the size breakdown."""

    state_dict: dict[str, torch.Tensor]
    architecture: dict[str, Any] | None
    inputs: InputSpec | None
    layers: list[LayerRow] = field(default_factory=list)
    other_bytes: int = 0
    header_bytes: int = 0
    file_bytes: int = 0
    float_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Dense float32 bytes of every tensor over the whole file."""
        return self.float_bytes / max(self.file_bytes, 1)


def snap_to_storage(model: nn.Module, float_dtype: FloatDtype) -> nn.Module:
    """Round every float parameter and buffer (codebooks included) to ``float_dtype`` values, in place.

    The packed file stores floats in ``float_dtype``; after this the in-memory model is exactly what
    the file loads back to.
    """
    dtype = getattr(torch, float_dtype)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    return model


def _code_stream(symbols: np.ndarray, alphabet: int, use_huffman: bool) -> tuple[bytes, dict[str, Any]]:
    """Bytes and header entry of one symbol stream, Huffman-coded or fixed-width."""
    if use_huffman:
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
        payload, nbits = huffman.encode(symbols, lengths)
        used = np.flatnonzero(lengths)
        trimmed = lengths[: (used[-1] + 1) if len(used) else 0]
        return payload, {
            "coding": "huffman",
            "count": len(symbols),
            "nbits": nbits,
            "lengths": trimmed.tolist(),
        }
    width = max(1, (alphabet - 1).bit_length())
    return huffman.pack_fixed(symbols, width), {"coding": "fixed", "count": len(symbols), "width": width}


def _decode_stream(payload: bytes, entry: dict[str, Any], alphabet: int) -> np.ndarray:
    count = int(entry["count"])
    if entry["coding"] == "huffman":
        lengths = np.zeros(alphabet, dtype=np.uint8)
        given = np.asarray(entry["lengths"], dtype=np.int64)
        if len(given) > alphabet or (
            len(given) and (given.min() < 0 or given.max() > huffman.MAX_CODE_LENGTH)
        ):
            raise ValueError("invalid Huffman code lengths")
        lengths[: len(given)] = given
        symbols = huffman.decode(payload, lengths, count, int(entry["nbits"]))
    elif entry["coding"] == "fixed":
        symbols = huffman.unpack_fixed(payload, int(entry["width"]), count)
    else:
        raise ValueError(f"unknown stream coding {entry['coding']!r}")
    if len(symbols) and symbols.max() >= alphabet:
        raise ValueError(f"symbol {int(symbols.max())} outside the alphabet of {alphabet}")
    return symbols


def _best_gap_width(mask: np.ndarray, use_huffman: bool) -> int:
    """The gap width whose coded position stream (plus its code table) is smallest."""
    longest_gap = int(np.diff(np.flatnonzero(mask), prepend=-1).max()) - 1 if mask.any() else 0
    best, best_cost = 1, math.inf
    for width in range(1, MAX_WIDTH + 1):
        counts = gap_histogram(mask, width)
        if use_huffman:
            lengths = huffman.code_lengths(counts)
            cost = huffman.encoded_bits(counts, lengths) + _TABLE_COST_BITS * int(np.count_nonzero(counts))
        else:
            cost = width * int(counts.sum())
        if cost < best_cost:
            best, best_cost = width, cost
        if (1 << width) - 1 > longest_gap:  # no fillers any more: wider only costs more
            break
    return best


class _Sections:
    """Accumulates the payload sections and their (length, CRC-32) table."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def add(self, data: bytes) -> int:
        self.parts.append(data)
        return len(self.parts) - 1

    def table(self) -> list[list[int]]:
        return [[len(p), zlib.crc32(p)] for p in self.parts]


def _raw_entry(name: str, tensor: torch.Tensor, float_dtype: FloatDtype, sections: _Sections) -> dict:
    stored = getattr(torch, float_dtype) if tensor.is_floating_point() else tensor.dtype
    values = tensor.detach().cpu().to(stored)
    if tensor.is_floating_point() and not torch.equal(values.to(tensor.dtype), tensor):
        raise ValueError(f"tensor {name!r} is not exact in {float_dtype}: call snap_to_storage(model) first")
    dtype_name = str(stored).removeprefix("torch.")
    if dtype_name not in _RAW_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype_name}, which a packed file cannot store")
    return {
        "name": name,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "stored": dtype_name,
        "section": sections.add(values.contiguous().numpy().tobytes()),
    }


def write_packed(
    path: str | Path,
    model: nn.Module,
    architecture: dict[str, Any] | None,
    inputs: InputSpec | Sequence[int] | None,
    *,
    use_huffman: bool = True,
    float_dtype: FloatDtype = "float16",
) -> PackedModel:
    """Write ``model`` (its shared layers from :func:`~torchshrink.encoding.kmeans.share_weights`) atomically.

    Every float must already be exact in ``float_dtype`` (:func:`snap_to_storage`), so that the file
    loads back to this very model. Returns the size breakdown (without decoding the file again).
    """
    shared = shared_layers(model)
    plain = plain_state_dict(model)
    sections = _Sections()
    layers, rows = [], []
    for name, param in shared.items():
        key = f"{name}.weight" if name else "weight"
        book = codebook_of(model, name).detach().cpu()
        stored_book = book.to(getattr(torch, float_dtype))
        if not torch.equal(stored_book.to(book.dtype), book):
            raise ValueError(
                f"codebook of layer {name!r} is not exact in {float_dtype}: call snap_to_storage"
            )
        mask = param.mask.cpu().numpy().reshape(-1)
        indices = param.indices.cpu().numpy().reshape(-1)[mask].astype(np.int64)
        index_data, index_entry = _code_stream(indices, 1 << param.bits, use_huffman)
        if mask.all():
            position_data, position_entry = b"", {"coding": "dense"}
        else:
            width = _best_gap_width(mask, use_huffman)
            position_data, position_entry = _code_stream(to_gaps(mask, width), 1 << width, use_huffman)
            position_entry["width_gap"] = width
        layers.append(
            {
                "name": key,
                "shape": list(plain[key].shape),
                "dtype": str(plain[key].dtype).removeprefix("torch."),
                "bits": param.bits,
                "kept": int(mask.sum()),
                "codebook": sections.add(stored_book.numpy().tobytes()),
                "indices": index_entry | {"section": sections.add(index_data)},
                "positions": position_entry | {"section": sections.add(position_data)},
            }
        )
        rows.append(
            LayerRow(
                key, tuple(plain[key].shape), int(mask.sum()), param.bits,
                len(index_data), len(position_data), stored_book.numel() * stored_book.element_size(),
            )
        )  # fmt: skip
    shared_keys = {entry["name"] for entry in layers}
    tensors = [_raw_entry(n, t, float_dtype, sections) for n, t in plain.items() if n not in shared_keys]
    header = {
        "format": "torchshrink-packed",
        "architecture": architecture,
        "inputs": as_spec(inputs).to_dict() if inputs is not None else None,
        "float_dtype": float_dtype,
        "float_bytes": sum(4 * t.numel() for t in plain.values()),
        "layers": layers,
        "tensors": tensors,
        "sections": sections.table(),
    }
    header_data = zlib.compress(json.dumps(header, separators=(",", ":")).encode("utf-8"), 9)
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_data), zlib.crc32(header_data))
    payload = b"".join(sections.parts)
    with atomic_path(path) as tmp:
        tmp.write_bytes(preamble + header_data + payload)
    return PackedModel(
        state_dict=plain,
        architecture=architecture,
        inputs=as_spec(inputs) if inputs is not None else None,
        layers=rows,
        other_bytes=sum(len(sections.parts[t["section"]]) for t in tensors),
        header_bytes=_PREAMBLE.size + len(header_data),
        file_bytes=_PREAMBLE.size + len(header_data) + len(payload),
        float_bytes=header["float_bytes"],
    )


def _read_header(path: Path, data: bytes) -> tuple[dict[str, Any], int]:
    """The parsed header and where the sections start; CorruptFileError on anything off."""
    if len(data) < _PREAMBLE.size:
        raise CorruptFileError(
            path, f"truncated: {len(data)} bytes, shorter than the {_PREAMBLE.size}-byte preamble"
        )
    magic, version, header_len, header_crc = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise CorruptFileError(path, "not a torchshrink packed file (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise CorruptFileError(
            path,
            f"packed format version {version}, this torchshrink reads version {FORMAT_VERSION}",
            "use the torchshrink version that wrote it, or re-encode the model",
        )
    end = _PREAMBLE.size + header_len
    if end > len(data):
        raise CorruptFileError(path, f"truncated: the header needs {end} bytes, the file has {len(data)}")
    raw = data[_PREAMBLE.size : end]
    if zlib.crc32(raw) != header_crc:
        raise CorruptFileError(path, "the header fails its checksum: the file is corrupted")
    try:
        header = json.loads(zlib.decompress(raw))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"the header cannot be read: {exc}") from exc
    if not isinstance(header, dict) or header.get("format") != "torchshrink-packed":
        raise CorruptFileError(path, "the header does not describe a torchshrink packed model")
    return header, end


def _split_sections(path: Path, data: bytes, start: int, table: list) -> list[bytes]:
    sizes = [int(length) for length, _ in table]
    if start + sum(sizes) != len(data):
        problem = "truncated" if start + sum(sizes) > len(data) else "has trailing bytes"
        raise CorruptFileError(
            path, f"{problem}: the header describes {start + sum(sizes)} bytes, the file has {len(data)}"
        )
    parts, offset = [], start
    for index, (length, crc) in enumerate(table):
        part = data[offset : offset + int(length)]
        if zlib.crc32(part) != int(crc):
            raise CorruptFileError(path, f"section {index} fails its checksum: the file is corrupted")
        parts.append(part)
        offset += int(length)
    return parts


def _decode_layer(
    entry: dict[str, Any], parts: list[bytes], float_dtype: str
) -> tuple[torch.Tensor, LayerRow]:
    shape = tuple(int(s) for s in entry["shape"])
    numel, bits, kept = math.prod(shape), int(entry["bits"]), int(entry["kept"])
    book = np.frombuffer(parts[entry["codebook"]], dtype=float_dtype)
    if len(book) != 1 << bits:
        raise ValueError(f"codebook has {len(book)} entries, {bits} bits need {1 << bits}")
    indices = _decode_stream(parts[entry["indices"]["section"]], entry["indices"], 1 << bits)
    positions = entry["positions"]
    if positions["coding"] == "dense":
        mask = np.ones(numel, dtype=bool)
    else:
        width = int(positions["width_gap"])
        mask = from_gaps(_decode_stream(parts[positions["section"]], positions, 1 << width), width, numel)
    if int(mask.sum()) != kept or len(indices) != kept:
        raise ValueError(
            f"{kept} kept weights expected, found {int(mask.sum())} positions and {len(indices)} indices"
        )
    dtype = _RAW_DTYPES[entry["dtype"]]
    weight = torch.zeros(numel, dtype=dtype)
    weight[torch.from_numpy(mask)] = torch.from_numpy(book.astype(np.float32)).to(dtype)[
        torch.from_numpy(indices)
    ]
    row = LayerRow(
        entry["name"], shape, kept, bits, len(parts[entry["indices"]["section"]]),
        len(parts[positions["section"]]), len(parts[entry["codebook"]]),
    )  # fmt: skip
    return weight.reshape(shape), row


def _decode_raw(entry: dict[str, Any], parts: list[bytes]) -> torch.Tensor:
    stored, dtype = _RAW_DTYPES[entry["stored"]], _RAW_DTYPES[entry["dtype"]]
    shape = tuple(int(s) for s in entry["shape"])
    values = np.frombuffer(parts[entry["section"]], dtype=entry["stored"])
    if values.size != math.prod(shape):
        raise ValueError(f"{values.size} values stored for shape {list(shape)}")
    return torch.from_numpy(values.copy()).to(stored).to(dtype).reshape(shape)


@register_file_reader("packed")
def read_packed(path: str | Path) -> PackedModel:
    """Decode a packed file into a state_dict, checking every size and checksum (never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(path, "packed model file")
    data = path.read_bytes()
    header, start = _read_header(path, data)
    try:
        parts = _split_sections(path, data, start, header["sections"])
        float_dtype = header["float_dtype"]
        if float_dtype not in ("float16", "float32"):
            raise CorruptFileError(path, f"unknown float type {float_dtype!r} in the header")
        state: dict[str, torch.Tensor] = {}
        rows = []
        for entry in header["layers"]:
            try:
                state[entry["name"]], row = _decode_layer(entry, parts, float_dtype)
            except ValueError as exc:
                raise CorruptFileError(path, f"layer {entry['name']!r} cannot be decoded: {exc}") from exc
            rows.append(row)
        for entry in header["tensors"]:
            try:
                state[entry["name"]] = _decode_raw(entry, parts)
            except ValueError as exc:
                raise CorruptFileError(path, f"tensor {entry['name']!r} cannot be decoded: {exc}") from exc
    except (KeyError, TypeError, IndexError) as exc:
        raise CorruptFileError(path, f"the header is malformed ({type(exc).__name__}: {exc})") from exc
    try:
        inputs = (
            InputSpec.from_dict(header["inputs"])
            if header.get("inputs")
            else InputSpec.of_shape(header["input_shape"])
            if header.get("input_shape")
            else None
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(path, f"the input description is malformed ({exc})") from exc
    return PackedModel(
        state_dict=state,
        architecture=header.get("architecture"),
        inputs=inputs,
        layers=rows,
        other_bytes=sum(len(parts[t["section"]]) for t in header["tensors"]),
        header_bytes=start,
        file_bytes=len(data),
        float_bytes=int(header["float_bytes"]),
    )


def format_layer_table(packed: PackedModel) -> str:
    """A Markdown table: per shared layer kept %, bits, bytes of indices / positions / codebook, ratio."""
    header = [
        "layer",
        "shape",
        "kept",
        "bits",
        "index bytes",
        "position bytes",
        "codebook bytes",
        "total bytes",
        "ratio",
    ]
    rows: list[list[object]] = [
        [
            r.name,
            "x".join(map(str, r.shape)),
            f"{r.kept / max(r.numel, 1):.1%}",
            r.bits,
            f"{r.index_bytes:,}",
            f"{r.position_bytes:,}",
            f"{r.codebook_bytes:,}",
            f"{r.total_bytes:,}",
            f"{r.ratio:.1f}x",
        ]  # fmt: skip
        for r in packed.layers
    ]
    blank = [""] * 6
    rows += [
        ["other tensors (biases, norms)", *blank, f"{packed.other_bytes:,}", ""],
        ["header", *blank, f"{packed.header_bytes:,}", ""],
        [
            "**file**",
            *blank,
            f"**{packed.file_bytes:,}**",
            f"**{packed.ratio:.1f}x** vs {packed.float_bytes:,} float32 bytes",
        ],
    ]
    return markdown_table(header, rows)
