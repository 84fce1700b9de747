"""Generation evals: sample N completions per held-out prompt, then measure them.

Every model samples with the same settings and the same seeds: the flat list of (prompt, sample) jobs is cut into
the same batches for every model, and batch b is sampled with seed `seed + b` (`common.generation`), so differences
between models are not differences of luck in the random stream. Prompts go through the model's chat template.

What is measured, per completion and then per model:
- gold reward: a gold scorer (`preferences.scorers`), e.g. VADER sentiment of the completion;
- learned reward: a reward model saved by a reward_model stage (`reward_model.api.RewardModel`);
- KL(policy || reference), estimated from the samples: for a completion y ~ pi(.|x), sum over its tokens of
  log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) (the "k1" estimator, unbiased for the sequence KL because y is
  drawn from pi; Schulman 2020, "Approximating KL divergence"). With temperature T both log-probs are those of
  softmax(logits / T), the distribution the tokens were actually drawn from;
- length in tokens (the completion without its EOS) and in whitespace-separated words;
- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models", sec. 4.2):
  distinct n-grams / all n-grams over all of a model's completions.

Means come with bootstrap 95% intervals that resample prompts, not completions: the N completions of one prompt
are correlated, and treating them as independent would give intervals too narrow (a cluster bootstrap, Field &
Welsh 2007). With the same N for every prompt, the mean of the per-prompt means is the mean over completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from common.errors import InputError
from common.generation import generate_responses, response_logprobs, truncate_after_eos
from common.stats import bootstrap_ci

Prompt = str | list[dict[str, str]]


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A text prompt is one user message; chat messages are kept as they are."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_text(prompt: Prompt) -> str:
    """What a scorer or a judge reads as the prompt: the text itself, a single user message's content, or the
    conversation with one `role: content` line per message."""
    messages = prompt_messages(prompt)
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], model_name: str) -> list[list[int]]:
    """Token ids of each prompt, rendered with the tokenizer's chat template and the generation prompt (or, for a
    tokenizer without one, the plain text of a text prompt)."""
    if tokenizer.chat_template is None:
        if any(not isinstance(p, str) for p in prompts):
            raise InputError(f"model '{model_name}': its tokenizer has no chat template, so chat-message prompts "
                             "cannot be rendered; give text prompts or a chat model")
        return [tokenizer(p).input_ids for p in prompts]
    return [list(tokenizer.apply_chat_template(prompt_messages(p), add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]) for p in prompts]


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    batch_size: int = 16
    seed: int = 0


@dataclass
class SampleBatch:
    """One batch of sampled completions. `jobs` are flat sample indices j = prompt * N + sample; `logprobs` [B, R]
    are the sampled tokens' log-probs under the model that sampled them (0 after EOS)."""

    jobs: list[int]
    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor | None = None


@dataclass
class ModelSamples:
    """A model's completions in flat order (j = prompt * N + sample), with the batches they were sampled in."""

    completions: list[str]
    length_tokens: list[int]
    has_eos: list[bool]
    batches: list[SampleBatch]


