"""PPO's losses: the clipped policy surrogate and the clipped value loss. (The per-token log-probs and entropies
they take are computed from a language model's logits by `common.generation.response_logprobs`.)

Per-token tensors are `[batch, response_len]` with a `mask` of the same shape (true on response tokens);
losses are means over all masked-in tokens of the minibatch (token-level averaging: a long response weighs
more than a short one, as in Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").

The stats returned next to each loss are detached scalars, so logging them neither keeps the graph alive
nor forces a device sync until the caller reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppo.advantages import masked_mean

LOSS_AGGREGATIONS = ("token", "sequence", "constant")


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str, constant_length: int | None = None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar (over one micro-batch: the trainers weigh micro-batches so that
    the optimizer step sees the same reduction over its whole minibatch, ppo.trainer.OnPolicyTrainer.loss_shares).

        token     sum over every masked-in token / their number: each token weighs the same, a long response
                  more than a short one (DAPO, Yu et al. 2025, eq. 12; Huang et al. 2024 for PPO)
        sequence  mean over responses of each response's mean: each response weighs the same, its tokens
                  1 / length each (GRPO, Shao et al. 2024, eq. 3)
        constant  sum over every masked-in token / (B * constant_length): no length normalisation at all
                  (Dr. GRPO, Liu et al. 2025, sec. 3.2, with constant_length = max_new_tokens)
    """
    if aggregation == "token":
        return masked_mean(per_token, mask)
    if aggregation == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if aggregation == "constant":
        if constant_length is None or constant_length < 1:
            raise ValueError(f"aggregate: 'constant' needs constant_length >= 1, got {constant_length}.")
        return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum() / (
            per_token.shape[0] * constant_length)
    raise ValueError(f"aggregate: unknown aggregation {aggregation!r}; expected one of {LOSS_AGGREGATIONS}.")


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float, clip_range_high: float | None = None, aggregation: str = "token",
                constant_length: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate objective, negated to be minimised (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", eq. 7):

        ratio_t = exp(log pi(a_t) - log pi_old(a_t))
        loss    = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps_low, 1 + eps_high))

    eps_high > eps_low is DAPO's clip-higher (Yu et al. 2025, eq. 10): a token with a positive advantage may
    gain more probability before its gradient is cut, which keeps low-probability tokens from being starved.

    Args:
        logprobs: [B, T] log-probs of the response tokens under the current policy (with grad).
        old_logprobs: [B, T] the same tokens' log-probs at rollout time (no grad).
        advantages: [B, T] advantages (usually whitened).
        mask: [B, T] true on response tokens.
        clip_range: eps_low, e.g. 0.2 (also eps_high unless `clip_range_high` is given).
        clip_range_high: eps_high, e.g. 0.28 (DAPO); None means symmetric clipping.
        aggregation, constant_length: how the per-token terms become one loss (see `aggregate`); "token" is
            PPO's mean over all masked-in tokens.

    Returns:
        (loss, stats) with stats:
          "approx_kl": mean over tokens of k3 = (r - 1) - log r with r = pi / pi_old, an unbiased estimate of
              KL(pi_old || pi) on tokens sampled from pi_old that is never negative (Schulman, "Approximating
              KL divergence", 2020). We pick k3 over 0.5 * logratio^2 (k2) because k2 is biased when pi and
              pi_old drift apart, which is exactly when this stat matters (early stopping, debugging).
          "clipfrac": fraction of tokens where the clipped term is the larger one, i.e. the clip is active
              and the token gives no gradient.
          "ratio_mean": mean probability ratio; should stay near 1.
    """
    clip_range_high = clip_range if clip_range_high is None else clip_range_high
    if clip_range <= 0 or clip_range_high <= 0:
        raise ValueError(f"policy_loss: clip ranges must be > 0, got {clip_range} and {clip_range_high}.")
    mask = mask.bool()
    # Zero the log-ratio on padding before exp: garbage there could overflow to inf, and inf * 0 in the
    # backward pass would turn the gradient into nan even though the loss ignores those positions.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range_high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation, constant_length)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (the value clipping of OpenAI baselines' PPO2, kept in RLHF-PPO since Ziegler et al.
    2019; Huang et al. 2024 list it among the implementation details):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        loss   = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    Args:
        values: [B, T] current value predictions (with grad).
        old_values: [B, T] the value predictions at rollout time (no grad).
        returns: [B, T] value targets (`gae(...)[1]`).
        mask: [B, T] true on response tokens.
        clip_range_value: eps_v, e.g. 0.2 (in the units of the rewards).

    Returns:
        (loss, {"clipfrac": fraction of tokens where the clipped error is the larger one}).
    """
    if clip_range_value <= 0:
        raise ValueError(f"value_loss: clip_range_value must be > 0, got {clip_range_value}.")
    mask = mask.bool()
    old_values = old_values.detach()
    returns = returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats

