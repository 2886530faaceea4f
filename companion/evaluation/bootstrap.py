"""Percentile bootstrap confidence intervals for any metric (Efron and Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13): resample the evaluation examples with replacement, recompute the metric on each
resample, and report the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the recomputed values.

Design: one seeded ``numpy.random.Generator`` draws every resample index at once, so the interval is the same
on every machine; the arrays are resampled *together* (row ``i`` of each array stays paired).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float  # the metric on the full sample
    low: float  # lower percentile of the resampled metric
    high: float  # upper percentile of the resampled metric
    confidence: float  # e.g. 0.95
    n_resamples: int  # number of bootstrap resamples

    @property
    def width(self) -> float:
        return self.high - self.low


def bootstrap_ci(metric: Callable[..., float], *arrays, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap interval of ``metric(*arrays)``; every array has the same first dimension N (the
    examples), and each resample takes the same N row indices (drawn with replacement) from all of them."""
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    arrays = [np.asarray(a) for a in arrays]
    lengths = [len(a) for a in arrays]
    if len(set(lengths)) != 1:
        raise ValueError(f"arrays must have the same length, got lengths {lengths}")
    n = lengths[0]
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one example, got empty arrays")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(n_resamples, n))  # (R, N)
    values = np.array([float(metric(*(a[i] for a in arrays))) for i in index])  # (R,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return BootstrapCI(float(metric(*arrays)), float(low), float(high), confidence, n_resamples)
