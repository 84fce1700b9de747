"""Generation evals: distinct-n, the KL estimate and the prompt-clustered interval on hand-worked numbers; sampling
on the tiny model (the same seed gives the same samples, a model's KL to itself is 0 up to float rounding, a LoRA's
is not)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from common.sampling import Completion, Samples, encode_prompts
from common.tiny import build_tiny_model, build_tiny_tokenizer
from eval.generation import (
    SamplingSettings,
    distinct_n,
    kl_to_reference,
    mean_ci,
    sample_model,
    sequence_kl,
    summarize,
)

PROMPTS = ["Review the film 'Heat'.", [{"role": "user", "content": "Review 'Up'."}], "Say something kind."]
SETTINGS = SamplingSettings(samples_per_prompt=2, max_new_tokens=6, temperature=1.0, token_budget=256, seed=7)


def test_distinct_n_counts_unique_ngrams_over_all_completions():
    texts = ["a b a b", "a c", ""]
    # unigrams a b a b a c: 3 distinct of 6; bigrams (a b) (b a) (a b) (a c): 3 distinct of 4.
    assert distinct_n(texts, 1) == pytest.approx(3 / 6, abs=1e-12)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4, abs=1e-12)
    assert distinct_n(["one"], 2) == 0.0, "no bigram at all"


def test_sequence_kl_sums_log_ratios_over_sampled_tokens_only():
    # (-1 + 1.5) + (-2 + 1) = -0.5;  0.3 + 0 - 0.2 = 0.1
    assert sequence_kl([-1.0, -2.0], [-1.5, -1.0]) == pytest.approx(-0.5, abs=1e-9)
    assert sequence_kl([-0.1, -0.2, -0.3], [-0.4, -0.2, -0.1]) == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(ValueError, match="2 policy log-probs but 3 reference ones"):
        sequence_kl([-1.0, -2.0], [-1.0, -2.0, -3.0])


def test_interval_resamples_prompts_not_completions():
    # Two completions per prompt: prompt means 1.5, 3.5, 5.5. Every bootstrap mean of three prompt means lies in
    # [1.5, 5.5]; resampling the six completions alone could reach 1 or 6.
    stat = mean_ci([1, 2, 3, 4, 5, 6], per_prompt=2)
    assert stat["mean"] == pytest.approx(3.5) and stat["n"] == 6
    assert 1.5 <= stat["ci"][0] < 3.5 < stat["ci"][1] <= 5.5
    assert mean_ci([2, 2, 2, 2], per_prompt=2) == {"mean": 2.0, "ci": [2.0, 2.0], "n": 4}


def test_paired_difference_to_the_reference_cancels_what_prompts_share():
    # Three prompts of very different difficulty, one completion each; the model beats the reference by exactly
    # 0.1 on every one. Side by side the two means' intervals overlap widely; paired, every resample of the
    # per-prompt differences has mean 0.1, so the interval is [0.1, 0.1].
    samples = Samples([[1]], 3, [Completion([5, 2], text, True) for text in "abc"])
    reference, model = [-0.9, 0.0, 0.8], [-0.8, 0.1, 0.9]
    gen = summarize(samples, 1, model, None, None, ref_gold=reference)
    assert gen["gold_reward_vs_ref"]["mean"] == pytest.approx(0.1, abs=1e-9)
    assert gen["gold_reward_vs_ref"]["ci"] == pytest.approx([0.1, 0.1], abs=1e-9)
    assert gen["gold_reward"]["ci"][0] < -0.5 < 0.5 < gen["gold_reward"]["ci"][1]
    assert summarize(samples, 1, model, None, None)["gold_reward_vs_ref"] is None, "no reference, no difference"



@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer), tokenizer


def test_same_seed_same_samples_and_kl_to_itself_is_exactly_zero(tiny):
    model, tok = tiny
    encoded = encode_prompts(tok, PROMPTS, "tiny")
    first = sample_model(model, tok, encoded, SETTINGS)
    again = sample_model(model, tok, encoded, SETTINGS)
    assert first.texts == again.texts and len(first.completions) == 6
    other = sample_model(model, tok, encoded, SamplingSettings(**{**SETTINGS.__dict__, "seed": 8}))
    assert other.texts != first.texts
    # The sampler's log-probs (KV cache) and the reference pass's (one full forward) differ by float rounding only.
    assert kl_to_reference(model, tok.pad_token_id, first, SETTINGS) == pytest.approx([0.0] * 6, abs=1e-4)


def test_a_lora_moves_away_from_its_base(tiny):
    base, tok = tiny
    model = get_peft_model(build_tiny_model(tok), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero (the adapter is then the identity); give it weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    encoded = encode_prompts(tok, PROMPTS, "tiny")
    settings = SamplingSettings(samples_per_prompt=4, max_new_tokens=8, token_budget=512)
    samples = sample_model(model, tok, encoded, settings)
    with model.disable_adapter():
        kl = kl_to_reference(model, tok.pad_token_id, samples, settings)
        as_base = sample_model(model, tok, encoded, settings)
    assert sum(kl) / len(kl) > 0.5, "KL(LoRA || base) from 12 samples"
    assert as_base.texts == sample_model(base, tok, encoded, settings).texts, \
        "with the adapter disabled the model is the base"

