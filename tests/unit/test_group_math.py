"""The critic-free family's math on numbers worked by hand (float64, tolerance 1e-6): the four group advantages, the
leave-one-out baseline against a plain loop, clip-higher and the loss aggregations."""

from __future__ import annotations

import math

import pytest
import torch

from ppo.group_advantages import group_advantages, group_statistics
from ppo.losses import aggregate, policy_loss
from tests.unit.test_ppo_math import close, t

# Two groups of G = 4: one with signal (mean 3, deviations -2 -1 0 3), one whose rewards are all equal.
REWARDS = [[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]


def test_grpo_divides_by_the_unbiased_group_std_plus_eps():
    # std = sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3) = 2.1602468995; + 1e-4 = 2.1603468995.
    # -2 / 2.1603468995 = -0.9257772446, -1 / ... = -0.4628886223, 3 / ... = 1.3886658669.
    # The equal group: 0 / (0 + 1e-4) = 0.
    close(group_advantages(t(REWARDS), "grpo"),
          [[-0.9257772446, -0.4628886223, 0.0, 1.3886658669], [0.0, 0.0, 0.0, 0.0]])


def test_dr_grpo_only_subtracts_the_group_mean():
    close(group_advantages(t(REWARDS), "dr_grpo"), [[-2.0, -1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])


def test_rloo_by_hand():
    # Leave-one-out means: (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2.
    # A = 1 - 11/3 = -8/3, 2 - 10/3 = -4/3, 3 - 3 = 0, 6 - 2 = 4.
    close(group_advantages(t(REWARDS), "rloo"), [[-8 / 3, -4 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])


def test_rloo_matches_a_plain_leave_one_out_loop():
    rewards = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            others = [rewards[g, j] for j in range(rewards.shape[1]) if j != i]
            expected[g, i] = rewards[g, i] - sum(others) / len(others)
    close(group_advantages(rewards, "rloo"), expected)


def test_reinforce_pp_centres_per_group_then_whitens_over_the_global_batch():
    # Centred: [-2, -1, 0, 3] and [-0.5, -0.5, 0.5, 0.5]; global mean 0; unbiased variance over all 8:
    # (4 + 1 + 0 + 9 + 4 * 0.25) / 7 = 15/7, std 1.4638501094. A = centred / 1.4638501094.
    rewards = t([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0]])
    expected = [[-1.3662600989, -0.6831300495, 0.0, 2.0493901484], [-0.3415650247, -0.3415650247,
                                                                     0.3415650247, 0.3415650247]]
    close(group_advantages(rewards, "reinforce_pp"), expected)
    # Each process holding one group and summing the statistics over both gives the same numbers: process 1's
    # centred group [-0.5, -0.5, 0.5, 0.5] contributes (sum 0, sum of squares 1, count 4).
    other = t([0.0, 1.0, 4.0])
    close(group_advantages(rewards[:1], "reinforce_pp", reduce_sum=lambda s: s + other), expected[:1])


def test_group_advantages_reject_a_group_of_one_and_an_unknown_name():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(t([[1.0], [2.0]]), "grpo")
    with pytest.raises(ValueError, match="'ppo'.*grpo"):
        group_advantages(t(REWARDS), "ppo")


def test_group_statistics_by_hand():
    # Mean of the group stds (2.1602468995 and 0) and one group in two without signal.
    std, no_signal = group_statistics(t(REWARDS))
    close(std, math.sqrt(14 / 3) / 2)
    close(no_signal, 0.5)


def test_clip_higher_by_hand():
    # Ratios 1.25, 1.4, 0.7 with advantages 1, 1, -1; eps_low 0.2, eps_high 0.28 (DAPO):
    #   tok 0: unclipped -1.25, clipped -clip(1.25, 0.8, 1.28) = -1.25 -> -1.25 (inside the higher clip)
    #   tok 1: unclipped -1.4,  clipped -1.28 -> -1.28 (clip active)
    #   tok 2: unclipped  0.7,  clipped  0.8  -> 0.8   (the low clip is unchanged)
    # loss = (-1.25 - 1.28 + 0.8) / 3 = -1.73 / 3, clipfrac 2/3. Symmetric 0.2: (-1.2 - 1.2 + 0.8) / 3, clipfrac 1.
    old = t([-1.0, -1.0, -1.0])
    logprobs = old + t([math.log(1.25), math.log(1.4), math.log(0.7)])
    advantages, mask = t([1.0, 1.0, -1.0]), t([1, 1, 1])
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2, clip_range_high=0.28)
    close(loss, -1.73 / 3)
    close(stats["clipfrac"], 2 / 3)
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    close(loss, -1.6 / 3)
    close(stats["clipfrac"], 1.0)


def test_aggregations_by_hand():
    # Row 0: three tokens 1 2 3; row 1: one token 4, then padding (nan there must not leak).
    per_token = t([[1.0, 2.0, 3.0], [4.0, math.nan, math.nan]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    close(aggregate(per_token, mask, "token"), (1 + 2 + 3 + 4) / 4)  # 2.5: every token weighs the same
    close(aggregate(per_token, mask, "sequence"), (2.0 + 4.0) / 2)  # 3.0: every response weighs the same
    close(aggregate(per_token, mask, "constant", constant_length=5), 10 / (2 * 5))  # 1.0: no length normalisation
    with pytest.raises(ValueError, match="constant_length"):
        aggregate(per_token, mask, "constant")


def test_policy_loss_aggregates_per_sequence():
    # Ratio 1 everywhere: the per-token loss is -A. Sequence: mean(-(1+1+1)/3, -(-2)/1) = (-1 + 2) / 2 = 0.5;
    # token: (-3 + 2) / 4 = -0.25.
    logprobs = t([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    advantages, mask = t([[1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]]), t([[1, 1, 1], [1, 0, 0]])
    close(policy_loss(logprobs, logprobs, advantages, mask, 0.2, aggregation="sequence")[0], 0.5)
    close(policy_loss(logprobs, logprobs, advantages, mask, 0.2, aggregation="token")[0], -0.25)
