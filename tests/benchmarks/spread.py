"""How far repeated timings wander: the tolerance the benchmarks' targets allow."""

from __future__ import annotations

import statistics


def relative_spread(values: list[float]) -> float:
    """(max - min) / median of repeated timings (or of their ratios)."""
    return (max(values) - min(values)) / statistics.median(values)
