"""Generation evals: sample N completions per held-out prompt, then measure them.

Every model samples with the same settings and the same seed through the one sampler (`common.sampling`), where each
(prompt, sample) job draws its tokens from a random stream of its own: every model sees the same random numbers for
the same job, so differences between models are not differences of luck. Prompts go through the model's chat
template (`common.sampling.encode_prompts`); scorers and judges read them as `common.sampling.scorer_text`.

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

from common.sampling import (
    DEFAULT_TOKEN_BUDGET,
    Prompt,
    Sampler,
    Samples,
    SamplingParams,
    completion_logprobs,
    scorer_text,
)
from common.stats import bootstrap_ci


@dataclass(frozen=True)
class SamplingSettings:
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    token_budget: int = DEFAULT_TOKEN_BUDGET
    seed: int = 0


def sample_model(model: Any, tokenizer: Any, encoded: Sequence[Sequence[int]], settings: SamplingSettings,
                 desc: str = "sampling", shard: tuple[int, int] = (0, 1)) -> Samples:
    """`settings.samples_per_prompt` completions of every prompt (flat order j = prompt * N + sample), with their
    log-probs under `model`, which sampled them (the KL estimate's first half)."""
    params = SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                            n=settings.samples_per_prompt, seed=settings.seed, logprobs=True)
    return Sampler(model, tokenizer, token_budget=settings.token_budget, shard=shard).sample(encoded, params, desc)


def sequence_kl(logprobs: Sequence[float], ref_logprobs: Sequence[float]) -> float:
    """KL(pi || pi_ref) estimate of one completion from its tokens' log-probs under the policy (which sampled it)
    and the reference: sum_t (log pi_t - log pi_ref_t)."""
    if len(logprobs) != len(ref_logprobs):
        raise ValueError(f"sequence_kl: {len(logprobs)} policy log-probs but {len(ref_logprobs)} reference ones")
    return float(sum(logprobs) - sum(ref_logprobs))


def kl_to_reference(reference: Any, pad_id: int, samples: Samples, settings: SamplingSettings,
                    shard: tuple[int, int] = (0, 1)) -> list[float]:
    """KL estimate of each of a model's completions (flat order) against `reference`, the model now active."""
    ref = completion_logprobs(reference, samples, settings.temperature, pad_id, token_budget=settings.token_budget,
                              shard=shard)
    return [sequence_kl(c.logprobs, r) for c, r in zip(samples.completions, ref, strict=True)]


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


def summarize(samples: Samples, per_prompt: int, gold: Sequence[float] | None, rm: Sequence[float] | None,
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
        "length_tokens": stat([c.length for c in samples.completions]),
        "length_words": stat([len(text.split()) for text in samples.texts]),
        "distinct_1": distinct_n(samples.texts, 1),
        "distinct_2": distinct_n(samples.texts, 2),
        # The share of completions that ended (EOS) within max_new_tokens; the rest were cut.
        "eos_rate": float(np.mean([c.has_eos for c in samples.completions])),
    }


def sample_rows(prompts: Sequence[Prompt], samples: Samples, per_prompt: int, gold: Sequence[float] | None,
                rm: Sequence[float] | None, kl: Sequence[float] | None) -> list[dict[str, Any]]:
    """The lines of samples.jsonl: one completion each, with its prompt (as text, `scorer_text`) and scores (null
    when not measured)."""
    rows = []
    for j, completion in enumerate(samples.completions):
        rows.append({
            "prompt_index": j // per_prompt, "sample": j % per_prompt, "prompt": scorer_text(prompts[j // per_prompt]),
            "completion": completion.text, "length_tokens": completion.length, "has_eos": completion.has_eos,
            "scores": {"gold": gold[j] if gold is not None else None, "rm": rm[j] if rm is not None else None,
                       "kl": kl[j] if kl is not None else None},
        })
    return rows

