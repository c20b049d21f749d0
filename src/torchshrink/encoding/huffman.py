"""Canonical Huffman coding for Deep-Compression storage (Han et al. 2016).

The packed file codes two kinds of streams with it: the centroid indices of shared weights (up to
2^8 symbols) and the gaps between non-zero weight positions (up to 2^16 symbols). Only the code
*lengths* need to be stored: the codes themselves are the canonical ones of DEFLATE (RFC 1951),
assigned in order of (length, symbol).

Streams hold millions of symbols, so both directions are numpy-vectorised. Encoding unpacks every
code into its bits and keeps the first ``length`` of them. Decoding works on every bit position at
once: the next ``L = max(lengths)`` bits at position ``p`` determine the code starting there, hence
``next[p] = p + length``; the start positions of the symbols are then found by pointer doubling
(``jump_2k = jump_k[jump_k]``), so the only Python loops run over code lengths, the 8 bit offsets
of a byte and the log2(count) doubling steps.
"""

from __future__ import annotations

import heapq
import operator

import numpy as np

__all__ = [
    "MAX_CODE_LENGTH",
    "code_lengths",
    "canonical_codes",
    "encode",
    "decode",
    "encoded_bits",
    "pack_fixed",
    "unpack_fixed",
]

MAX_CODE_LENGTH = 24  # default limit: codes and decoding windows fit comfortably in 32 bits
_LIMIT = 32  # hard limit on any code length or fixed width
_CHUNK = 1 << 20  # symbols unpacked to bits at a time (bounds the temporary memory)


