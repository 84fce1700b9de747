"""common.token_draw on cases worked by hand: the inverse-CDF draw under temperature, top_k and top_p, its two
levels, and the LM head fused with the draw (`HeadDraw`) against the draw from materialised logits."""

from __future__ import annotations

import math

import pytest
import torch

from common.tiny import build_tiny_model, build_tiny_tokenizer
from common.token_draw import HeadDraw, draw_tokens, inverse_cdf, plain_lm_head


def test_draw_tokens_inverts_the_cdf_by_hand():
    # Probabilities 0.5, 0.3, 0.2: cumulative 0.5, 0.8, 1.0. A uniform u picks the first token whose cumulative
    # probability exceeds u.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 4))
    u = torch.tensor([0.0, 0.49, 0.6, 0.85], dtype=torch.float64)
    assert draw_tokens(logits, u, 1.0)[0].tolist() == [0, 0, 1, 2]
    # Temperature 0.5 squares and renormalises: 0.25, 0.09, 0.04 over 0.38 -> 0.658, 0.237, 0.105;
    # cumulative 0.658, 0.895: u = 0.85 now picks token 1.
    assert draw_tokens(logits, u, 0.5)[0].tolist() == [0, 0, 0, 1]
    # top_k 2: 0.5, 0.3 over 0.8 -> 0.625, 0.375: u = 0.6 -> 0, u = 0.85 -> 1 (token 2 is never drawn).
    assert draw_tokens(logits, u, 1.0, top_k=2)[0].tolist() == [0, 0, 0, 1]
    # top_p 0.6: token 0 (mass before it 0) and token 1 (mass before it 0.5 < 0.6) stay, token 2 (0.8) goes:
    # the same distribution as top_k 2.
    assert draw_tokens(logits, u, 1.0, top_p=0.6)[0].tolist() == [0, 0, 0, 1]
    # top_p 0.5: the mass before token 1 is 0.5, not below 0.5: only token 0 stays.
    assert draw_tokens(logits, u, 1.0, top_p=0.5)[0].tolist() == [0, 0, 0, 0]
    # The log-probs are those of the full distribution, whatever top_k / top_p drew from.
    tokens, logprobs = draw_tokens(logits, u, 1.0, top_k=2, with_logprobs=True)
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.5, 0.5, 0.3])), atol=1e-6, rtol=0)


def test_inverse_cdf_in_blocks_finds_what_one_cumulative_sum_finds():
    # Blocks of 4 over 10 tokens (the last block padded with zeros). Probabilities 0.1 each: cumulative 0.1, ..., 1.0;
    # u = 0.35 -> first cumulative above 0.35 is 0.4: token 3; u = 0.95 -> token 9; u = 0 -> token 0.
    probs = torch.full((3, 10), 0.1)
    assert inverse_cdf(probs, torch.tensor([0.35, 0.95, 0.0], dtype=torch.float64), block=4).tolist() == [3, 9, 0]
    # Against a float64 cumulative sum over whole rows, on random rows and uniforms, unnormalised, blocks of 7.
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 1000, generator=generator) ** 4
    u = torch.rand(50, generator=generator, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    assert torch.equal(inverse_cdf(probs, u, block=7), expected)


def test_head_draw_draws_from_the_heads_softmax_by_hand():
    # One hidden unit equal to 1 and head rows log(p): the logits are log(0.1), log(0.2), log(0.3), log(0.4), so the
    # cumulative probabilities are 0.1, 0.3, 0.6, 1.0. Chunks of 2 tokens and blocks of 1 make every level count.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draw = HeadDraw(torch.log(probs)[:, None], max_rows=5, chunk=2, block=1)
    u = torch.tensor([0.05, 0.25, 0.5, 0.65, 0.95], dtype=torch.float64)
    tokens, logprobs = draw(torch.ones(5, 1), u, 1.0, with_logprobs=True)
    assert tokens.tolist() == [0, 1, 2, 3, 3]
    torch.testing.assert_close(logprobs, torch.log(probs[tokens]), atol=1e-6, rtol=0)
    # T = 0.5 squares and renormalises: 0.01, 0.04, 0.09, 0.16 over 0.30, cumulative 0.033, 0.167, 0.467, 1.0.
    tokens, logprobs = draw(torch.ones(5, 1), u, 0.5, with_logprobs=True)
    assert tokens.tolist() == [1, 2, 3, 3, 3]
    torch.testing.assert_close(logprobs, torch.log(probs[tokens] ** 2 / 0.30), atol=1e-6, rtol=0)


@pytest.mark.parametrize("vocab, chunk, block", [(1000, 256, 64), (4096, 1024, 256), (300, 512, 256)])
def test_head_draw_matches_the_draw_from_materialised_logits(vocab, chunk, block):
    # Vocabularies that end in a partial chunk and a partial block, and one smaller than a chunk.
    generator = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, 32, generator=generator)
    hidden = torch.randn(33, 32, generator=generator)
    u = torch.rand(33, generator=generator, dtype=torch.float64)
    draw = HeadDraw(weight, max_rows=40, chunk=chunk, block=block)
    for temperature in (1.0, 0.7):
        tokens, logprobs = draw(hidden, u, temperature, with_logprobs=True)
        expected, expected_logprobs = draw_tokens(hidden @ weight.T, u, temperature, with_logprobs=True)
        assert torch.equal(tokens, expected)
        torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-4, rtol=0)  # float32 logits of |z| ~ 20
    # Fewer rows than the buffer holds, and rows whose logits are all equal (every token 1 / vocab).
    flat = torch.zeros(2, 32)
    tokens, logprobs = draw(flat, torch.tensor([0.0, 0.999999], dtype=torch.float64), 1.0, with_logprobs=True)
    assert tokens.tolist() == [0, vocab - 1]
    torch.testing.assert_close(logprobs, torch.full((2,), -math.log(vocab)), atol=1e-5, rtol=0)


def test_only_a_plain_head_is_fused():
    model = build_tiny_model(build_tiny_tokenizer(), hidden_size=16, num_layers=1)
    assert plain_lm_head(model) is model.lm_head.weight
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + 1.0)
    assert plain_lm_head(model) is None, "a hook changes the logits: the model's own forward must run"
    hook.remove()
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert plain_lm_head(model) is None
