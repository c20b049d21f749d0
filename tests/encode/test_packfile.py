"""The packed .tshrink file: exact round trip, size accounting, and rejection of damaged files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchshrink.cli import main as cli_main
from torchshrink.encoding.kmeans import plain_state_dict, share_weights
from torchshrink.encoding.packfile import format_layer_table, read_packed, snap_to_storage, write_packed
from torchshrink.errors import CorruptFileError, ModelLoadError
from torchshrink.models import open_model
from torchshrink.zoo import build


def _shared(name: str, density: float, bits: dict[str, int], seed: int = 0) -> tuple[nn.Module, dict]:
    """A zoo model with random pruning at ``density`` in its big layers, then weight sharing."""
    torch.manual_seed(seed)
    model = build(name).eval()
    with torch.no_grad():
        for layer_name in bits:
            w = dict(model.named_modules())[layer_name].weight
            if w.numel() > 1000:
                w.mul_(torch.rand_like(w) < density)
    share_weights(model, bits)
    return model, {"zoo": name, "kwargs": {}}


LENET300_BITS = {"1": 4, "3": 4, "5": 6}
LENET5_BITS = {"0": 8, "3": 8, "7": 5, "9": 5}


@pytest.mark.parametrize(
    ("name", "bits", "use_huffman", "float_dtype"),
    [
        ("lenet300", LENET300_BITS, True, "float16"),
        ("lenet300", LENET300_BITS, False, "float32"),
        ("lenet5", LENET5_BITS, True, "float16"),
    ],
)
def test_round_trip_is_bit_identical(tmp_path: Path, name, bits, use_huffman, float_dtype) -> None:
    model, arch = _shared(name, 0.1, bits)
    snap_to_storage(model, float_dtype)
    path = tmp_path / "m.tshrink"
    written = write_packed(path, model, arch, (1, 28, 28), use_huffman=use_huffman, float_dtype=float_dtype)
    loaded = open_model(path)
    expected = plain_state_dict(model)
    assert set(loaded.module.state_dict()) == set(expected)
    for key, tensor in loaded.module.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
        assert tensor.dtype == expected[key].dtype
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded.module(x), model(x))
    assert loaded.inputs.shape == (1, 28, 28) and loaded.architecture == arch
    # the size breakdown adds up to the file, and reading reports the same breakdown as writing
    packed = read_packed(path)
    assert packed.file_bytes == path.stat().st_size == written.file_bytes
    assert (
        sum(r.total_bytes for r in packed.layers) + packed.other_bytes + packed.header_bytes
        == packed.file_bytes
    )
    assert [(r.name, r.kept, r.index_bytes, r.position_bytes) for r in packed.layers] == [
        (r.name, r.kept, r.index_bytes, r.position_bytes) for r in written.layers
    ]


def test_size_follows_sparsity_and_bits_and_huffman_helps(tmp_path: Path) -> None:
    model, arch = _shared("lenet300", 0.1, LENET300_BITS)
    snap_to_storage(model, "float16")
    fixed = write_packed(tmp_path / "a.tshrink", model, arch, None, use_huffman=False)
    coded = write_packed(tmp_path / "b.tshrink", model, arch, None, use_huffman=True)
    fc1 = next(r for r in fixed.layers if r.name == "1.weight")
    assert fc1.kept == pytest.approx(0.1 * 784 * 300, rel=0.05)
    assert fc1.index_bytes == int(np.ceil(fc1.kept * 4 / 8))  # fixed width: exactly 4 bits per kept weight
    # random positions at 10% density: entropy ~4.7 bits per kept weight; coded gaps come close
    assert fc1.position_bytes * 8 / fc1.kept < 6.0
    coded_fc1 = next(r for r in coded.layers if r.name == "1.weight")
    assert coded_fc1.position_bytes * 8 / coded_fc1.kept < 5.2
    assert coded.file_bytes < fixed.file_bytes
    # dense float32 bytes / file: ~4 + 4.7 bits per kept weight of 10% -> well over 25x
    assert coded.ratio > 25
    assert coded.float_bytes == 4 * sum(p.numel() for p in build("lenet300").state_dict().values())


def test_dense_layer_needs_no_positions(tmp_path: Path) -> None:
    model = build("lenet300")
    share_weights(model, {"5": 3})
    snap_to_storage(model, "float16")
    packed = write_packed(tmp_path / "d.tshrink", model, {"zoo": "lenet300", "kwargs": {}}, None)
    (row,) = packed.layers
    assert row.position_bytes == 0 and row.kept == 1000


def test_writer_refuses_floats_the_file_cannot_hold_exactly(tmp_path: Path) -> None:
    model, arch = _shared("lenet300", 0.1, LENET300_BITS)
    with pytest.raises(ValueError, match="not exact in float16"):
        write_packed(tmp_path / "x.tshrink", model, arch, None, float_dtype="float16")
    assert not (tmp_path / "x.tshrink").exists()


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory) -> bytes:
    model, arch = _shared("lenet5", 0.2, LENET5_BITS)
    snap_to_storage(model, "float16")
    path = tmp_path_factory.mktemp("packed") / "lenet5.tshrink"
    write_packed(path, model, arch, (1, 28, 28))
    return path.read_bytes()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_bit_is_rejected(tmp_path: Path, packed_file: bytes, data) -> None:
    position = data.draw(st.integers(0, len(packed_file) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(packed_file)
    damaged[position] ^= 1 << bit
    path = tmp_path / "flipped.tshrink"
    path.write_bytes(bytes(damaged))
    with pytest.raises((CorruptFileError, ModelLoadError)):
        open_model(path)


def test_every_truncation_is_rejected(tmp_path: Path, packed_file: bytes) -> None:
    path = tmp_path / "cut.tshrink"
    cuts = sorted({*range(0, 40), *np.linspace(40, len(packed_file) - 1, 60).astype(int).tolist()})
    for cut in cuts:
        path.write_bytes(packed_file[:cut])
        with pytest.raises(
            (CorruptFileError, ModelLoadError), match="truncated|not a torchshrink|not a readable"
        ):
            read_packed(path) if cut >= 8 else open_model(path)
    path.write_bytes(packed_file + b"\0")
    with pytest.raises(CorruptFileError, match="trailing bytes"):
        read_packed(path)


def _rewrite_header(data: bytes, change) -> bytes:
    magic, version, length, _ = struct.unpack_from("<8sHII", data)
    header = json.loads(zlib.decompress(data[18 : 18 + length]))
    change(header)
    raw = zlib.compress(json.dumps(header).encode())
    return struct.pack("<8sHII", magic, version, len(raw), zlib.crc32(raw)) + raw + data[18 + length :]


def test_clear_errors_for_version_architecture_and_malformed_header(
    tmp_path: Path, packed_file: bytes
) -> None:
    path = tmp_path / "m.tshrink"
    path.write_bytes(packed_file[:8] + struct.pack("<H", 99) + packed_file[10:])
    with pytest.raises(CorruptFileError, match="version 99, this torchshrink reads version 1"):
        read_packed(path)
    path.write_bytes(_rewrite_header(packed_file, lambda h: h["architecture"].update(zoo="alexnet")))
    with pytest.raises(ModelLoadError, match="unknown architecture 'alexnet'"):
        open_model(path)
    path.write_bytes(_rewrite_header(packed_file, lambda h: h["layers"][0].pop("bits")))
    with pytest.raises(CorruptFileError, match="header is malformed"):
        read_packed(path)
    path.write_bytes(_rewrite_header(packed_file, lambda h: h["tensors"][0].update(stored="object")))
    with pytest.raises(CorruptFileError, match="header is malformed"):
        read_packed(path)
    path.write_bytes(
        _rewrite_header(packed_file, lambda h: h["layers"][1].update(kept=h["layers"][1]["kept"] + 1))
    )
    with pytest.raises(CorruptFileError, match="layer '3.weight' cannot be decoded"):
        read_packed(path)


def test_cli_inspect_and_eval(tmp_path: Path, packed_file: bytes, capsys) -> None:
    path = tmp_path / "lenet5.tshrink"
    path.write_bytes(packed_file)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "packed" in out and "| 7.weight | 500x800 |" in out and f"**{len(packed_file):,}**" in out
    assert cli_main(["eval", str(path), "--data", "mnist5k", "--json", "--repeats", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["size_bytes"] == len(packed_file)
    assert 0 <= metrics["accuracy"] <= 1


def test_layer_table_lists_every_layer(tmp_path: Path, packed_file: bytes) -> None:
    path = tmp_path / "t.tshrink"
    path.write_bytes(packed_file)
    table = format_layer_table(read_packed(path))
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:6]] == [
        "0.weight",
        "3.weight",
        "7.weight",
        "9.weight",
    ]
