"""The reward-model stage's pure pieces on hand-worked numbers: gold agreement, margins, last-token pooling,
truncation, label flips and label statistics."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from common.agreement import gold_agreement, gold_agreement_by_gap
from preferences.stage import flip_label, label_stats
from reward_model.api import keep_last, last_token_index
from reward_model.stage import gold_gap_margins, with_margin


def test_gold_agreement_leaves_gold_ties_out_and_counts_predicted_ties_as_wrong():
    # Pair 0 agrees (+ / +), pair 1 disagrees (- / +), pair 2 is a gold tie (left out), pair 3 is a predicted
    # tie against a strict gold preference (wrong): 1 of 3 counted pairs agree.
    assert gold_agreement([0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 3.0]) == pytest.approx(1 / 3, abs=1e-12)
    # Negative gold gaps: the chosen one is gold-worse; a negative prediction agrees.
    assert gold_agreement(torch.tensor([-0.1, 0.2]), torch.tensor([-5.0, -1.0])) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(gold_agreement([1.0, -1.0], [0.0, 0.0]))
    with pytest.raises(ValueError, match="2 predicted gaps but 3 gold gaps"):
        gold_agreement([1.0, 1.0], [1.0, 1.0, 1.0])


def test_gold_agreement_by_gap_splits_the_pairs_into_thirds_by_absolute_gold_gap():
    # Listed out of order; ranked by |gold gap|: 0.1 (wrong), 0.2 (wrong) | 0.3 (right), 0.4 (wrong) | 0.5, 0.6
    # (right). The gold tie (0.0) is left out before the split, so the thirds hold two pairs each.
    predicted = [1.0, 1.0, -1.0, 7.0, 1.0, 1.0, 2.0]
    gold = [0.6, -0.4, 0.1, 0.0, 0.3, -0.2, 0.5]
    assert gold_agreement_by_gap(predicted, gold) == {"small": 0.0, "middle": 0.5, "large": 1.0}
    # Seven strict pairs: the thirds hold 3, 2 and 2 (the smallest gaps take the extra pair).
    assert gold_agreement_by_gap([-1, 1, 1, 1, -1, 1, 1], [1, 2, 3, 4, 5, 6, 7]) == pytest.approx(
        {"small": 2 / 3, "middle": 0.5, "large": 1.0}, abs=1e-12)
    # Two strict pairs leave the large third empty.
    assert math.isnan(gold_agreement_by_gap([1.0, 1.0], [1.0, 2.0])["large"])


def test_gold_gap_margin_is_the_absolute_gap_so_a_flip_keeps_its_margin():
    # |0.9 - 0.2| = 0.7; a flipped pair (0.1 chosen, 0.7 rejected) gets |0.1 - 0.7| = 0.6, not -0.6.
    m = gold_gap_margins(torch.tensor([0.9, 0.1]), torch.tensor([0.2, 0.7]))
    assert torch.allclose(m, torch.tensor([0.7, 0.6], dtype=torch.float64), atol=1e-12)


def test_with_margin_writes_or_drops_the_margin_column():
    ds = datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 0.25,
                                      "score_rejected": 1.0, "margin": 9.0}])
    assert "margin" not in with_margin(ds, "none").column_names
    assert with_margin(ds, "gold_gap")["margin"] == [pytest.approx(0.75, abs=1e-12)]


def test_last_token_index_under_right_and_left_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 0]


def test_keep_last_cuts_the_start():
    assert keep_last([1, 2, 3, 4, 5], 3) == [3, 4, 5]
    assert keep_last([1, 2], 3) == [1, 2]
    assert keep_last([1, 2, 3], None) == [1, 2, 3]


def test_flip_label_swaps_everything_that_travels_with_the_texts():
    record = {"prompt": "p", "chosen": "good", "rejected": "bad", "score_chosen": 0.9, "score_rejected": -0.4,
              "chosen_index": 2, "rejected_index": 0, "prompt_index": 7}
    flipped = flip_label(record)
    assert flipped == {"prompt": "p", "chosen": "bad", "rejected": "good", "score_chosen": -0.4,
                       "score_rejected": 0.9, "chosen_index": 0, "rejected_index": 2, "prompt_index": 7,
                       "flipped": True}
    assert flip_label(flipped) == record | {"flipped": False}


def test_label_stats_on_hand_worked_records():
    records = [{"score_chosen": 0.8, "score_rejected": 0.2, "flipped": False},
               {"score_chosen": -0.5, "score_rejected": 0.5, "flipped": True},
               {"score_chosen": 0.3, "score_rejected": 0.1, "flipped": False},
               {"score_chosen": 0.6, "score_rejected": 0.0, "flipped": False}]
    stats = label_stats(records)
    assert stats["labels/pairs"] == 4 and stats["labels/flipped"] == 1
    assert stats["labels/agreement_with_gold"] == pytest.approx(0.75, abs=1e-12)  # 3 of 4 chosen score higher
    assert stats["rewards/gold_chosen"] == pytest.approx((0.8 - 0.5 + 0.3 + 0.6) / 4, abs=1e-12)
    assert stats["rewards/gold_rejected"] == pytest.approx((0.2 + 0.5 + 0.1 + 0.0) / 4, abs=1e-12)
    assert "labels/agreement_with_gold" not in label_stats([{"chosen": "a", "rejected": "b"}])
