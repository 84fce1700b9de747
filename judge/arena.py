"""Arena ratings: a Bradley-Terry fit of pairwise judgements among many models, as Chatbot Arena computes it.

The fit follows Chatbot Arena's published notebook (`compute_mle_elo`, Chiang et al. 2024, "Chatbot Arena: An Open
Platform for Evaluating LLMs by Human Preference", sec. 5): a logistic regression without intercept whose features
are +ln(base) for the first model of a battle and -ln(base) for the second, so that a coefficient w_m turns into
a rating `scale * w_m` and the predicted win probability of i over j is 1 / (1 + base^((R_j - R_i) / scale)).
Every battle appears in both orientations (x, y) and (-x, 1 - y), so no intercept is needed and the fit does not
depend on which model is listed first; a win weighs 1 in each orientation and a tie 1/2 on each side (half a win
each way: the notebook's doubled win counts against single tie counts, the same ratio).

Deviation from the notebook, and why: it fits without penalty, and the maximum-likelihood rating of a model that
never lost is infinite (the likelihood keeps rising as it grows). We add an L2 penalty `l2 * |w|^2 / 2` (a Gaussian
prior on the coefficients), small enough not to move the ratings of models with both wins and losses by a rating
point (tested against the unpenalised fit), so such a model gets a finite rating. That rating is set by the
prior, not the data: the leaderboard lists such models under `undefeated` and says so.

Intervals: a bootstrap over prompts (every battle on a resampled prompt is kept with it, as prompts are the unit
that varies), refitting and re-anchoring each time, percentile intervals (the notebook's `get_bootstrap_result`
resamples battles; prompts are the independent unit here, since all pairs share them).

Style control (Chatbot Arena, "Does Style Matter? Disentangling style and substance in Chatbot Arena", 2024): per
battle, each style feature enters as the normalised difference (a - b) / (a + b) (0 when both are 0), divided
by its root mean square over battles; its coefficient absorbs the judge's taste for that style, and the model
coefficients fitted beside it are ratings with style held equal. Features: answer length in characters, and where
any answer has markdown, the counts of headers, list items and bold spans.

Everything here is a pure function of the battles; nothing calls a judge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import InputError

A_WINS, B_WINS, TIE = "a", "b", "tie"
OUTCOMES = (A_WINS, B_WINS, TIE)

# Chatbot Arena's Elo-like scale: 400 points is a factor of 10 in odds, anchored so the baseline sits at 1000.
SCALE, BASE, ANCHOR = 400.0, 10.0, 1000.0
DEFAULT_L2 = 1e-3

MARKDOWN_PATTERNS = {
    "headers": re.compile(r"^#{1,6}\s", re.MULTILINE),
    "list_items": re.compile(r"^\s*(?:[-*+]|\d+\.)\s", re.MULTILINE),
    "bold": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
}


@dataclass(frozen=True)
class Battle:
    """One judged pair: `winner` is "a", "b" or "tie" (a position-inconsistent pair is a tie); the answers are only
    read for style features."""

    prompt: str
    model_a: str
    model_b: str
    winner: str
    answer_a: str = ""
    answer_b: str = ""


def check_battles(battles: Sequence[Battle], where: str = "arena") -> list[str]:
    """The models, in order of first appearance; raises InputError on fewer than two models or a bad outcome."""
    models: list[str] = []
    for i, b in enumerate(battles):
        if b.winner not in OUTCOMES:
            raise InputError(f"{where}: battle {i}: winner must be one of {', '.join(OUTCOMES)}, got {b.winner!r}")
        if b.model_a == b.model_b:
            raise InputError(f"{where}: battle {i}: a model ({b.model_a}) against itself; pair different models")
        for m in (b.model_a, b.model_b):
            if m not in models:
                models.append(m)
    if len(models) < 2:
        raise InputError(f"{where}: an arena needs at least 2 models, got {len(models)} "
                         f"({', '.join(models) or 'none'}); give two or more models")
    return models


def style_features(answers_a: Sequence[str], answers_b: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Names and [n_battles, n_features] values of the style features (see the module docstring), scaled.
    Markdown counts are included only when some answer has markdown; a feature constant over battles is dropped."""
    def counts(text: str) -> list[float]:
        return [float(len(text))] + [float(len(p.findall(text))) for p in MARKDOWN_PATTERNS.values()]

    names = ["length", *MARKDOWN_PATTERNS]
    a = np.array([counts(t) for t in answers_a], dtype=float).reshape(-1, len(names))
    b = np.array([counts(t) for t in answers_b], dtype=float).reshape(-1, len(names))
    total = a + b
    diff = np.divide(a - b, total, out=np.zeros_like(total), where=total > 0)
    # Scaled, not centred: a difference is antisymmetric (swapping a and b negates it), and which model is listed
    # first is arbitrary, so its mean carries no meaning. The root mean square is the scale.
    rms = np.sqrt((diff ** 2).mean(axis=0))
    keep = rms > 0
    return [n for n, k in zip(names, keep, strict=True) if k], diff[:, keep] / rms[keep]


