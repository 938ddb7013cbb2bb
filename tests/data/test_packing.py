"""Best-fit-decreasing packing: every sample once, no row over capacity, positions restart per sample."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafit.data.packing import best_fit_decreasing, pack_rows, packing_efficiency


@settings(max_examples=200, deadline=None)
@given(st.integers(8, 64).flatmap(lambda cap: st.tuples(st.just(cap), st.lists(st.integers(1, cap), max_size=60))))
def test_bins_hold_every_sample_once_within_capacity(case):
    capacity, lengths = case
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) >= math.ceil(sum(lengths) / capacity)
    # best fit never leaves two bins that could have been merged... at most one bin is at most half full
    assert sum(1 for b in bins if sum(lengths[i] for i in b) <= capacity / 2) <= 1


def test_best_fit_beats_first_fit_order():
    # Sorted decreasing with best fit: 6+4, 5+5, 3+3+2+2 -> three full rows of 10.
    lengths = [5, 3, 6, 2, 4, 5, 3, 2]
    bins = best_fit_decreasing(lengths, 10)
    assert len(bins) == 3 and packing_efficiency(lengths, bins, 10) == 1.0


def test_pack_rows_restarts_positions():
    batch = {"member_ids": [[[1, 2, 3], [4, 5]]], "member_labels": [[[-100, 2, 3], [-100, 5]]]}
    out = pack_rows(batch)
    assert out["input_ids"] == [[1, 2, 3, 4, 5]]
    assert out["labels"] == [[-100, 2, 3, -100, 5]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1]]
    assert out["seq_lengths"] == [[3, 2]]
