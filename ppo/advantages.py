"""Masked statistics, per-token rewards and generalised advantage estimation for RLHF-PPO.

Shapes: every per-token tensor is `[batch, response_len]`, aligned with the response tokens, and comes with
a `mask` of the same shape that is true on the real response tokens (up to and including the EOS) and false
on the right padding after them. Masks may be bool or 0/1 of any dtype; they are read as bool.

Nothing here computes gradients: advantages and returns are targets, so the inputs are detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over the positions where `mask` is true (over all of them, or along `dim`).

    Masked-out positions are excluded with `where`, not multiplied by 0, so a nan/inf in the padding
    cannot leak into the mean. An empty mask (or a row with no true entry when `dim` is given) is an error:
    its mean is undefined and a silent 0 would hide an empty response.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim)
    count = mask.sum(dim)
    if bool((count == 0).any()):
        raise ValueError(
            "masked_mean: the mask has no true entry" + ("" if dim is None else f" in some slice along dim {dim}")
            + f" (mask shape {tuple(mask.shape)}); every response must keep at least one token."
        )
    return total / count


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` over the positions where `mask` is true.

    unbiased=True applies Bessel's correction n / (n - 1), with n the number of true positions.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum()
        if int(n) < 2:
            raise ValueError(f"masked_var: the unbiased variance needs at least 2 masked-in values, got {int(n)}.")
        var = var * (n / (n - 1))
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True,
           eps: float = 1e-8) -> Tensor:
    """Normalise `values` to zero mean and unit variance over the masked-in positions.

    `(values - mean) / sqrt(var + eps)`, mean and variance taken over the true positions of `mask` only
    (padding must not pull the statistics). With shift_mean=False the mean is added back: the spread is
    normalised but the mean kept, which is how rewards are whitened when their sign carries meaning.
    Masked-out positions are returned as 0.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16), vectorised over the batch.

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t          (the value target: the lambda-return)

    Each row is one episode that ends at its last masked-in token (the EOS, or the last token of a response
    cut at max_new_tokens): past it V_{t+1} = 0 and A_{t+1} = 0, so the padding after a response
    contributes nothing, whatever `rewards` and `values` hold there. Masked-out positions get advantage 0
    and return 0. The mask is expected to be right-padded (true then false); a false inside a row would end
    the episode there.

    Args:
        rewards: [B, T] per-token rewards (see `per_token_rewards`).
        values: [B, T] value estimates V(s_t) of the state before each response token.
        mask: [B, T] true on response tokens.
        gamma: discount; 1.0 is usual for RLHF (Huang et al. 2024, "The N+ Implementation Details of RLHF
            with PPO").
        lam: GAE lambda; 0.95 is a usual choice.

    Returns:
        (advantages, returns), both [B, T], detached.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must all be the same [batch, response_len] shape."
        )
    mask = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(mask, rewards.detach(), zero)
    values = torch.where(mask, values.detach().to(rewards.dtype), zero)
    # `continues[:, t]` is 1 when the episode goes on after token t, i.e. token t + 1 is a response token.
    continues = torch.zeros_like(rewards)
    continues[:, :-1] = mask[:, 1:].to(rewards.dtype)
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    deltas = rewards + gamma * next_values * continues - values

    # The recursion runs backwards in time; each step is one vectorised op over the batch.
    advantages_reversed = []
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_advantage = deltas[:, t] + gamma * lam * continues[:, t] * next_advantage
        next_advantage = torch.where(mask[:, t], next_advantage, zero)
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


def per_token_rewards(scores: Tensor, kl: Tensor, kl_coef: float | Tensor, mask: Tensor) -> Tensor:
    """The per-token reward of RLHF-PPO: -kl_coef * KL on every response token, plus the sequence's score on
    its last response token (Ziegler et al. 2019, eq. 1; Stiennon et al. 2020, eq. 1).

        r_t = -kl_coef * kl_t + [t == last_t] * score

    The score of a whole response is given where the episode ends, at the last masked-in token (the EOS
    when the response has one). Padding gets 0.

    Args:
        scores: [B] one scalar reward-model score per response (already penalised / whitened as wanted).
        kl: [B, T] per-token KL estimates (`ppo.kl.kl_penalty`).
        kl_coef: the KL coefficient beta (`KLController.value`).
        mask: [B, T] true on response tokens; each row needs at least one.

    Returns:
        [B, T] rewards, detached.
    """
    if kl.shape != mask.shape or kl.dim() != 2 or scores.shape != kl.shape[:1]:
        raise ValueError(
            f"per_token_rewards: expected scores [B], kl [B, T] and mask [B, T]; got scores "
            f"{tuple(scores.shape)}, kl {tuple(kl.shape)}, mask {tuple(mask.shape)}."
        )
    mask = mask.bool()
    has_token = mask.any(dim=1)
    if not bool(has_token.all()):
        rows = torch.nonzero(~has_token).flatten().tolist()
        raise ValueError(f"per_token_rewards: rows {rows} have an empty response mask; nothing can carry the score.")
    kl = kl.detach()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    # Index of the last true entry of each row: the first true entry of the row read backwards.
    length = mask.shape[1]
    last = length - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)
    at_last = F.one_hot(last, num_classes=length).to(rewards.dtype)
    return rewards + at_last * scores.detach().to(rewards.dtype)[:, None]


def global_whiten(values: Tensor, mask: Tensor, reduce_sum: Callable[[Tensor], Tensor], eps: float = 1e-8) -> Tensor:
    """`whiten` over the union of every process's batch: (x - mean) / sqrt(var + eps) with the
    unbiased variance of all masked-in entries on all processes. `reduce_sum` sums a tensor over processes
    (the identity on one process). Statistics in float64: sum of squares minus squared mean loses digits in float32."""
    m = mask.bool()
    x = torch.where(m, values, torch.zeros_like(values)).double()
    sums = reduce_sum(torch.stack([x.sum(), (x * x).sum(), m.sum().double()]))
    total, total_sq, n = sums[0], sums[1], sums[2]
    mean = total / n
    var = (total_sq / n - mean * mean) * n / (n - 1)
    whitened = ((values.double() - mean) * torch.rsqrt(var + eps)).to(values.dtype)
    return torch.where(m, whitened, torch.zeros_like(whitened))
