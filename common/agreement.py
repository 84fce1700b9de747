"""How often a preference agrees with the gold scorer's: for labels (did the labeller pick the higher-scoring
completion?) and for reward models (does the model score the higher-scoring completion higher?).

Pure functions of score differences, so the preferences stage, the reward-model stage and the eval harness report
one number the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def as_gaps(predicted_gap: Tensor | Sequence[float], gold_gap: Tensor | Sequence[float],
            caller: str) -> tuple[Tensor, Tensor]:
    predicted = torch.as_tensor(predicted_gap, dtype=torch.float64).flatten()
    gold = torch.as_tensor(gold_gap, dtype=torch.float64).flatten()
    if predicted.shape != gold.shape:
        raise ValueError(f"{caller}: {predicted.numel()} predicted gaps but {gold.numel()} gold gaps")
    return predicted, gold


def gold_agreement(predicted_gap: Tensor | Sequence[float], gold_gap: Tensor | Sequence[float]) -> float:
    """Share of pairs where sign(predicted_gap) == sign(gold_gap), with gap = value(chosen) - value(rejected).

    Pairs the gold scorer ties (gold_gap == 0) say nothing about which completion is better and are left out; a
    predicted tie agrees with no strict gold preference (as trl's reward accuracy, `r_chosen > r_rejected`, counts
    it). Returns nan when no pair has a strict gold preference.
    """
    predicted, gold = as_gaps(predicted_gap, gold_gap, "gold_agreement")
    strict = gold != 0
    if not bool(strict.any()):
        return float("nan")
    return float((torch.sign(predicted[strict]) == torch.sign(gold[strict])).double().mean())


GAP_THIRDS = ("small", "middle", "large")


def gold_agreement_by_gap(predicted_gap: Tensor | Sequence[float],
                          gold_gap: Tensor | Sequence[float]) -> dict[str, float]:
    """gold_agreement within each third of the pairs ranked by |gold_gap| (gold ties left out; the thirds differ in
    size by at most one pair), keyed by GAP_THIRDS: a reward model that has learned the gold scorer errs on the pairs
    the scorer itself barely separates. Thirds rather than fixed gap edges, so it reads the same for any scorer's
    scale. nan for an empty third.
    """
    predicted, gold = as_gaps(predicted_gap, gold_gap, "gold_agreement_by_gap")
    strict = gold != 0
    predicted, gold = predicted[strict], gold[strict]
    order = torch.argsort(gold.abs(), stable=True)
    return {name: gold_agreement(predicted[part], gold[part])
            for name, part in zip(GAP_THIRDS, torch.tensor_split(order, len(GAP_THIRDS)), strict=True)}
