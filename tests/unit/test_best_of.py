"""Best-of-N on hand-made numbers: the pick is each group's reward argmax; the KL bound and its sampled estimate
worked by hand (tolerance 1e-6)."""

from __future__ import annotations

import math

import pytest
import torch

from common.sampling import Completion, Samples
from eval.best_of import kl_bound, kl_estimate, pick, select_best


def test_select_best_picks_each_groups_argmax_first_on_ties():
    # Two prompts, K = 2 answers of N = 3 samples each: groups (0.1, 0.9, 0.5), (0.3, 0.2, 0.3) | (-1, -2, -0.5),
    # (7, 7, 7). Argmax within each group: 1, 0 (first of the tie 0.3), 2, 0 (first of three).
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.3], [-1.0, -2.0, -0.5, 7.0, 7.0, 7.0]])
    chosen = select_best(rewards, n=3)
    assert chosen.tolist() == [[1, 3], [6 + 2, 6 + 3]]
    samples = Samples([[1], [2]], 6, [Completion([5] * j, f"c{j}", j % 2 == 0) for j in range(12)])
    best = pick(samples, chosen.flatten().tolist(), per_prompt=2)
    assert best.texts == ["c1", "c3", "c8", "c9"]
    assert [c.has_eos for c in best.completions] == [False, False, True, False]
    assert best.n == 2 and [len(g) for g in best.grouped()] == [2, 2]
    with pytest.raises(ValueError, match="groups of n = 4"):
        select_best(rewards, n=4)


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0  # one sample: the policy itself
    assert abs(kl_bound(4) - (math.log(4) - 0.75)) < 1e-12  # 1.3862943611 - 0.75 = 0.6362943611
    assert abs(kl_bound(16) - 1.8350887222) < 1e-6  # 2.7725887222 - 0.9375
    with pytest.raises(ValueError, match="n must be >= 1"):
        kl_bound(0)


def test_kl_estimate_by_hand():
    # Rewards 1, 2, 2, 3 and N = 2: F runs 0 -> 1/4 over the untied 1, 1/4 -> 3/4 over the tied 2s, 3/4 -> 1 over 3.
    #   untied [a, b]: G(b) - G(a), G(u) = u^2 log 2 + (u^2 log u - u^2 / 2)
    #     [0, 1/4]: 0.0625 * 0.6931471806 + 0.0625 * (-1.3862943611) - 0.03125 = -0.0745716988
    #     [3/4, 1]: (0.6931471806 - 0.5) - (0.5625 * 0.6931471806 + 0.5625 * (-0.2876820725) - 0.28125)
    #               = 0.1931471806 + 0.0531758767 = 0.2463230573
    #   tied 2s: picked with probability 0.5625 - 0.0625 = 0.5 = their mass: 0.5 * log 1 = 0
    # KL 0.1717513585, below the bound log 2 - 1/2 = 0.1931471806 (ties lower it).
    rewards = torch.tensor([[1.0, 2.0, 2.0, 3.0]], dtype=torch.float64)
    assert abs(kl_estimate(rewards, 2) - 0.1717513585) < 1e-6
    # Two equally likely values and N = 2 (a Bernoulli(1/2) reward): the better one is picked with probability 3/4,
    # KL = 0.75 log 1.5 + 0.25 log 0.5 = 0.1308120365.
    coin = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert abs(kl_estimate(coin, 2) - 0.1308120365) < 1e-6
    # A reward that ties everything cannot move the policy: KL 0; and N = 1 is the policy itself.
    assert kl_estimate(torch.ones(1, 8, dtype=torch.float64), 4) == 0.0
    assert kl_estimate(rewards, 1) == 0.0
    # Prompts are averaged: the tied one (0) with the coin (0.1308120365).
    assert abs(kl_estimate(torch.cat([torch.ones(1, 4, dtype=torch.float64), coin]), 2) - 0.0654060183) < 1e-6


def test_kl_estimate_without_ties_is_the_bound_however_few_the_samples():
    # The best of N samples sits at the top of their own empirical CDF: a plug-in of that CDF would give
    # log(N (1 - (1 - 1/N)^N)) = 1.006 for N = 4 against the true 0.636. Without ties the estimate is the bound.
    for n, m in ((4, 4), (16, 16), (64, 64), (4, 4000)):
        rewards = torch.randn(3, m, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        assert abs(kl_estimate(rewards, n) - kl_bound(n)) < 1e-9
