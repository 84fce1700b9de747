"""The gold score beside the learned reward (Gao et al. 2022) and keep_best: gold, on the tiny in-process model, for
PPO and the critic-free family: the gold scorer scores the very rollouts the reward scored; `gold: auto` finds the
preferences stage's scorer behind a reward model; keep_best keeps the policy of the best held-out evaluation, says
when it is not the last, and a resumed run keeps the same one; bad recipes fail with one line."""

from __future__ import annotations

import json
import logging
import math

import pytest
from safetensors.torch import load_file

from common.errors import InputError
from common.tracking import read_metrics
from recipes.cli import main
from recipes.runner import RunOptions, load, run_recipe
from tests.conftest import write_jsonl
from tests.stages.test_grpo import grpo_recipe
from tests.stages.test_ppo_resume import Killed, comparable, run
from tests.stages.test_ppo_training import LETTERS, ppo_recipe, write_prompts, write_recipe

# Minus twice the letters: a gold scorer whose score of any completion is known from the reward's (LETTERS).
MINUS_TWO_LETTERS = {"scorer": "regex", "pattern": "[a-z]", "weight": -2.0}
MINUS_LETTERS = {"scorer": "regex", "pattern": "[a-z]", "weight": -1.0}


def run_stage(tmp_path, recipe: dict, name: str):
    return run_recipe(write_recipe(tmp_path, recipe), RunOptions(overrides=[], output_dir=tmp_path / "runs")
                      ).stage_dir(name)


def check_gold_beside_the_reward(rows: list[dict], steps: int) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        # The same completions, scored by both: gold = -2 x letters exactly (float32 sums of small integers).
        assert r["objective/gold_scores"] == pytest.approx(-2.0 * r["objective/scores"], abs=1e-6)
        assert r["objective/sqrt_kl"] == pytest.approx(math.sqrt(max(r["objective/kl"], 0.0)), abs=1e-9)
        assert r["time/gold"] >= 0.0
    assert any(r["objective/scores"] != 0 for r in rows), "a test of -2 x 0 = 0 would prove nothing"


def test_ppo_logs_the_gold_score_of_its_rollouts_beside_the_reward(tmp_path):
    stage = run_stage(tmp_path, ppo_recipe(tmp_path, {"max_steps": 3}, gold=MINUS_TWO_LETTERS), "ppo")
    rows = read_metrics(stage / "metrics.jsonl")
    check_gold_beside_the_reward(rows, 3)
    done = json.loads((stage / "done.json").read_text())["metrics"]
    assert done["objective/gold_scores"] == rows[-1]["objective/gold_scores"]
    assert done["objective/sqrt_kl"] == rows[-1]["objective/sqrt_kl"]
    assert not any(k.startswith("heldout/") for k in done), "no keep_best, no held-out evaluation"


def test_grpo_logs_the_gold_score_of_its_rollouts_beside_the_reward(tmp_path):
    stage = run_stage(tmp_path, grpo_recipe(tmp_path, {"max_steps": 2}, gold=MINUS_TWO_LETTERS), "grpo")
    check_gold_beside_the_reward(read_metrics(stage / "metrics.jsonl"), 2)


def test_without_a_gold_scorer_nothing_is_logged_for_it(tmp_path):
    stage = run_stage(tmp_path, ppo_recipe(tmp_path, {"max_steps": 1}), "ppo")
    row = read_metrics(stage / "metrics.jsonl")[0]
    assert "objective/gold_scores" not in row and "time/gold" not in row and "objective/sqrt_kl" in row


def chain(tmp_path, prefs_scorer, **ppo) -> dict:
    """sft -> prefs (scored by `prefs_scorer`) -> rm -> ppo and grpo on the reward model (loaded, not run)."""
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    recipe = ppo_recipe(tmp_path, reward={"stage": "rm"}, **ppo)
    recipe["stages"] = {
        "sft": {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0}, "args": {"max_steps": 1}},
        "prefs": {"kind": "preferences", "from": "sft", "data": {"path": "prompts.jsonl"}, "scorer": prefs_scorer},
        "rm": {"kind": "reward_model", "from": "sft", "data": {"stage": "prefs"}, "args": {"max_steps": 1}},
        **recipe["stages"],
        "grpo": grpo_recipe(tmp_path, reward=[{"stage": "rm"}, {"scorer": "length", "weight": 0.01}])["stages"]["grpo"],
    }
    return recipe


def test_gold_auto_is_the_scorer_that_labelled_the_reward_models_preferences(tmp_path):
    recipe, _ = load(write_recipe(tmp_path, chain(tmp_path, LETTERS)), [])
    assert recipe.stages["ppo"].gold == "auto"
    assert recipe.stages["ppo"].gold_spec(recipe) == LETTERS
    assert recipe.stages["grpo"].gold_spec(recipe) == LETTERS, "the reward-model source of a weighted sum"
    off, _ = load(write_recipe(tmp_path, chain(tmp_path, LETTERS)), ["stages.ppo.gold=null"])
    assert off.stages["ppo"].gold_spec(off) is None
    given, _ = load(write_recipe(tmp_path, chain(tmp_path, LETTERS)), ["stages.ppo.gold=vader"])
    assert given.stages["ppo"].gold_spec(given) == "vader"
    # A gold scorer as the reward: objective/scores is the gold score already; auto logs nothing more.
    scored, _ = load(write_recipe(tmp_path, ppo_recipe(tmp_path)), [])
    assert scored.stages["ppo"].gold_spec(scored) is None


