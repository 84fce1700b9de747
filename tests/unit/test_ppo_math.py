"""The PPO math on numbers worked by hand (float64, tolerance 1e-6), and GAE against a plain loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppo.advantages import gae, masked_mean, masked_var, per_token_rewards, whiten
from ppo.kl import AdaptiveKLController, FixedKLController, kl_loss_terms, kl_penalty, make_kl_controller
from ppo.losses import policy_loss, value_loss

TOL = 1e-6


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=TOL):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------- kl penalty


def test_kl_penalty_k1_is_the_log_ratio():
    # k1 = log p - log p_ref: -1 - (-1.5) = 0.5 and -2 - (-1) = -1 (k1 can be negative on one token).
    close(kl_penalty(t([-1.0, -2.0]), t([-1.5, -1.0]), "k1"), [0.5, -1.0])


def test_kl_penalty_k2_by_hand():
    # k2 = (log p - log p_ref)^2 / 2: 0.5^2 / 2 = 0.125 and (-1)^2 / 2 = 0.5.
    close(kl_penalty(t([-1.0, -2.0]), t([-1.5, -1.0]), "k2"), [0.125, 0.5])


def test_kl_penalty_k3_by_hand():
    # log r = log p_ref - log p = [-0.5, 1.0]; k3 = (r - 1) - log r:
    #   e^-0.5 - 1 + 0.5 = 0.6065306597 - 0.5 = 0.1065306597
    #   e^1    - 1 - 1   = 2.7182818285 - 2   = 0.7182818285
    close(kl_penalty(t([-1.0, -2.0]), t([-1.5, -1.0]), "k3"), [0.1065306597, 0.7182818285])


def test_kl_penalty_k3_is_nonnegative_and_second_order_near_zero():
    # (r - 1) - log r >= 0 for all r > 0, and for log r = x small it is x^2 / 2 + O(x^3).
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert (kl_penalty(torch.zeros_like(x), x, "k3") >= 0).all()
    # x = 1e-4 in float32: k3 = 5e-9 (+1.7e-13). expm1 gets 4.9986e-9; exp(x) - 1 - x would give 1.66e-8,
    # over 3x too large, because exp(1e-4) = 1.0001 keeps only ~3 significant digits of x in float32.
    small = kl_penalty(torch.zeros(1), torch.full((1,), 1e-4), "k3")
    close(small, [0.5e-8], tol=1e-11)


def _expected_loss_gradient(logits: torch.Tensor, ref_logits: torch.Tensor, estimator: str) -> torch.Tensor:
    """E_{x ~ pi}[grad_theta k(x)] exactly, over the 4 outcomes of a categorical pi = softmax(theta): what the
    in-loss KL term's gradient averages to on-policy (the sampled tokens are constants, log pi carries the gradient)."""
    theta = logits.clone().requires_grad_(True)
    logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)
    weights = logp.detach().exp()  # pi(x), the sampling distribution, not differentiated
    (weights * kl_penalty(logp, ref_logp, estimator)).sum().backward()
    return theta.grad


def _kl_gradient(logits: torch.Tensor, ref_logits: torch.Tensor, reverse: bool) -> torch.Tensor:
    """grad_theta of KL(pi || pi_ref) (reverse=True) or KL(pi_ref || pi), by autograd on the closed form."""
    theta = logits.clone().requires_grad_(True)
    logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)
    p, q = (logp, ref_logp) if reverse else (ref_logp, logp)
    (p.exp() * (p - q)).sum().backward()
    return theta.grad


