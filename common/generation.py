"""Sampling completions from a causal LM in batches: left-padded prompts, KV-cached `generate`, responses
cut after their first EOS with explicit masks; and the log-probs of the sampled tokens, recomputed with one
forward pass (`response_logprobs`).

Shared by every part of the lab that samples: PPO rollouts, the preferences stage (K completions per prompt)
and generation evals. The sampling distribution is exactly softmax(logits / temperature) (optionally
restricted by top_k / top_p), so log-probs recomputed later describe what was sampled.

Layout: prompts are left-padded to a common length P, so every response starts at column P
(`response_start`) and is right-padded after its EOS. Masks are explicit: the tokenizer's pad id is never
used to find padding, because a sampling policy can emit the pad token as an ordinary token.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig

# Entries of a model's own generation_config that would make `generate` sample from something other than
# softmax(logits / temperature) (restricted by top_k / top_p), which the recomputed log-probs assume. The
# numeric knobs (repetition_penalty, typical_p, min_length, ...) are overridden explicitly instead; these can
# only be switched off by their owner, since `generate` fills a None from the model's config.
_UNSUPPORTED_GENERATION_ENTRIES = (
    "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
    "min_p", "top_h", "sequence_bias", "watermarking_config", "stop_strings", "max_time",
    "exponential_decay_length_penalty", "guidance_scale",
)


@dataclass
class Generation:
    """What `generate_responses` returns.

    query_ids: [B, P] prompts, left-padded with the pad id.
    query_mask: [B, P] long, 1 on prompt tokens, 0 on padding (an HF attention mask).
    response_ids: [B, R] sampled tokens, R <= max_new_tokens (generation stops when every row has emitted
        EOS). After a row's EOS, `generate` writes pad ids; use `truncate_after_eos` for the mask.
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor

    @property
    def response_start(self) -> int:
        return self.query_ids.shape[1]


