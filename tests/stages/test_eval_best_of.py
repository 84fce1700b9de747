"""Best-of-N as an eval-time model: the eval stage samples N completions of the policy per answer, keeps the one the
reward scores highest and reports the KL bound beside its sampled estimate; a bad best_of entry fails at load."""

from __future__ import annotations

import json
import math

import pytest

from common.tracking import read_metrics
from recipes.cli import main
from recipes.runner import RunOptions, run_recipe
from tests.stages.conftest import EVAL

LETTERS = {"scorer": "regex", "pattern": "[a-z]"}


def test_best_of_n_is_evaluated_beside_its_policy(eval_recipe, tmp_path):
    generation = {**EVAL["generation"], "scorer": LETTERS, "reference": "sft"}
    path = eval_recipe(models=["sft"], mc=None, judge=None, generation=generation,
                       best_of=[{"policy": "sft", "reward": "gold", "n": 4}])
    stage = run_recipe(path, RunOptions(overrides=[], output_dir=tmp_path / "runs")).stage_dir("eval")
    models = json.loads((stage / "results.json").read_text())["models"]
    assert list(models) == ["sft", "best_of_4_sft"]
    best = models["best_of_4_sft"]["gen"]
    assert best["best_of"]["n"] == 4 and best["best_of"]["policy"] == "sft"
    assert abs(best["best_of"]["kl_bound"] - (math.log(4) - 0.75)) < 1e-9
    assert 0 <= best["best_of"]["kl_estimate"] <= best["best_of"]["kl_bound"] + 1e-9
    # Best-of-N of the reference stands on the reward-KL frontier at its estimated KL.
    assert best["kl_to_ref"] == {"mean": best["best_of"]["kl_estimate"], "ci": None}
    assert best["gold_reward"]["n"] == models["sft"]["gen"]["gold_reward"]["n"], "as many answers as the policy"
    rows = [json.loads(line) for line in (stage / "best_of_4_sft" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == best["gold_reward"]["n"] and all(r["scores"]["kl"] is None for r in rows)
    metrics = read_metrics(stage / "metrics.jsonl")[0]
    assert metrics["eval/best_of_4_sft/best_of/kl_bound"] == best["best_of"]["kl_bound"]


@pytest.mark.parametrize("entry, message", [
    ({"policy": "sft", "reward": "gold", "n": 0}, "stages.eval.best_of[0].n must be >= 1, got 0"),
    ({"policy": "sft", "reward": "sft", "n": 4}, "stages.eval.best_of[0].reward: 'sft' is not a reward_model stage"),
    ({"policy": "nope", "reward": "gold"}, "unknown key 'nope' at stages.eval (a from:/data.stage reference"),
    ({"policy": "sft", "reward": "gold", "name": "sft"}, "the model name 'sft' is taken"),
])
def test_a_bad_best_of_entry_exits_2_before_anything_runs(eval_recipe, tmp_path, capsys, entry,
                                                          message):
    path = eval_recipe(models=["sft"], mc=None, judge=None, best_of=[entry])
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
