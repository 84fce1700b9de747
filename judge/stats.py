"""Results of judge runs: pure functions of verdicts, lengths and gold scores.

Verdicts are from answer a's point of view: "a" (a better), "b" (b better), "tie", or None (the judge's
answer could not be parsed; such pairs are counted and left out of every rate). Position-inconsistent
pairs arrive here already as ties (see protocol.py).

Metric names returned by the summaries are namespaced ("judge/...") and stable: reports read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.stats import Interval, bootstrap_ci

# A win scores 1, a tie half (the convention of AlpacaEval and Chatbot Arena win rates), a loss 0.
OUTCOME_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def outcome_counts(winners: Sequence[str | None]) -> dict[str, int]:
    """Wins / ties / losses of answer a, and the unparseable pairs."""
    unknown = {w for w in winners if w is not None and w not in OUTCOME_SCORE}
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; expected 'a', 'b', 'tie' or None")
    return {
        "wins": sum(w == "a" for w in winners),
        "ties": sum(w == "tie" for w in winners),
        "losses": sum(w == "b" for w in winners),
        "unparseable": sum(w is None for w in winners),
    }


def preference_scores(winners: Sequence[str | None]) -> np.ndarray:
    """1 / 0.5 / 0 per parseable pair (unparseable pairs dropped)."""
    outcome_counts(winners)  # validates
    return np.array([OUTCOME_SCORE[w] for w in winners if w is not None], dtype=float)


def win_rate(winners: Sequence[str | None]) -> float:
    """(wins + ties / 2) / parseable pairs; nan when no pair was parseable."""
    scores = preference_scores(winners)
    return float(scores.mean()) if scores.size else float("nan")


def win_rate_ci(winners: Sequence[str | None], n_resamples: int = 2000, confidence: float = 0.95,
                seed: int | None = 0) -> Interval:
    """Bootstrap interval of the win rate, resampling pairs."""
    return bootstrap_ci(preference_scores(winners), np.mean, n_resamples=n_resamples, confidence=confidence,
                        seed=seed)


def position_consistency(consistent: Sequence[bool | None]) -> float:
    """Share of parseable pairs whose verdict did not depend on the order; nan when none."""
    known = [c for c in consistent if c is not None]
    return float(np.mean(known)) if known else float("nan")


def fit_logistic(features: np.ndarray, targets: np.ndarray, l2: float = 0.0) -> np.ndarray:
    """Maximum-likelihood logistic regression with an intercept (scikit-learn); returns
    [intercept, coef_1..coef_k].

    Targets are in [0, 1]: a fractional target t (0.5 for a tie) enters as a win with weight t and a loss
    with weight 1 - t, which is the same binomial likelihood. `l2` is a ridge penalty on the coefficients
    (not the intercept), which keeps the fit finite on separable data.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=float).reshape(len(targets), -1)
    y = np.asarray(targets, dtype=float)
    model = LogisticRegression(C=1.0 / l2 if l2 > 0 else np.inf, tol=1e-10, max_iter=10_000)
    model.fit(np.vstack([x, x]), np.r_[np.ones(len(y)), np.zeros(len(y))], sample_weight=np.r_[y, 1 - y])
    return np.r_[model.intercept_, model.coef_[0]]


@dataclass(frozen=True)
class LengthControlled:
    """win_rate: the fitted win rate at zero length difference; intercept and length_coef: the
    logistic coefficients; scale: the std of the length differences used to normalise them."""

    win_rate: float
    intercept: float
    length_coef: float
    scale: float


def length_controlled_win_rate(winners: Sequence[str | None], len_a: Sequence[float], len_b: Sequence[float],
                               l2: float = 1e-3) -> LengthControlled:
    """Win rate with the length effect regressed out, as AlpacaEval 2 does (Dubois et al. 2024,
    "Length-Controlled AlpacaEval", eq. 2, for one pair of models and without the instruction term):

        logit P(a preferred) = theta + phi * tanh((len_a - len_b) / std(len_a - len_b))

    fitted by maximum likelihood (ties as half wins); the length-controlled win rate is sigmoid(theta),
    the predicted preference at zero length difference. With no length variation it is the plain win
    rate (the intercept-only fit gives sigmoid(theta) = mean). Unparseable pairs are dropped.
    """
    if not len(winners) == len(len_a) == len(len_b):
        raise ValueError("winners, len_a and len_b must have the same length")
    keep = [i for i, w in enumerate(winners) if w is not None]
    y = preference_scores([winners[i] for i in keep])
    if y.size == 0:
        return LengthControlled(float("nan"), float("nan"), float("nan"), float("nan"))
    diff = np.array([len_a[i] - len_b[i] for i in keep], dtype=float)
    scale = float(np.std(diff))
    if np.all(y == y[0]) or scale == 0.0:
        # All verdicts alike (the MLE is at infinity) or nothing to regress on: the plain rate.
        rate = float(y.mean())
        theta = math.log(rate / (1 - rate)) if 0 < rate < 1 else math.copysign(math.inf, rate - 0.5)
        return LengthControlled(rate, theta, 0.0, scale)
    theta, phi = fit_logistic(np.tanh(diff / scale)[:, None], y, l2=l2)
    return LengthControlled(float(1.0 / (1.0 + math.exp(-theta))), float(theta), float(phi), scale)


