"""Best-of-N: an eval-time model that samples N completions from a policy and returns the one a reward scores highest.

Its KL to the policy has the analytic bound (Stiennon et al. 2020, appendix G.3; Gao et al. 2022, eq. 1), exact
when the reward has no ties:

    KL(best-of-N || pi) <= log N - (N - 1) / N

and is estimated from the samples' ties. With a reward that has no ties KL is exactly the bound, whatever the
reward's distribution: pi_bon(y) / pi(y) = N F(r)^(N-1), F the policy's reward CDF, and F(r) of the best of N is
Beta(N, 1). Only ties (identical completions, a coarse reward) lower it: a tied value of mass p = F(r) - F_(r),
F_(r) = P(R < r), is picked with probability F(r)^N - F_(r)^N (Beirami et al. 2024, "Theoretical guarantees on the
best-of-n alignment policy", lemma 1). So the estimate is the exact KL of each prompt's samples read as such a
distribution: a value sampled once is a continuous stretch of F of width 1/M (M: the prompt's samples), a value
sampled c > 1 times an atom of mass c/M; the KL integrates N u^(N-1) log(N u^(N-1)) du over the stretches and adds
(F^N - F_^N) log((F^N - F_^N) / p) for the atoms, averaged over prompts. Without ties it returns the bound; with one
value throughout, 0. Plugging the empirical CDF of the N samples themselves in instead would overestimate (for N = 4,
1.01 where the bound is 0.64), since the best of N samples sits at the top of their own CDF.
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


def kl_estimate(rewards: Tensor, n: int) -> float:
    """The estimate of KL(best-of-N || pi) from the ties among each prompt's samples (module docstring). `rewards`
    [P, M]: every sample of each prompt."""
    per_prompt = []
    for row in rewards.double():
        counts = torch.unique(row, sorted=True, return_counts=True)[1].tolist()
        edges = [0.0, *(torch.tensor(counts).cumsum(0) / len(row)).tolist()]
        per_prompt.append(sum(_tied(a, b, n) if c > 1 else _untied(a, b, n)
                              for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)))
    return sum(per_prompt) / len(per_prompt)


def _untied(a: float, b: float, n: int) -> float:
    """The integral of N u^(N-1) log(N u^(N-1)) over u in [a, b]: u^N log N + (N-1) (u^N log u - u^N / N)."""

    def antiderivative(u: float) -> float:
        return u**n * math.log(n) + (n - 1) * ((u**n * math.log(u) if u > 0 else 0.0) - u**n / n)

    return antiderivative(b) - antiderivative(a)


def _tied(a: float, b: float, n: int) -> float:
    """An atom of mass b - a whose value best-of-N picks with probability b^N - a^N."""
    picked = b**n - a**n
    return picked * math.log(picked / (b - a))


def pick(samples: Samples, indices: list[int], per_prompt: int) -> Samples:
    """The samples at flat `indices` (prompt-major, `per_prompt` of each prompt), as a model's own samples. Their
    log-probs are the policy's, not the best-of-N model's, so no log-ratio KL is computed from them."""
    return Samples(samples.prompt_ids, per_prompt, [samples.completions[j] for j in indices])