class TruncatedResponses(NamedTuple):
    """What `truncate_after_eos` returns (unpacks as a tuple: `ids, mask, has_eos = ...`).

    ids: [B, R] response ids with everything after the first EOS replaced by the pad id.
    mask: [B, R] long, 1 up to and including the first EOS (the whole row when it has none).
    has_eos: [B] bool, whether the row emitted EOS within the budget (rows without one were cut at
        max_new_tokens; a training loop often penalises their score, Huang et al. 2024).
    """

    ids: Tensor
    mask: Tensor
    has_eos: Tensor


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


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int] | Tensor] | Mapping[str, Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | torch.Generator | None = None,
) -> Generation:
    """Sample one response per prompt with `model.generate` (KV cache on, multinomial sampling).

    Args:
        model: a causal LM (transformers or peft). It is put in eval mode for the call (dropout off, so
            the sampling distribution is the one `response_logprobs` recomputes in eval mode) and its
            previous train/eval flags are restored afterwards.
        tokenizer: supplies `pad_token_id` and `eos_token_id` (they must differ).
        prompts: a list of token-id sequences (lists or 1-D tensors), left-padded here; or a padded batch,
            a mapping with "input_ids" and "attention_mask" such as `tokenizer(..., padding_side="left",
            return_tensors="pt")`, which must be left-padded.
        max_new_tokens: the response budget.
        temperature: > 0. The recomputed log-probs must use the same value.
        top_k, top_p: 0 and 1.0 switch them off, the right setting for PPO: with them on, tokens are drawn
            from a truncated distribution but `response_logprobs` scores them under the full one.
        seed: an int or a torch.Generator (one int is drawn from it) makes the sampling reproducible
            without touching the global RNG, which is saved and restored around the call; None samples
            from the global RNG.

    Returns:
        A `Generation` (left-padded queries and their raw responses), on the model's device.
    """
    if temperature <= 0:
        raise ValueError(
            f"generate_responses: temperature must be > 0 for sampling, got {temperature}; PPO needs the "
            "log-probs of a sampling distribution (greedy decoding has none)."
        )
    if max_new_tokens < 1:
        raise ValueError(f"generate_responses: max_new_tokens must be >= 1, got {max_new_tokens}.")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate_responses: expected top_k >= 0 and 0 < top_p <= 1, got {top_k}, {top_p}.")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad_id is None or eos_id is None or pad_id == eos_id:
        raise ValueError(
            f"generate_responses: the tokenizer needs distinct pad and eos tokens (pad={pad_id}, eos={eos_id}); "
            "add a pad token (e.g. '<|pad|>') so padding is never mistaken for the end of a response."
        )
    device = next(model.parameters()).device
    query_ids, query_mask = _as_left_padded_batch(prompts, pad_id, device)
    _check_model_generation_config(model)

    generation_config = GenerationConfig(
        do_sample=True,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        max_new_tokens=int(max_new_tokens),
        # Explicit neutral values: `generate` would otherwise take them from the model's generation_config
        # (min_new_tokens also overrides min_length).
        min_new_tokens=0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        num_beams=1,
        num_return_sequences=1,
        renormalize_logits=False,
        use_cache=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    with _eval_mode(model), _seeded(seed, device), torch.no_grad():
        sequences = model.generate(
            input_ids=query_ids, attention_mask=query_mask, generation_config=generation_config
        )
    return Generation(query_ids=query_ids, query_mask=query_mask, response_ids=sequences[:, query_ids.shape[1]:])


def truncate_after_eos(response_ids: Tensor, eos_id: int, pad_id: int) -> TruncatedResponses:
    """Cut each response after its first EOS: later tokens become `pad_id` and leave the mask.

    The EOS itself stays in the response and the mask: it is an action of the policy (ending the answer)
    and the token where the reward model's score is given. A row without EOS keeps all its tokens.
    """
    if response_ids.dim() != 2:
        raise ValueError(f"truncate_after_eos: expected [batch, response_len] ids, got {tuple(response_ids.shape)}.")
    is_eos = response_ids == eos_id
    # Number of EOS strictly before each position: > 0 means the position is after the first EOS.
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    after_first_eos = eos_before > 0
    ids = response_ids.masked_fill(after_first_eos, pad_id)
    return TruncatedResponses(ids=ids, mask=(~after_first_eos).long(), has_eos=is_eos.any(dim=1))


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

    Why recompute rather than keep the scores of `generate`: PPO's ratio compares log-probs from the same
    forward pass used in training (same kernels, no KV cache), so at the first PPO step the ratio is 1 up to
    float rounding (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"); and a reference
    model scores the same tokens the same way (the KL estimate of generation evals).

    Grad mode, train/eval mode and autocast are the caller's: wrap in `torch.no_grad()` for PPO's old /
    reference log-probs and for evals, call with grad in the PPO update. After sampling:

        gen = generate_responses(model, tokenizer, prompts, max_new_tokens=64, temperature=0.7, seed=step)
        resp = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ids = torch.cat([gen.query_ids, resp.ids], dim=1)
        mask = torch.cat([gen.query_mask, resp.mask], dim=1)
        with torch.no_grad():
            old = response_logprobs(model, ids, mask, gen.response_start, temperature=0.7).logprobs

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
    if _accepts_logits_to_keep(model):
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


def _accepts_logits_to_keep(model: Any) -> bool:
    # A peft model forwards **kwargs to the transformers model; look through it when we can.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _as_left_padded_batch(prompts: Any, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(prompts, Mapping):
        if "input_ids" not in prompts or "attention_mask" not in prompts:
            raise ValueError(
                f"generate_responses: a padded batch needs 'input_ids' and 'attention_mask', got keys "
                f"{sorted(prompts)}."
            )
        ids = torch.as_tensor(prompts["input_ids"]).long()
        mask = torch.as_tensor(prompts["attention_mask"]).long()
        if ids.shape != mask.shape or ids.dim() != 2:
            raise ValueError(
                f"generate_responses: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must "
                "be the same [batch, length] shape."
            )
        if not bool((mask[:, -1] == 1).all()):
            raise ValueError(
                "generate_responses: the prompt batch is not left-padded (some rows end in padding); "
                "tokenize with padding_side='left' or pass a list of id sequences."
            )
        return ids.to(device), mask.to(device)
    return pad_left(prompts, pad_id, device)


def _check_model_generation_config(model: Any) -> None:
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    set_entries = {name: getattr(config, name, None) for name in _UNSUPPORTED_GENERATION_ENTRIES}
    set_entries = {name: value for name, value in set_entries.items() if value is not None}
    if set_entries:
        raise ValueError(
            f"generate_responses: model.generation_config sets {set_entries}, which would change the sampling "
            "distribution away from softmax(logits / temperature) that PPO's log-probs assume; set them to None "
            "on model.generation_config before the rollout."
        )


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    # Remember each submodule's flag: a frozen part may be deliberately in eval mode inside a training model.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _seeded(seed: int | torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Seed the RNG `generate` samples with (the global one), restoring it afterwards."""
    if seed is None:
        yield
        return
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=seed))
    # Fork the CPU RNG and, for a model on an accelerator, that device's RNG (which `generate` samples with).
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [],
                               device_type=device.type if accelerator else None):
        torch.manual_seed(seed)
        yield
