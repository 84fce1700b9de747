"""`alignlab arena` over a run's samples with the tiny local judge (and its cache), `alignlab eval contamination`
on the tiny model, and their bad input: one line, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest

from recipes.cli import main
from tests.conftest import write_jsonl

ANSWERS = {"short": "Yes.", "long": "Yes, and here is a longer answer with more words.", "odd": "Purple."}
PROMPTS = ["Is water wet?", "Is the sky blue?", "Do fish swim?"]


def fake_run(root, models):
    """A run directory as an eval stage leaves it: manifest, results.json naming the models, their samples."""
    (root / "eval").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    (root / "eval" / "results.json").write_text(json.dumps({"models": {m: {} for m in models}}))
    for m in models:
        (root / "eval" / m).mkdir()
        write_jsonl(root / "eval" / m / "samples.jsonl",
                    [{"prompt": p, "sample": 0, "completion": f"{ANSWERS[m]} ({i})"} for i, p in enumerate(PROMPTS)])
    return root


def test_arena_judges_every_pair_once_and_a_second_run_makes_no_calls(tmp_path, capsys):
    run = fake_run(tmp_path / "run", list(ANSWERS))
    args = ["arena", str(run), "--judge-model", "tiny-random-llama", "--cache", str(tmp_path / "cache.sqlite"),
            "--baseline", "short", "--bootstrap", "20", "--style-control", "--output", str(tmp_path / "arena.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    # 3 models -> 3 pairs, on 3 prompts -> 9 pairs of answers, each judged in both orders.
    assert "arena: 3 models, 9 pairs of answers, 18 judgements (both orders)" in out
    assert "judge calls: 18 (not in the cache)" in out
    board = json.loads((tmp_path / "arena.json").read_text())
    assert board["judge_calls"] == 18 and board["baseline"] == "short"
    assert {r["model"] for r in board["models"]} == set(ANSWERS)
    assert sum(r["wins"] + r["ties"] + r["losses"] for r in board["models"]) == 2 * (9 - board["unparseable"])
    assert all("style_rating" in r for r in board["models"])

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "judge calls: 0 (every judgement was in the cache)" in out
    assert json.loads((tmp_path / "arena.json").read_text())["models"] == board["models"]


def test_contamination_on_the_tiny_model(tmp_path, capsys):
    rows = [{"question": f"What is {i} + {i}?", "choices": [str(2 * i), str(2 * i + 1)], "answer": 0}
            for i in range(8)]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    assert main(["eval", "contamination", "--model", "tiny-random-llama", "--data", str(tmp_path / "mc.jsonl"),
                 "--shards", "2", "--permutations", "3", "--output", str(tmp_path / "out")]) == 0
    assert "contamination" in capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "contamination.json").read_text())["models"]["tiny-random-llama"]
    assert result["test"] == "t-test" and result["n_examples"] == 8 and 0.0 <= result["p_value"] <= 1.0


def bad_args(case: str, tmp_path) -> list[str]:
    if case == "mc row with one choice":
        write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0},
                                             {"question": "R?", "choices": ["only"], "answer": 0}])
        return ["eval", "mc", "--model", "tiny-random-llama", "--data", str(tmp_path / "bad.jsonl")]
    if case == "mc answer out of range":
        write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "choices": list("abcdefghij"), "answer": 10}])
        return ["eval", "mc", "--model", "tiny-random-llama", "--data", str(tmp_path / "bad.jsonl")]
    if case == "arena of one model":
        return ["arena", str(fake_run(tmp_path / "run", ["short"])), "--output", str(tmp_path / "arena.json")]
    if case == "contamination on one example":
        write_jsonl(tmp_path / "one.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0}])
        return ["eval", "contamination", "--model", "tiny-random-llama", "--data", str(tmp_path / "one.jsonl"),
                "--output", str(tmp_path / "out")]
    raise AssertionError(case)


CASES = {
    "mc row with one choice": "bad.jsonl, line 2: a question needs at least 2 choices, got 1; add the missing options",
    "mc answer out of range": "bad.jsonl, line 1: 'answer' 10 is out of range for 10 choices (expected an index 0..9 "
                              "or a letter A-J)",
    "arena of one model": "alignlab arena: an arena needs at least 2 models, found 1 (short)",
    "contamination on one example": "one.jsonl: a contamination test compares orders of examples and needs at least "
                                    "2, got 1",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    args = bad_args(case, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and CASES[case] in err[0], err
    assert not (tmp_path / "arena.json").exists() and not (tmp_path / "out").exists()
