"""common.sampling's pure parts on cases worked by hand: prompt rendering for scorers, token-budget batches, the
per-job random streams, the inverse-CDF draw under top_k / top_p."""

from __future__ import annotations

import random

import pytest
import torch

from common.errors import InputError
from common.sampling import (
    as_messages,
    completion_text,
    draw_tokens,
    inverse_cdf,
    job_uniforms,
    plan_batches,
    scorer_text,
)

TRANSCRIPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Review Alien."},
              {"role": "assistant", "content": "Which one?"}, {"role": "user", "content": "The 1979 one."}]


def test_scorer_text_shows_the_whole_conversation():
    assert scorer_text("Review Alien.") == "Review Alien."
    assert scorer_text([{"role": "user", "content": "Review Alien."}]) == "Review Alien."
    assert scorer_text(TRANSCRIPT) == ("system: Be brief.\nuser: Review Alien.\nassistant: Which one?\n"
                                       "user: The 1979 one.")
    assert as_messages("hi", "assistant") == [{"role": "assistant", "content": "hi"}]
    assert completion_text([{"role": "assistant", "content": "Great film."}]) == "Great film."


def test_plan_batches_by_hand():
    # Widths 10, 30, 20, 30 with a budget of 60: sorted widest first (ties in job order) -> 1, 3, 2, 0.
    # Batch [1, 3] is 2 x 30 = 60 (fits; a third row would be 90); then [2, 0] is 2 x 20 = 40.
    assert plan_batches([10, 30, 20, 30], 60) == [[1, 3], [2, 0]]
    assert plan_batches([10, 30, 20, 30], 1000) == [[1, 3, 2, 0]]
    with pytest.raises(InputError, match="token_budget 25 is smaller than one row of 30 tokens.*at least 30"):
        plan_batches([10, 30], 25)


def test_plan_batches_never_exceed_the_budget_and_cover_every_job_once():
    rng = random.Random(0)
    for _ in range(200):
        widths = [rng.randint(1, 50) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(50, 400)
        batches = plan_batches(widths, budget)
        assert sorted(j for b in batches for j in b) == list(range(len(widths)))
        for b in batches:
            assert len(b) * max(widths[j] for j in b) <= budget


def test_job_streams_are_their_own():
    a = job_uniforms(7, 3, 1, 5)
    assert torch.equal(a, job_uniforms(7, 3, 1, 5))
    assert not torch.equal(a, job_uniforms(7, 3, 2, 5)) and not torch.equal(a, job_uniforms(8, 3, 1, 5))
    assert torch.equal(job_uniforms(7, 3, 1, 8)[:5], a)  # a longer budget extends the stream, it does not change it
    assert a.dtype == torch.float64 and bool(((a >= 0) & (a < 1)).all())


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
