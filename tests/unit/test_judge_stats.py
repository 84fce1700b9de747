"""judge.stats on hand-made verdicts and on synthetic data with a known length effect."""

import math

import numpy as np
import pytest

from judge import stats


def test_counts_and_win_rate_by_hand():
    winners = ["a", "a", "a", "b", "tie", None]
    assert stats.outcome_counts(winners) == {"wins": 3, "ties": 1, "losses": 1, "unparseable": 1}
    # (3 wins + 1 tie / 2) / 5 parseable pairs = 3.5 / 5
    assert stats.win_rate(winners) == pytest.approx(0.7, abs=1e-12)
    assert math.isnan(stats.win_rate([None, None]))
    with pytest.raises(ValueError, match="unknown verdicts"):
        stats.outcome_counts(["A"])


def test_win_rate_interval_by_hand():
    # All wins: every resample has win rate 1, so the interval is (1, 1).
    assert tuple(stats.win_rate_ci(["a"] * 8)) == (1.0, 1.0)
    # One win, one loss: resampled rates 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> (0, 1).
    assert tuple(stats.win_rate_ci(["a", "b"], n_resamples=4000)) == (0.0, 1.0)
    # Two ties out of two: scores 0.5, 0.5 -> (0.5, 0.5).
    assert tuple(stats.win_rate_ci(["tie", "tie", None])) == (0.5, 0.5)


def test_position_consistency():
    assert stats.position_consistency([True, False, True, None]) == pytest.approx(2 / 3)
    assert math.isnan(stats.position_consistency([None]))


def test_length_controlled_win_rate_two_groups_by_hand():
    # Two length groups, diff = +10 and -10, so std = 10 and the feature is +-tanh(1). With two feature
    # values the logistic model is saturated: it fits each group's win rate exactly,
    #   theta + phi*tanh(1) = logit(0.8) = ln 4,   theta - phi*tanh(1) = logit(0.4) = ln(2/3),
    # so theta = (ln 4 + ln(2/3)) / 2 and the LC win rate sigmoid(theta) = 1 / (1 + sqrt(3/8)) = 0.6202041.
    winners = ["a", "a", "a", "a", "b"] + ["a", "a", "b", "b", "b"]
    len_a = [20] * 5 + [10] * 5
    len_b = [10] * 5 + [20] * 5
    lc = stats.length_controlled_win_rate(winners, len_a, len_b, l2=0.0)
    assert lc.scale == pytest.approx(10.0)
    assert lc.intercept == pytest.approx((math.log(4) + math.log(2 / 3)) / 2, abs=1e-8)
    assert lc.length_coef == pytest.approx(math.log(6) / (2 * math.tanh(1.0)), abs=1e-8)
    assert lc.win_rate == pytest.approx(1 / (1 + math.sqrt(3 / 8)), abs=1e-8)
    # The raw win rate, 6/10, is below it: a won less often when it was the shorter answer.
    assert stats.win_rate(winners) == pytest.approx(0.6)


def test_length_controlled_win_rate_recovers_a_known_effect():
    # Synthetic judge: P(a preferred) = sigmoid(0.5 + 1.5 * tanh(diff / std)), with a usually longer.
    # The true win rate at zero length difference is sigmoid(0.5) = 0.6225; the raw win rate is inflated
    # by the length preference.
    rng = np.random.default_rng(0)
    n = 4000
    diff = rng.normal(loc=80.0, scale=100.0, size=n)
    x = np.tanh(diff / diff.std())
    p = 1 / (1 + np.exp(-(0.5 + 1.5 * x)))
    winners = ["a" if u < pi else "b" for u, pi in zip(rng.random(n), p, strict=True)]
    len_b = rng.integers(100, 300, size=n)
    len_a = len_b + diff
    lc = stats.length_controlled_win_rate(winners, len_a, len_b)
    assert lc.win_rate == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.03)
    assert lc.length_coef == pytest.approx(1.5, abs=0.2)
    assert stats.win_rate(winners) - lc.win_rate > 0.1


def test_length_controlled_win_rate_degenerate_cases():
    # No length variation: the plain win rate. All wins: 1.0 (the MLE is at infinity).
    assert stats.length_controlled_win_rate(["a", "b", "tie"], [5, 5, 5], [5, 5, 5]).win_rate == pytest.approx(0.5)
    assert stats.length_controlled_win_rate(["a", "a"], [1, 9], [5, 5]).win_rate == 1.0
    assert math.isnan(stats.length_controlled_win_rate([None], [1], [2]).win_rate)


def test_gold_agreement_by_hand():
    winners = ["a", "b", "tie", "a", None]
    gold_a = [1.0, 1.0, 0.0, 0.0, 1.0]
    gold_b = [0.0, 0.0, 1.0, 0.0, 0.0]
    # gold preferences: a, a, b, tie, a.
    # Decisive on both sides: pair 0 (a, a) agrees, pair 1 (b vs gold a) does not -> 1/2 over 2 pairs.
    # Three-way over parseable pairs 0..3: only pair 0 matches -> 1/4.
    assert stats.gold_agreement(winners, gold_a, gold_b) == {
        "agreement": 0.5, "n": 2, "agreement_with_ties": 0.25, "n_with_ties": 4}
    assert stats.gold_preferences([None, 1.0], [0.0, float("nan")]) == [None, None]


def test_summaries_use_stable_names():
    metrics = stats.summarize_pairwise(
        ["a", "tie", "b", None], [True, False, True, None], ["xx", "xxxx", "x", "x"], ["x", "x", "x", "x"],
        gold_a=[2.0, 1.0, 0.0, 1.0], gold_b=[1.0, 1.0, 1.0, 1.0], unparseable_answers=1, n_resamples=200)
    assert metrics["judge/wins"] == 1 and metrics["judge/ties"] == 1 and metrics["judge/losses"] == 1
    assert metrics["judge/unparseable_pairs"] == 1 and metrics["judge/unparseable_answers"] == 1
    assert metrics["judge/win_rate"] == pytest.approx(0.5)
    assert metrics["judge/win_rate_ci_low"] <= 0.5 <= metrics["judge/win_rate_ci_high"]
    assert metrics["judge/position_consistency"] == pytest.approx(2 / 3)
    assert metrics["judge/mean_length_a"] == pytest.approx(2.0)  # (2 + 4 + 1 + 1) / 4 characters
    assert metrics["judge/gold_agreement"] == 1.0 and metrics["judge/gold_agreement_n"] == 2
    assert 0.0 <= metrics["judge/length_controlled_win_rate"] <= 1.0

    scores = stats.summarize_scores([7.0, 9.0, None], n_resamples=200)
    assert scores["judge/score_mean"] == pytest.approx(8.0)
    assert scores["judge/unparseable_answers"] == 1
    assert scores["judge/score_ci_low"] >= 7.0 and scores["judge/score_ci_high"] <= 9.0