def gold_preferences(gold_a: Sequence[float | None], gold_b: Sequence[float | None]) -> list[str | None]:
    """'a' / 'b' / 'tie' from gold scores; None where either score is missing."""
    out: list[str | None] = []
    for ga, gb in zip(gold_a, gold_b, strict=True):
        if ga is None or gb is None or (isinstance(ga, float) and math.isnan(ga)) or (
                isinstance(gb, float) and math.isnan(gb)):
            out.append(None)
        else:
            out.append("a" if ga > gb else "b" if gb > ga else "tie")
    return out


def gold_agreement(winners: Sequence[str | None], gold_a: Sequence[float | None],
                   gold_b: Sequence[float | None]) -> dict[str, float]:
    """Agreement of the judge with the gold preference (Zheng et al. 2023, sec. 4.2 report both forms):

    agreement:            over pairs where judge and gold both prefer one answer (no ties, no unparseable);
    agreement_with_ties:  over pairs with a parseable verdict and gold scores, three-way exact match;
    n, n_with_ties:       the pair counts behind each.
    """
    gold = gold_preferences(gold_a, gold_b)
    decisive = [(w, g) for w, g in zip(winners, gold, strict=True) if w in ("a", "b") and g in ("a", "b")]
    known = [(w, g) for w, g in zip(winners, gold, strict=True) if w is not None and g is not None]
    return {
        "agreement": float(np.mean([w == g for w, g in decisive])) if decisive else float("nan"),
        "n": len(decisive),
        "agreement_with_ties": float(np.mean([w == g for w, g in known])) if known else float("nan"),
        "n_with_ties": len(known),
    }


def summarize_pairwise(winners: Sequence[str | None], consistent: Sequence[bool | None],
                       answers_a: Sequence[str], answers_b: Sequence[str],
                       gold_a: Sequence[float | None] | None = None, gold_b: Sequence[float | None] | None = None,
                       unparseable_answers: int | None = None, n_resamples: int = 2000,
                       confidence: float = 0.95, seed: int | None = 0) -> dict[str, float]:
    """All pairwise metrics, for answer a against answer b. Lengths are in characters (as AlpacaEval)."""
    len_a = [len(a) for a in answers_a]
    len_b = [len(b) for b in answers_b]
    counts = outcome_counts(winners)
    low, high = win_rate_ci(winners, n_resamples=n_resamples, confidence=confidence, seed=seed)
    lc = length_controlled_win_rate(winners, len_a, len_b)
    metrics: dict[str, float] = {
        "judge/pairs": len(winners),
        "judge/wins": counts["wins"],
        "judge/ties": counts["ties"],
        "judge/losses": counts["losses"],
        "judge/unparseable_pairs": counts["unparseable"],
        "judge/win_rate": win_rate(winners),
        "judge/win_rate_ci_low": low,
        "judge/win_rate_ci_high": high,
        "judge/position_consistency": position_consistency(consistent),
        "judge/length_controlled_win_rate": lc.win_rate,
        "judge/length_coef": lc.length_coef,
        "judge/mean_length_a": float(np.mean(len_a)) if len_a else float("nan"),
        "judge/mean_length_b": float(np.mean(len_b)) if len_b else float("nan"),
    }
    if unparseable_answers is not None:
        metrics["judge/unparseable_answers"] = unparseable_answers
    if gold_a is not None and gold_b is not None:
        agree = gold_agreement(winners, gold_a, gold_b)
        metrics.update({
            "judge/gold_agreement": agree["agreement"],
            "judge/gold_agreement_n": agree["n"],
            "judge/gold_agreement_with_ties": agree["agreement_with_ties"],
            "judge/gold_agreement_with_ties_n": agree["n_with_ties"],
        })
    return metrics


def summarize_scores(scores: Sequence[float | None], n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int | None = 0) -> dict[str, float]:
    """Mean single-answer grade with a bootstrap interval; unparseable grades are counted and dropped."""
    known = np.array([s for s in scores if s is not None], dtype=float)
    low, high = bootstrap_ci(known, np.mean, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {
        "judge/graded": len(scores),
        "judge/score_mean": float(known.mean()) if known.size else float("nan"),
        "judge/score_ci_low": low,
        "judge/score_ci_high": high,
        "judge/unparseable_answers": len(scores) - int(known.size),
    }
