"""95 % percentile-bootstrap intervals, the one implementation every table and figure uses.

    bootstrap_interval(statistic, *samples) -> (low, high)

The samples are resampled together, row by row (paired values stay paired), 2000 times with a
fixed seed. A resample on which the statistic is undefined (it raises ValueError: one class
only, a constant series) is skipped; fewer than 2 rows, or fewer than half the resamples
defined, give (nan, nan): no interval rather than a misleading one.
"""

from __future__ import annotations

import numpy as np

RESAMPLES, SEED, LEVEL = 2000, 0, 0.95


def bootstrap_interval(statistic, *samples, resamples: int = RESAMPLES, seed: int = SEED,
                       level: float = LEVEL) -> tuple[float, float]:
    samples = [np.asarray(s) for s in samples]
    n = len(samples[0])
    if any(len(s) != n for s in samples):
        raise ValueError(f"bootstrap: samples of different lengths {[len(s) for s in samples]}")
    if n < 2:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    values = []
    for rows in draws:
        try:
            values.append(float(statistic(*(s[rows] for s in samples))))
        except ValueError:
            continue
    if len(values) < resamples / 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def mean_interval(values) -> tuple[float, float]:
    """The interval of the mean of `values`."""
    return bootstrap_interval(np.mean, np.asarray(values, dtype=np.float64))
