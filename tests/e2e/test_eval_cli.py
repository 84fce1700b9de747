"""`alignlab eval mc`, `alignlab eval gen` and `alignlab judge` on the tiny model and a tiny run's SFT adapter."""

from __future__ import annotations

import json

import pytest
import yaml

from recipes.cli import main
from recipes.runner import RunOptions, run_recipe
from tests.conftest import sft_rows, write_jsonl

QUESTIONS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0, "subject": "nature"},
    {"question": "What colour is grass?", "choices": ["blue", "green"], "answer": 1, "subject": "nature"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny run with a finished SFT stage, a prompt file and a question file."""
    root = tmp_path_factory.mktemp("evalcli")
    write_jsonl(root / "sft.jsonl", sft_rows(8))
    write_jsonl(root / "prompts.jsonl", [{"prompt": "What is the colour of the sky?"}, {"prompt": "Hello!"}])
    write_jsonl(root / "mc.jsonl", QUESTIONS)
    write_jsonl(root / "dev.jsonl", QUESTIONS[:1])
    recipe = {"name": "t", "model": {"base": "tiny-random-llama", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
              "stages": {"sft": {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0.0},
                                 "args": {"max_steps": 2, "learning_rate": 1e-2, "save_strategy": "no"}}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = run_recipe(root / "recipe.yaml", RunOptions(overrides=[], output_dir=root / "runs"))
    return root, run.root


def test_eval_gen_on_a_run_stage_against_the_run_base(files, capsys):
    root, run = files
    out = root / "gen"
    assert main(["eval", "gen", "--model", f"{run}:sft", "--model", f"{run}:base", "--reference", f"{run}:base",
                 "--prompts", str(root / "prompts.jsonl"), "--scorer", "{scorer: length, unit: words}",
                 "--samples-per-prompt", "2", "--max-new-tokens", "5", "--output", str(out)]) == 0
    assert "generations" in capsys.readouterr().out
    models = json.loads((out / "results.json").read_text())["models"]
    assert list(models) == ["sft", "base"] and "adapter" in models["sft"]["source"]
    assert models["base"]["gen"]["kl_to_ref"]["mean"] == 0.0 and models["sft"]["gen"]["kl_to_ref"]["mean"] != 0.0
    rows = [json.loads(line) for line in (out / "sft" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["scores"]["gold"] == len(r["completion"].split()) for r in rows)


def test_judge_two_sample_files_then_two_models(files, capsys, tmp_path):
    root, run = files
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"prompt": "Hi", "sample": 0, "completion": "Hello there!"},
                    {"prompt": "Sky?", "sample": 0, "completion": "Blue.", "scores": {"gold": 1.0}}])
    write_jsonl(b, [{"prompt": "Sky?", "sample": 0, "completion": "Green."},
                    {"prompt": "Hi", "sample": 0, "completion": "Go away."},
                    {"prompt": "Unpaired", "sample": 0, "completion": "-"}])
    assert main(["judge", "--a", str(a), "--b", str(b), "--judge-model", "tiny-random-llama",
                 "--output", str(tmp_path / "j.json")]) == 0
    assert "win rate" in capsys.readouterr().out
    result = json.loads((tmp_path / "j.json").read_text())
    # Paired by (prompt, sample), whatever the row order, the unpaired row left out: the verdicts are the judge's on
    # exactly these two pairs, a's answer as answer a.
    from common.models import resolve_model
    from judge import Pair, build_judge, judge_config_from_dict, judge_pairs

    judge = build_judge(judge_config_from_dict({"backend": "local", "local": {
        "model": str(resolve_model("tiny-random-llama").path)}}, "judge"))
    expected = [v.winner for v in judge_pairs(judge, [Pair("Hi", "Hello there!", "Go away."),
                                                      Pair("Sky?", "Blue.", "Green.")])]
    assert (result["wins"], result["ties"], result["losses"]) == tuple(expected.count(w) for w in ("a", "tie", "b"))
    assert result["n"] == 2 and result["vs"] == str(b)

    assert main(["judge", "--a", f"{run}:sft", "--b", f"{run}:base", "--prompts", str(root / "prompts.jsonl"),
                 "--samples-per-prompt", "1", "--max-new-tokens", "4", "--judge-model", "tiny-random-llama",
                 "--output", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 2


def test_eval_mc_with_shots(files, capsys):
    root, _ = files
    assert main(["eval", "mc", "--model", "tiny-random-llama", "--data", str(root / "mc.jsonl"),
                 "--dev", str(root / "dev.jsonl"), "--shots", "1", "--output", str(root / "mc")]) == 0
    assert "multiple choice" in capsys.readouterr().out
    mc = json.loads((root / "mc" / "tiny-random-llama" / "results.json").read_text())["mc"]
    assert mc["n_questions"] == 2 and mc["shots"] == 1


def bad_args(case: str, root, run) -> list[str]:
    if case == "answer out of range":
        write_jsonl(root / "bad.jsonl", [QUESTIONS[0], {**QUESTIONS[1], "answer": 2}])
        return ["eval", "mc", "--model", "tiny-random-llama", "--data", str(root / "bad.jsonl")]
    if case == "shots without dev":
        return ["eval", "mc", "--model", "tiny-random-llama", "--data", str(root / "mc.jsonl"), "--shots", "2"]
    if case == "unfinished stage":
        return ["eval", "gen", "--model", f"{run}:dpo", "--prompts", str(root / "prompts.jsonl")]
    if case == "unknown scorer":
        return ["eval", "gen", "--model", "tiny-random-llama", "--prompts", str(root / "prompts.jsonl"),
                "--scorer", "vadr"]
    if case == "judge without prompts":
        return ["judge", "--a", "tiny-random-llama", "--b", f"{run}:sft"]
    if case == "http judge without endpoint":
        return ["judge", "--a", "a.jsonl", "--b", "b.jsonl", "--judge", "http", "--judge-model", "m"]
    return ["eval", "gen", "--model", "tiny-random-llama", "--prompts", str(root / "prompts.jsonl"),
            "--samples-per-prompt", "0"]


CASES = {
    "answer out of range": "bad.jsonl, line 2: 'answer' 2 is out of range for 2 choices",
    "shots without dev": "2-shot prompts need dev examples",
    "unfinished stage": "no finished stage 'dpo' in this run (finished: sft, or 'base')",
    "unknown scorer": "--scorer",
    "judge without prompts": "tiny-random-llama is a model, so it needs --prompts",
    "http judge without endpoint": "--judge http needs --base-url",
    "no samples": "--samples-per-prompt must be >= 1, got 0",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(files, capsys, case):
    root, run = files
    assert main(bad_args(case, root, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and CASES[case] in err[0], err
