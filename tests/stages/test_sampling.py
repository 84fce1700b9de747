"""The one sampler (`common.sampling`) on the tiny random Llama: samples of softmax(logits / T) with a random stream per
job, the padded layout and its recomputed log-probs (`common.generation.response_logprobs`) equal to each sequence's
alone, a folded LoRA adapter that samples the same tokens and leaves every weight as it was, token-budget batches."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from common.generation import response_logprobs
from common.sampling import NextTokens, Sampler, SamplingParams, completion_logprobs, encode_prompts
from common.tiny import build_tiny_model, build_tiny_tokenizer

TEMPERATURE = 0.7
# Chat prompts of different lengths, so the batch really is left-padded.
CONTENTS = ["hi", "hello there, how are you today?", "2+2=", "tell me a very short story about a cat"]
# The random model spreads its next-token probability over 260 tokens, so it would almost never end a
# response. A fixed logit bias (the same in sampling and in the forward pass, so it is simply part of
# the model) makes EOS likely (+4, i.e. +5.7 after dividing by T = 0.7) and the pad token common (+3), so
# responses end at different lengths, some run to the budget, and some contain the pad id as an ordinary
# sampled token.
EOS_BIAS, PAD_BIAS = 4.0, 3.0
PARAMS = SamplingParams(max_new_tokens=12, temperature=TEMPERATURE, n=3, seed=0, logprobs=True)


def biased(model, tokenizer):
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = EOS_BIAS
    bias[tokenizer.pad_token_id] = PAD_BIAS
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return biased(build_tiny_model(tokenizer, seed=0), tokenizer)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return encode_prompts(tokenizer, CONTENTS, "test")


@pytest.fixture(scope="module")
def samples(model, tokenizer, prompts):
    return Sampler(model, tokenizer, progress=False).sample(prompts, PARAMS)


@pytest.fixture(scope="module")
def batch(samples, tokenizer):
    return samples.padded(range(len(samples.completions)), tokenizer.pad_token_id)


def unpadded_logprobs(model, prompt, response, temperature):
    """The reference: one sequence alone, no padding, default positions, a full log-softmax."""
    ids = torch.tensor(prompt + response)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_samples_come_in_input_order_and_end_at_their_first_eos(samples, prompts, tokenizer):
    # j = prompt * n + sample, whatever order the length-sorted batches ran in.
    assert len(samples.completions) == len(prompts) * PARAMS.n
    assert [len(g) for g in samples.grouped()] == [PARAMS.n] * len(prompts)
    eos = tokenizer.eos_token_id
    ended = [c for c in samples.completions if c.has_eos]
    cut = [c for c in samples.completions if not c.has_eos]
    # The seed gives completions that exercise what we test: some end early, some run to the budget.
    assert ended and cut
    for c in ended:
        assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1] and c.length == len(c.token_ids) - 1
    for c in cut:
        assert eos not in c.token_ids and len(c.token_ids) == PARAMS.max_new_tokens
    for c in samples.completions:
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_padded_batch_layout(batch, samples, prompts, tokenizer):
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) > 1 and batch.response_start == max(lengths)
    for j, completion in enumerate(samples.completions):
        prompt = prompts[j // PARAMS.n]
        # Left padding: pad ids first, then the prompt exactly, with the mask saying which is which.
        assert batch.query_ids[j, batch.response_start - len(prompt):].tolist() == prompt
        assert batch.query_mask[j].tolist() == [0] * (batch.response_start - len(prompt)) + [1] * len(prompt)
        n = len(completion.token_ids)
        assert batch.response_ids[j, :n].tolist() == completion.token_ids
        assert batch.response_mask[j].tolist() == [1] * n + [0] * (batch.response_ids.shape[1] - n)
        assert (batch.response_ids[j, n:] == tokenizer.pad_token_id).all()
        assert bool(batch.has_eos[j]) == completion.has_eos


def test_recomputed_logprobs_match_one_sequence_at_a_time(model, batch, samples, prompts):
    with torch.no_grad():
        out = response_logprobs(model, batch.ids, batch.attention_mask, batch.response_start, TEMPERATURE,
                                return_entropy=True)
    assert out.logprobs.shape == batch.response_ids.shape == out.entropy.shape
    pad_inside_a_response = False
    for i, completion in enumerate(samples.completions):
        prompt, response = prompts[i // PARAMS.n], completion.token_ids
        n = len(response)
        pad_inside_a_response |= model.config.pad_token_id in response
        expected_lp, expected_entropy = unpadded_logprobs(model, prompt, response, TEMPERATURE)
        torch.testing.assert_close(out.logprobs[i, :n].double(), expected_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy[i, :n].double(), expected_entropy, atol=1e-5, rtol=0)
        # Positions after the EOS are not response tokens: 0, not garbage.
        assert (out.logprobs[i, n:] == 0).all() and (out.entropy[i, n:] == 0).all()
    # A sampled pad id inside a response is scored like any token: masks, never pad ids, define padding.
    assert pad_inside_a_response


def test_response_logprobs_keeps_the_graph_for_the_ppo_update(model, batch):
    out = response_logprobs(model, batch.ids, batch.attention_mask, batch.response_start, TEMPERATURE)
    assert out.entropy is None and out.logprobs.requires_grad
    out.logprobs.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_response_logprobs_divides_logits_by_the_temperature(model, prompts):
    # Log-probs at temperature T are log_softmax(logits / T); T = 1 and T = 2 must both match that and differ.
    prompt, response = prompts[0], [70, 71, 2]
    ids = torch.tensor(prompt + response)[None]
    mask = torch.ones_like(ids)
    results = {}
    for temperature in (1.0, 2.0):
        with torch.no_grad():
            lp = response_logprobs(model, ids, mask, len(prompt), temperature).logprobs[0]
        expected, _ = unpadded_logprobs(model, prompt, response, temperature)
        torch.testing.assert_close(lp.double(), expected, atol=1e-5, rtol=0)
        results[temperature] = lp
    assert (results[1.0] - results[2.0]).abs().max() > 1e-2


def test_sampler_logprobs_are_those_the_policy_recomputes(model, samples, tokenizer):
    recomputed = completion_logprobs(model, samples, TEMPERATURE, tokenizer.pad_token_id)
    for completion, values in zip(samples.completions, recomputed, strict=True):
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(values), atol=1e-4, rtol=0)


def test_completion_logprobs_run_each_prompt_once_for_the_log_probs_of_whole_rows(model, samples, batch, tokenizer):
    # The plain way: every row whole, prompt and completion, in one left-padded batch.
    with torch.no_grad():
        whole = response_logprobs(model, batch.ids, batch.attention_mask, batch.response_start, TEMPERATURE).logprobs
    fed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].shape))
    try:
        shared = completion_logprobs(model, samples, TEMPERATURE, tokenizer.pad_token_id)
    finally:
        hook.remove()
    for j, values in enumerate(shared):
        length = len(samples.completions[j].token_ids)
        torch.testing.assert_close(torch.tensor(values), whole[j, :length], atol=1e-5, rtol=0)
    # One batch: the 4 distinct prompts (padded to the longest), then each of the 12 rows' completion tokens but the
    # last; the prompts are not run again for their 3 samples.
    longest_prompt = max(len(p) for p in samples.prompt_ids)
    longest_completion = max(len(c.token_ids) for c in samples.completions)
    assert fed == [(len(samples.prompt_ids), longest_prompt), (len(samples.completions), longest_completion - 1)]


def test_sampling_uses_the_temperature_and_nothing_else(tokenizer):
    # A "model" whose next-token logits are fixed: 6 on token 70, 0 on the 259 others. At temperature T,
    #   p(70) = e^(6/T) / (e^(6/T) + 259):  T = 1: 403.43 / 662.43 = 0.6090;  T = 2: 20.09 / 279.09 = 0.0720.
    # With 2000 draws the frequency has a standard error of 0.011 and 0.006, so +-0.04 is a 4-7 sigma band.
    # No top-k of transformers' defaults applies: the other ~800 draws at T = 1 (~1850 at T = 2) spread over 259
    # tokens, so far more than 50 distinct tokens appear.
    model = build_tiny_model(tokenizer, seed=0, hidden_size=16, num_layers=1)
    fixed = torch.zeros(len(tokenizer))
    fixed[70] = 6.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output) + fixed)
    for temperature, p70 in ((1.0, 0.6090), (2.0, 0.0720)):
        params = SamplingParams(max_new_tokens=1, temperature=temperature, n=2000, seed=0)
        first = torch.tensor([c.token_ids[0] for c in Sampler(model, tokenizer, progress=False).sample([[5]], params)
                              .completions])
        assert abs(float((first == 70).float().mean()) - p70) < 0.04, temperature
        assert len(first.unique()) > 150


def test_seed_makes_sampling_reproducible_whatever_the_batching(model, tokenizer, prompts, samples):
    tokens = [c.token_ids for c in samples.completions]
    before = torch.get_rng_state()
    again = Sampler(model, tokenizer, progress=False).sample(prompts, PARAMS)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is neither used nor moved
    assert [c.token_ids for c in again.completions] == tokens
    # One row per batch: other batches, the same completions (each job has its own random stream).
    narrow = Sampler(model, tokenizer, token_budget=max(map(len, prompts)) + PARAMS.max_new_tokens, progress=False)
    assert [c.token_ids for c in narrow.sample(prompts, PARAMS).completions] == tokens
    other = Sampler(model, tokenizer, progress=False).sample(prompts, SamplingParams(**{**PARAMS.__dict__, "seed": 1}))
    assert [c.token_ids for c in other.completions] != tokens


def test_sampling_restores_train_mode(tokenizer, prompts):
    model = build_tiny_model(tokenizer, seed=1, hidden_size=16, num_layers=1)
    model.train()
    model.model.norm.eval()  # a submodule deliberately in eval mode stays so
    Sampler(model, tokenizer, progress=False).sample(prompts[:1], SamplingParams(max_new_tokens=2))
    assert model.training and model.model.layers[0].training and not model.model.norm.training


def test_folded_lora_samples_the_plain_path_tokens_and_leaves_every_weight_as_it_was(tokenizer, prompts):
    base = biased(build_tiny_model(tokenizer, seed=2), tokenizer)
    # A random (not zero) B, so that the adapter changes the logits and folding it in matters.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    fast = Sampler(model, tokenizer, progress=False).sample(prompts, PARAMS)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit, base and adapter
    assert trainable == {name: p.requires_grad for name, p in model.named_parameters()}
    plain = Sampler(model, tokenizer, fold_lora=False, progress=False).sample(prompts, PARAMS)
    assert [c.token_ids for c in fast.completions] == [c.token_ids for c in plain.completions]
    with model.disable_adapter():
        without = Sampler(model, tokenizer, progress=False).sample(prompts, PARAMS)
    assert [c.token_ids for c in without.completions] != [c.token_ids for c in fast.completions]
    # The folded pass's log-probs are the trained (unfolded) policy's, recomputed.
    for completion, values in zip(fast.completions, completion_logprobs(model, fast, TEMPERATURE,
                                                                          tokenizer.pad_token_id), strict=True):
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(values), atol=1e-4, rtol=0)


def test_a_prompt_given_several_times_is_prefilled_once_and_each_copy_samples_its_own_stream(model, tokenizer, prompts):
    # A GRPO group: the same prompt as G separate jobs (n = 1), beside another prompt.
    group = [prompts[1]] * 3 + [prompts[0]]
    params = SamplingParams(**{**PARAMS.__dict__, "n": 1})
    samples = Sampler(model, tokenizer, progress=False).sample(group, params)
    # One new token: no decoding step, so what was processed is the prefill alone, the two distinct prompts once.
    first = Sampler(model, tokenizer, progress=False).sample(group, SamplingParams(max_new_tokens=1))
    assert first.tokens_processed == len(prompts[1]) + len(prompts[0])
    assert len({tuple(c.token_ids) for c in samples.completions[:3]}) == 3
    alone = Sampler(model, tokenizer, progress=False).sample(group[:1], params)
    assert samples.completions[0].token_ids == alone.completions[0].token_ids  # job (seed, 0, 0) either way
    recomputed = completion_logprobs(model, samples, TEMPERATURE, tokenizer.pad_token_id)
    for completion, values in zip(samples.completions, recomputed, strict=True):
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(values), atol=1e-4, rtol=0)


def test_the_head_fused_with_the_draw_samples_the_tokens_of_the_models_own_logits(tokenizer, prompts):
    # A model without the test's logit hook has a plain LM head, so unrestricted sampling runs the decoder and
    # HeadDraw; top_k = the vocabulary restricts nothing but takes the model's forward and draw_tokens instead.
    base = build_tiny_model(tokenizer, seed=3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert NextTokens(model, PARAMS, 1).fused is not None
    whole_vocabulary = SamplingParams(**{**PARAMS.__dict__, "top_k": len(tokenizer)})
    assert NextTokens(model, whole_vocabulary, 1).fused is None
    fused = Sampler(model, tokenizer, progress=False).sample(prompts, PARAMS)
    plain = Sampler(model, tokenizer, progress=False).sample(prompts, whole_vocabulary)
    assert [c.token_ids for c in fused.completions] == [c.token_ids for c in plain.completions]
    for completion, values in zip(fused.completions, completion_logprobs(model, fused, TEMPERATURE,
                                                                           tokenizer.pad_token_id), strict=True):
        torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(values), atol=1e-4, rtol=0)
