"""Paired-seed statistics of the study: a mean's Student-t interval and the spread over seeds."""

from __future__ import annotations

import math


def interval(values: list[float]) -> dict[str, float | int]:
    """Mean and the half-width of its 95 % Student-t interval (n - 1 degrees of freedom)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "half_width": math.nan, "low": math.nan, "high": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


def spread(values: list[float]) -> dict[str, float | int]:
    """Sample SD and range over seeds: how far one run moves on its own."""
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"n": n, "sd": sd, "min": min(values), "max": max(values), "range": max(values) - min(values)}