def _as_int_array(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a 1-D integer array (an empty input of any dtype is fine)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr


def _huffman_depths(weights: list[int]) -> np.ndarray:
    """Leaf depths of the Huffman tree of ``weights`` (at least two of them, all positive).

    Ties are broken deterministically: a heap entry is ``(weight, id)`` where the leaves have the
    ids ``0..n-1`` (their order in ``weights``) and merged nodes ``n, n+1, ...`` in order of creation,
    so at equal weight leaves are merged first (which also gives the minimum-variance code).
    """
    n = len(weights)
    heap = [(w, i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    node = n
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * (2 * n - 1)  # the root is node 2n-2; a parent always has a larger id than its children
    par = parent.tolist()
    for i in range(2 * n - 3, -1, -1):
        depth[i] = depth[par[i]] + 1
    return np.asarray(depth[:n], dtype=np.int64)


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of every symbol (uint8; 0 for symbols whose count is 0).

    A single used symbol gets length 1. If the optimal tree is deeper than ``max_length``, the
    counts are flattened (halved k times, rounding up so none drops to 0) and the tree rebuilt, with
    k found by bisection (the smallest k that fits, as more halving never deepens the tree in
    practice): a simple, slightly sub-optimal length limit (package-merge would be optimal). It
    always succeeds: once all counts are 1 a balanced tree fits, since ``max_length`` must allow
    ``2**max_length`` >= the number of used symbols.
    """
    c = _as_int_array(counts, "counts")
    if c.size and c.min() < 0:
        raise ValueError(f"counts must be non-negative, got {c.min()} at symbol {int(np.argmin(c))}")
    max_length = operator.index(max_length)
    if not 1 <= max_length <= _LIMIT:
        raise ValueError(f"max_length must be between 1 and {_LIMIT}, got {max_length}")
    out = np.zeros(c.size, dtype=np.uint8)
    used = np.flatnonzero(c)
    if used.size == 0:
        return out
    if used.size == 1:
        out[used] = 1
        return out
    if used.size > 1 << max_length:
        need = int(used.size - 1).bit_length()
        raise ValueError(
            f"{used.size} used symbols need codes of {need} bits, more than max_length={max_length}; "
            f"raise max_length to at least {need}"
        )
    weights = c[used].tolist()  # Python ints: no overflow in the merged weights
    depth = _huffman_depths(weights)
    if depth.max() > max_length:
        # Halving k times (rounding up) gives ceil(w / 2^k). At k = bit_length(max) all weights are 1,
        # which fits; bisection over k needs ~6 rebuilds where halving one step at a time needs up to 64.
        def halved(k: int) -> np.ndarray:
            return _huffman_depths([-(-w >> k) for w in weights])

        lo, hi = 0, max(weights).bit_length()
        depth = halved(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = halved(mid)
            if trial.max() <= max_length:
                hi, depth = mid, trial
            else:
                lo = mid
    out[used] = depth
    return out


def _check_lengths(lengths: np.ndarray) -> np.ndarray:
    """``lengths`` as int64, checked: 0..32 each and a prefix code (Kraft sum at most 1)."""
    lens = _as_int_array(lengths, "lengths").astype(np.int64)
    if lens.size and (lens.min() < 0 or lens.max() > _LIMIT):
        bad = int(np.flatnonzero((lens < 0) | (lens > _LIMIT))[0])
        raise ValueError(f"code lengths must be 0..{_LIMIT}, got {lens[bad]} for symbol {bad}")
    per_length = np.bincount(lens, minlength=_LIMIT + 1)
    kraft = sum(int(per_length[n]) << (_LIMIT - n) for n in range(1, _LIMIT + 1))
    if kraft > 1 << _LIMIT:
        raise ValueError(
            f"code lengths are not those of a prefix code: sum of 2^-length is {kraft / 2**_LIMIT:.6g} > 1"
        )
    return lens


def _canonical(lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes of checked ``lens`` and the used symbols sorted by (length, symbol)."""
    order = np.lexsort((np.arange(lens.size), lens))
    order = order[lens[order] > 0]
    sorted_lens = lens[order]
    per_length = np.bincount(lens, minlength=_LIMIT + 1)
    per_length[0] = 0
    first = np.zeros(_LIMIT + 1, dtype=np.uint64)  # first[n]: code of the first symbol of length n
    code = 0
    for n in range(1, _LIMIT + 1):
        code = (code + int(per_length[n - 1])) << 1
        first[n] = code
    group_start = np.concatenate(([0], np.cumsum(per_length)))[:-1]  # rank of length n's first symbol
    rank = np.arange(order.size, dtype=np.uint64) - group_start[sorted_lens].astype(np.uint64)
    codes = np.zeros(lens.size, dtype=np.uint64)
    codes[order] = first[sorted_lens] + rank
    return codes, order


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of every symbol (uint64), assigned in order of (length, symbol) as in DEFLATE.

    Unused symbols (length 0) get 0. The lengths must form a prefix code (Kraft sum at most 1).
    """
    return _canonical(_check_lengths(lengths))[0]


def encoded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Size in bits of a stream with these symbol ``counts`` coded with ``lengths``, without coding it."""
    c = _as_int_array(counts, "counts").astype(np.int64)
    lens = _as_int_array(lengths, "lengths").astype(np.int64)
    if c.shape != lens.shape:
        raise ValueError(f"counts and lengths differ in size: {c.size} vs {lens.size}")
    missing = np.flatnonzero((c > 0) & (lens == 0))
    if missing.size:
        s = int(missing[0])
        raise ValueError(f"symbol {s} occurs {c[s]} times but has no code (length 0)")
    return int(np.dot(c, lens))


def _bits_of(values: np.ndarray, widths: np.ndarray | int, width_bytes: int) -> np.ndarray:
    """Concatenated MSB-first bits (uint8 0/1) of ``values``, each ``widths`` bits wide.

    ``values`` (uint64) are right-aligned and below ``2**widths``; ``width_bytes`` (1, 2 or 4)
    holds the widest of them.
    """
    total = 8 * width_bytes
    dtype = np.dtype(f">u{width_bytes}")
    pieces = []
    for start in range(0, values.size, _CHUNK):
        v = values[start : start + _CHUNK]
        w = widths if isinstance(widths, int) else widths[start : start + _CHUNK]
        left = (v << (np.uint64(total) - np.asarray(w, dtype=np.uint64))).astype(dtype)
        bits = np.unpackbits(left.view(np.uint8).reshape(-1, width_bytes), axis=1)
        if isinstance(w, int):
            pieces.append(bits[:, :w].reshape(-1))
        else:
            pieces.append(bits[np.arange(total) < w[:, None]])
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)


def _width_bytes(bits: int) -> int:
    """Bytes of the unsigned type that holds ``bits`` (at most 32) bits."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Canonical Huffman codes of ``symbols`` (flattened), packed MSB-first into bytes.

    Returns ``(payload, nbits)``: ``nbits`` bits are meaningful, the rest of the last byte is zero.
    """
    lens = _check_lengths(lengths)
    sym = np.asarray(symbols).reshape(-1)
    if sym.size == 0:
        return b"", 0
    if not np.issubdtype(sym.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got dtype {sym.dtype}")
    bad = np.flatnonzero((sym < 0) | (sym >= lens.size))
    if bad.size:
        raise ValueError(
            f"symbol {sym[bad[0]]} at index {bad[0]} is out of range for an alphabet of {lens.size} symbols"
        )
    sym = sym.astype(np.int64)
    sym_lens = lens[sym]
    if not sym_lens.all():
        i = int(np.flatnonzero(sym_lens == 0)[0])
        raise ValueError(f"symbol {sym[i]} at index {i} has no code (length 0); recompute the lengths")
    codes = _canonical(lens)[0]
    bits = _bits_of(codes[sym], sym_lens, _width_bytes(int(sym_lens.max())))
    return np.packbits(bits).tobytes(), int(bits.size)


def _words64(buf: np.ndarray) -> np.ndarray:
    """``out[b]``: the 8 bytes ``buf[b:b+8]`` (zero-padded) as a big-endian uint64."""
    padded = np.concatenate((buf, np.zeros(8, dtype=np.uint8)))
    out = np.zeros(buf.size, dtype=np.uint64)
    for k in range(8):
        out |= padded[k : k + buf.size].astype(np.uint64) << np.uint64(56 - 8 * k)
    return out


def _payload_bits(payload: bytes, nbits: int | None) -> tuple[np.ndarray, int]:
    buf = np.frombuffer(payload, dtype=np.uint8)
    if nbits is None:
        return buf, 8 * buf.size
    nbits = operator.index(nbits)
    if not 0 <= nbits <= 8 * buf.size:
        raise ValueError(f"nbits must be between 0 and {8 * buf.size} (the payload's bits), got {nbits}")
    return buf, nbits


def decode(payload: bytes, lengths: np.ndarray, count: int, nbits: int | None = None) -> np.ndarray:
    """The first ``count`` symbols (int64) coded in ``payload`` with the canonical codes of ``lengths``.

    ``nbits`` (from :func:`encode`) is the number of meaningful bits; without it the whole payload
    counts, so zero padding bits may decode as extra symbols. Raises ValueError if the stream is
    truncated (the symbols need more bits than there are) or holds bits that match no code.
    """
    count = operator.index(count)
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    lens = _check_lengths(lengths)
    buf, total = _payload_bits(payload, nbits)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if not lens.any():
        raise ValueError("no symbol has a code (all lengths are 0), so nothing can be decoded")
    codes, order = _canonical(lens)
    width = int(lens.max())  # L: every code is read from an L-bit window
    shortest = int(lens[lens > 0].min())
    if count * shortest > total:
        raise ValueError(
            f"truncated Huffman stream: {count} symbols need at least {count * shortest} bits, it has {total}"
        )

    # `count` symbols take at most count * L bits: positions past that are never needed.
    n = min(total, count * width)
    nbytes = -(-n // 8)
    words = _words64(buf[:nbytes])
    mask = np.uint64((1 << width) - 1)
    windows = np.empty((nbytes, 8), dtype=np.uint32)
    for off in range(8):
        windows[:, off] = (words >> np.uint64(64 - width - off)) & mask
    windows = windows.reshape(-1)[:n]
    # Windows near the end also read bits past the meaningful ones; that is harmless: a code found
    # there is either shorter than the bits left (and determined by them alone) or reported below.

    # Canonical codes, left-aligned to L bits, fill the window range in order of length: the codes
    # of length l cover [first_l << (L-l), (first_l + n_l) << (L-l)); windows above all are invalid.
    used_lengths = np.unique(lens[lens > 0])
    sorted_lens = lens[order]
    group_first = np.searchsorted(sorted_lens, used_lengths)  # rank of each length's first symbol
    group_size = np.diff(np.append(group_first, sorted_lens.size))
    first_code = codes[order[group_first]].astype(np.int64)
    shift = width - used_lengths
    upper = (first_code + group_size) << shift
    group = np.zeros(n, dtype=np.uint8)
    for u in upper[upper < 1 << width]:  # windows are below 2^L: a bound of 2^L never counts
        group += windows >= np.uint32(u)
    nogroup = used_lengths.size
    bad = n + 1  # sentinel: index n is the end of the stream, n + 1 means "cannot go on"
    itype = np.int32 if 2 * n + 4 < 2**31 else np.int64
    step = np.append(used_lengths, n + 2).astype(itype)  # no code: a step that surely runs past n
    nxt = np.arange(n + 2, dtype=itype)
    nxt[:n] += np.take(step, group)
    np.minimum(nxt, bad, out=nxt)  # a code that would end past the stream leads to the sentinel
    nxt[n] = bad

    # Start positions of symbols 0..count-1 and the end of the last one, by pointer doubling:
    # pos[k + m] = jump_m[pos[k]] for the jump table of m = 2^j steps.
    pos = np.empty(count + 1, dtype=itype)
    pos[0] = 0
    jump, spare, filled = nxt, np.empty_like(nxt), 1
    while True:
        m = min(filled, count + 1 - filled)
        pos[filled : filled + m] = np.take(jump, pos[:m], mode="clip")  # indices are in range anyway
        filled += m
        if filled == count + 1 or pos[filled - 1] == bad:
            break
        np.take(jump, jump, out=spare, mode="clip")
        jump, spare = spare, jump
    if pos[filled - 1] == bad:
        k = int(np.argmax(pos[:filled] == bad))  # symbol k - 1 could not be decoded
        p = int(pos[k - 1])
        if p == n:
            raise ValueError(f"truncated Huffman stream: {total} bits hold only {k - 1} of {count} symbols")
        if group[p] == nogroup:
            raise ValueError(
                f"corrupt or truncated Huffman stream: the bits at position {p} (symbol {k - 1}) match no code"
            )
        need = int(step[group[p]])
        raise ValueError(
            f"truncated Huffman stream: symbol {k - 1} at bit {p} needs {need} bits, "
            f"only {total - p} of {total} remain ({count} symbols asked)"
        )

    start = pos[:count]
    g = group[start]
    rank = group_first[g] + (windows[start].astype(np.int64) >> shift[g]) - first_code[g]
    return order[rank].astype(np.int64)


def pack_fixed(values: np.ndarray, width: int) -> bytes:
    """``values`` (flattened) as ``width``-bit unsigned integers (1..32), packed MSB-first."""
    width = operator.index(width)
    if not 1 <= width <= _LIMIT:
        raise ValueError(f"width must be between 1 and {_LIMIT}, got {width}")
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return b""
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"values must be integers, got dtype {v.dtype}")
    bad = np.flatnonzero((v < 0) | (v > (1 << width) - 1))
    if bad.size:
        raise ValueError(f"value {v[bad[0]]} at index {bad[0]} does not fit in {width} unsigned bits")
    return np.packbits(_bits_of(v.astype(np.uint64), width, _width_bytes(width))).tobytes()


def unpack_fixed(payload: bytes, width: int, count: int) -> np.ndarray:
    """The first ``count`` ``width``-bit values (int64) packed by :func:`pack_fixed`."""
    width, count = operator.index(width), operator.index(count)
    if not 1 <= width <= _LIMIT:
        raise ValueError(f"width must be between 1 and {_LIMIT}, got {width}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    buf = np.frombuffer(payload, dtype=np.uint8)
    if count * width > 8 * buf.size:
        raise ValueError(
            f"payload too short: {count} values of {width} bits need {count * width} bits, it has {8 * buf.size}"
        )
    words = _words64(buf[: -(-count * width // 8)])
    start = np.arange(count, dtype=np.uint64) * np.uint64(width)
    v = (words[(start >> np.uint64(3)).astype(np.int64)] << (start & np.uint64(7))) >> np.uint64(64 - width)
    return v.astype(np.int64)
