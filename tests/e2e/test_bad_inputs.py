"""Bad inputs a new user makes, each refused through the command line before anything runs: exit code 2, one line on
stderr naming the file, line, row or key, and nothing written."""

from __future__ import annotations

import errno
import json
import shlex
from pathlib import Path

import pytest
import yaml

from recipes.cli import main
from tests.conftest import sft_rows, write_jsonl


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alignlab: error: "), err[-5:]
    return err[0][len("alignlab: error: "):]


def edit(path: Path, change) -> Path:
    recipe = yaml.safe_load(path.read_text())
    change(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def dpo_reading_sft(recipe: dict) -> None:
    recipe["stages"]["dpo"] = {"kind": "dpo", "from": "sft", "data": {"stage": "sft"}}


def sft_reading_prefs(recipe: dict) -> None:
    recipe["stages"]["prefs"] = {"kind": "preferences", "source": "policy", "from": "sft", "scorer": "vader",
                                 "data": {"path": "sft.jsonl"}}
    recipe["stages"]["sft2"] = {"kind": "sft", "data": {"stage": "prefs"}}


# case -> (how to break the recipe in tmp_path, extra --set overrides, the one line expected after "error: ")
CASES = {
    "duplicate key": (lambda d, p: p.write_text("seed: 1\n" + "\n" * 20 + p.read_text() + "seed: 7\n"), [],
                      r"recipe\.yaml: key 'seed' is given twice in one mapping, on line 1 and line 41; keep one$"),
    "max_steps negative": (None, ["stages.sft.args.max_steps=-5"],
                           r"recipe: stages\.sft\.args\.max_steps must be -1 \(not set\) or a number > 0, got -5"),
    "max_steps zero": (None, ["stages.sft.args.max_steps=0"], r"max_steps must be -1 \(not set\) or a number > 0"),
    "negative rate": (None, ["stages.sft.args.learning_rate=-0.001"],
                      r"stages\.sft\.args\.learning_rate must be a number >= 0, got -0\.001"),
    "lora r 0": (None, ["model.lora.r=0"], r"recipe\.yaml: model\.lora: r must be a positive rank, got 0"),
    "jsonl line not JSON": (lambda d, p: (d / "sft.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in sft_rows(4)) + '{"prompt": oops}\n'), [],
        r"sft\.jsonl: line 5 is not JSON \(Expecting value at column 12\) \(stages\.sft\.data\); fix or remove "
        r"that line$"),
    "data not UTF-8": (lambda d, p: (d / "sft.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), [],
                       r"sft\.jsonl: line 2, column 14: byte b'\\xe9' is not valid UTF-8 \(stages\.sft\.data\); "
                       r"save the file as UTF-8$"),
    "malformed --set": (None, ["stages.sft.args.max_steps=[1,"],
                        r"^--set 'stages\.sft\.args\.max_steps=\[1,': the value is not valid YAML"),
    "model.base missing path": (None, ["model.base=./no-such-model"],
                                r"recipe\.yaml: model\.base: model '.*/no-such-model': no such model directory"),
    "model.base offline hub id": (None, ["model.base=nobody/no-model"],
                                  r"model\.base: model 'nobody/no-model' is not a local directory, not in the hub "
                                  r"cache, and the hub cannot be reached"),
    "model.base not a model": (lambda d, p: (d / "notes").mkdir(), ["model.base=notes"],
                               r"model\.base: model '.*/notes': the directory has no config\.json"),
    "data.stage writes no data": (lambda d, p: edit(p, dpo_reading_sft), [],
                                  r"stages\.dpo\.data\.stage names 'sft', a sft stage, which writes no data"),
    "data.stage wrong shape": (lambda d, p: edit(p, sft_reading_prefs), [],
                               r"stages\.sft2\.data\.stage names 'prefs', which writes preference records, but a sft "
                               r"stage reads sft records"),
}


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(recipe_file, tmp_path, capsys, case, command):
    import re

    path = recipe_file()
    breaks, overrides, expected = CASES[case]
    if breaks:
        breaks(tmp_path, path)
    runs = tmp_path / "runs"
    extra = ["--output-dir", str(runs)] if command == "run" else []
    assert main([command, str(path), *extra, *(a for o in overrides for a in ("--set", o))]) == 2
    assert re.search(expected, one_error_line(capsys))
    assert not runs.exists()


def test_output_dir_naming_a_file_is_refused_and_the_file_kept(recipe_file, tmp_path, capsys):
    taken = tmp_path / "runs.txt"
    taken.write_text("notes")
    assert main(["run", str(recipe_file()), "--output-dir", str(taken)]) == 2
    assert one_error_line(capsys) == (f"{taken} is a file, not a directory; runs are written into {taken}/t/<run-id>/: "
                                      "give --output-dir (or output_dir) a directory")
    assert taken.read_text() == "notes"


def test_relative_model_base_is_relative_to_the_recipe_file(recipe_file, tiny_model_dir, tmp_path, monkeypatch,
                                                            capsys):
    """The one rule of every path in a recipe: a model directory beside the recipe is found from any directory."""
    import shutil

    from recipes.runner import load

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    path = recipe_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe, _ = load(path, ["model.base=models/tiny"])
    assert recipe.model.base == str(tmp_path / "models" / "tiny")
    (elsewhere / "models").mkdir()  # a directory of that name in the working directory does not win
    assert load(path, ["model.base=./models/tiny"])[0].model.base == str(tmp_path / "models" / "tiny")


def test_stage_without_its_inputs_writes_nothing_and_its_command_works(recipe_file, tmp_path, capsys):
    path = edit(recipe_file(), lambda r: r["stages"].__setitem__(
        "sft2", {"kind": "sft", "from": "sft", "data": {"path": "sft.jsonl", "test_size": 0.25},
                 "args": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no"}}))
    runs = tmp_path / "runs"
    common = ["--set", "stages.sft.args.max_steps=1", "--output-dir", str(runs)]
    assert main(["run", str(path), "--stage", "sft2", *common, "--run-id", "r"]) == 2
    line = one_error_line(capsys)
    assert not runs.exists(), "no run directory is left behind"
    first = shlex.join(["alignlab", "run", str(path), "--set", "stages.sft.args.max_steps=1", "--stage", "sft",
                        "--output-dir", str(runs), "--run-id", "r"])
    assert line == (f"--stage sft2 needs stage(s) sft done, and a new run has none; run them first: {first}, then "
                    "this command with --resume --run-id r")
    assert main(shlex.split(first)[1:]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--stage", "sft2", *common, "--run-id", "r", "--resume"]) == 0
    assert (runs / "t" / "r" / "sft2" / "done.json").is_file()


def test_judge_checks_its_model_before_sampling(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import eval.stage

    def never(*args, **kwargs):
        raise AssertionError("answers were sampled before the judge model was checked")

    monkeypatch.setattr(eval.stage, "evaluate_models", never)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    assert main(["judge", "--a", str(tiny_model_dir), "--b", "tiny-random-llama", "--prompts", str(prompts),
                 "--judge-model", str(tmp_path / "no-judge")]) == 2
    assert one_error_line(capsys) == (f"alignlab judge --judge-model: model '{tmp_path / 'no-judge'}': no such model "
                                      "directory; fix the path (relative to the recipe file), or use a hub id "
                                      "(org/name) or 'smollm2-135m-instruct'")


def test_full_disk_while_writing_the_report_exits_3_and_leaves_no_torn_report(tmp_path, capsys, monkeypatch):
    import os

    run = tmp_path / "runs" / "t" / "r"
    (run / "sft").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"recipe": "t"}))
    (run / "recipe.yaml").write_text("name: t\n")
    out = tmp_path / "report.html"
    out.write_text("the previous report")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["report", str(run), "-o", str(out)]) == 3
    assert one_error_line(capsys) == (f"disk full while writing the report {out}: free space, then write it again "
                                      "(alignlab report RUN... -o FILE)")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert out.read_text() == "the previous report", "the old report is kept whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "runs"], "no temporary file is left"
