"""The log-probs of generated tokens, recomputed with one forward pass (`response_logprobs`), and the padded-batch
layout they use; the sampling itself is `common.sampling`.

Layout: prompts are left-padded to a common length P, so every response starts at column P (`response_start`) and
is right-padded after its EOS. Masks are explicit: the tokenizer's pad id is never used to find padding, because a
sampling policy can emit the pad token as an ordinary token.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor


def pad_left(sequences: Sequence[Sequence[int] | Tensor], pad_id: int,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Left-pad token-id sequences to a common length: (ids [B, P], attention mask [B, P] long)."""
    if len(sequences) == 0:
        raise ValueError("pad_left: no sequences given; pass at least one prompt.")
    not_ids = [i for i, seq in enumerate(sequences) if isinstance(seq, Mapping | str)]
    if not_ids:
        raise ValueError(
            f"pad_left: prompts {not_ids} are not token-id sequences (a mapping or a string); pass "
            "encoding['input_ids'] for each prompt."
        )
    rows = [torch.as_tensor(seq, dtype=torch.long).flatten() for seq in sequences]
    empty = [i for i, row in enumerate(rows) if row.numel() == 0]
    if empty:
        raise ValueError(f"pad_left: prompts {empty} are empty; every prompt needs at least one token.")
    length = max(row.numel() for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - row.numel():] = row
        mask[i, length - row.numel():] = 1
    return ids.to(device), mask.to(device)


class ResponseLogprobs(NamedTuple):
    """What `response_logprobs` returns.

    logprobs: [B, R] log pi(response token | everything before it) under softmax(logits / T), float32 (at
        least); 0 where the attention mask is 0.
    entropy: [B, R] entropy of the next-token distribution softmax(logits / T) at each response position
        when asked for, else None; 0 where the attention mask is 0.
    """

    logprobs: Tensor
    entropy: Tensor | None


