"""Gap coding of non-zero positions with filler entries (Deep Compression's relative indices)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchshrink.encoding.positions import from_gaps, gap_histogram, to_gaps


def test_hand_example_with_fillers() -> None:
    # positions 1 and 7: gaps 1 and 5; width 2 -> filler M=3 -> [1, 3(filler), 2]
    mask = np.zeros(10, dtype=bool)
    mask[[1, 7]] = True
    assert to_gaps(mask, 2).tolist() == [1, 3, 2]
    assert to_gaps(mask, 3).tolist() == [1, 5]
    assert to_gaps(mask, 1).tolist() == [1, 0, 1, 1, 1, 1, 1, 0]  # a bitmask up to the last weight
    assert from_gaps([1, 3, 2], 2, 10).tolist() == mask.tolist()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.booleans(), min_size=0, max_size=400),
    st.integers(min_value=1, max_value=10),
)
def test_round_trip_and_histogram(bits: list[bool], width: int) -> None:
    mask = np.array(bits, dtype=bool)
    symbols = to_gaps(mask, width)
    assert symbols.max(initial=0) < 2**width
    assert (symbols != 2**width - 1).sum() == mask.sum()  # one non-filler per kept weight
    assert from_gaps(symbols, width, len(mask)).tolist() == mask.tolist()
    assert np.array_equal(gap_histogram(mask, width), np.bincount(symbols, minlength=2**width))


def test_rejects_streams_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="past the end"):
        from_gaps([5], 3, 4)
    with pytest.raises(ValueError, match="0..3"):
        from_gaps([4], 2, 10)
    with pytest.raises(ValueError, match="1..16"):
        to_gaps(np.ones(3, dtype=bool), 17)
