"""The command line: bad input is one line on stderr, exit code 2, and no run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from recipes.cli import main


def bad_recipe(recipe_file, tmp_path, case: str):
    from tests.conftest import sft_rows, write_jsonl

    path = recipe_file()
    recipe = yaml.safe_load(path.read_text())
    sft = recipe["stages"]["sft"]
    if case == "unknown key":
        sft["args"]["lerning_rate"] = 1e-3
    elif case == "wrong type":
        sft["args"]["max_steps"] = "ten"
    elif case == "missing file":
        sft["data"]["path"] = "missing.jsonl"
    elif case == "empty dataset":
        (tmp_path / "sft.jsonl").write_text("")
    elif case == "row missing a field":
        rows = sft_rows(4)
        del rows[2]["completion"]
        write_jsonl(tmp_path / "sft.jsonl", rows)
    elif case == "unknown stage":
        sft["from"] = "pretrain"
    path.write_text(yaml.safe_dump(recipe))
    return path


CASES = {
    "unknown key": "unknown key 'lerning_rate' at stages.sft.args; did you mean 'learning_rate'?",
    "wrong type": "stages.sft.args.max_steps must be int",
    "missing file": "missing.jsonl: data file not found (stages.sft.data)",
    "empty dataset": "the dataset is empty",
    "row missing a field": "row 3, field 'completion' is missing",
    "unknown stage": "unknown key 'pretrain' at stages.sft",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_no_run_dir(recipe_file, tmp_path, capsys, case):
    path = bad_recipe(recipe_file, tmp_path, case)
    runs = tmp_path / "runs"
    assert main(["run", str(path), "--output-dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: ") and CASES[case] in err[0]
    assert not runs.exists(), "nothing is written before the input is valid"


def test_existing_run_is_refused_and_kept(recipe_file, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "t" / "r1" / "sft").mkdir(parents=True)
    (runs / "t" / "r1" / "sft" / "precious.txt").write_text("x")
    path = recipe_file()
    assert main(["run", str(path), "--output-dir", str(runs), "--run-id", "r1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (runs / "t" / "r1" / "sft" / "precious.txt").read_text() == "x"


def test_stage_flag_names_the_inputs_it_needs(recipe_file, tmp_path, capsys):
    path = recipe_file()
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["sft2"] = {"kind": "sft", "from": "sft", "data": {"path": "sft.jsonl"}}
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--stage", "sft2", "--output-dir", str(tmp_path / "runs")]) == 2
    assert "--stage sft2 needs stage(s) sft done" in capsys.readouterr().err


def test_console_script_exit_code_and_validate(recipe_file, tmp_path):
    exe = [sys.executable, "-m", "recipes.cli"]
    ok = subprocess.run([*exe, "validate", str(recipe_file())], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok (1 stages: sft)" in ok.stdout
    bad = subprocess.run([*exe, "validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "recipe file not found" in bad.stderr


def test_single_stage_run_then_resume_skips_done_stage(recipe_file, tmp_path, capsys):
    path, runs = recipe_file(), tmp_path / "runs"
    common = [str(path), "--output-dir", str(runs), "--run-id", "r", "--set", "stages.sft.args.max_steps=2"]
    assert main(["run", *common, "--stage", "sft"]) == 0
    done = json.loads((runs / "t" / "r" / "sft" / "done.json").read_text())
    assert main(["run", *common, "--resume"]) == 0
    assert "done, skipped" in capsys.readouterr().err
    assert json.loads((runs / "t" / "r" / "sft" / "done.json").read_text()) == done
