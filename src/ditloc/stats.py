"""The intervals every results table carries (report, ground truth)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

Z95 = 1.959964  # two-sided 95% quantile of the standard normal


def mean_ci(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% CI by the normal approximation, mean ± 1.96 s/√n
    (s the sample standard deviation; low = high = mean when n = 1)."""
    x = np.asarray(list(values), dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion successes / n (n > 0)."""
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
