"""One call from a config to verdicts and metrics, for the eval stage to wire in."""

from __future__ import annotations

from collections.abc import Sequence

from .config import JudgeConfig, build_judge, build_templates, open_cache
from .protocol import Grade, Pair, PairJudgement, grade_answers, judge_pairs
from .stats import summarize_pairwise, summarize_scores


def evaluate_pairs(cfg: JudgeConfig, pairs: Sequence[Pair]) -> tuple[list[PairJudgement], dict[str, float]]:
    """Judge `pairs` (answer a against answer b) as the config says; returns the verdicts and the
    `judge/...` metrics (gold agreement included when every pair has gold scores)."""
    judge = build_judge(cfg)
    cache = open_cache(cfg)
    try:
        verdicts = judge_pairs(judge, pairs, template=build_templates(cfg)["pairwise"], cache=cache)
    finally:
        if cache is not None:
            cache.close()
    has_gold = bool(pairs) and all(p.gold_a is not None and p.gold_b is not None for p in pairs)
    metrics = summarize_pairwise(
        [v.winner for v in verdicts], [v.consistent for v in verdicts],
        [p.answer_a for p in pairs], [p.answer_b for p in pairs],
        gold_a=[p.gold_a for p in pairs] if has_gold else None,
        gold_b=[p.gold_b for p in pairs] if has_gold else None,
        unparseable_answers=sum(not a.parsed for v in verdicts for a in (v.ab, v.ba)),
        n_resamples=cfg.bootstrap_resamples, confidence=cfg.confidence, seed=cfg.seed,
    )
    return verdicts, metrics


def evaluate_grades(cfg: JudgeConfig, prompts: Sequence[str], answers: Sequence[str],
                    references: Sequence[str | None] | None = None) -> tuple[list[Grade], dict[str, float]]:
    """Grade answers on 1..10 (reference-guided where a reference is given); grades and metrics."""
    judge = build_judge(cfg)
    templates = build_templates(cfg)
    cache = open_cache(cfg)
    try:
        grades = grade_answers(judge, prompts, answers, references=references, template=templates["single"],
                               reference_template=templates["single_reference"], cache=cache)
    finally:
        if cache is not None:
            cache.close()
    metrics = summarize_scores([g.score for g in grades], n_resamples=cfg.bootstrap_resamples,
                               confidence=cfg.confidence, seed=cfg.seed)
    return grades, metrics