def design(battles: Sequence[Battle], models: Sequence[str], style: np.ndarray | None = None,
           base: float = BASE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the regression: X [rows, n_models (+ n_style)], y, weight, and the battle each row came from.
    Each battle gives (x, y) and (-x, 1 - y); a tie gives both labels in each orientation at weight 1/2."""
    index = {m: i for i, m in enumerate(models)}
    n_style = 0 if style is None else style.shape[1]
    xs, ys, ws, src = [], [], [], []
    for k, b in enumerate(battles):
        x = np.zeros(len(models) + n_style)
        x[index[b.model_a]], x[index[b.model_b]] = math.log(base), -math.log(base)
        if n_style:
            x[len(models):] = style[k]
        labels = [(1.0, 1.0)] if b.winner == A_WINS else [(0.0, 1.0)] if b.winner == B_WINS else \
            [(1.0, 0.5), (0.0, 0.5)]
        for y, w in labels:
            xs += [x, -x]
            ys += [y, 1.0 - y]
            ws += [w, w]
            src += [k, k]
    return np.array(xs), np.array(ys), np.array(ws), np.array(src)


def fit_coefficients(x: np.ndarray, y: np.ndarray, weight: np.ndarray, l2: float = DEFAULT_L2) -> np.ndarray:
    """Logistic-regression coefficients (no intercept) with penalty l2 * |w|^2 / 2 (`l2=0`: none, the notebook's
    fit). sklearn's C multiplies the data term, so C = 1 / l2."""
    from sklearn.linear_model import LogisticRegression

    penalty = {"penalty": None} if l2 == 0 else {"C": 1.0 / l2}
    model = LogisticRegression(fit_intercept=False, tol=1e-8, max_iter=1000, **penalty)
    model.fit(x, y, sample_weight=weight)
    return model.coef_[0]


def ratings_from(coef: np.ndarray, models: Sequence[str], baseline: str, scale: float = SCALE,
                 anchor: float = ANCHOR) -> np.ndarray:
    """Ratings on the Elo-like scale with `baseline` at `anchor`."""
    r = scale * coef[:len(models)]
    return r - r[list(models).index(baseline)] + anchor


def win_probability(rating_i: float, rating_j: float, scale: float = SCALE, base: float = BASE) -> float:
    """P(i beats j) under Bradley-Terry on this scale (a tie counts as half a win)."""
    return 1.0 / (1.0 + base ** ((rating_j - rating_i) / scale))


def fit_ratings(battles: Sequence[Battle], baseline: str, style: bool = False, l2: float = DEFAULT_L2,
                scale: float = SCALE, base: float = BASE, anchor: float = ANCHOR,
                weights: np.ndarray | None = None) -> dict[str, float]:
    """{model: rating}; `weights` (per battle) lets the bootstrap reweight battles without copying them."""
    models = check_battles(battles)
    features = style_features([b.answer_a for b in battles], [b.answer_b for b in battles])[1] if style else None
    x, y, w, src = design(battles, models, features, base)
    if weights is not None:
        w = w * weights[src]
    coef = fit_coefficients(x, y, w, l2)
    return dict(zip(models, ratings_from(coef, models, baseline, scale, anchor).tolist(), strict=True))


def bootstrap_ratings(battles: Sequence[Battle], baseline: str, n_resamples: int = 1000, seed: int = 0,
                      style: bool = False, **fit) -> np.ndarray:
    """[n_resamples, n_models] ratings, each fitted on the battles of prompts drawn with replacement (a prompt drawn
    k times weighs k); anchored at the baseline each time."""
    models = check_battles(battles)
    prompts = list(dict.fromkeys(b.prompt for b in battles))
    prompt_of = np.array([prompts.index(b.prompt) for b in battles])
    rng = np.random.default_rng(seed)
    features = style_features([b.answer_a for b in battles], [b.answer_b for b in battles])[1] if style else None
    x, y, w, src = design(battles, models, features, fit.get("base", BASE))
    out = np.empty((n_resamples, len(models)))
    for r in range(n_resamples):
        counts = rng.multinomial(len(prompts), np.full(len(prompts), 1.0 / len(prompts)))
        keep = counts[prompt_of[src]] > 0
        coef = fit_coefficients(x[keep], y[keep], (w * counts[prompt_of[src]])[keep], fit.get("l2", DEFAULT_L2))
        out[r] = ratings_from(coef, models, baseline, fit.get("scale", SCALE), fit.get("anchor", ANCHOR))
    return out


def undefeated(battles: Sequence[Battle]) -> list[str]:
    """Models that won at least once and never lost (ties allowed): their maximum-likelihood rating is infinite. A
    model whose battles were all ties has a finite one (every rating equal fits ties best)."""
    models = check_battles(battles)
    decided = [b for b in battles if b.winner != TIE]
    lost = {b.model_b if b.winner == A_WINS else b.model_a for b in decided}
    won = {b.model_a if b.winner == A_WINS else b.model_b for b in decided}
    return [m for m in models if m in won and m not in lost]


def leaderboard(battles: Sequence[Battle], baseline: str, style_control: bool = False, n_resamples: int = 1000,
                confidence: float = 0.95, seed: int = 0, l2: float = DEFAULT_L2, scale: float = SCALE,
                base: float = BASE, anchor: float = ANCHOR) -> dict:
    """The arena result (JSON-ready): per model its rating with a bootstrap interval (and, with `style_control`, the
    style-controlled rating and interval), win / tie / loss counts, sorted by rating; the predicted win rate of
    every ordered pair; the undefeated models with the statement that their rating is set by the prior."""
    models = check_battles(battles)
    if baseline not in models:
        raise InputError(f"arena baseline: '{baseline}' is not among the models ({', '.join(models)}); choose one")
    fit = {"l2": l2, "scale": scale, "base": base, "anchor": anchor}
    tail = (1.0 - confidence) / 2

    def rated(style: bool) -> tuple[dict[str, float], dict[str, list[float]]]:
        point = fit_ratings(battles, baseline, style=style, **fit)
        boots = bootstrap_ratings(battles, baseline, n_resamples, seed, style=style, **fit)
        low, high = np.quantile(boots, [tail, 1.0 - tail], axis=0)
        return point, {m: [float(low[i]), float(high[i])] for i, m in enumerate(models)}

    raw, raw_ci = rated(False)
    styled, styled_ci = rated(True) if style_control else ({}, {})
    record = {m: {"wins": 0, "ties": 0, "losses": 0} for m in models}
    for b in battles:
        if b.winner == TIE:
            record[b.model_a]["ties"] += 1
            record[b.model_b]["ties"] += 1
        else:
            winner, loser = (b.model_a, b.model_b) if b.winner == A_WINS else (b.model_b, b.model_a)
            record[winner]["wins"] += 1
            record[loser]["losses"] += 1
    rows = []
    for m in sorted(models, key=lambda m: -raw[m]):
        row = {"model": m, "rating": raw[m], "ci": raw_ci[m], **record[m]}
        if style_control:
            row |= {"style_rating": styled[m], "style_ci": styled_ci[m]}
        rows.append(row)
    never_lost = undefeated(battles)
    return {
        "baseline": baseline, "anchor": anchor, "scale": scale, "n_battles": len(battles),
        "n_prompts": len({b.prompt for b in battles}), "confidence": confidence, "n_resamples": n_resamples,
        "models": rows,
        "win_rates": {a: {b: win_probability(raw[a], raw[b], scale, base) for b in models if b != a}
                      for a in models},
        "style_features": style_features([b.answer_a for b in battles], [b.answer_b for b in battles])[0]
        if style_control else [],
        "undefeated": never_lost,
        "note": (f"{', '.join(never_lost)} never lost: the maximum-likelihood rating is infinite; the rating shown is "
                 f"finite only through the L2 prior (l2={l2}); the judgements only say it is above every model it met"
                 if never_lost else ""),
    }
