"""Calibration of multiple-choice predictions: expected calibration error and reliability-diagram data.

Loaded from this folder with `evaluate.load(path)`, so it works offline. Self-contained (numpy only).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The model's probability for each choice is the softmax over the choices' log-likelihoods; its confidence
is the largest of them and its prediction that choice (the first on ties, as numpy's argmax).

Confidences fall into `n_bins` equal-width bins, bin b holding (b/M, (b+1)/M] (the first also holds 0).
Expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural
Networks", eq. 3):  ECE = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|, acc and conf being the bin's accuracy
and mean confidence. MCE is the largest such gap over non-empty bins (Guo et al. eq. 5). The Brier score is
the multi-class one (Brier 1950): mean over questions of sum_k (p_k - [k == gold])^2.

The bins are the reliability diagram: plot accuracy against confidence, one point per non-empty bin.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): each question's probabilities over its choices (summing to 1;
        questions may have different numbers of choices).
    references (list of int): the gold choice index of each question.
    n_bins (int, optional): number of equal-width confidence bins, default 10.
Returns:
    ece, mce, brier, accuracy, mean_confidence, n_bins, bins (list of {lower, upper, count, accuracy,
    confidence}; accuracy and confidence are None for an empty bin).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class McCalibration(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, n_bins=10):
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        n = len(predictions)
        confidence = np.empty(n)
        correct = np.empty(n)
        brier = np.empty(n)
        for i, (probs, gold) in enumerate(zip(predictions, references, strict=True)):
            p = np.asarray(probs, dtype=np.float64)
            if not 0 <= gold < len(p):
                raise ValueError(f"question {i}: gold index {gold} out of range for {len(p)} choices")
            if abs(p.sum() - 1.0) > 1e-6:
                raise ValueError(f"question {i}: probabilities sum to {p.sum()}, expected 1")
            pred = int(np.argmax(p))
            confidence[i] = p[pred]
            correct[i] = float(pred == gold)
            onehot = np.zeros_like(p)
            onehot[gold] = 1.0
            brier[i] = float(((p - onehot) ** 2).sum())
        # Bin b holds (b/M, (b+1)/M]: ceil(conf * M) - 1, with conf == 0 put in the first bin.
        index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
        bins, ece, mce = [], 0.0, 0.0
        for b in range(n_bins):
            members = index == b
            count = int(members.sum())
            acc = float(correct[members].mean()) if count else None
            conf = float(confidence[members].mean()) if count else None
            if count:
                gap = abs(acc - conf)
                ece += count / n * gap
                mce = max(mce, gap)
            bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count, "accuracy": acc,
                         "confidence": conf})
        return {
            "ece": float(ece) if n else None,
            "mce": float(mce) if n else None,
            "brier": float(brier.mean()) if n else None,
            "accuracy": float(correct.mean()) if n else None,
            "mean_confidence": float(confidence.mean()) if n else None,
            "n_bins": int(n_bins),
            "bins": bins,
        }
