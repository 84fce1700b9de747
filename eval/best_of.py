"""Best-of-N: an eval-time model that samples N completions from a policy and returns the one a reward scores highest.

Its KL to the policy has the analytic bound (Stiennon et al. 2020, appendix G.3; Gao et al. 2022, eq. 1), exact
when the reward has no ties:

    KL(best-of-N || pi) <= log N - (N - 1) / N

and is estimated from the samples with the exact best-of-N probability of a discrete reward (Beirami et al. 2024,
"Theoretical guarantees on the best-of-n alignment policy", lemma 1), the policy's reward CDF being the empirical one
of all the prompt's samples:

    pi_bon(y) / pi(y) = (F(r)^N - F_(r)^N) / (F(r) - F_(r)),   F(r) = P(R <= r),  F_(r) = P(R < r)
    KL ~ mean over the selected y of log(pi_bon(y) / pi(y))

With distinct rewards this tends to the bound; with ties it is lower (a reward that cannot tell samples apart
leaves the policy as it was: KL 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from common.sampling import Samples


def kl_bound(n: int) -> float:
    """log N - (N - 1) / N: 0 for N = 1, ~ log N - 1 for large N."""
    if n < 1:
        raise ValueError(f"kl_bound: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def select_best(rewards: Tensor, n: int) -> Tensor:
    """Flat indices of the selected samples. `rewards` [P, K * N]: prompt p's K * N samples, read as K groups of N
    consecutive ones; each group gives its highest-reward sample (the first on a tie). Returns [P, K] indices into
    the flat [P * K * N] order (prompt-major)."""
    prompts, per_prompt = rewards.shape
    if per_prompt % n:
        raise ValueError(f"select_best: {per_prompt} samples per prompt are not groups of n = {n}")
    groups = rewards.view(prompts, per_prompt // n, n)
    best = groups.argmax(dim=2)  # the first maximum: torch documents argmax's ties as the first occurrence
    offsets = torch.arange(prompts)[:, None] * per_prompt + torch.arange(per_prompt // n)[None, :] * n
    return offsets + best


def kl_estimate(rewards: Tensor, selected: Tensor, n: int) -> float:
    """The sampled estimate of KL(best-of-N || pi) (module docstring). `rewards` [P, M]: every sample of each prompt;
    `selected` [P, K]: the selected samples' rewards (each one of its row's values)."""
    below_or_equal = (rewards[:, None, :] <= selected[:, :, None]).double().mean(dim=2)  # F(r)   [P, K]
    below = (rewards[:, None, :] < selected[:, :, None]).double().mean(dim=2)  # F_(r)
    ratio = (below_or_equal**n - below**n) / (below_or_equal - below)
    return float(torch.log(ratio).mean())


def pick(samples: Samples, indices: list[int], per_prompt: int) -> Samples:
    """The samples at flat `indices` (prompt-major, `per_prompt` of each prompt), as a model's own samples. Their
    log-probs are the policy's, not the best-of-N model's, so no log-ratio KL is computed from them."""
    return Samples(samples.prompt_ids, per_prompt, [samples.completions[j] for j in indices])
