"""common.generation on the tiny random Llama: left-padded sampling with the temperature alone, EOS truncation, and
the recomputed log-probs (`response_logprobs`) equal to each sequence's alone, with grad for the PPO update."""

from __future__ import annotations

import pytest
import torch

from common.generation import generate_responses, response_logprobs, truncate_after_eos
from common.tiny import build_tiny_model, build_tiny_tokenizer

TEMPERATURE = 0.7
# Chat prompts of different lengths, so the batch really is left-padded.
CONTENTS = ["hi", "hello there, how are you today?", "2+2=", "tell me a very short story about a cat"]
# The random model spreads its next-token probability over 260 tokens, so it would almost never end a
# response. A fixed logit bias (the same in `generate` and in the forward pass, so it is simply part of
# the model) makes EOS likely (+4, i.e. +5.7 after dividing by T = 0.7) and the pad token common (+3), so
# responses end at different lengths, some run to the budget, and some contain the pad id as an ordinary
# sampled token. With seed 0 the responses have 12, 12, 5 and 1 tokens.
EOS_BIAS, PAD_BIAS = 4.0, 3.0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    model = build_tiny_model(tokenizer, seed=0)
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = EOS_BIAS
    bias[tokenizer.pad_token_id] = PAD_BIAS
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True)["input_ids"]
            for c in CONTENTS]


@pytest.fixture(scope="module")
def rollout(model, tokenizer, prompts):
    gen = generate_responses(model, tokenizer, prompts, max_new_tokens=12, temperature=TEMPERATURE, seed=0)
    resp = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return gen, resp


def unpadded_logprobs(model, prompt, response, temperature):
    """The reference: one sequence alone, no padding, default positions, a full log-softmax."""
    ids = torch.tensor(prompt + response)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_generation_is_left_padded_and_responses_end_at_eos(rollout, prompts, tokenizer):
    gen, resp = rollout
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) > 1
    assert gen.response_start == max(lengths)
    for i, prompt in enumerate(prompts):
        # Left padding: pad ids first, then the prompt exactly, with the mask saying which is which.
        assert gen.query_ids[i, gen.response_start - len(prompt):].tolist() == prompt
        assert gen.query_mask[i].tolist() == [0] * (gen.response_start - len(prompt)) + [1] * len(prompt)
        assert (gen.query_ids[i, : gen.response_start - len(prompt)] == tokenizer.pad_token_id).all()
    # The seed gives a batch that exercises what we test: rows ending early (right padding after EOS) and
    # rows cut by the budget.
    lengths_out = resp.mask.sum(1)
    assert resp.has_eos.any() and (~resp.has_eos).any() and (lengths_out < resp.ids.shape[1]).any()
    for i in range(len(prompts)):
        n = int(lengths_out[i])
        if resp.has_eos[i]:
            assert resp.ids[i, n - 1] == tokenizer.eos_token_id
            assert (resp.ids[i, :n - 1] != tokenizer.eos_token_id).all()
        assert (resp.ids[i, n:] == tokenizer.pad_token_id).all()


def test_recomputed_logprobs_match_one_sequence_at_a_time(model, rollout, prompts):
    gen, resp = rollout
    ids = torch.cat([gen.query_ids, resp.ids], dim=1)
    attention = torch.cat([gen.query_mask, resp.mask], dim=1)
    with torch.no_grad():
        out = response_logprobs(model, ids, attention, gen.response_start, TEMPERATURE, return_entropy=True)
    assert out.logprobs.shape == resp.ids.shape == out.entropy.shape
    pad_inside_a_response = False
    for i, prompt in enumerate(prompts):
        n = int(resp.mask[i].sum())
        response = resp.ids[i, :n].tolist()
        pad_inside_a_response |= model.config.pad_token_id in response
        expected_lp, expected_entropy = unpadded_logprobs(model, prompt, response, TEMPERATURE)
        torch.testing.assert_close(out.logprobs[i, :n].double(), expected_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.entropy[i, :n].double(), expected_entropy, atol=1e-5, rtol=0)
        # Positions after the EOS are not response tokens: 0, not garbage.
        assert (out.logprobs[i, n:] == 0).all() and (out.entropy[i, n:] == 0).all()
    # A sampled pad id inside a response is scored like any token: masks, never pad ids, define padding.
    assert pad_inside_a_response