def test_in_loss_kl_gradients_follow_which_kl_on_policy_and_k2_pulls_pi_towards_the_reference():
    logits, ref_logits = t([1.0, -0.5, 0.3, 2.0]), t([0.0, 0.4, -1.0, 0.2])
    # k1: E_pi[grad log pi] = sum_x grad pi(x) = 0: no pull towards the reference at all.
    close(_expected_loss_gradient(logits, ref_logits, "k1"), [0.0] * 4, tol=1e-12)
    # k2: the gradient of the reverse KL(pi || pi_ref), the KL of the RLHF objective; k3: the forward KL's.
    k2 = _expected_loss_gradient(logits, ref_logits, "k2")
    close(k2, _kl_gradient(logits, ref_logits, reverse=True), tol=1e-12)
    close(_expected_loss_gradient(logits, ref_logits, "k3"), _kl_gradient(logits, ref_logits, reverse=False), tol=1e-12)
    # The direction: a gradient-descent step on the k2 term moves log pi towards log pi_ref. The first-order change
    # of KL(pi || pi_ref) along -grad is -|grad|^2 < 0, and a small step indeed lowers it and the log-prob gap.
    def reverse_kl(th):
        logp, ref_logp = th.log_softmax(-1), ref_logits.log_softmax(-1)
        return float((logp.exp() * (logp - ref_logp)).sum())

    def gap(th):  # the L1 distance between the log-prob vectors
        return float((th.log_softmax(-1) - ref_logits.log_softmax(-1)).abs().sum())

    stepped = logits - 0.1 * k2
    assert reverse_kl(stepped) < reverse_kl(logits) and gap(stepped) < gap(logits)
    # And the sign per outcome: the most over-weighted outcome (index 3: pi = 0.61 vs pi_ref = 0.30) loses logit
    # mass, the most under-weighted (index 1: pi = 0.05 vs 0.37) gains it.
    assert k2[3] > 0 > k2[1]


def test_in_loss_kl_terms_follow_the_reverse_kl_on_policy_for_k2_and_importance_weighted_k3():
    logits, ref_logits = t([1.0, -0.5, 0.3, 2.0]), t([0.0, 0.4, -1.0, 0.2])
    reverse = _kl_gradient(logits, ref_logits, reverse=True)
    for estimator in ("k2", "k3"):
        theta = logits.clone().requires_grad_(True)
        logp, ref_logp = theta.log_softmax(-1), ref_logits.log_softmax(-1)
        # On-policy: pi_old = pi in value (the rollout's log-probs, detached), the samples weighted by pi(x).
        terms = kl_loss_terms(logp, logp.detach(), ref_logp, torch.ones(4, dtype=torch.bool), estimator)
        (logp.detach().exp() * terms).sum().backward()
        close(theta.grad, reverse, tol=1e-12)
    # The weight changes k3's gradient, never its value on-policy: the logged KL stays k3's estimate.
    logp, ref_logp = t([-1.0, -2.0]), t([-1.5, -1.0])
    close(kl_loss_terms(logp, logp, ref_logp, torch.ones(2, dtype=torch.bool), "k3"), [0.1065306597, 0.7182818285])
    # Off-policy (a later minibatch pass): the value is scaled by pi / pi_old = e^0.5 on the first token; padding
    # is 0 even where its log-probs would overflow exp.
    close(kl_loss_terms(logp, t([-1.5, -2.0]), ref_logp, torch.tensor([True, True]), "k3"),
          [0.1065306597 * math.exp(0.5), 0.7182818285])
    close(kl_loss_terms(t([-1.0, 500.0]), t([-1.0, -500.0]), t([-1.5, 0.0]), torch.tensor([True, False]), "k3"),
          [0.1065306597, 0.0])
    with pytest.raises(ValueError, match="'k2' or 'k3' in a loss"):
        kl_loss_terms(logp, logp, ref_logp, torch.ones(2, dtype=torch.bool), "k1")


def test_kl_penalty_rejects_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"expected one of \('k1', 'k2', 'k3'\)"):
        kl_penalty(t([0.0]), t([0.0]), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(t([0.0]), t([0.0, 1.0]))


# ------------------------------------------------------------------------------------------ controllers


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 64) == 0.05
    assert ctl.value == 0.05


