"""common.stats.bootstrap_ci and t_interval on cases whose answer can be worked by hand."""

import math

import numpy as np
import pytest

from common.stats import Interval, bootstrap_ci, t_interval


def test_two_values_percentile_interval_spans_both():
    # Resampling [0, 1] twice gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5th
    # percentile of the resampled means is 0 and the 97.5th is 1.
    low, high = bootstrap_ci([0.0, 1.0], n_resamples=4000, seed=1)
    assert (low, high) == (0.0, 1.0)


def test_three_values_ninety_percent_interval():
    # Means of 3 draws from [0, 0, 1]: k ones ~ Binomial(3, 1/3), so P(mean=0) = 8/27 = 0.296,
    # P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27. CDF: 0.296, 0.741, 0.963, 1. The 5th percentile falls
    # in the first block (0) and the 95th in the third (2/3). With 10k resamples the 95th-percentile
    # index (9500) is ~7 standard deviations from the block edge (9630 +- 19), so the answer is exact.
    interval = bootstrap_ci([0.0, 0.0, 1.0], confidence=0.90, n_resamples=10_000, seed=0)
    assert interval.low == 0.0
    assert interval.high == pytest.approx(2 / 3, abs=1e-12)


def test_matches_normal_approximation_on_a_large_sample():
    # 50 ones and 50 zeros: mean 0.5, standard error sqrt(0.25 / 100) = 0.05, so the normal interval is
    # 0.5 +- 1.96 * 0.05 = (0.402, 0.598). Bootstrap means are multiples of 0.01.
    low, high = bootstrap_ci([1.0] * 50 + [0.0] * 50, n_resamples=10_000, seed=0)
    assert low == pytest.approx(0.402, abs=0.011)
    assert high == pytest.approx(0.598, abs=0.011)


def test_degenerate_and_empty_inputs():
    assert bootstrap_ci([3.0, 3.0, 3.0]) == Interval(3.0, 3.0)
    assert bootstrap_ci([2.5]) == Interval(2.5, 2.5)
    low, high = bootstrap_ci([])
    assert math.isnan(low) and math.isnan(high)


def test_seeded_runs_repeat_and_custom_statistics_work():
    values = np.random.default_rng(0).normal(size=40)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    low, high = bootstrap_ci(values, statistic=np.median, n_resamples=500)
    assert low <= float(np.median(values)) <= high
    low, high = bootstrap_ci(values, statistic=lambda x: float(np.max(x)), n_resamples=300)
    assert high == pytest.approx(values.max())


def test_paired_statistic_through_row_indices():
    # Bootstrapping rows: the interval of mean(x - y) when x - y is constant 1 is exactly (1, 1).
    x = np.arange(10, dtype=float)
    y = x - 1.0
    low, high = bootstrap_ci(np.arange(10), statistic=lambda idx: float(np.mean(x[idx] - y[idx])),
                             n_resamples=200)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="one-dimensional"):
        bootstrap_ci([[1.0, 2.0]])


# Student's t quantiles from the tables: t(0.975, df=2) = 4.3027, t(0.975, df=1) = 12.706.
T_975_DF2, T_975_DF1 = 4.302652729749462, 12.706204736174694


def test_t_interval_of_three_seeds():
    # [1, 2, 3]: mean 2, sample sd 1, standard error 1 / sqrt(3); half-width 4.3027 / 1.7321 = 2.4841.
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - T_975_DF2 / math.sqrt(3), abs=1e-9)
    assert high == pytest.approx(2 + T_975_DF2 / math.sqrt(3), abs=1e-9)
    assert (low, high) == pytest.approx((-0.4841377, 4.4841377), abs=1e-6)


def test_t_interval_of_two_seeds_is_wide():
    # [0.4, 0.6]: sd 0.1414, standard error 0.1; half-width 12.706 * 0.1 = 1.2706, far beyond both values.
    assert t_interval([0.4, 0.6]) == pytest.approx((0.5 - T_975_DF1 * 0.1, 0.5 + T_975_DF1 * 0.1), abs=1e-9)


def test_t_interval_degenerate_inputs():
    assert t_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3), abs=1e-12)
    low, high = t_interval([0.7])
    assert math.isnan(low) and math.isnan(high), "one seed has no spread to measure"
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)