def test_response_logprobs_keeps_the_graph_for_the_ppo_update(model, rollout):
    gen, resp = rollout
    ids = torch.cat([gen.query_ids, resp.ids], dim=1)
    attention = torch.cat([gen.query_mask, resp.mask], dim=1)
    out = response_logprobs(model, ids, attention, gen.response_start, TEMPERATURE)
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


def test_sampling_uses_the_temperature_and_nothing_else(tokenizer):
    # A "model" whose next-token logits are fixed: 6 on token 70, 0 on the 259 others. At temperature T,
    #   p(70) = e^(6/T) / (e^(6/T) + 259):  T = 1: 403.43 / 662.43 = 0.6090;  T = 2: 20.09 / 279.09 = 0.0720.
    # With 2000 draws the frequency has a standard error of 0.011 and 0.006, so +-0.04 is a 4-7 sigma band.
    # transformers' global default top_k=50 must not apply (top_k=0 turns it off): the other ~800 draws at
    # T = 1 (~1850 at T = 2) spread over 259 tokens, so far more than 50 distinct tokens appear.
    model = build_tiny_model(tokenizer, seed=0, hidden_size=16, num_layers=1)
    fixed = torch.zeros(len(tokenizer))
    fixed[70] = 6.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output) + fixed)
    prompt = [[5]] * 2000
    for temperature, p70 in ((1.0, 0.6090), (2.0, 0.0720)):
        gen = generate_responses(model, tokenizer, prompt, max_new_tokens=1, temperature=temperature, seed=0)
        first = gen.response_ids[:, 0]
        assert abs(float((first == 70).float().mean()) - p70) < 0.04, temperature
        assert len(first.unique()) > 150


def test_seed_makes_sampling_reproducible_without_touching_the_global_rng(model, tokenizer, prompts):
    before = torch.get_rng_state()
    first = generate_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=123)
    assert torch.equal(torch.get_rng_state(), before)
    again = generate_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=123)
    assert torch.equal(first.response_ids, again.response_ids)
    other = generate_responses(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=124)
    assert not torch.equal(first.response_ids, other.response_ids)
    # A torch.Generator is a seed source too: equal generators, equal samples.
    a = generate_responses(model, tokenizer, prompts, 6, seed=torch.Generator().manual_seed(5))
    b = generate_responses(model, tokenizer, prompts, 6, seed=torch.Generator().manual_seed(5))
    assert torch.equal(a.response_ids, b.response_ids)


def test_padded_batch_input_and_its_checks(model, tokenizer, prompts):
    texts = [tokenizer.decode(p) for p in prompts]
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    from_batch = generate_responses(model, tokenizer, batch, max_new_tokens=4, seed=0)
    from_list = generate_responses(model, tokenizer, prompts, max_new_tokens=4, seed=0)
    assert torch.equal(from_batch.query_ids, from_list.query_ids)
    assert torch.equal(from_batch.query_mask, from_list.query_mask)
    assert torch.equal(from_batch.response_ids, from_list.response_ids)
    right = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    with pytest.raises(ValueError, match="left-padded"):
        generate_responses(model, tokenizer, right, max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        generate_responses(model, tokenizer, prompts, max_new_tokens=4, temperature=0.0)


def test_generation_restores_train_mode_and_refuses_distribution_changing_config(tokenizer, prompts):
    model = build_tiny_model(tokenizer, seed=1, hidden_size=16, num_layers=1)
    model.train()
    model.model.norm.eval()  # a submodule deliberately in eval mode stays so
    generate_responses(model, tokenizer, prompts[:1], max_new_tokens=2, seed=0)
    assert model.training and model.model.layers[0].training and not model.model.norm.training
    model.generation_config.suppress_tokens = [5]
    with pytest.raises(ValueError, match="suppress_tokens"):
        generate_responses(model, tokenizer, prompts[:1], max_new_tokens=2)