def sample_model(model: Any, tokenizer: Any, encoded: Sequence[Sequence[int]], settings: SamplingSettings,
                 desc: str = "sampling") -> ModelSamples:
    """`settings.samples_per_prompt` completions of every prompt, with their log-probs under `model` (in eval mode,
    as the eval stage loads it)."""
    n = settings.samples_per_prompt
    size = len(encoded) * n
    completions, lengths, has_eos = [""] * size, [0] * size, [False] * size
    batches = []
    with tqdm(total=size, desc=desc, unit="completion") as bar:
        for b, start in enumerate(range(0, size, settings.batch_size)):
            flat = list(range(start, min(start + settings.batch_size, size)))
            gen = generate_responses(model, tokenizer, [encoded[j // n] for j in flat], settings.max_new_tokens,
                                     temperature=settings.temperature, seed=settings.seed + b)
            cut = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
            batch = SampleBatch(flat, gen.query_ids, gen.query_mask, cut.ids, cut.mask)
            batch.logprobs = _batch_logprobs(model, batch, settings.temperature)
            batches.append(batch)
            texts = tokenizer.batch_decode(cut.ids.cpu(), skip_special_tokens=True)
            # Token length without the EOS: the tokens of the text the completion shows.
            counts = (cut.mask.sum(dim=1) - cut.has_eos.long()).tolist()
            for j, text, count, eos in zip(flat, texts, counts, cut.has_eos.tolist(), strict=True):
                completions[j], lengths[j], has_eos[j] = text, int(count), bool(eos)
            bar.update(len(flat))
    return ModelSamples(completions, lengths, has_eos, batches)


@torch.no_grad()
def _batch_logprobs(model: Any, batch: SampleBatch, temperature: float) -> Tensor:
    """[B, R] log-probs of a batch's sampled tokens under `model` (`common.generation.response_logprobs`); 0 after
    EOS."""
    ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    return response_logprobs(model, ids, mask, batch.query_ids.shape[1], temperature).logprobs


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL(pi || pi_ref) estimate [B] from the sampled tokens' log-probs [B, R] under the policy (which
    sampled them) and the reference: sum_t mask_t * (log pi_t - log pi_ref_t)."""
    if not logprobs.shape == ref_logprobs.shape == mask.shape:
        raise ValueError(f"sequence_kl: shapes differ: logprobs {tuple(logprobs.shape)}, ref_logprobs "
                         f"{tuple(ref_logprobs.shape)}, mask {tuple(mask.shape)}")
    return ((logprobs - ref_logprobs) * mask).sum(dim=1)


def kl_to_reference(reference: Any, samples: ModelSamples, temperature: float) -> list[float]:
    """KL estimate of each of a model's completions (flat order) against `reference`, the model now active."""
    kl = [0.0] * len(samples.completions)
    for batch in tqdm(samples.batches, desc="reference log-probs", unit="batch"):
        ref = _batch_logprobs(reference, batch, temperature)
        for j, value in zip(batch.jobs, sequence_kl(batch.logprobs, ref, batch.response_mask).tolist(), strict=True):
            kl[j] = value
    return kl


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams of whitespace-separated words, pooled over `texts` (0 when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_ci(values: Sequence[float], per_prompt: int, seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci": [low, high], "n"} of per-completion values in flat order (prompt-major, `per_prompt` each);
    the 95% interval bootstraps per-prompt means (see the module docstring)."""
    flat = np.asarray(values, dtype=float)
    prompt_means = flat.reshape(-1, per_prompt).mean(axis=1)
    low, high = bootstrap_ci(prompt_means, seed=seed)
    return {"mean": float(flat.mean()), "ci": [low, high], "n": int(flat.size)}


def summarize(samples: ModelSamples, per_prompt: int, gold: Sequence[float] | None, rm: Sequence[float] | None,
              kl: Sequence[float] | None, ref_gold: Sequence[float] | None = None, seed: int = 0) -> dict[str, Any]:
    """A model's `gen` entry of results.json. With `ref_gold`, the reference model's gold rewards on the same
    (prompt, sample) jobs, `gold_reward_vs_ref` is the paired difference: its interval resamples prompts of
    per-prompt differences, far narrower than the two models' intervals side by side when prompts vary a lot."""
    def stat(values):
        return None if values is None else mean_ci(values, per_prompt, seed)

    paired = None if gold is None or ref_gold is None else [a - b for a, b in zip(gold, ref_gold, strict=True)]
    return {
        "gold_reward": stat(gold),
        "gold_reward_vs_ref": stat(paired),
        "rm_reward": stat(rm),
        "kl_to_ref": stat(kl),
        "length_tokens": stat(samples.length_tokens),
        "length_words": stat([len(c.split()) for c in samples.completions]),
        "distinct_1": distinct_n(samples.completions, 1),
        "distinct_2": distinct_n(samples.completions, 2),
        # The share of completions that ended (EOS) within max_new_tokens; the rest were cut.
        "eos_rate": float(np.mean(samples.has_eos)),
    }


def sample_rows(prompts: Sequence[Prompt], samples: ModelSamples, per_prompt: int, gold: Sequence[float] | None,
                rm: Sequence[float] | None, kl: Sequence[float] | None) -> list[dict[str, Any]]:
    """The lines of samples.jsonl: one completion each, with its prompt (as text, `prompt_text`) and scores (null
    when not measured)."""
    rows = []
    for j, completion in enumerate(samples.completions):
        rows.append({
            "prompt_index": j // per_prompt, "sample": j % per_prompt, "prompt": prompt_text(prompts[j // per_prompt]),
            "completion": completion, "length_tokens": samples.length_tokens[j], "has_eos": samples.has_eos[j],
            "scores": {"gold": gold[j] if gold is not None else None, "rm": rm[j] if rm is not None else None,
                       "kl": kl[j] if kl is not None else None},
        })
    return rows

