"""Protocols on scripted judges: position swapping, ties, probabilities, caching, templates, parsing."""

import json
import math

import pytest

from common.errors import InputError
from judge import (
    PAIRWISE_LABELS,
    SCORE_LABELS,
    JudgeCache,
    LocalJudgeConfig,
    Pair,
    RawAnswer,
    grade_answers,
    judge_config_from_dict,
    judge_label_pairs,
    judge_pairs,
    load_pairs,
    load_template,
    parse_label,
)


@pytest.fixture
def plain_template(tmp_path):
    """A template a scripted judge can read back: prompt|shown first|shown second."""
    path = tmp_path / "pairwise.txt"
    path.write_text("{prompt}|{answer_a}|{answer_b}")
    return load_template("pairwise", path)


class ScriptedJudge:
    """Answers with `decide(prompt, shown_first, shown_second)`: a label, a probability dict, or None."""

    def __init__(self, decide, judge_id="scripted"):
        self.decide = decide
        self.judge_id = judge_id
        self.asked: list[str] = []

    def ask(self, queries, labels, on_result=None):
        out = []
        for i, q in enumerate(queries):
            self.asked.append(q)
            got = self.decide(*q.split("|"))
            if isinstance(got, dict):
                answer = RawAnswer(label=max(got, key=got.get), probs=got)
            else:
                answer = RawAnswer(label=got, text=str(got))
            if on_result:
                on_result(i, answer)
            out.append(answer)
        return out


PAIR = Pair(prompt="q", answer_a="long answer", answer_b="x")


def test_consistent_judge_wins_in_both_orders(plain_template):
    judge = ScriptedJudge(lambda p, first, second: "A" if len(first) > len(second) else "B")
    [v] = judge_pairs(judge, [PAIR], template=plain_template)
    assert judge.asked == ["q|long answer|x", "q|x|long answer"]  # both orders shown
    assert (v.winner, v.consistent) == ("a", True)
    assert (v.prob_a, v.prob_b, v.prob_tie) == (1.0, 0.0, 0.0)


def test_position_biased_judge_flips_and_counts_as_inconsistent_tie(plain_template):
    judge = ScriptedJudge(lambda *_: "A")  # always prefers whatever is shown first
    [v] = judge_pairs(judge, [PAIR], template=plain_template)
    assert (v.winner, v.consistent) == ("tie", False)
    # one-hot per order, averaged: a wins in order AB, b wins in order BA
    assert (v.prob_a, v.prob_b, v.prob_tie) == (0.5, 0.5, 0.0)


def test_win_in_one_order_and_tie_in_the_other_is_inconsistent(plain_template):
    judge = ScriptedJudge(lambda p, first, second: "A" if first == "long answer" else "C")
    [v] = judge_pairs(judge, [PAIR], template=plain_template)
    assert (v.winner, v.consistent) == ("tie", False)


def test_tie_in_both_orders_is_a_consistent_tie(plain_template):
    [v] = judge_pairs(ScriptedJudge(lambda *_: "C"), [PAIR], template=plain_template)
    assert (v.winner, v.consistent, v.prob_tie) == ("tie", True, 1.0)


def test_unparseable_order_makes_the_pair_unparseable(plain_template):
    judge = ScriptedJudge(lambda p, first, second: None if first == "x" else "A")
    [v] = judge_pairs(judge, [PAIR], template=plain_template)
    assert v.winner is None and v.consistent is None and v.prob_a is None
    assert judge_label_pairs(judge, ["q"], ["long answer"], ["x"], template=plain_template)[0][0] is None


def test_probabilities_are_mapped_back_and_averaged(plain_template):
    # Order AB (a first): P(A)=.8 -> a; order BA (b first): P(B)=.6 means a (shown second) is better.
    # P(a better) = (.8 + .6) / 2 = .7, P(b better) = (.1 + .3) / 2 = .2, P(tie) = .1.
    def decide(p, first, second):
        return {"A": 0.8, "B": 0.1, "C": 0.1} if first == "long answer" else {"A": 0.3, "B": 0.6, "C": 0.1}

    [v] = judge_pairs(ScriptedJudge(decide), [PAIR], template=plain_template)
    assert v.winner == "a" and v.consistent
    assert (v.prob_a, v.prob_b, v.prob_tie) == pytest.approx((0.7, 0.2, 0.1), abs=1e-12)


def test_constant_position_bias_cancels_in_probabilities(plain_template):
    # The same distribution in both orders says nothing about the answers: P(a) = P(b) = (.7 + .2) / 2.
    [v] = judge_pairs(ScriptedJudge(lambda *_: {"A": 0.7, "B": 0.2, "C": 0.1}), [PAIR], template=plain_template)
    assert (v.winner, v.consistent) == ("tie", False)
    assert (v.prob_a, v.prob_b, v.prob_tie) == pytest.approx((0.45, 0.45, 0.1), abs=1e-12)


