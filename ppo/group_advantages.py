"""Critic-free advantages: each prompt's group of G sampled completions is its own baseline.

Shapes: `rewards` is `[num_groups, G]`, row g holding the scalar rewards of the G completions of prompt g. The
advantage of a completion is one number, given to every one of its tokens by the loss (outcome supervision).

    grpo          A_i = (r_i - mean(r)) / (std(r) + eps)                  Shao et al. 2024 (DeepSeekMath), eq. 3
    dr_grpo       A_i = r_i - mean(r)                                     Liu et al. 2025 (Dr. GRPO), eq. 3: the
                  std division biases towards too easy / too hard prompts, so it is dropped
    rloo          A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean(r))   Ahmadian et al. 2024, eq. 4
    reinforce_pp  A_i = r_i - mean(r), then whitened over the global batch      Hu 2025 (REINFORCE++-baseline)

std is the unbiased (Bessel-corrected) standard deviation of the group, as in trl's GRPOTrainer and verl.
Nothing here computes gradients: the rewards are detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ppo.advantages import global_whiten

GROUP_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
# Added to the group's std before dividing (trl GRPOTrainer uses 1e-4): a group whose rewards are all equal gets
# advantage 0, not 0 / 0.
GRPO_STD_EPS = 1e-4


def group_advantages(rewards: Tensor, estimator: str, reduce_sum: Callable[[Tensor], Tensor] = lambda s: s,
                     eps: float = GRPO_STD_EPS) -> Tensor:
    """Per-completion advantages `[num_groups, G]` for `estimator` (see the module docstring).

    Args:
        rewards: [num_groups, G] scalar rewards, G >= 2.
        estimator: one of GROUP_ADVANTAGES.
        reduce_sum: sums a tensor over processes (the identity on one process); only reinforce_pp whitens over
            the global batch, the other estimators are local to a group.
        eps: added to the group std by grpo.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [num_groups, G] with G >= 2, got {tuple(rewards.shape)}"
                         "; sample at least two completions per prompt.")
    rewards = rewards.detach()
    group_size = rewards.shape[1]
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if estimator == "dr_grpo":
        return centred
    if estimator == "rloo":
        # r_i - (sum(r) - r_i) / (G - 1) = (G r_i - sum(r)) / (G - 1) = G / (G - 1) * (r_i - mean(r)).
        return centred * (group_size / (group_size - 1))
    if estimator == "reinforce_pp":
        return global_whiten(centred, torch.ones_like(centred, dtype=torch.bool), reduce_sum)
    raise ValueError(f"group_advantages: unknown estimator {estimator!r}; expected one of {GROUP_ADVANTAGES}.")


def group_statistics(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over groups of the unbiased std of each group's rewards, fraction of groups whose rewards are all
    equal). A group with equal rewards has advantage 0 under every estimator: it teaches nothing (DAPO's dynamic
    sampling, Yu et al. 2025, filters such groups; here they are counted)."""
    rewards = rewards.detach()
    no_signal = (rewards == rewards[:, :1]).all(dim=1)
    return rewards.std(dim=1).mean(), no_signal.to(rewards.dtype).mean()
