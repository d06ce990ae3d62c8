"""Latency statistics over timed runs: the numbers every bench record carries.

Percentiles use numpy's linear interpolation (``np.percentile``'s default), ``std`` is the
population standard deviation, as in LiteRT's ``benchmark_model``. Times are milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOISY_RATIO = 0.10  # two runs of one configuration whose medians differ by more: too noisy


def latency_stats(samples_ms: Sequence[float], warmup: int = 0) -> dict:
    """min, median, p90, p99, mean, std over ``samples_ms`` (after ``warmup`` untimed runs)."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no timed runs")
    return {
        "runs": int(x.size),
        "warmup": int(warmup),
        "min": float(x.min()),
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "mean": float(x.mean()),
        "std": float(x.std()),
    }


def median_spread(a: float, b: float) -> float:
    """Relative difference of two medians of the same configuration: |a - b| / min(a, b)."""
    return abs(a - b) / min(a, b)