def test_judge_label_pairs_returns_index_and_probability(plain_template):
    def decide(p, first, second):  # prefers the answer containing "good", with probability .9
        if "good" in first:
            return {"A": 0.9, "B": 0.05, "C": 0.05}
        if "good" in second:
            return {"A": 0.05, "B": 0.9, "C": 0.05}
        return {"A": 0.1, "B": 0.1, "C": 0.8}

    labels = judge_label_pairs(ScriptedJudge(decide), ["q1", "q2", "q3"], ["good", "meh", "meh"],
                               ["bad", "good", "so-so"], template=plain_template)
    assert labels[0] == (0, pytest.approx(0.9))
    assert labels[1] == (1, pytest.approx(0.9))
    assert labels[2] == (None, pytest.approx(0.8))


def test_cache_resumes_and_a_rerun_asks_nothing(tmp_path, plain_template):
    pairs = [Pair("q", f"answer {i}", "x") for i in range(3)]
    calls = {"n": 0}

    def flaky(p, first, second):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("interrupted")
        return "A" if first != "x" else "B"

    with JudgeCache(tmp_path / "cache.sqlite") as cache, pytest.raises(RuntimeError, match="interrupted"):
        judge_pairs(ScriptedJudge(flaky), pairs, template=plain_template, cache=cache)
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        assert len(cache) == 3  # the answers before the interruption were kept
        resumed = ScriptedJudge(lambda p, first, second: "A" if first != "x" else "B")
        first_run = judge_pairs(resumed, pairs, template=plain_template, cache=cache)
        assert len(resumed.asked) == 3  # only the 3 missing order-judgements
        again = ScriptedJudge(lambda *_: pytest.fail("cache miss"))
        second_run = judge_pairs(again, pairs, template=plain_template, cache=cache)
        assert again.asked == [] and [v.winner for v in second_run] == [v.winner for v in first_run] == ["a"] * 3


def test_cache_key_depends_on_judge_template_and_order(tmp_path, plain_template):
    other_template = tmp_path / "other.txt"
    other_template.write_text("{prompt}|{answer_a}|{answer_b}\n")  # one newline more: another hash
    with JudgeCache(tmp_path / "c.sqlite") as cache:
        judge_pairs(ScriptedJudge(lambda *_: "A"), [PAIR], template=plain_template, cache=cache)
        j2 = ScriptedJudge(lambda *_: "A", judge_id="another")
        judge_pairs(j2, [PAIR], template=plain_template, cache=cache)
        assert len(j2.asked) == 2
        j3 = ScriptedJudge(lambda *_: "A")
        judge_pairs(j3, [PAIR], template=load_template("pairwise", other_template), cache=cache)
        assert len(j3.asked) == 2
        # identical pairs are asked once
        j4 = ScriptedJudge(lambda *_: "B", judge_id="fresh")
        judge_pairs(j4, [PAIR, PAIR], template=plain_template, cache=cache)
        assert len(j4.asked) == 2


def test_grading_uses_reference_template_and_expected_scores(tmp_path):
    single = tmp_path / "single.txt"
    single.write_text("plain|{prompt}|{answer}")
    guided = tmp_path / "ref.j2"
    guided.write_text("ref|{{ prompt }}|{{ answer }}|{{ reference }}")

    def decide(kind, *rest):
        return "7" if kind == "plain" else {"1": 0.5, "10": 0.5, **{str(s): 0.0 for s in range(2, 10)}}

    judge = ScriptedJudge(decide)
    grades = grade_answers(judge, ["q1", "q2"], ["a1", "a2"], references=[None, "gold"],
                           template=load_template("single", single),
                           reference_template=load_template("single_reference", guided))
    assert judge.asked == ["plain|q1|a1", "ref|q2|a2|gold"]
    assert grades[0].score == 7.0
    assert grades[1].score == pytest.approx(5.5)  # 1 * .5 + 10 * .5
    assert grade_answers(ScriptedJudge(lambda *_: None), ["q"], ["a"],
                         template=load_template("single", single))[0].score is None


def test_default_templates_load_and_render():
    for kind in ("pairwise", "single", "single_reference"):
        template = load_template(kind)
        assert len(template.hash) == 16
    text = load_template("pairwise").render(prompt="P?", answer_a="first", answer_b="second")
    assert "P?" in text and text.index("first") < text.index("second") and "{" not in text


