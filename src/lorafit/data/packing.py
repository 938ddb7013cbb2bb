"""Best-fit-decreasing packing of samples into rows of at most `max_length` tokens.

A packed row is the concatenation of whole samples; `position_ids` restart at 0 for every sample and
`seq_lengths` lists the sample lengths, from which the collator builds the attention that keeps samples
apart (see collate.py). Packing happens per micro-batch, at collate time: the samples of one micro-batch
are laid out in as few rows as fit, so a batch holds the same samples with packing on or off.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices. Each sample goes into the open bin with the least room that still fits it.

    Open bins are grouped by remaining room, and the distinct room values are kept sorted, so a lookup is
    a bisect over at most `capacity` values: fast enough for millions of samples.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rooms: list[int] = []  # sorted distinct remaining capacities of open bins
    by_room: dict[int, list[int]] = {}  # room -> bin ids with that room
    bins: list[list[int]] = []
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"sample {i} has {size} tokens, more than the row capacity {capacity}")
        k = bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            b = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = room - size
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(b)
    return bins


def pack_rows(batch: dict) -> dict:
    """Concatenate the samples of each bin (one batch of `datasets.map`, columns already gathered per bin)."""
    out = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for ids_list, labels_list in zip(batch["member_ids"], batch["member_labels"]):
        ids, labels, positions, lengths = [], [], [], []
        for s_ids, s_labels in zip(ids_list, labels_list):
            ids += s_ids
            labels += s_labels
            positions += range(len(s_ids))
            lengths.append(len(s_ids))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["seq_lengths"].append(lengths)
    return out


def packing_efficiency(lengths: list[int], bins: list[list[int]], capacity: int) -> float:
    """Real tokens / tokens computed when every packed row is padded to `capacity`."""
    if not bins:
        return 0.0
    return sum(lengths) / (len(bins) * capacity)


def pack_features(features: list[dict], capacity: int) -> list[dict]:
    """One micro-batch of samples (input_ids, labels) as packed rows (+ position_ids, seq_lengths)."""
    bins = best_fit_decreasing([len(f["input_ids"]) for f in features], capacity)
    out = pack_rows(
        {
            "member_ids": [[features[i]["input_ids"] for i in b] for b in bins],
            "member_labels": [[features[i]["labels"] for i in b] for b in bins],
        }
    )
    return [{key: out[key][k] for key in out} for k in range(len(bins))]


def layout_stats(lengths: np.ndarray, micro_batch: int, capacity: int, seed: int, flat: bool = False) -> dict:
    """What one epoch's micro-batches cost with and without packing: rows, and real / computed tokens.

    Without packing a micro-batch is `micro_batch` rows padded to its longest sample; packed, its samples share rows
    of at most `capacity` tokens, padded to the longest row (flash attention: one row, no padding at all). The
    grouping is a seeded shuffle, as the Trainer's sampler makes one; the figures are per epoch.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return {"rows": 0, "efficiency": 0.0, "unpacked_rows": 0, "unpacked_efficiency": 0.0}
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows = padded = computed = 0
    for start in range(0, len(order), micro_batch):
        group = lengths[order[start : start + micro_batch]]
        padded += len(group) * int(group.max())
        if flat:
            rows, computed = rows + 1, computed + int(group.sum())
            continue
        bins = best_fit_decreasing(group.tolist(), capacity)
        rows += len(bins)
        computed += len(bins) * max(int(group[b].sum()) for b in bins)
    real = int(lengths.sum())
    return {
        "rows": rows,
        "efficiency": round(real / computed, 4),
        "unpacked_rows": len(lengths),
        "unpacked_efficiency": round(real / padded, 4),
    }
