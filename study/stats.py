"""Confidence intervals for the confirmation phase: Student's t for a mean, Welch for a
difference of two means.

Welch rather than a paired test: a seed fixes the initialisation and the data order only
between configurations with the same model and batch size, which the best configurations
of a search rarely share, so runs with one seed are not matched pairs in general. Welch is
valid either way (conservative where pairing would have held) and does not assume equal
variances.
"""

import math

import numpy as np

LEVEL = 0.95


def mean_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """The mean and its two-sided t interval. The interval is NaN (undefined) with fewer
    than 2 values, and with no spread at all: identical values (runs that ignored their
    seed, or a saturated metric) give no estimate of the spread, and a zero-width interval
    would claim a certainty that they do not show."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    if np.all(values == values[0]):
        return mean, math.nan, math.nan
    from scipy import stats  # Here, not at the top: each study's driver imports this module.

    sem = values.std(ddof=1) / math.sqrt(len(values))
    low, high = stats.t.interval(level, len(values) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def welch_difference(a, b, level: float = LEVEL) -> tuple[float, float, float, float]:
    """mean(a) - mean(b), its Welch interval and two-sided p-value; NaN where either side
    has fewer than 2 values or no spread (its variance, and so the interval, unknown)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return difference, math.nan, math.nan, math.nan
    from scipy import stats

    test = stats.ttest_ind(a, b, equal_var=False)
    low, high = test.confidence_interval(level)
    return difference, float(low), float(high), float(test.pvalue)