KEEP_BEST = {"max_steps": 6, "keep_best": "gold", "keep_best_every": 2, "save_steps": 2, "save_total_limit": 5,
             "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 4, "lr_scheduler_type": "constant"}


def keep_best_recipe(tmp_path, reward=None) -> dict:
    # The policy learns to write letters (the reward) while the gold is minus the letters: the held-out gold falls
    # as training goes on, so the best evaluation comes before the last step.
    recipe = ppo_recipe(tmp_path, KEEP_BEST, reward=reward, gold=MINUS_LETTERS)
    write_prompts(tmp_path / "prompts.jsonl", n=16)
    recipe["stages"]["ppo"]["data"]["test_size"] = 0.25  # 4 held-out prompts, 12 to train on
    return recipe


def test_keep_best_saves_the_best_held_out_policy_and_says_the_last_is_not_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ppo.trainer"):
        stage = run_stage(tmp_path, keep_best_recipe(tmp_path), "ppo")
    rows = read_metrics(stage / "metrics.jsonl")
    evaluated = {r["step"]: r["heldout/gold_scores"] for r in rows if "heldout/gold_scores" in r}
    assert sorted(evaluated) == [2, 4, 6], "every keep_best_every steps and at the last"
    best = max(evaluated, key=lambda s: (evaluated[s], -s))
    assert evaluated[6] < evaluated[best] and best < 6, evaluated
    done = json.loads((stage / "done.json").read_text())["metrics"]
    assert done["heldout/best_step"] == best and done["heldout/best_gold_scores"] == evaluated[best]
    assert done["heldout/last_gold_scores"] == evaluated[6] and done["heldout/last_is_best"] == 0.0
    assert f"the last step is not the best: held-out gold peaked at step {best}" in caplog.text

    # adapter/ is the policy of the best step (as its checkpoint holds it), not the last step's.
    adapter = load_file(stage / "adapter" / "adapter_model.safetensors")
    checkpoint = {s: load_file(stage / "checkpoints" / f"checkpoint-{s}" / "trainable.safetensors") for s in (best, 6)}
    assert all(checkpoint[best][f"policy.{k}"].equal(v) for k, v in adapter.items())
    assert not all(checkpoint[6][f"policy.{k}"].equal(v) for k, v in adapter.items())
    # The last checkpoint carries the best policy too, for --resume.
    assert all(checkpoint[6][f"best.policy.{k}"].equal(v) for k, v in adapter.items())


def test_a_resumed_keep_best_run_keeps_the_uninterrupted_runs_policy(tmp_path):
    reward = {"scorer": "python", "function": "tests.stages.test_ppo_resume:letters_until_killed", "batched": True}
    path = write_recipe(tmp_path, keep_best_recipe(tmp_path, reward=reward))
    whole = run(path, tmp_path / "whole").stage_dir("ppo")
    with pytest.raises(Killed):
        run(path, tmp_path / "killed", kill_at=6)  # in step 6, after checkpoint-4
    stage = run(path, tmp_path / "killed", resume=True).stage_dir("ppo")
    assert comparable(read_metrics(stage / "metrics.jsonl")) == comparable(read_metrics(whole / "metrics.jsonl"))
    assert json.loads((stage / "done.json").read_text())["metrics"] == \
        json.loads((whole / "done.json").read_text())["metrics"]
    a, b = (load_file(s / "adapter" / "adapter_model.safetensors") for s in (whole, stage))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (["stages.ppo.args.keep_best=gold", "stages.ppo.data.test_size=0.25"],
     r"stages.ppo.args.keep_best: gold scores held-out samples with a gold scorer, but none is known here"),
    (["stages.ppo.args.keep_best=gold", "stages.ppo.gold=vader"],
     r"stages.ppo.args.keep_best: gold needs held-out prompts, and data.test_size is 0; set data.test_size"),
    (["stages.ppo.gold={scorer: vaderr}"], r"stages.ppo.gold.scorer: unknown scorer 'vaderr'; did you mean 'vader'"),
    (["stages.ppo.args.keep_best=best"], r"stages.ppo.args.keep_best must be 'last' \| 'gold'"),
    (["stages.ppo.args.keep_best_every=0"], r"stages.ppo.args.keep_best_every must be >= 1, got 0"),
])
def test_bad_gold_and_keep_best_blocks_name_the_key(tmp_path, overrides, message):
    with pytest.raises(InputError, match=message):
        load(write_recipe(tmp_path, ppo_recipe(tmp_path)), overrides)


def test_cli_refuses_keep_best_without_held_out_prompts_with_exit_2_and_writes_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path, grpo_recipe(tmp_path, {"keep_best": "gold"}, gold="vader"))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "stages.grpo.args.keep_best: gold needs held-out prompts" in err[-1]
    assert not (tmp_path / "runs").exists()