def test_adaptive_controller_hand_worked_sequence():
    # Ziegler et al. 2019 eq. 2 with target 6 and horizon 100:
    #   e = clip(KL / 6 - 1, -0.2, 0.2);  beta *= 1 + e * n_steps / 100
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    # KL 9:   9/6 - 1 = 0.5 -> clipped to 0.2;   mult 1 + 0.2 * 10/100 = 1.02   -> 0.102
    close(ctl.update(9.0, 10), 0.102)
    # KL 6.6: 1.1 - 1 = 0.1 (inside the clip);   mult 1 + 0.1 * 10/100 = 1.01   -> 0.10302
    close(ctl.update(6.6, 10), 0.10302)
    # KL 3:   0.5 - 1 = -0.5 -> clipped to -0.2; mult 1 - 0.2 * 50/100 = 0.9    -> 0.092718
    close(ctl.update(torch.tensor(3.0), 50), 0.092718)
    # KL 5.7: 0.95 - 1 = -0.05;                  mult 1 - 0.05 * 20/100 = 0.99  -> 0.09179082
    close(ctl.update(5.7, 20), 0.09179082)
    close(ctl.value, 0.09179082)


def test_controller_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=4.0, horizon=500)
    for kl in (1.0, 7.0, 3.5):
        ctl.update(kl, 32)
    state = json.loads(json.dumps(ctl.state_dict()))  # a checkpoint may store it as JSON
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == ctl.state_dict()
    # Resuming continues exactly where the saved controller would have gone.
    assert resumed.update(5.0, 32) == ctl.update(5.0, 32)

    fixed = FixedKLController(0.3)
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3
    with pytest.raises(ValueError, match="adaptive"):
        fixed.load_state_dict(ctl.state_dict())


def test_make_kl_controller_picks_the_kind():
    assert isinstance(make_kl_controller(0.1), FixedKLController)
    adaptive = make_kl_controller(0.1, target=6.0)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.horizon == 10000
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ------------------------------------------------------------------------------------ masked statistics

VALUES = [[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]]
MASK = [[1, 1, 0], [1, 0, 0]]  # selects 1, 2, 4


def test_masked_mean_by_hand_ignores_padding_even_inf_and_nan():
    # (1 + 2 + 4) / 3 = 7/3; the inf and nan sit on masked-out positions and must not leak.
    close(masked_mean(t(VALUES), t(MASK)), 7 / 3)
    # Per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4.
    close(masked_mean(t(VALUES), torch.tensor(MASK, dtype=torch.bool), dim=1), [1.5, 4.0])
    with pytest.raises(ValueError, match="no true entry"):
        masked_mean(t(VALUES), torch.zeros(2, 3))


def test_masked_var_by_hand():
    # Values 1, 2, 4 with mean 7/3: deviations -4/3, -1/3, 5/3, squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3.
    # Biased: 14/3 / 3 = 14/9. Unbiased (Bessel, n - 1 = 2): 14/3 / 2 = 7/3.
    close(masked_var(t(VALUES), t(MASK), unbiased=False), 14 / 9)
    close(masked_var(t(VALUES), t(MASK), unbiased=True), 7 / 3)


def test_whiten_by_hand():
    # mean 7/3 and unbiased variance 7/3 (above): whitened = (v - 7/3) / sqrt(7/3); padding -> 0.
    sd = math.sqrt(7 / 3)
    expected = [[(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0], [(4 - 7 / 3) / sd, 0.0, 0.0]]
    close(whiten(t(VALUES), t(MASK)), expected)
    # shift_mean=False adds the mean back: the spread is normalised, the mean kept.
    kept = [[e + 7 / 3 if m else 0.0 for e, m in zip(row, mrow, strict=True)] for row, mrow in zip(expected, MASK,
                                                                                                   strict=True)]
    close(whiten(t(VALUES), t(MASK), shift_mean=False), kept)


def test_whiten_against_manual_statistics_on_random_data():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 9, generator=gen, dtype=torch.float64) * 3 + 2
    lengths = torch.tensor([9, 1, 5, 3])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    selected = values[mask]  # the 18 masked-in values, flattened
    expected = (values - selected.mean()) / torch.sqrt(selected.var(unbiased=True) + 1e-8)
    result = whiten(values, mask)
    close(result[mask], expected[mask])
    assert (result[~mask] == 0).all()
    # The whitened masked-in values have mean 0 and unbiased variance 1.
    close(result[mask].mean(), 0.0)
    close(result[mask].var(unbiased=True), 1.0, tol=1e-6)


