"""Exact-match extraction (lm-eval's GSM8K "strict" and "flexible" filters) on hand-written completions, and the
reward scorer built on it."""

import json

import pytest

from common.errors import InputError
from eval.exact_match import INVALID, extract, is_exact_match, reward
from preferences.scorers import build_scorer


@pytest.mark.parametrize(("completion", "strict", "flexible"), [
    ("3 * 8 = 24 shells.\n#### 24", "24", "24"),
    ("She has 1,200 coins.\n#### 1,200", "1,200", "1,200"),
    ("The answer is 42.", INVALID, "42."),                      # no "#### ": strict fails, flexible takes 42.
    ("#### 7 but wait, 5 + 3 = 8", "7", "8"),                   # strict: first "####"; flexible: the last number
    ("It costs $15", INVALID, "$15"),
    ("no digits here", INVALID, INVALID),
    ("#### -3", "-3", "-3"),
    ("I think 9", INVALID, "9"),                                # a single digit: the second alternative
])
def test_strict_and_flexible_extraction(completion, strict, flexible):
    assert extract(completion, "strict") == strict
    assert extract(completion, "flexible") == flexible


def test_exact_match_ignores_commas_dollars_a_final_period_and_case():
    assert is_exact_match("She has 1,200 coins.\n#### 1,200", "1200", "strict")
    assert is_exact_match("The answer is 42.", "42", "flexible")
    assert is_exact_match("It costs $15", "15", "flexible")
    assert not is_exact_match("The answer is 42.", "42", "strict")
    assert not is_exact_match("#### 7 but wait, 5 + 3 = 8", "7", "flexible")
    with pytest.raises(InputError, match="expected one of strict, flexible, got 'loose'"):
        extract("1", "loose")


def test_reward_as_a_python_gold_scorer(tmp_path):
    data = tmp_path / "answers.jsonl"
    data.write_text(json.dumps({"prompt": "2 + 2?", "answer": "4"}) + "\n" + json.dumps({"prompt": "3 * 3?",
                                                                                         "answer": 9}) + "\n")
    scorer = build_scorer({"scorer": "python", "function": "eval.exact_match:reward", "batched": True,
                           "kwargs": {"data": str(data), "extraction": "strict"}}, "scorer", "test")
    assert scorer.score(["2 + 2?", "3 * 3?", "2 + 2?"], ["#### 4", "it is 9", "#### 5"]) == [1.0, 0.0, 0.0]
    with pytest.raises(InputError, match=r"no answer for the prompt '1 \+ 1\?'"):
        reward(["1 + 1?"], ["#### 2"], data=str(data))


def test_the_shipped_problems_answer_themselves():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "recipes" / "data" / "arithmetic"
    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    train = {json.loads(line)["prompt"] for line in (folder / "train.jsonl").read_text().splitlines()}
    assert len(rows) == 50 and not train & {r["prompt"] for r in rows}
    assert reward([r["prompt"] for r in rows], [r["solution"] for r in rows], data=str(folder / "test.jsonl"),
                  extraction="strict") == [1.0] * 50
