"""Statistics shared by every stage: bootstrap confidence intervals, and Student-t intervals over seeds.

Pure functions of arrays; no stage imports here, and nothing here reads a config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    """A two-sided confidence interval; unpacks as `low, high = interval`."""

    low: float
    high: float


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
    method: str = "percentile",
) -> Interval:
    """Bootstrap confidence interval of `statistic(values)` (Efron & Tibshirani 1993, ch. 13).

    `values` is one sample (1-D). To bootstrap a statistic of paired columns (x_i, y_i), pass the row
    indices `np.arange(n)` as `values` and let `statistic` index the columns: resampling indices with
    replacement resamples rows.

    `method` is scipy's: "percentile" (the default: it never extrapolates outside the range the
    resampled statistics reach, which matters for rates near 0 or 1 on small samples), "basic" or "BCa".
    A deterministic `seed` makes reports reproducible; `seed=None` draws fresh randomness.

    Degenerate inputs are answered without scipy (which would warn and return NaN): one value, or all
    values equal, gives the zero-width interval at `statistic(values)`; no values gives (nan, nan).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    data = np.asarray(values)
    if data.dtype.kind not in "iuf":  # keep integers as they are: they may be row indices
        data = data.astype(float)
    if data.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {data.shape}")
    if data.size == 0:
        return Interval(float("nan"), float("nan"))
    if data.size == 1 or np.all(data == data[0]):
        point = float(statistic(data))
        return Interval(point, point)

    def _stat(sample: np.ndarray, axis: int = -1) -> np.ndarray:
        # scipy calls a vectorised statistic with an `axis`; a plain callable (a user's lambda) is applied
        # along that axis one resample at a time.
        if statistic in (np.mean, np.median, np.std, np.sum):
            return statistic(sample, axis=axis)
        return np.apply_along_axis(statistic, axis, sample)

    from scipy import stats as scipy_stats  # imported here: it takes a second, and most callers never bootstrap

    result = scipy_stats.bootstrap(
        (data,),
        _stat,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method=method,
        rng=np.random.default_rng(seed),
        vectorized=True,
    )
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high))


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean of a few independent values (Student 1908): mean +- t_{n-1} * s / sqrt(n).

    Used across seeds, where each value is one replica's figure (itself a mean over hundreds of prompts, so close to
    normal by the central limit theorem). With the 2 to 5 seeds a lab can afford, a bootstrap over seeds cannot
    reach beyond the values it saw (3 seeds give at most 10 distinct resampled means) and its intervals are far too
    narrow; the t quantile (12.7 for 2 seeds, 4.30 for 3) widens the interval honestly for so few values.

    One value has no spread to measure: (nan, nan). Equal values give the zero-width interval at that value.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    data = np.asarray(values, dtype=float)
    if data.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {data.shape}")
    if data.size < 2:
        return Interval(float("nan"), float("nan"))
    from scipy import stats as scipy_stats

    mean = float(data.mean())
    half = float(scipy_stats.t.ppf((1 + confidence) / 2, df=data.size - 1) * data.std(ddof=1) / np.sqrt(data.size))
    return Interval(mean - half, mean + half)