# ------------------------------------------------------------------------------------------------- GAE


def test_gae_by_hand():
    # One episode of 2 tokens then padding (whose reward 99 and value 77 must be ignored); gamma 0.9, lam 0.8.
    #   t=1 (last token, terminal, V_2 = 0): delta = 1 + 0 - 0.2 = 0.8;          A_1 = 0.8
    #   t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32;  A_0 = -0.32 + 0.9 * 0.8 * 0.8 = -0.32 + 0.576 = 0.256
    #   returns = A + V = [0.756, 1.0]; padding gets 0 and 0.
    adv, ret = gae(t([[0.0, 1.0, 99.0]]), t([[0.5, 0.2, 77.0]]), t([[1, 1, 0]]), gamma=0.9, lam=0.8)
    close(adv, [[0.256, 0.8, 0.0]])
    close(ret, [[0.756, 1.0, 0.0]])


def test_gae_with_gamma_lam_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t to the end) - V_t = 2 - 1 for every token.
    adv, ret = gae(t([[0.0, 0.0, 2.0]]), t([[1.0, 1.0, 1.0]]), t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[1.0, 1.0, 1.0]])
    close(ret, [[2.0, 2.0, 2.0]])


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain Python: A_t = sum_l (gamma * lam)^l * delta_{t+l}, the sum form of GAE (Schulman et al. 2016,
    eq. 16), with delta_t = r_t + gamma * V_{t+1} - V_t and V = 0 past the episode's last token."""
    batch, length = len(rewards), len(rewards[0])
    advantages = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        n = lengths[b]
        v = values[b][:n] + [0.0]
        deltas = [rewards[b][i] + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            advantages[b][i] = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
    returns = [[advantages[b][i] + values[b][i] if i < lengths[b] else 0.0 for i in range(length)]
               for b in range(batch)]
    return advantages, returns


def test_gae_matches_plain_loop_on_random_right_padded_batch():
    gen = torch.Generator().manual_seed(1)
    batch, length = 6, 8
    lengths = [8, 1, 5, 3, 7, 2]
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    expected_adv, expected_ret = reference_gae(rewards.tolist(), values.tolist(), lengths, 0.97, 0.9)
    # Garbage on the padding must change nothing.
    noisy_rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    noisy_values = torch.where(mask, values, torch.full_like(values, -1e6))
    adv, ret = gae(noisy_rewards, noisy_values, mask, gamma=0.97, lam=0.9)
    close(adv, expected_adv)
    close(ret, expected_ret)


def test_gae_outputs_are_detached():
    values = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    adv, ret = gae(torch.ones(1, 2, dtype=torch.float64), values, torch.ones(1, 2), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ----------------------------------------------------------------------------------- per-token rewards


def test_per_token_rewards_by_hand():
    # kl_coef 0.5: every response token gets -0.5 * kl; the score is added on the last real token.
    #   row 0 (3 tokens): [-0.05, -0.1, -0.15 + 2.0] = [-0.05, -0.1, 1.85]
    #   row 1 (2 tokens): [-0.25, +0.2 - 1.0, 0 (padding, its kl 9 ignored)] = [-0.25, -0.8, 0.0]
    rewards = per_token_rewards(t([2.0, -1.0]), t([[0.1, 0.2, 0.3], [0.5, -0.4, 9.0]]), 0.5, t([[1, 1, 1], [1, 1, 0]]))
    close(rewards, [[-0.05, -0.1, 1.85], [-0.25, -0.8, 0.0]])


def test_per_token_rewards_rejects_an_empty_response():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(t([1.0, 1.0]), t([[0.0, 0.0], [0.0, 0.0]]), 0.1, t([[1, 0], [0, 0]]))


# ---------------------------------------------------------------------------------------------- losses


def test_policy_loss_by_hand():
    # Ratios 1.5, 0.5, 1.1 on three tokens, a fourth padding token with a wild log-ratio; clip 0.2.
    #   tok 0: A = 1,  unclipped -1.5, clipped -1.2 -> max -1.2 (clip active: no gradient)
    #   tok 1: A = 1,  unclipped -0.5, clipped -0.8 -> max -0.5 (the pessimistic bound keeps the unclipped)
    #   tok 2: A = -2, unclipped  2.2, clipped  2.2 -> 2.2 (inside the clip range)
    # loss = (-1.2 - 0.5 + 2.2) / 3 = 0.5 / 3; clipfrac = 1/3; ratio_mean = 3.1 / 3.
    # approx_kl (k3 = (r - 1) - log r): 0.5 - ln 1.5 = 0.0945349, -0.5 + ln 2 = 0.1931472,
    #   0.1 - ln 1.1 = 0.0046898; mean 0.0974573.
    old = t([-1.0, -1.0, -1.0, -1.0])
    logprobs = (old + t([math.log(1.5), math.log(0.5), math.log(1.1), 1000.0])).requires_grad_()
    mask = t([1, 1, 1, 0])
    loss, stats = policy_loss(logprobs, old, t([1.0, 1.0, -2.0, 5.0]), mask, clip_range=0.2)
    close(loss, 0.5 / 3)
    close(stats["clipfrac"], 1 / 3)
    close(stats["ratio_mean"], 3.1 / 3)
    close(stats["approx_kl"], 0.0974573, tol=1e-7)
    assert not any(v.requires_grad for v in stats.values())
    # d loss / d logp_t = -A_t * ratio_t / 3 where unclipped is chosen, 0 where clipped and on padding:
    #   tok 0: 0; tok 1: -1 * 0.5 / 3; tok 2: 2 * 1.1 / 3; tok 3: 0 (and not nan despite exp(1000) = inf).
    loss.backward()
    close(logprobs.grad, [0.0, -0.5 / 3, 2.2 / 3, 0.0])


def test_value_loss_by_hand():
    # clip 0.2; V_clip = V_old + clip(V - V_old, -0.2, 0.2); per token max((V - R)^2, (V_clip - R)^2):
    #   tok 0: V 1.0, old 0.5, R 2.0: V_clip 0.7; 1.00 vs 1.69 -> 1.69 (clip active)
    #   tok 1: V 0.0, old 0.5, R 0.0: V_clip 0.3; 0.00 vs 0.09 -> 0.09 (clip active)
    #   tok 2: V 2.0, old 2.0, R 1.0: V_clip 2.0; 1.00 vs 1.00 -> 1.00
    #   tok 3: V 3.0, old 2.5, R 2.8: V_clip 2.7; 0.04 vs 0.01 -> 0.04 (clipped one smaller: not active)
    #   tok 4: padding.
    # loss = 0.5 * (1.69 + 0.09 + 1.0 + 0.04) / 4 = 0.5 * 2.82 / 4 = 0.3525; clipfrac 2/4.
    values = t([1.0, 0.0, 2.0, 3.0, 50.0]).requires_grad_()
    loss, stats = value_loss(values, t([0.5, 0.5, 2.0, 2.5, 0.0]), t([2.0, 0.0, 1.0, 2.8, 0.0]),
                             t([1, 1, 1, 1, 0]), clip_range_value=0.2)
    close(loss, 0.3525)
    close(stats["clipfrac"], 0.5)
    # Gradient 0.5 * 2 * (V - R) / 4 where the unclipped term is chosen, 0 where the clipped one is:
    #   tok 2: (2 - 1) / 4 = 0.25; tok 3: (3 - 2.8) / 4 = 0.05; the others 0.
    loss.backward()
    close(values.grad, [0.0, 0.0, 0.25, 0.05, 0.0])
