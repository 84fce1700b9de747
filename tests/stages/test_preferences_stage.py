"""The preferences stage end to end on the tiny in-process model: sampled, scored, paired and noised pairs written
where `data: {stage: NAME}` reads them; a (scripted HTTP) judge as the labeller; an existing dataset scored and
noised; bad input stopped before anything runs."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import yaml

from common.config import DataSpec
from common.data import load_splits
from common.errors import InputError
from preferences.pairs import pair_indices
from recipes.cli import main
from recipes.runner import RunOptions, run_recipe
from tests.conftest import write_jsonl
from tests.stages.test_judge_http import ScriptedServer

SEED = 42
# The tiny random model's bytes decode to texts of equal length, but it writes newlines often: count those.
NEWLINES = {"scorer": "regex", "pattern": "\n"}


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"Write a short review of film number {i}."} for i in range(n)]


def write_recipe(tmp_path, prefs: dict, others: dict | None = None) -> object:
    write_jsonl(tmp_path / "prompts.jsonl", prompts(16))
    recipe = {"name": "t", "seed": SEED,
              "model": {"base": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
              "stages": {"prefs": {"kind": "preferences", "data": {"path": "prompts.jsonl", "test_size": 0.25},
                                   "scorer": NEWLINES, "samples_per_prompt": 4, "max_new_tokens": 4,
                                   "temperature": 1.0, "noise": 0.5} | prefs} | (others or {})}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sampled_pairs_are_distinct_noised_by_the_seed_split_by_prompt_and_readable(tmp_path):
    run = run_recipe(write_recipe(tmp_path, {}), RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    stage = run.stage_dir("prefs")
    done = json.loads((stage / "done.json").read_text())
    assert done["outputs"] == {"data": "data", "dataset": "dataset", "samples": "samples.jsonl"}
    train, test = read_jsonl(stage / "data" / "train.jsonl"), read_jsonl(stage / "data" / "test.jsonl")
    samples = read_jsonl(stage / "samples.jsonl")
    assert len(samples) == 16 and all(len(s["completions"]) == 4 for s in samples)

    records = sorted(train + test, key=lambda r: r["prompt_index"])  # the order form_pairs made them in
    assert records and len(records) == done["metrics"]["labels/pairs"]
    for r in records:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert chosen.strip() and rejected.strip() and chosen.strip() != rejected.strip()
        group = samples[r["prompt_index"]]
        user = prompts(16)[r["prompt_index"]]["prompt"]
        assert r["prompt"] == group["prompt"] == [{"role": "user", "content": user}]
        assert chosen == group["completions"][r["chosen_index"]]
        assert rejected == group["completions"][r["rejected_index"]]
        assert (r["score_chosen"], r["score_rejected"]) == (chosen.count("\n"), rejected.count("\n"))
        assert r["flipped"] == (r["score_chosen"] < r["score_rejected"]) and r["policy"] == "base:tiny-random-llama"
    # One Bernoulli(noise) draw per pair, in pair order, from the recipe's seed.
    expected = np.random.default_rng(SEED).random(len(records)) < 0.5
    assert [r["flipped"] for r in records] == expected.tolist()
    assert done["metrics"]["labels/flipped"] == expected.sum()
    assert done["metrics"]["labels/agreement_with_gold"] == pytest.approx(1 - expected.mean(), abs=1e-12)
    duplicates = sum(len([c for c in s["completions"] if c.strip()]) - len({c.strip() for c in s["completions"]
                                                                          if c.strip()}) for s in samples)
    assert done["metrics"]["labels/duplicate_completions"] == duplicates
    assert done["metrics"]["perf/completions_per_s"] > 0

    train_prompts = {r["prompt_index"] for r in train}
    assert train and test and not train_prompts & {r["prompt_index"] for r in test}

    splits = load_splits(DataSpec(stage="prefs"), run.recipe, "preference", "stages.rm.data", stage)
    assert (len(splits.train), len(splits.test)) == (len(train), len(test))
    assert splits.train[0]["chosen"] == train[0]["chosen"]
    assert splits.train[0]["score_chosen"] == train[0]["score_chosen"]
    saved = datasets.load_from_disk(str(stage / "dataset"))
    assert (saved["train"].num_rows, saved["test"].num_rows) == (len(train), len(test))

    again = run_recipe(write_recipe(tmp_path, {}), RunOptions(overrides=[], output_dir=tmp_path / "again"))
    rerun = again.stage_dir("prefs") / "data" / "train.jsonl"
    assert rerun.read_text() == (stage / "data" / "train.jsonl").read_text(), "same seed, same pairs"


def test_identical_or_blank_samples_make_no_pair(tmp_path):
    # Nearly greedy, the tiny model writes the same blank completion K times for every prompt.
    with pytest.raises(InputError, match="no pair could be formed"):
        run_recipe(write_recipe(tmp_path, {"temperature": 0.05}), RunOptions(overrides=[], output_dir=tmp_path / "r"))


def newline_judge(n: int, body: dict) -> tuple[str, str]:
    """A scripted judge, consistent in both orders: of two answers whose newline counts differ by 1 it cannot tell
    (C), by 2 it prefers the one with fewer newlines, by 3 or more the one with more."""
    text = body["messages"][-1]["content"]

    def answer(x: str) -> str:
        return text.split(f"[The start of Assistant {x}'s answer]\n")[1].split(f"\n[The end of Assistant {x}'s")[0]

    gap = answer("A").count("\n") - answer("B").count("\n")
    if abs(gap) == 1:
        return "ok", "C"
    return "ok", "A" if (gap > 0) == (abs(gap) >= 3) else "B"


def test_a_judge_keeps_swaps_or_drops_each_gold_pair(tmp_path):
    with ScriptedServer(newline_judge) as server:
        judge = {"kind": "judge", "judge": {"backend": "http", "http": {"base_url": server.base_url, "model": "j"}}}
        run = run_recipe(write_recipe(tmp_path, {"labeller": judge, "noise": 0.0}),
                         RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    stage = run.stage_dir("prefs")
    records = read_jsonl(stage / "data" / "train.jsonl") + read_jsonl(stage / "data" / "test.jsonl")
    metrics = json.loads((stage / "done.json").read_text())["metrics"]
    gaps = [abs(s["scores"][hi] - s["scores"][lo]) for s in read_jsonl(stage / "samples.jsonl")
            for hi, lo in pair_indices(s["completions"], s["scores"])]  # the gold pairs the judge was shown
    assert metrics["labels/judge_undecided"] == gaps.count(1) > 0 and len(records) == len(gaps) - gaps.count(1)
    assert {abs(r["score_chosen"] - r["score_rejected"]) == 2 for r in records} == {True, False}, "both rules ran"
    for r in records:  # with no noise, a flip is the judge disagreeing with gold
        assert r["flipped"] == (abs(r["score_chosen"] - r["score_rejected"]) == 2)
        assert r["flipped"] == (r["score_chosen"] < r["score_rejected"]) and r["judge_prob"] == 1.0


def test_an_existing_dataset_is_scored_noised_and_split_by_prompt(tmp_path):
    rows = [{"prompt": f"q{i // 2}", "chosen": "long answer" * (1 + i % 3), "rejected": "short", "source": "hand"}
            for i in range(10)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = write_recipe(tmp_path, {"source": "dataset", "data": {"path": "pairs.jsonl", "test_size": 0.2},
                                   "scorer": {"scorer": "length"}, "noise": 1.0})
    run = run_recipe(path, RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    stage = run.stage_dir("prefs")
    train, test = read_jsonl(stage / "data" / "train.jsonl"), read_jsonl(stage / "data" / "test.jsonl")
    assert len(train) == 8 and len(test) == 2 and {r["prompt"] for r in test} == {test[0]["prompt"]}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:  # noise 1 flips every label; the scores travel with their texts
        assert r["flipped"] and r["chosen"] == "short" and r["score_chosen"] == 5 and r["source"] == "hand"
        assert r["score_rejected"] == len(r["rejected"])
    done = json.loads((stage / "done.json").read_text())
    assert done["metrics"]["labels/agreement_with_gold"] == 0.0 and done["outputs"]["data"] == "data"


CASES = {
    "unknown scorer": ({"scorer": "vadr"}, "stages.prefs.scorer.scorer: unknown scorer 'vadr'; did you mean 'vader'?"),
    "no scorer": ({"scorer": None}, "stages.prefs.scorer: sampled completions are scored by a gold scorer"),
    "judge model": ({"labeller": {"kind": "judge", "judge": {"backend": "local", "local": {"model": "nope"}}}},
                    "stages.prefs.labeller.judge.local.model:"),
    "judge key": ({"labeller": {"kind": "judge", "judge": {"backend": "local", "lokal": {}}}},
                  "unknown key 'lokal' at stages.prefs.labeller.judge; did you mean 'local'? valid keys: "),
    "noise": ({"noise": 1.5}, "stages.prefs.noise: expected a flip probability in [0, 1], got 1.5"),
    "from with a dataset": ({"source": "dataset", "from": "other"}, "stages.prefs.from names a policy"),
    "from a data stage": ({"from": "other"}, "stages.prefs.from: 'other' is a preferences stage"),
    "trainer args": ({"args": {"learning_rate": 1e-3}}, "a preferences stage trains nothing"),
    "one sample": ({"samples_per_prompt": 1}, "stages.prefs.samples_per_prompt must be >= 2"),
    "bad pair rows": ({"source": "dataset", "data": {"path": "bad.jsonl"}}, "bad.jsonl: row 2: 'rejected' is empty"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, case):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                         {"prompt": "q", "chosen": "a", "rejected": ""}])
    block, message = CASES[case]
    runs = tmp_path / "runs"
    other = {"other": {"kind": "preferences", "data": {"path": "prompts.jsonl"}, "scorer": "vader"}}
    assert main(["run", str(write_recipe(tmp_path, block, other)), "--output-dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and message in err[0], err
    assert not runs.exists(), "nothing is written before the input is valid"
