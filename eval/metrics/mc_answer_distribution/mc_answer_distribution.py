"""Where the answers fall: histogram of predicted letters, share of each gold letter, chance level.

A model that always answers "A" scores the share of gold "A"s; reading accuracy beside these numbers shows
whether it learned anything. Loaded from this folder with `evaluate.load(path)`; numpy only.
"""

import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Counts and shares of the predicted and of the gold choice positions, labelled A, B, C, ... (the position,
also in cloze mode where the model scores answer texts). `chance` is the accuracy of guessing uniformly:
the mean over questions of 1 / number of choices. `majority_baseline` is the accuracy of always answering
the most frequent gold letter.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted choice index of each question.
    references (list of int): gold choice index of each question.
    n_choices (list of int, optional): number of choices of each question (default: 1 + the largest index
        seen in that row's prediction and reference; give it, since a guess of "never D" cannot be seen).
Returns:
    letters, predicted (letter -> count), predicted_share, gold (letter -> count), gold_share, chance,
    majority_baseline, n.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class McAnswerDistribution(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, n_choices=None):
        preds = np.asarray(predictions, dtype=int)
        golds = np.asarray(references, dtype=int)
        n = len(preds)
        if n_choices is None:
            n_choices = np.maximum(preds, golds) + 1
        n_choices = np.asarray(n_choices, dtype=int)
        if len(n_choices) != n:
            raise ValueError(f"n_choices has {len(n_choices)} entries for {n} predictions")
        width = int(n_choices.max()) if n else 0
        letters = [string.ascii_uppercase[i] if i < 26 else str(i) for i in range(width)]
        pred_counts = np.bincount(preds, minlength=width)[:width] if n else np.zeros(0, dtype=int)
        gold_counts = np.bincount(golds, minlength=width)[:width] if n else np.zeros(0, dtype=int)
        return {
            "letters": letters,
            "predicted": {k: int(v) for k, v in zip(letters, pred_counts, strict=True)},
            "predicted_share": {k: float(v / n) for k, v in zip(letters, pred_counts, strict=True)},
            "gold": {k: int(v) for k, v in zip(letters, gold_counts, strict=True)},
            "gold_share": {k: float(v / n) for k, v in zip(letters, gold_counts, strict=True)},
            "chance": float(np.mean(1.0 / n_choices)) if n else None,
            "majority_baseline": float(gold_counts.max() / n) if n else None,
            "n": int(n),
        }
