"""Judging protocols: pairwise comparison in both orders, and single-answer grading on 1..10.

Pairwise (Zheng et al. 2023, "Judging LLM-as-a-Judge", sec. 3.4): every pair is shown twice, as (A, B)
and swapped as (B, A). The pair's verdict is the common verdict of the two orders; when the orders
disagree (a flip, or a win in one order and a tie in the other) it counts as a tie and the pair is
marked position-inconsistent. Probabilities, where the judge gives them, are averaged over the two
orders after mapping back to the original answers, which cancels a constant position bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import PAIRWISE_LABELS, SCORE_LABELS, TIE, Judge, LabelSet, RawAnswer, expected_score
from .cache import JudgeCache, cache_key
from .templates import JudgeTemplate, load_template

A_WINS, B_WINS, TIED = "a", "b", "tie"


@dataclass
class Pair:
    """A prompt and two answers; gold scores (e.g. from a gold reward model) when known."""

    prompt: str
    answer_a: str
    answer_b: str
    gold_a: float | None = None
    gold_b: float | None = None
    id: str | None = None


@dataclass
class PairJudgement:
    """The verdict on one pair, in terms of the pair's own answers (not the presented positions).

    winner:     "a", "b", "tie", or None when either order's answer was unparseable.
    consistent: True when both orders agreed, False when they disagreed (then winner == "tie"),
                None when unparseable.
    prob_a, prob_b, prob_tie: order-averaged probabilities (one-hot per order for text judges);
                None when unparseable.
    """

    winner: str | None
    consistent: bool | None
    prob_a: float | None
    prob_b: float | None
    prob_tie: float | None
    ab: RawAnswer = field(repr=False)  # answer with a shown first
    ba: RawAnswer = field(repr=False)  # answer with b shown first


@dataclass
class Grade:
    """A single-answer grade. score: the expected score for probability judges, the parsed score for
    text judges, None when unparseable."""

    score: float | None
    answer: RawAnswer = field(repr=False)


def _order_probs(answer: RawAnswer, swapped: bool) -> dict[str, float] | None:
    """P(a better), P(b better), P(tie) from one order's answer, in the pair's own terms."""
    if answer.label is None:
        return None
    probs = answer.probs or {label: float(label == answer.label) for label in PAIRWISE_LABELS.labels}
    first, second = probs.get("A", 0.0), probs.get("B", 0.0)
    p_a, p_b = (second, first) if swapped else (first, second)
    return {A_WINS: p_a, B_WINS: p_b, TIED: probs.get(TIE, 0.0)}


def _order_winner(answer: RawAnswer, swapped: bool) -> str | None:
    if answer.label is None:
        return None
    if answer.label == TIE:
        return TIED
    shown_first_wins = answer.label == "A"
    return A_WINS if shown_first_wins != swapped else B_WINS


def combine_orders(ab: RawAnswer, ba: RawAnswer) -> PairJudgement:
    """Fold the (A, B) and (B, A) answers into one verdict (see the module docstring)."""
    w_ab, w_ba = _order_winner(ab, swapped=False), _order_winner(ba, swapped=True)
    if w_ab is None or w_ba is None:
        return PairJudgement(None, None, None, None, None, ab, ba)
    consistent = w_ab == w_ba
    winner = w_ab if consistent else TIED
    p1, p2 = _order_probs(ab, swapped=False), _order_probs(ba, swapped=True)
    avg = {k: (p1[k] + p2[k]) / 2 for k in p1}
    return PairJudgement(winner, consistent, avg[A_WINS], avg[B_WINS], avg[TIED], ab, ba)


def ask_cached(judge: Judge, labels: LabelSet, template: JudgeTemplate,
               items: Sequence[tuple[dict[str, str], str]], cache: JudgeCache | None) -> list[RawAnswer]:
    """Render and ask each (fields, order) item once, reading and writing the cache.

    Identical items are asked once. Each fresh answer is written to the cache as it arrives, so an
    interrupted run keeps everything answered so far.
    """
    keys = [cache_key(judge.judge_id, template.hash, labels.name, fields, order) for fields, order in items]
    answers: dict[str, RawAnswer] = {}
    todo: list[str] = []
    todo_text: list[str] = []
    seen: set[str] = set()
    for key, (fields, _order) in zip(keys, items, strict=True):
        if key in seen:
            continue
        seen.add(key)
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            answers[key] = hit
        else:
            todo.append(key)
            todo_text.append(template.render(**fields))
    if todo:
        def on_result(i: int, answer: RawAnswer) -> None:
            answers[todo[i]] = answer
            if cache is not None:
                cache.put(todo[i], judge.judge_id, answer)

        fresh = judge.ask(todo_text, labels, on_result=on_result)
        for i, answer in enumerate(fresh):
            if todo[i] not in answers:  # a backend that did not call on_result
                on_result(i, answer)
    return [answers[k] for k in keys]


def judge_pairs(judge: Judge, pairs: Sequence[Pair], template: JudgeTemplate | None = None,
                cache: JudgeCache | None = None) -> list[PairJudgement]:
    """Judge every pair in both orders and combine (see the module docstring)."""
    template = template or load_template("pairwise")
    items: list[tuple[dict[str, str], str]] = []
    for p in pairs:
        items.append(({"prompt": p.prompt, "answer_a": p.answer_a, "answer_b": p.answer_b}, "AB"))
        items.append(({"prompt": p.prompt, "answer_a": p.answer_b, "answer_b": p.answer_a}, "BA"))
    answers = ask_cached(judge, PAIRWISE_LABELS, template, items, cache)
    return [combine_orders(answers[2 * i], answers[2 * i + 1]) for i in range(len(pairs))]


def grade_answers(judge: Judge, prompts: Sequence[str], answers: Sequence[str],
                  references: Sequence[str | None] | None = None, template: JudgeTemplate | None = None,
                  reference_template: JudgeTemplate | None = None,
                  cache: JudgeCache | None = None) -> list[Grade]:
    """Grade each answer on 1..10; an item with a (non-empty) reference uses the reference-guided template.

    The score is the expected score sum_s s * p(s) when the judge gives probabilities, else the parsed
    number; None when a text answer could not be parsed.
    """
    if len(prompts) != len(answers) or (references is not None and len(references) != len(prompts)):
        raise ValueError("prompts, answers and references must have the same length")
    template = template or load_template("single")
    refs = list(references) if references is not None else [None] * len(prompts)
    plain = [i for i, r in enumerate(refs) if not r]
    guided = [i for i, r in enumerate(refs) if r]
    raw: dict[int, RawAnswer] = {}
    if plain:
        got = ask_cached(judge, SCORE_LABELS, template,
                         [({"prompt": prompts[i], "answer": answers[i]}, "") for i in plain], cache)
        raw.update(zip(plain, got, strict=True))
    if guided:
        reference_template = reference_template or load_template("single_reference")
        got = ask_cached(judge, SCORE_LABELS, reference_template,
                         [({"prompt": prompts[i], "answer": answers[i], "reference": refs[i]}, "")
                          for i in guided], cache)
        raw.update(zip(guided, got, strict=True))
    return [Grade(score=_score_of(raw[i]), answer=raw[i]) for i in range(len(prompts))]


def _score_of(answer: RawAnswer) -> float | None:
    if answer.probs:
        return expected_score(answer.probs)
    return float(answer.label) if answer.label is not None else None


def judge_label_pairs(judge: Judge, prompts: Sequence[str], completions_a: Sequence[str],
                      completions_b: Sequence[str], template: JudgeTemplate | None = None,
                      cache: JudgeCache | None = None) -> list[tuple[int | None, float]]:
    """Label preference pairs with the judge, for the preference-data stage.

    Returns, per pair, (preferred index, probability):
    - (0, P(a better)) or (1, P(b better)) when both orders agree on a winner;
    - (None, P(tie)) for a tie or a position-inconsistent pair (P(tie) is 0.0 for a text judge that
      flipped: it never said tie);
    - (None, nan) when the judge's answer could not be parsed.
    Probabilities are averaged over the two presentation orders.
    """
    if not len(prompts) == len(completions_a) == len(completions_b):
        raise ValueError("prompts, completions_a and completions_b must have the same length")
    pairs = [Pair(p, a, b) for p, a, b in zip(prompts, completions_a, completions_b, strict=True)]
    out: list[tuple[int | None, float]] = []
    for j in judge_pairs(judge, pairs, template=template, cache=cache):
        if j.winner == A_WINS:
            out.append((0, j.prob_a))
        elif j.winner == B_WINS:
            out.append((1, j.prob_b))
        elif j.winner == TIED:
            out.append((None, j.prob_tie))
        else:
            out.append((None, float("nan")))
    return out
