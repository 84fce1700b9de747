"""How often a preference agrees with the gold scorer's: for labels (did the labeller pick the higher-scoring
completion?) and for reward models (does the model score the higher-scoring completion higher?).

Pure functions of score differences, so the preferences stage, the reward-model stage and the eval harness report
one number the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def gold_agreement(predicted_gap: Tensor | Sequence[float], gold_gap: Tensor | Sequence[float]) -> float:
    """Share of pairs where sign(predicted_gap) == sign(gold_gap), with gap = value(chosen) - value(rejected).

    Pairs the gold scorer ties (gold_gap == 0) say nothing about which completion is better and are left out; a
    predicted tie agrees with no strict gold preference (as trl's reward accuracy, `r_chosen > r_rejected`, counts
    it). Returns nan when no pair has a strict gold preference.
    """
    predicted = torch.as_tensor(predicted_gap, dtype=torch.float64).flatten()
    gold = torch.as_tensor(gold_gap, dtype=torch.float64).flatten()
    if predicted.shape != gold.shape:
        raise ValueError(f"gold_agreement: {predicted.numel()} predicted gaps but {gold.numel()} gold gaps")
    strict = gold != 0
    if not bool(strict.any()):
        return float("nan")
    return float((torch.sign(predicted[strict]) == torch.sign(gold[strict])).double().mean())