def test_bad_templates_name_the_file(tmp_path):
    typo = tmp_path / "typo.txt"
    typo.write_text("{prompt} {answer_a} {anwser_b}")
    with pytest.raises(InputError, match=r"typo.txt: unknown placeholder\(s\) \['anwser_b'\]"):
        load_template("pairwise", typo)
    missing = tmp_path / "missing.txt"
    missing.write_text('{prompt} {answer} and a JSON example {"score": 7}')
    with pytest.raises(InputError, match=r"missing.txt: the 'single_reference' judge template must use"):
        load_template("single_reference", missing)
    assert "{\"score\": 7}" in load_template("single", missing).render(prompt="p", answer="a")
    broken = tmp_path / "broken.j2"
    broken.write_text("{{ prompt }} {{ answer ")
    with pytest.raises(InputError, match="broken.j2: line 1: jinja2 syntax error"):
        load_template("single", broken)
    with pytest.raises(InputError, match="not found"):
        load_template("single", tmp_path / "nope.txt")


@pytest.mark.parametrize(("text", "label"), [
    ("A", "A"), ("**B**.", "B"), ("tie", "C"), ("[[C]]", "C"), ("First [[A]], on reflection [[B]]", "B"),
    ("Verdict: B", "B"), ("A. Because it is clearer.", "A"), ("Assistant A's answer is better", None),
    ("I cannot decide", None), ("", None), ("AAAA", None),
])
def test_parse_pairwise_verdicts(text, label):
    assert parse_label(text, PAIRWISE_LABELS) == label


@pytest.mark.parametrize(("text", "label"), [
    ("7", "7"), ("[[10]]", "10"), ("Rating: 8", "8"), ("8/10", "8"), ("1", "1"), ("9 - very good", "9"),
    ("It has 3 points", None), ("7.5", None), ("Rating: 7.5", None), ("11", None),
])
def test_parse_scores(text, label):
    assert parse_label(text, SCORE_LABELS) == label


def test_load_pairs_both_shapes_and_bad_rows(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"prompt": "p", "answer_a": "a", "answer_b": "b", "gold_a": 1, "id": 3}) + "\n\n"
                    + json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "score_rejected": 0.5}) + "\n")
    first, second = load_pairs(good)
    assert (first.answer_a, first.gold_a, first.gold_b, first.id) == ("a", 1.0, None, "3")
    assert (second.answer_a, second.answer_b, second.gold_b) == ("c", "r", 0.5)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer_a": "a", "answer_b": "b"}) + "\n{oops\n")
    with pytest.raises(InputError, match=r"bad.jsonl: line 2: not valid JSON"):
        load_pairs(bad)
    bad.write_text(json.dumps({"prompt": "p", "answer_a": "a", "answer_b": 5}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl: line 1: 'answer_b' must be a string"):
        load_pairs(bad)
    bad.write_text(json.dumps({"question": "p"}) + "\n")
    with pytest.raises(InputError, match=r"line 1: expected keys 'prompt', 'answer_a', 'answer_b'"):
        load_pairs(bad)
    bad.write_text(json.dumps({"prompt": "p", "answer_a": "a", "answer_b": "b", "gold_a": "high"}) + "\n")
    with pytest.raises(InputError, match=r"'gold_a' must be a finite number"):
        load_pairs(bad)


def test_config_is_strict():
    cfg = judge_config_from_dict({"backend": "http", "http": {"base_url": "http://127.0.0.1:1/v1", "model": "m",
                                                                "timeout_s": 5}})
    assert cfg.http.timeout_s == 5.0 and cfg.http.max_retries == 4 and cfg.cache is None
    assert judge_config_from_dict({"backend": "local"}).local == LocalJudgeConfig(), "no block: every default"
    # The recipe's schema machinery reads the block: its one-line messages, with "did you mean" for a typo.
    cases = [
        ({"backend": "http", "http": {"base_url": "u", "model": "m", "tmeout_s": 5}},
         "recipe: unknown key 'tmeout_s' at judge.http; did you mean 'timeout_s'? valid keys: api_key_env, "),
        ({"backend": "http"}, "recipe: judge: backend 'http' needs an 'http:' block with base_url and model; add it"),
        ({"backend": "http", "http": {"base_url": "u", "model": "m", "max_retries": "3"}},
         "recipe: judge.http.max_retries must be int, got '3' (str)"),
        ({"backend": "http", "http": {"base_url": "u"}}, "recipe: missing required key 'judge.http.model' (str)"),
        ({"backend": "gpt"}, "recipe: judge.backend must be 'local' | 'http', got 'gpt' (str)"),
        ({"backend": "local", "local": {"model": "m"}, "pairwise_template": "/nope.txt"},
         "recipe: judge.pairwise_template: template file /nope.txt not found"),
    ]
    for block, message in cases:
        with pytest.raises(InputError) as error:
            judge_config_from_dict(block)
        assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_nan_probability_for_unparseable_label(plain_template):
    [(index, prob)] = judge_label_pairs(ScriptedJudge(lambda *_: None), ["q"], ["a"], ["b"],
                                        template=plain_template)
    assert index is None and math.isnan(prob)
