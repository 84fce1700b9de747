"""Rollouts for RLHF-PPO on a Hugging Face causal LM: sample responses, cut them at EOS, recompute log-probs.

One PPO rollout with these functions:

    gen = generate_responses(policy, tokenizer, prompts, max_new_tokens=64, temperature=0.7, seed=step)
    resp = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = torch.cat([gen.query_ids, resp.ids], dim=1)
    attention = torch.cat([gen.query_mask, resp.mask], dim=1)
    with torch.no_grad():
        old = forward_logprobs(policy, ids, attention, gen.query_ids.shape[1], temperature=0.7).logprobs
        ref = forward_logprobs(reference, ids, attention, gen.query_ids.shape[1], temperature=0.7).logprobs
    # ... scores, ppo.kl.kl_penalty(old, ref), ppo.advantages.per_token_rewards / gae, then the PPO epochs
    # call forward_logprobs(policy, ...) again with grad.

Sampling itself (`generate_responses`, `truncate_after_eos`) lives in common.generation, shared with the
preferences stage and the generation evals.

Why the log-probs are recomputed rather than taken from `generate`: the PPO ratio compares log-probs from
the same forward pass used in training (same kernels, no KV cache), so at the first PPO step the ratio is 1
up to float rounding (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ppo.losses import entropy_from_logits, logprobs_from_logits


class ResponseLogprobs(NamedTuple):
    """What `forward_logprobs` returns.

    logprobs: [B, R] log pi(response token | everything before it), float32; 0 where the attention mask
        is 0.
    entropy: [B, R] entropy of the next-token distribution softmax(logits / T) at each response position
        when asked for, else None; 0 where the attention mask is 0.
    """

    logprobs: Tensor
    entropy: Tensor | None


def forward_logprobs(
    model: Any,
    query_response_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> ResponseLogprobs:
    """Log-probs of the response tokens `query_response_ids[:, response_start:]` under `model`.

    One forward pass over the whole sequence with explicit position ids (`cumsum(mask) - 1`, as `generate`
    numbers them), so a left-padded row gets exactly the positions it would have alone and its log-probs
    match the unpadded ones. The LM head runs only on the positions that predict response tokens when the
    model accepts `logits_to_keep`, and the log-softmax only there, one row at a time.

    Grad mode, train/eval mode and autocast are the caller's: wrap in `torch.no_grad()` for the rollout's
    old / reference log-probs, call with grad in the PPO update.

    Args:
        model: a causal LM (transformers or peft).
        query_response_ids: [B, P + R] left-padded prompts followed by responses.
        attention_mask: [B, P + R] 1 on real tokens (prompt and response up to its EOS), 0 on padding.
        response_start: P, the column where responses begin (the same for every row).
        temperature: the sampling temperature used at generation (logits are divided by it).
        return_entropy: also return the entropy of softmax(logits / T) at each response position (with grad
            when grad mode is on, for an entropy bonus).
    """
    if temperature <= 0:
        raise ValueError(f"forward_logprobs: temperature must be > 0, got {temperature}.")
    if query_response_ids.shape != attention_mask.shape or query_response_ids.dim() != 2:
        raise ValueError(
            f"forward_logprobs: ids {tuple(query_response_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must be the same [batch, length] shape."
        )
    total = query_response_ids.shape[1]
    if not 1 <= response_start < total:
        raise ValueError(
            f"forward_logprobs: response_start={response_start} must be in [1, {total - 1}]: at least one prompt "
            "token to condition on and one response token to score."
        )
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    response_len = total - response_start
    kwargs: dict[str, Any] = {}
    if _accepts_logits_to_keep(model):
        # Logits at positions response_start - 1 ... total - 1; the last one predicts past the end and is dropped.
        kwargs["logits_to_keep"] = response_len + 1
    output = model(
        input_ids=query_response_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        **kwargs,
    )
    # Works whether the model kept response_len + 1 logits or all of them.
    logits = output.logits[:, -(response_len + 1):-1]
    response_ids = query_response_ids[:, response_start:]
    response_mask = attention_mask[:, response_start:].bool()
    logprobs = logprobs_from_logits(logits, response_ids, temperature)
    logprobs = torch.where(response_mask, logprobs, torch.zeros_like(logprobs))
    entropy = None
    if return_entropy:  # under the caller's grad mode: the PPO update's entropy bonus differentiates it
        entropy = entropy_from_logits(logits, temperature)
        entropy = torch.where(response_mask, entropy, torch.zeros_like(entropy))
    return ResponseLogprobs(logprobs=logprobs, entropy=entropy)


def _accepts_logits_to_keep(model: Any) -> bool:
    # A peft model forwards **kwargs to the transformers model; look through it when we can.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False

