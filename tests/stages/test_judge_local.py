"""The local transformers judge on the tiny random model (byte-level tokenizer: "10" is two tokens)."""

import pytest
import torch

from common.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model
from judge import (
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


def biased_judge(tokenizer, labels: dict[str, float], seed: int = 0, batch_size: int = 4) -> LocalJudge:
    """A judge whose next-token logits are fixed, whatever it is shown: `value` on each label's first token, 0 on the
    others. Its answer is known in advance."""
    model = build_tiny_model(tokenizer, seed=seed)
    bias = torch.zeros(len(tokenizer))
    for label, value in labels.items():
        bias[tokenizer(label, add_special_tokens=False)["input_ids"][0]] = value
    model.lm_head.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output) + bias)
    return LocalJudge(model, tokenizer, batch_size=batch_size)


def test_a_judge_that_always_says_a_is_position_inconsistent_on_every_pair(tiny):
    # It prefers whichever answer is shown first: a wins in the order (a, b), b in the order (b, a). With the position
    # swap that is no evidence either way: every pair is an inconsistent tie, the win rate exactly 1/2. A harness
    # without the swap would report a win rate of 1.
    _, tokenizer = tiny
    verdicts = judge_pairs(biased_judge(tokenizer, {"A": 30.0}), PAIRS)
    for v in verdicts:
        assert (v.ab.label, v.ba.label, v.winner, v.consistent) == ("A", "A", "tie", False)
        # P(A) ~ 1 in each order: a's probability is P(A) shown first and P(B) shown second, so the average is 1/2.
        assert v.prob_a == pytest.approx(0.5, abs=1e-9) and v.prob_b == pytest.approx(0.5, abs=1e-9)
        assert v.prob_tie == pytest.approx(0.0, abs=1e-9)
    winners, consistency = [v.winner for v in verdicts], [v.consistent for v in verdicts]
    assert winners == ["tie"] * 3 and consistency == [False] * 3


def test_a_judge_that_always_says_b_first_makes_the_second_shown_answer_win_twice(tiny):
    # "B" in both orders: b wins shown second in (a, b), a wins shown second in (b, a): inconsistent again. A judge
    # torn between A and C (equal bias) puts half its mass on the tie label in each order.
    _, tokenizer = tiny
    assert [v.winner for v in judge_pairs(biased_judge(tokenizer, {"B": 30.0}), PAIRS)] == ["tie"] * 3
    for v in judge_pairs(biased_judge(tokenizer, {"A": 30.0, "C": 30.0}), PAIRS):
        assert v.prob_tie == pytest.approx(0.5, abs=1e-6)
        assert v.prob_a == pytest.approx(0.25, abs=1e-6) and v.prob_b == pytest.approx(0.25, abs=1e-6)


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
    # A judge sure of "7" grades 7; one split evenly between "3" and "8" grades their mean, 5.5. A harness that took
    # the most likely label would say 3 (or 8), one that read "1" of "10" as a grade would drift below.
    _, tokenizer = tiny
    questions, answers, references = ["Name a colour.", "2 + 2?"], ["Blue.", "4"], [None, "4"]
    sure = grade_answers(biased_judge(tokenizer, {"7": 30.0}), questions, answers, references=references)
    assert [g.score for g in sure] == pytest.approx([7.0, 7.0], abs=1e-6)
    split = grade_answers(biased_judge(tokenizer, {"3": 30.0, "8": 30.0}), questions, answers, references=references)
    assert [g.score for g in split] == pytest.approx([5.5, 5.5], abs=1e-6)


def test_labeller_and_cache_on_the_local_judge(tiny, tmp_path):
    _, tokenizer = tiny
    judge = biased_judge(tokenizer, {"A": 30.0}, batch_size=2)
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
    # A position-biased judge decides no pair: each is left unlabelled, with the order-averaged P(tie) (0 here).
    assert [index for index, _ in labels] == [None] * 3
    assert [prob for _, prob in labels] == pytest.approx([0.0] * 3, abs=1e-9)


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
    # The metrics are the verdicts counted: wins, ties, losses; a tie counts half (in a's favour and against).
    winners = [v.winner for v in verdicts]
    counts = {w: winners.count(w) for w in ("a", "tie", "b")}
    assert (metrics["judge/wins"], metrics["judge/ties"], metrics["judge/losses"]) == tuple(counts.values())
    assert metrics["judge/win_rate"] == pytest.approx((counts["a"] + counts["tie"] / 2) / 3, abs=1e-12)
    assert metrics["judge/position_consistency"] == pytest.approx(sum(v.consistent for v in verdicts) / 3)
    grades, scores = evaluate_grades(cfg, ["q1", "q2"], ["a1", "a2"], references=["r1", None])
    assert scores["judge/score_mean"] == pytest.approx(sum(g.score for g in grades) / 2, abs=1e-9)
    assert scores["judge/unparseable_answers"] == 0
