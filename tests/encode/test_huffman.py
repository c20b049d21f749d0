"""Canonical Huffman coding: hand-worked lengths and codes, Kraft equality, optimality against an
independent cost, exact round trips (hypothesis), length limiting, a 2-million-symbol stream,
truncated or corrupt streams, and fixed-width packing."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchshrink.encoding.huffman import (
    MAX_CODE_LENGTH,
    canonical_codes,
    code_lengths,
    decode,
    encode,
    encoded_bits,
    pack_fixed,
    unpack_fixed,
)

FAST = settings(max_examples=60, deadline=None)


def kraft_units(lengths: np.ndarray) -> int:
    """sum(2^-l) over used symbols, in units of 2^-32 (exact)."""
    return sum(1 << (32 - int(n)) for n in lengths if n > 0)


def huffman_cost(counts: list[int]) -> int:
    """Optimal coded size, computed independently: the sum of the weights of all merged nodes."""
    heap = [c for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def reference_bits(symbols: np.ndarray, lengths: np.ndarray) -> str:
    """The coded stream as a '0'/'1' string, one symbol at a time (slow, obviously right)."""
    codes = canonical_codes(lengths)
    return "".join(format(int(codes[s]), f"0{int(lengths[s])}b") for s in symbols)


def round_trip(symbols: np.ndarray, alphabet: int, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = code_lengths(counts, max_length)
    payload, nbits = encode(symbols, lengths)
    assert nbits == encoded_bits(counts, lengths)
    assert len(payload) == math.ceil(nbits / 8)
    out = decode(payload, lengths, symbols.size, nbits)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, symbols)
    return lengths


# --- lengths and codes worked out by hand -------------------------------------------------------


def test_clrs_example_lengths_and_size() -> None:
    counts = np.array([45, 13, 12, 16, 9, 5])  # CLRS 16.3: a..f, in thousands
    lengths = code_lengths(counts)
    assert lengths.dtype == np.uint8
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    assert encoded_bits(counts, lengths) == 224
    # canonical: a=0, then b, c, d = 100, 101, 110, then e, f = 1110, 1111
    assert canonical_codes(lengths).tolist() == [0b0, 0b100, 0b101, 0b110, 0b1110, 0b1111]
    assert encode(np.repeat(np.arange(6), counts), lengths)[1] == 224


def test_canonical_codes_by_hand() -> None:
    codes = canonical_codes(np.array([2, 1, 3, 3]))
    assert codes.dtype == np.uint64
    assert codes.tolist() == [0b10, 0b0, 0b110, 0b111]
    # RFC 1951 section 3.2.2's example (A..H), with an unused symbol in the middle getting 0
    lengths = np.array([3, 3, 3, 3, 3, 0, 2, 4, 4])
    expected = [0b010, 0b011, 0b100, 0b101, 0b110, 0, 0b00, 0b1110, 0b1111]
    assert canonical_codes(lengths).tolist() == expected


def test_encoded_bits_are_msb_first_by_hand() -> None:
    # codes: 0 -> 10, 1 -> 0, 2 -> 110, 3 -> 111; stream 1 0 2 3 = 0 10 110 111 = 01011011 1(0000000)
    payload, nbits = encode(np.array([1, 0, 2, 3]), np.array([2, 1, 3, 3]))
    assert (payload, nbits) == (bytes([0b01011011, 0b10000000]), 9)
    assert decode(payload, np.array([2, 1, 3, 3]), 4, nbits).tolist() == [1, 0, 2, 3]


def test_deterministic_tie_breaking() -> None:
    # equal weights: the lower symbols merge first, so they end up deeper
    assert code_lengths(np.array([1, 1, 1])).tolist() == [2, 2, 1]
    # at equal weight leaves merge before merged nodes: the flat (minimum-variance) code, not 3,3,2,1
    assert code_lengths(np.array([1, 1, 2, 2])).tolist() == [2, 2, 2, 2]
    assert code_lengths(np.array([2, 1, 1])).tolist() == [1, 2, 2]


def test_degenerate_alphabets() -> None:
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]  # one used symbol: one bit
    assert code_lengths(np.zeros(4, dtype=np.int64)).tolist() == [0, 0, 0, 0]
    assert code_lengths(np.array([], dtype=np.int64)).size == 0
    lengths = np.array([0, 1, 0])
    payload, nbits = encode(np.array([1, 1, 1]), lengths)
    assert (payload, nbits) == (b"\x00", 3)
    assert decode(payload, lengths, 3, nbits).tolist() == [1, 1, 1]
    assert encode(np.array([], dtype=np.int64), lengths) == (b"", 0)
    assert decode(b"", lengths, 0).size == 0


# --- properties -------------------------------------------------------------------------------


@FAST
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=300))
def test_complete_and_optimal(counts: list[int]) -> None:
    c = np.array(counts)
    lengths = code_lengths(c, max_length=32)  # no limit can bind here: the sum of counts is too small
    assert lengths.shape == c.shape
    assert ((lengths == 0) == (c == 0)).all()
    used = int((c > 0).sum())
    if used >= 2:
        assert kraft_units(lengths) == 1 << 32  # a complete prefix code
        assert encoded_bits(c, lengths) == huffman_cost(counts)
    elif used == 1:
        assert lengths.max() == 1


@st.composite
def streams(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    alphabet = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["geometric", "single", "list"]))
    if kind == "list":  # hypothesis-shrinkable, skewed toward a few symbols
        favourites = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=4))
        anything = st.integers(0, alphabet - 1)
        values = draw(st.lists(st.one_of(st.sampled_from(favourites), anything), max_size=400))
        return np.array(values, dtype=np.int64), alphabet
    size = draw(st.integers(0, 3000))
    if kind == "single":
        return np.full(size, draw(st.integers(0, alphabet - 1)), dtype=np.int64), alphabet
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = draw(st.floats(0.01, 0.9))
    ranks = np.minimum(rng.geometric(p, size) - 1, alphabet - 1)
    return rng.permutation(alphabet)[ranks].astype(np.int64), alphabet


@FAST
@given(streams())
def test_round_trip(stream: tuple[np.ndarray, int]) -> None:
    symbols, alphabet = stream
    lengths = round_trip(symbols, alphabet)
    payload, nbits = encode(symbols, lengths)
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    assert "".join(map(str, bits[:nbits])) == reference_bits(symbols, lengths)
    assert not bits[nbits:].any()  # padding is zero
    np.testing.assert_array_equal(decode(payload, lengths, symbols.size), symbols)  # nbits optional


def fibonacci(n: int) -> np.ndarray:
    out = [1, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return np.array(out[:n], dtype=np.int64)


def test_length_limit_on_a_fibonacci_tree() -> None:
    counts = fibonacci(30)
    assert code_lengths(counts, max_length=32).max() == 29  # the optimal tree is a 29-deep comb
    lengths = code_lengths(counts)
    assert lengths.max() <= MAX_CODE_LENGTH
    assert kraft_units(lengths) <= 1 << 32

    for limit in (8, 12, 20):  # the documented rule: the fewest halvings of the counts that fit
        halved = counts
        while code_lengths(halved, max_length=32).max() > limit:
            halved = (halved + 1) // 2
        assert (code_lengths(counts, max_length=limit) == code_lengths(halved, max_length=32)).all()

    counts = fibonacci(22)
    lengths = code_lengths(counts, max_length=8)
    assert lengths.max() <= 8
    assert kraft_units(lengths) <= 1 << 32
    symbols = np.random.default_rng(0).permutation(np.repeat(np.arange(22), counts))
    assert (round_trip(symbols, 22, max_length=8) == lengths).all()


def test_length_limit_tight_for_the_alphabet() -> None:
    counts = np.random.default_rng(1).geometric(0.05, 256) ** 3  # strongly skewed, 256 used symbols
    assert code_lengths(counts).max() > 8
    assert code_lengths(counts, max_length=8).tolist() == [8] * 256  # the only code that fits
    with pytest.raises(ValueError, match="max_length=8"):
        code_lengths(np.ones(257, dtype=np.int64), max_length=8)


def test_long_stream_round_trips() -> None:
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.05, 2_000_000) - 1, 255)
    lengths = round_trip(symbols, 256)
    assert lengths.max() > 16  # deep codes: windows wider than two bytes


# --- broken streams and bad arguments -----------------------------------------------------------


def test_truncated_stream_is_rejected() -> None:
    rng = np.random.default_rng(2)
    symbols = rng.integers(0, 40, 1000)
    lengths = code_lengths(np.bincount(symbols, minlength=40))
    payload, nbits = encode(symbols, lengths)
    with pytest.raises(ValueError, match="truncated"):
        decode(payload[:-2], lengths, symbols.size)
    with pytest.raises(ValueError, match="truncated.* needs"):
        decode(payload, lengths, symbols.size, nbits - 1)  # the last code lacks one bit
    with pytest.raises(ValueError, match="truncated.* hold only 1000 of 1001 symbols"):
        decode(payload, lengths, symbols.size + 1, nbits)  # more symbols than were encoded
    with pytest.raises(ValueError, match="truncated.* at least"):
        decode(b"", lengths, 1)
    with pytest.raises(ValueError, match="nbits"):
        decode(payload, lengths, symbols.size, 8 * len(payload) + 1)


def test_bits_matching_no_code_are_rejected() -> None:
    with pytest.raises(ValueError, match="match no code"):
        decode(b"\x80", np.array([1, 0]), 1)  # the single code is '0'
    lengths = np.array([1, 2])  # an incomplete code: 0 and 10; 11 is unused
    assert decode(bytes([0b01000000]), lengths, 3).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="position 1 \\(symbol 1\\)"):
        decode(bytes([0b01100000]), lengths, 3)


def test_bad_arguments() -> None:
    lengths = np.array([2, 1, 3, 3])
    with pytest.raises(ValueError, match="out of range"):
        encode(np.array([0, 4]), lengths)
    with pytest.raises(ValueError, match="out of range"):
        encode(np.array([-1]), lengths)
    with pytest.raises(ValueError, match="no code"):
        encode(np.array([1]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="count"):
        decode(b"\x00", lengths, -1)
    with pytest.raises(ValueError, match="prefix code"):
        canonical_codes(np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="0..32"):
        canonical_codes(np.array([33, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        code_lengths(np.array([3, -1]))
    with pytest.raises(ValueError, match="integers"):
        code_lengths(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        code_lengths(np.ones((2, 2), dtype=np.int64))
    for bad in (0, 33):
        with pytest.raises(ValueError, match="max_length"):
            code_lengths(np.array([1, 2]), max_length=bad)
    with pytest.raises(ValueError, match="no code"):
        encoded_bits(np.array([1, 1]), np.array([1, 0]))


# --- fixed-width packing ------------------------------------------------------------------------


def test_pack_fixed_by_hand() -> None:
    assert pack_fixed(np.array([1, 2, 3]), 2) == bytes([0b01101100])
    assert pack_fixed(np.array([5, 0x1ABC]), 13) == bytes([0b00000000, 0b00101110, 0b10101111, 0b00000000])
    assert unpack_fixed(bytes([0b01101100]), 2, 4).tolist() == [1, 2, 3, 0]


@FAST
@given(st.integers(1, 32).flatmap(lambda w: st.tuples(st.just(w), st.lists(st.integers(0, 2**w - 1)))))
def test_pack_fixed_round_trip(case: tuple[int, list[int]]) -> None:
    width, values = case
    payload = pack_fixed(np.array(values, dtype=np.uint64), width)
    assert len(payload) == math.ceil(len(values) * width / 8)
    out = unpack_fixed(payload, width, len(values))
    assert out.dtype == np.int64
    assert out.tolist() == values


def test_pack_fixed_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit in 3"):
        pack_fixed(np.array([1, 8]), 3)
    with pytest.raises(ValueError, match="does not fit"):
        pack_fixed(np.array([-1]), 8)
    with pytest.raises(ValueError, match="width"):
        pack_fixed(np.array([1]), 33)
    with pytest.raises(ValueError, match="too short"):
        unpack_fixed(pack_fixed(np.arange(10), 5), 5, 12)  # 60 bits > 56
