"""Numbers derived from losses, defined once (the trainer's logs, `lorafit compare` and the report share them)."""

from __future__ import annotations

import math


def perplexity(loss: float | None) -> float | None:
    """exp(loss); inf where exp overflows a float, None for a missing or non-finite loss."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(loss) if loss < 700 else float("inf")