def position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids of a padded batch as `generate` numbers them: `cumsum(mask) - 1`, counted over attended
    tokens only (0 on left padding), so a left-padded row gets the positions it would have alone."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(
    model: Any,
    query_response_ids: Tensor,
    attention_mask: Tensor,
    response_start: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> ResponseLogprobs:
    """Log-probs log softmax(logits / T)[token] of the response tokens `query_response_ids[:, response_start:]`
    under `model`, from one forward pass over the left-padded prompts and their responses.

    The positions are `position_ids(attention_mask)`, so each left-padded row gets exactly the positions it
    would have alone and its log-probs match the unpadded ones. Memory: the LM head runs only on the positions
    that predict response tokens when the model accepts `logits_to_keep`, and the log-softmax (and entropy)
    only there, one row at a time (`logprobs_from_logits`): no full-vocabulary tensor is materialised beyond
    the logits the model returns (`[B, R + 1, V]`) and one row's `[R, V]` at a time.

    Why recompute rather than keep the sampler's log-probs: PPO's ratio compares log-probs from the same
    forward pass used in training (same kernels, no KV cache), so at the first PPO step the ratio is 1 up to
    float rounding (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"); and a reference
    model scores the same tokens the same way (the KL estimate of generation evals).

    Grad mode, train/eval mode and autocast are the caller's: wrap in `torch.no_grad()` for PPO's old /
    reference log-probs and for evals, call with grad in the PPO update. After sampling:

        samples = Sampler(model, tokenizer).sample(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.7))
        batch = samples.padded(range(len(prompt_ids)), tokenizer.pad_token_id)
        with torch.no_grad():
            old = response_logprobs(model, batch.ids, batch.attention_mask, batch.response_start, 0.7).logprobs

    Args:
        model: a causal LM (transformers or peft).
        query_response_ids: [B, P + R] left-padded prompts followed by responses.
        attention_mask: [B, P + R] 1 on real tokens (prompt and response up to its EOS), 0 on padding.
        response_start: P, the column where responses begin (the same for every row).
        temperature: the sampling temperature used at generation (logits are divided by it).
        return_entropy: also return the entropy of softmax(logits / T) at each response position (with grad
            when grad mode is on, for PPO's entropy bonus).
    """
    if temperature <= 0:
        raise ValueError(f"response_logprobs: temperature must be > 0, got {temperature}.")
    if query_response_ids.shape != attention_mask.shape or query_response_ids.dim() != 2:
        raise ValueError(
            f"response_logprobs: ids {tuple(query_response_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must be the same [batch, length] shape."
        )
    total = query_response_ids.shape[1]
    if not 1 <= response_start < total:
        raise ValueError(
            f"response_logprobs: response_start={response_start} must be in [1, {total - 1}]: at least one "
            "prompt token to condition on and one response token to score."
        )
    attention_mask = attention_mask.long()
    response_len = total - response_start
    kwargs: dict[str, Any] = {}
    if accepts_logits_to_keep(model):
        # Logits at positions response_start - 1 ... total - 1; the last one predicts past the end and is dropped.
        kwargs["logits_to_keep"] = response_len + 1
    output = model(
        input_ids=query_response_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
        use_cache=False, **kwargs,
    )
    # The logit at position t predicts token t + 1. Works whether the model kept response_len + 1 logits or all.
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


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label] for every position, i.e. log pi(label_t | context_t).

    Computed as `logit[label] / T - logsumexp(logits / T)`, one batch row at a time in (at least) float32, so
    the full `[B, T, V]` log-softmax is never materialised: the peak extra memory is one row `[T, V]`.

    Args:
        logits: [B, T, V] (or [T, V]) logits of the positions that predict `labels`.
        labels: [B, T] (or [T]) token ids; every entry must be a valid id (mask padding separately).
        temperature: the sampling temperature; must be the one used at generation, so that these are the
            log-probs of the distribution the tokens were drawn from.

    Returns:
        [B, T] log-probs, float32 (float64 for float64 logits).
    """
    if temperature <= 0:
        raise ValueError(f"logprobs_from_logits: temperature must be > 0, got {temperature}.")
    if logits.dim() not in (2, 3) or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logprobs_from_logits: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}; "
            "expected logits [..., V] over the labels' positions."
        )
    if logits.dim() == 2:
        return logprobs_from_logits(logits[None], labels[None], temperature)[0]
    dtype = _compute_dtype(logits.dtype)
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = row_logits.to(dtype)
        if temperature != 1.0:
            row_logits = row_logits / temperature
        picked = row_logits.gather(-1, row_labels[:, None]).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(z) over the last axis, z = logits / temperature:

        H = -sum_i p_i log p_i = logsumexp(z) - sum_i p_i * z_i      (since log p_i = z_i - logsumexp(z))

    Pass the sampling temperature for the entropy of the distribution responses were drawn from. Computed
    one batch row at a time in (at least) float32, like `logprobs_from_logits`. Returns logits.shape[:-1].
    """
    if temperature <= 0:
        raise ValueError(f"entropy_from_logits: temperature must be > 0, got {temperature}.")
    if logits.dim() not in (2, 3):
        raise ValueError(f"entropy_from_logits: expected [B, T, V] or [T, V] logits, got shape {tuple(logits.shape)}.")
    if logits.dim() == 2:
        return entropy_from_logits(logits[None], temperature)[0]
    dtype = _compute_dtype(logits.dtype)
    rows = []
    for row_logits in logits:
        row_logits = row_logits.to(dtype)
        if temperature != 1.0:
            row_logits = row_logits / temperature
        probs = torch.softmax(row_logits, dim=-1)
        # A token masked to -inf (top-k / top-p filtered logits) has p = 0 and adds 0, not 0 * -inf = nan.
        weighted = torch.where(probs > 0, probs * row_logits, torch.zeros((), dtype=dtype, device=probs.device))
        rows.append(torch.logsumexp(row_logits, dim=-1) - weighted.sum(-1))
    return torch.stack(rows)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision log-softmax loses the small differences PPO's ratios are made of; float32 at least.
    return torch.promote_types(dtype, torch.float32)


def accepts_logits_to_keep(model: Any) -> bool:
    # A peft model forwards **kwargs to the transformers model; look through it when we can.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
