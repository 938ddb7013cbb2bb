"""Faults and hostile input: fuzzed data, NaN, disk full, interrupted saves, OOM, trust boundaries, secrets, paths."""
