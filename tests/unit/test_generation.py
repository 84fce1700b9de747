"""common.generation's pure functions on numbers worked by hand: padding, position ids, and the
log-probs and entropies of softmax(logits / T) (float64, tolerances near 1e-7)."""

from __future__ import annotations

import math

import pytest
import torch

from common.generation import entropy_from_logits, logprobs_from_logits, pad_left, position_ids


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


def test_pad_left():
    ids, mask = pad_left([[7, 8, 9], torch.tensor([4])], pad_id=3)
    assert ids.tolist() == [[7, 8, 9], [3, 3, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="empty"):
        pad_left([[1], []], pad_id=3)


def test_position_ids_count_attended_tokens_only():
    # Row 0: two left pads, then 3 tokens numbered 0, 1, 2 as if alone (pads get 0, clamped from -1).
    # Row 1: 3 tokens then right padding after an EOS: cumsum 1 2 3 3 3 - 1 = 0 1 2 2 2.
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    assert position_ids(mask.bool()).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_entropy_from_logits_by_hand():
    # [0, 0]: uniform over 2 -> ln 2 = 0.6931472.
    # [0, ln 3]: p = [1/4, 3/4] -> 0.25 ln 4 + 0.75 ln(4/3) = 0.3465736 + 0.2157616 = 0.5623351.
    # [0, 0, -inf]: the -inf token has p = 0 and adds nothing -> ln 2.
    logits = t([[[0.0, 0.0, -math.inf], [0.0, math.log(3), -math.inf]], [[0.0, 0.0, -math.inf]] * 2])
    close(entropy_from_logits(logits), [[math.log(2), 0.5623351], [math.log(2), math.log(2)]], tol=1e-7)
    # Temperature 2 on [0, 2 ln 3] gives the logits [0, ln 3] -> 0.5623351 again.
    close(entropy_from_logits(t([[0.0, 2 * math.log(3)]]), temperature=2.0), [0.5623351], tol=1e-7)


def test_logprobs_from_logits_by_hand_and_with_temperature():
    # logits [0, ln 2, ln 5] -> p = [1, 2, 5] / 8: log p[2] = ln(5/8) = -0.4700036, log p[0] = ln(1/8) = -2.0794415.
    logits = t([[[0.0, math.log(2), math.log(5)], [0.0, math.log(2), math.log(5)]]])
    close(logprobs_from_logits(logits, torch.tensor([[2, 0]])), [[-0.4700036, -2.0794415]], tol=1e-7)
    # Temperature 0.5 divides by 0.5: [0, ln2 / 2, ln5 / 2] / 0.5 = [0, ln 2, ln 5], the same distribution.
    close(logprobs_from_logits(logits / 2, torch.tensor([[2, 0]]), temperature=0.5), [[-0.4700036, -2.0794415]],
          tol=1e-7)


def test_logprobs_from_logits_matches_log_softmax_and_upcasts_half_precision():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    result = logprobs_from_logits(logits, labels, temperature=0.7)
    assert result.dtype == torch.float32
    expected = torch.log_softmax(logits.float() / 0.7, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    close(result, expected)
    # Entropy at temperature T agrees with -sum p log p computed from the full log-softmax.
    log_p = torch.log_softmax(logits.float() / 0.7, dim=-1)
    close(entropy_from_logits(logits, temperature=0.7), -(log_p.exp() * log_p).sum(-1), tol=1e-5)
