"""The local transformers judge on the tiny random model (byte-level tokenizer: "10" is two tokens)."""

import pytest
import torch

from common.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model
from judge import (
    PAIRWISE_LABELS,
    SCORE_LABELS,
    JudgeCache,
    Pair,
    build_judge,
    evaluate_grades,
    evaluate_pairs,
    grade_answers,
    judge_config_from_dict,
    judge_label_pairs,
    judge_pairs,
)
from judge.local import LocalJudge

PAIRS = [
    Pair("What is 2 + 2?", "4", "5"),
    Pair("Name a colour.", "Blue is a colour that many people like.", "Dog."),
    Pair("Say hi.", "hi", "hello there, friend"),
]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


def test_every_verdict_has_a_probability(tiny):
    model, tokenizer = tiny
    verdicts = judge_pairs(LocalJudge(model, tokenizer, batch_size=4), PAIRS)
    for v in verdicts:
        for answer in (v.ab, v.ba):
            assert answer.label in PAIRWISE_LABELS.labels
            assert set(answer.probs) == {"A", "B", "C"}
            assert sum(answer.probs.values()) == pytest.approx(1.0, abs=1e-9)
            assert 0.0 < answer.label_mass <= 1.0
        assert v.winner in ("a", "b", "tie") and v.consistent in (True, False)
        assert v.prob_a + v.prob_b + v.prob_tie == pytest.approx(1.0, abs=1e-9)


def test_batched_equals_one_at_a_time(tiny):
    # Left padding with explicit position ids: a prompt scores the same alone or in a padded batch.
    model, tokenizer = tiny
    queries = ["short", "a considerably longer judge prompt " * 4, "mid-length prompt"]
    batched = LocalJudge(model, tokenizer, batch_size=3).ask(queries, SCORE_LABELS)
    single = LocalJudge(model, tokenizer, batch_size=1).ask(queries, SCORE_LABELS)
    for b, s in zip(batched, single, strict=True):
        assert b.probs == pytest.approx(s.probs, abs=1e-5)
        assert b.label_mass == pytest.approx(s.label_mass, rel=1e-4)


def test_two_token_label_is_split_from_its_prefix(tiny):
    # "10" is "1" then "0" in the byte-level tokenizer. P("1" as an answer) must be P("1") - P("1","0"),
    # and P("10") = P("1") * P("0" | "1"); worked here directly from the model's logits.
    model, tokenizer = tiny
    judge = LocalJudge(model, tokenizer)
    query = "Rate this answer."
    [answer] = judge.ask([query], SCORE_LABELS)
    text = tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    one, zero = tokenizer("1", add_special_tokens=False)["input_ids"][0], tokenizer("0")["input_ids"][0]
    with torch.no_grad():
        p_next = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        p_after_one = torch.softmax(model(torch.tensor([ids + [one]])).logits[0, -1].double(), -1)
    p_one, p_ten = float(p_next[one]), float(p_next[one] * p_after_one[zero])
    mass = answer.label_mass
    assert answer.probs["10"] * mass == pytest.approx(p_ten, rel=1e-4)
    assert answer.probs["1"] * mass == pytest.approx(p_one - p_ten, rel=1e-4)
    digits = [tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(2, 10)]
    assert mass == pytest.approx(p_one + float(p_next[digits].sum()), rel=1e-4)


def test_grades_are_expected_scores(tiny):
    model, tokenizer = tiny
    judge = LocalJudge(model, tokenizer)
    grades = grade_answers(judge, ["Name a colour.", "2 + 2?"], ["Blue.", "4"], references=[None, "4"])
    for g in grades:
        assert 1.0 <= g.score <= 10.0
        assert g.score == pytest.approx(sum(int(k) * p for k, p in g.answer.probs.items()), rel=1e-9)


def test_labeller_and_cache_on_the_local_judge(tiny, tmp_path):
    model, tokenizer = tiny
    judge = LocalJudge(model, tokenizer, batch_size=2)
    calls = []
    original = judge.ask
    judge.ask = lambda q, labels, on_result=None: calls.append(len(q)) or original(q, labels, on_result)
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        labels = judge_label_pairs(judge, [p.prompt for p in PAIRS], [p.answer_a for p in PAIRS],
                                   [p.answer_b for p in PAIRS], cache=cache)
        again = judge_label_pairs(judge, [p.prompt for p in PAIRS], [p.answer_a for p in PAIRS],
                                  [p.answer_b for p in PAIRS], cache=cache)
    assert calls == [6]  # 3 pairs x 2 orders, then nothing on the re-run
    assert again == labels
    for index, prob in labels:
        assert index in (0, 1, None) and 0.0 <= prob <= 1.0


def test_judge_ids_tell_models_apart(tiny):
    model, tokenizer = tiny
    other = build_tiny_model(tokenizer, seed=1)
    assert LocalJudge(model, tokenizer).judge_id == LocalJudge(model, tokenizer).judge_id
    assert LocalJudge(model, tokenizer).judge_id != LocalJudge(other, tokenizer).judge_id
    assert LocalJudge(model, tokenizer).judge_id != LocalJudge(model, tokenizer, system_prompt="Be fair.").judge_id


def test_evaluate_from_a_saved_model_directory(tmp_path):
    save_tiny_model(tmp_path / "judge-model")
    cfg = judge_config_from_dict({"backend": "local", "cache": str(tmp_path / "cache.sqlite"),
                                  "bootstrap_resamples": 100,
                                  "local": {"model": str(tmp_path / "judge-model"), "batch_size": 2}})
    assert build_judge(cfg).judge_id.startswith("local:judge-model/:")
    gold = [Pair(p.prompt, p.answer_a, p.answer_b, gold_a=1.0, gold_b=0.0) for p in PAIRS]
    verdicts, metrics = evaluate_pairs(cfg, gold)
    assert len(verdicts) == 3 and metrics["judge/pairs"] == 3 and metrics["judge/unparseable_answers"] == 0
    assert 0.0 <= metrics["judge/win_rate"] <= 1.0 and "judge/gold_agreement_with_ties" in metrics
    grades, scores = evaluate_grades(cfg, ["q1", "q2"], ["a1", "a2"], references=["r1", None])
    assert 1.0 <= scores["judge/score_mean"] <= 10.0 and scores["judge/unparseable_answers"] == 0
