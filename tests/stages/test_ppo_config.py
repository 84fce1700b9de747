"""The PPO stage's recipe block is checked when the recipe loads: each mistake is one InputError line naming the key
and the fix, and the CLI exits with code 2 before anything is written."""

from __future__ import annotations

import pytest

from common.errors import InputError
from recipes.cli import main
from recipes.runner import load
from tests.conftest import write_jsonl
from tests.stages.test_ppo_training import ppo_recipe, write_recipe


def test_the_test_recipe_loads_with_typed_defaults(tmp_path):
    recipe, _ = load(write_recipe(tmp_path, ppo_recipe(tmp_path)), ["stages.ppo.args.kl_coef=1e-2"])
    args = recipe.stages["ppo"].args
    assert args.kl_coef == 0.01 and args.kl_estimator is None and args.micro_batch_size == 2
    # Unset, the estimator follows where the KL goes: k1 in the reward, k2 in the loss (ppo/kl.py says why).
    assert args.kl_estimator_used == "k1"
    in_loss, _ = load(write_recipe(tmp_path, ppo_recipe(tmp_path)), ["stages.ppo.args.kl_in_reward=false"])
    assert in_loss.stages["ppo"].args.kl_estimator_used == "k2"


@pytest.mark.parametrize("overrides, message", [
    (["stages.ppo.args.minibatch_size=3"], r"minibatch_size \(3\) must divide rollout_batch_size \(8\)"),
    (["stages.ppo.args.gradient_accumulation_steps=3"], r"gradient_accumulation_steps \(3\) must divide"),
    (["stages.ppo.args.kl_coeff=0.1"], r"unknown key 'kl_coeff' at stages.ppo.args; did you mean 'kl_coef'"),
    (["stages.ppo.args.kl_estimator=k4"], r"stages.ppo.args.kl_estimator must be 'k1' \| 'k2' \| 'k3'"),
    (["stages.ppo.args.kl_in_reward=false", "stages.ppo.args.kl_estimator=k1"],
     r"stages.ppo.args.kl_estimator: k1 with kl_in_reward: false .* gradient averages to zero on-policy"),
    (["stages.ppo.args.temperature=0"], r"stages.ppo.args.temperature must be > 0"),
    (["stages.ppo.args.lam=1.5"], r"stages.ppo.args.lam must be in \[0, 1\]"),
    (["stages.ppo.args.kl_ceiling=-1"], r"kl_ceiling must be > 0 \(or null"),
    (["stages.ppo.args.value_init=reward"], r"value_init: reward copies the reward model's adapter .* value_model"),
    (["stages.ppo.args.value_init=reward", "stages.ppo.args.value_model=separate"],
     r"value_init: reward copies a reward model, but the reward is a gold scorer"),
    (["stages.ppo.args.value_init=reward", "stages.ppo.args.value_model=separate",
      "stages.ppo.args.normalize_scores=true"],
     r"value_init: reward starts the value head at the reward model's raw scores, but normalize_scores: true"),
    (["stages.ppo.reward={scorer: vaderr}"], r"unknown scorer 'vaderr'; did you mean 'vader'"),
    (["stages.ppo.reward={stage: nowhere}"], r"unknown key 'nowhere' at stages.ppo \(a from:/data.stage reference"),
    (["stages.ppo.reward=null"], r"stages.ppo needs a reward block"),
    (["model.lora=null"], r"PPO keeps one base model and trains LoRA adapters on it, but model.lora is null"),
])
def test_bad_recipes_name_the_key_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(InputError, match=message):
        load(write_recipe(tmp_path, ppo_recipe(tmp_path)), overrides)


def test_reward_stage_must_be_a_reward_model(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    recipe = ppo_recipe(tmp_path, reward={"stage": "sft"})
    recipe["stages"]["sft"] = {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0}, "args": {"max_steps": 1}}
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(InputError, match=r"stage 'sft' is a 'sft' stage; name a stage of kind reward_model"):
        load(path, [])
    with pytest.raises(InputError, match=r"\{stage: \.\.\.\} takes no other keys, got \['scorer'\]"):
        load(path, ["stages.ppo.reward.scorer=vader"])


def test_cli_rejects_a_bad_prompt_row_with_exit_code_2_and_writes_nothing(tmp_path, capsys):
    path = write_recipe(tmp_path, ppo_recipe(tmp_path))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write about cats."}, {"prompt": "  "}])
    code = main(["run", str(path), "--output-dir", str(tmp_path / "runs")])
    assert code == 2
    assert "prompts.jsonl: row 2, field 'prompt' is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
