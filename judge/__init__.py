"""LLM-as-judge: pairwise comparison (both orders, position-consistency), single-answer grading on 1..10
(reference-guided when a reference is given), with a local transformers judge that reads verdict
probabilities or any OpenAI-compatible endpoint, an on-disk cache, and the statistics in `stats`.

Typical use:

    judge = LocalJudge.from_pretrained("path/to/model")          # or HTTPJudge(base_url, model, ...)
    with JudgeCache("runs/x/judge.sqlite") as cache:
        verdicts = judge_pairs(judge, pairs, cache=cache)
    metrics = summarize_pairwise([v.winner for v in verdicts], [v.consistent for v in verdicts],
                                 [p.answer_a for p in pairs], [p.answer_b for p in pairs])

The backends are imported lazily (`LocalJudge` pulls in torch, `HTTPJudge` requests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import PAIRWISE_LABELS, SCORE_LABELS, TIE, Judge, LabelSet, RawAnswer
from .cache import JudgeCache, cache_key
from .config import (
    HTTPJudgeConfig,
    JudgeConfig,
    LocalJudgeConfig,
    build_judge,
    build_templates,
    judge_config_from_dict,
    open_cache,
    with_paths,
)
from .evaluate import evaluate_grades, evaluate_pairs
from .pairs import load_pairs
from .parsing import parse_label
from .protocol import (
    Grade,
    Pair,
    PairJudgement,
    combine_orders,
    grade_answers,
    judge_label_pairs,
    judge_pairs,
)
from .stats import summarize_pairwise, summarize_scores
from .templates import JudgeTemplate, load_template

if TYPE_CHECKING:
    from .http_judge import HTTPJudge, JudgeRequestError
    from .local import LocalJudge

__all__ = [
    "PAIRWISE_LABELS", "SCORE_LABELS", "TIE", "Grade", "HTTPJudge", "HTTPJudgeConfig", "Judge", "JudgeCache",
    "JudgeConfig", "JudgeRequestError", "JudgeTemplate", "LabelSet", "LocalJudge", "LocalJudgeConfig", "Pair",
    "PairJudgement", "RawAnswer", "build_judge", "build_templates", "cache_key", "combine_orders",
    "evaluate_grades", "evaluate_pairs", "grade_answers", "judge_config_from_dict", "judge_label_pairs",
    "judge_pairs", "load_pairs", "load_template", "open_cache", "parse_label", "summarize_pairwise",
    "summarize_scores", "with_paths",
]


def __getattr__(name: str) -> Any:
    if name == "LocalJudge":
        from .local import LocalJudge

        return LocalJudge
    if name in ("HTTPJudge", "JudgeRequestError"):
        from . import http_judge

        return getattr(http_judge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
