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
    # One prompt, samples with rewards 1 2 3 4 in groups (1, 2), (3, 4), N = 2: the picks are 2 and 4.
    #   r = 2: F = 2/4, F_ = 1/4: (0.25 - 0.0625) / 0.25 = 0.75, log = -0.2876820725
    #   r = 4: F = 1,   F_ = 3/4: (1 - 0.5625) / 0.25 = 1.75, log = 0.5596157879
    # mean 0.1359668577, below the bound log 2 - 1/2 = 0.1931471806.
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    selected = rewards.flatten()[select_best(rewards, 2)]
    assert abs(kl_estimate(rewards, selected, 2) - 0.1359668577) < 1e-6
    # A reward that ties everything cannot move the policy: (1 - 0) / (1 - 0) = 1, KL 0.
    flat = torch.ones(1, 8, dtype=torch.float64)
    assert kl_estimate(flat, flat.flatten()[select_best(flat, 4)], 4) == 0.0


def test_kl_estimate_tends_to_the_bound_with_distinct_rewards():
    # 4000 samples in groups of 4, distinct rewards: the empirical CDF is close to the true one.
    rewards = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    selected = rewards.flatten()[select_best(rewards, 4)]
    assert abs(kl_estimate(rewards, selected, 4) - kl_bound(4)) < 0.05
