"""The KL penalty of RLHF-PPO: per-token estimators and the controllers of its coefficient.

The reward PPO maximises is the reward model's score minus `beta * KL(pi || pi_ref)` (Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences", eq. 1; Stiennon et al. 2020, eq. 1). The KL of a
whole response is estimated from the sampled tokens only, one term per token, with the estimators of
Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html):

    k1 = log p(x) - log p_ref(x)            unbiased, can be negative on a single token
    k2 = 1/2 (log p(x) - log p_ref(x))^2    biased (exact to second order), never negative
    k3 = (r - 1) - log r,  r = p_ref / p     unbiased and never negative (r - 1 >= log r)

All three estimate KL(pi || pi_ref) because the tokens x are sampled from pi (the policy).

As a reward (`kl_in_reward: true`) only the value matters and k1 is the usual choice. As a term added to the loss
(`kl_in_reward: false`) what matters is its gradient through log pi with the tokens held fixed, averaged over
x ~ pi (Tang & Munos 2025, "On a Few Pitfalls in KL Divergence Gradient Estimation for RL", sec. 3):

    k1:  E_pi[grad log p]                          = 0                        no pull towards pi_ref at all
    k2:  E_pi[(log p - log p_ref) grad log p]      = grad KL(pi || pi_ref)    the reverse KL of the reward above
    k3:  E_pi[(1 - p_ref / p) grad log p]          = grad KL(pi_ref || pi)    the forward (mass-covering) KL

So k3 as it stands (GRPO, Shao et al. 2024, eq. 4) pulls pi towards pi_ref along the forward KL, which raises
entropy wherever the policy has sharpened. `kl_loss_terms` therefore weights k3 by the importance ratio
w = p / p_old (1 in value on-policy): grad (w k3) = w (log p - log p_ref) grad log p, whose expectation over
x ~ pi_old is grad KL(pi || pi_ref), the reverse KL, as for k2 (trl's GRPO default, `use_bias_correction_kl`),
while the logged value stays k3's unbiased, never negative estimate. tests/unit/test_ppo_math.py checks these
expectations exactly on a small categorical distribution.

The coefficient `beta` is either fixed or adapted towards a target KL (Ziegler et al. 2019, eq. 2). The
controllers here hold only a float and are plain Python; `state_dict()` / `load_state_dict()` let a
checkpoint carry them so that a resumed run continues with the same `beta`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled tokens.

    Args:
        logprobs: log pi(x_t | x_<t) of the sampled tokens under the policy, any shape.
        ref_logprobs: the same tokens' log-probs under the reference model, same shape.
        estimator: "k1" (log-ratio), "k2" (half the squared log-ratio) or "k3" ((r - 1) - log r with
            r = p_ref / p); see the module docstring for which to use where.

    Returns:
        A tensor of the inputs' shape. Padding is not masked here: callers mask (see
        `ppo.advantages.per_token_rewards`).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"kl_penalty: logprobs has shape {tuple(logprobs.shape)} but ref_logprobs has "
            f"{tuple(ref_logprobs.shape)}; pass the log-probs of the same tokens from both models."
        )
    log_ratio = logprobs - ref_logprobs  # log p - log p_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # log r = log p_ref - log p = -log_ratio; k3 = (r - 1) - log r. expm1 keeps precision when r ~ 1,
        # which is the usual case early in training (a naive exp(x) - 1 loses ~7 digits there in float32).
        log_r = -log_ratio
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; expected one of {KL_ESTIMATORS}.")


def kl_loss_terms(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                  estimator: str) -> Tensor:
    """Per-token KL terms to add to a loss (0 on padding), whose gradient through `logprobs` follows the reverse
    KL(pi || pi_ref) on tokens sampled from pi_old: k2 as it is, k3 weighted by the importance ratio
    pi / pi_old (see the module docstring).

    Args:
        logprobs: [B, T] the policy's log-probs of the sampled tokens (with grad).
        old_logprobs: [B, T] their log-probs at rollout time (no grad).
        ref_logprobs: [B, T] the reference's.
        mask: [B, T] true on response tokens.
        estimator: "k2" or "k3" (k1's gradient averages to zero on-policy).
    """
    if estimator not in ("k2", "k3"):
        raise ValueError(f"kl_loss_terms: estimator must be 'k2' or 'k3' in a loss, got {estimator!r}.")
    mask = mask.bool()
    terms = kl_penalty(logprobs, ref_logprobs, estimator)
    if estimator == "k3":
        # Zero the log-ratio on padding before exp (as policy_loss does): garbage there must not overflow.
        terms = terms * torch.where(mask, logprobs - old_logprobs.detach(), 0.0).exp()
    return torch.where(mask, terms, 0.0)


class FixedKLController:
    """A constant KL coefficient `beta` (Stiennon et al. 2020 use a fixed beta)."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"FixedKLController: kl_coef must be >= 0, got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """No-op, so a training loop can call `update` whatever the controller; returns `value`."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


class AdaptiveKLController:
    """KL coefficient adapted towards a target KL: Ziegler et al. 2019, eq. 2.

        e_t       = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    `KL_t` is the current mean KL per response (summed over its tokens, averaged over responses) and
    `n_steps` the number of responses (episodes) the KL was measured on. Ziegler et al. use K_beta = 0.1;
    writing it as n_steps / horizon makes the rate independent of the batch size: `beta` moves by at most a
    factor (1 +- 0.2) over `horizon` episodes. The clip to +-0.2 keeps one noisy KL estimate from moving
    `beta` far.
    """

    kind = "adaptive"
    # Ziegler et al. 2019, eq. 2: the proportional error is clipped to [-0.2, 0.2].
    ERROR_CLIP = 0.2

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"AdaptiveKLController: init_kl_coef must be >= 0, got {init_kl_coef}.")
        if target <= 0:
            raise ValueError(f"AdaptiveKLController: target KL must be > 0, got {target}.")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController: horizon must be > 0, got {horizon}.")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Move `value` one step of eq. 2 given the KL measured on `n_steps` episodes; returns the new value."""
        if n_steps < 0:
            raise ValueError(f"AdaptiveKLController.update: n_steps must be >= 0, got {n_steps}.")
        current_kl = float(current_kl)
        error = min(max(current_kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly the saved controller (value, target and horizon)."""
        _check_kind(state, self.kind)
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kl_coef: float, target: float | None = None, horizon: float = 10000) -> KLController:
    """A fixed controller when `target` is None, else an adaptive one starting at `kl_coef`.

    The default horizon of 10000 episodes is the one in Ziegler et al.'s released code (openai/lm-human-preferences,
    `AdaptiveKLParams.horizon`).
    """
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target=target, horizon=horizon)


def _check_kind(state: dict[str, Any], expected: str) -> None:
    kind = state.get("kind")
    if kind != expected:
        raise ValueError(
            f"KL controller state has kind {kind!r} but this controller is {expected!r}; build the controller "
            f"the checkpoint was saved with (state keys: {sorted(state)})."
        )
