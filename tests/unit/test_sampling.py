"""common.sampling's pure parts on cases worked by hand: prompt rendering for scorers, token-budget batches, the
per-job random streams."""

from __future__ import annotations

import random

import pytest
import torch

from common.errors import InputError
from common.sampling import (
    as_messages,
    completion_text,
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
