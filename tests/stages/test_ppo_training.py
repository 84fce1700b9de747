"""The PPO stage end to end on the tiny in-process model: a trivially learnable reward rises while the KL stays
bounded, every metric the report reads is logged, the saved policy reloads, a reward-model stage scores the
responses (and initialises the value adapter)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from common.models import load_base_model, resolve_model
from common.sampling import Sampler, SamplingParams, encode_prompts
from common.tracking import read_metrics
from ppo.adapters import OneBaseModel
from preferences.scorers import build_scorer
from recipes.runner import RunOptions, run_recipe
from reward_model.api import HEAD_FILE, RewardModel
from tests.conftest import REPO, sft_rows, write_jsonl
from tests.stages.test_reward_model import marker_pairs
from tests.unit.test_allocator import RETAINED_MIB

TOPICS = ["cats", "rain", "a film", "tea", "the sea", "music", "a city", "books", "trains", "snow", "bread", "stars"]
# Every name the issue and the report rely on, logged at every step.
STEP_METRICS = ["objective/scores", "objective/kl", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
                "val/clipfrac_avg", "val/ratio", "val/num_eos_tokens", "kl/coef", "time/rollout", "time/train",
                "perf/tokens_per_s"]
# The number of lowercase ASCII letters in the response: about 1 in 10 of the tiny model's byte tokens at first.
LETTERS = {"scorer": "regex", "pattern": "[a-z]"}
FAST_ARGS = {"max_steps": 2, "rollout_batch_size": 8, "minibatch_size": 4, "max_new_tokens": 6, "temperature": 1.0,
             "learning_rate": 3.0e-3, "ppo_epochs": 2, "save_steps": 100, "sample_every": 1}


def write_prompts(path, n: int = 12):
    return write_jsonl(path, [{"prompt": f"Write about {TOPICS[i % len(TOPICS)]}."} for i in range(n)])


def ppo_recipe(tmp_path, args: dict | None = None, reward: dict | None = None, **stage) -> dict:
    write_prompts(tmp_path / "prompts.jsonl")
    return {
        "name": "t",
        # float32 on a GPU too (auto would pick bfloat16), so a run follows the same path on every device.
        "model": {"base": "tiny-random-llama", "dtype": "float32", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "stages": {"ppo": {"kind": "ppo", "data": {"path": "prompts.jsonl", "test_size": 0},
                           "reward": reward or LETTERS, "args": FAST_ARGS | (args or {})} | stage},
    }


def write_recipe(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_learnable_reward_rises_with_bounded_kl_and_the_policy_reloads(tmp_path):
    args = {"max_steps": 24, "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 4, "sample_every": 5,
            "lr_scheduler_type": "constant"}
    run = run_recipe(write_recipe(tmp_path, ppo_recipe(tmp_path, args)),
                     RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    stage = run.stage_dir("ppo")
    rows = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    assert all(name in r for r in rows for name in STEP_METRICS)
    scores = [r["objective/scores"] for r in rows]
    kls = [r["objective/kl"] for r in rows]
    # About 0.6 letters in 6 tokens at first (one byte token in ten is a letter), about 3 by the end: over seeds
    # 1-6 the last 4 steps averaged 2.8 to 4.8 letters.
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > 2.0 and last > first + 1.0, scores
    assert kls[0] == 0.0, "the first rollout comes from the reference policy itself"
    assert max(kls) < 15.0, kls  # 6 tokens: the penalty keeps the policy within ~2.5 nats a token

    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 5, 10, 15, 20]
    assert {"prompt", "completion", "score", "kl"} <= set(samples[0])
    done = json.loads((stage / "done.json").read_text())
    assert done["outputs"] == {"adapter": "adapter", "value": "value"}
    assert done["metrics"]["objective/scores"] == scores[-1]

    # The saved policy reloads with plain peft and is the trained one: it writes more letters than the base does.
    assert (stage / "adapter" / "tokenizer.json").is_file()
    base = load_base_model(run.recipe.model, resolve_model("tiny-random-llama"), training=False)
    policy = PeftModel.from_pretrained(base, stage / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(stage / "adapter")
    prompts = encode_prompts(tokenizer, [f"Write about {t}." for t in TOPICS], "topics")
    letters = build_scorer(LETTERS)

    def mean_letters() -> float:
        texts = Sampler(policy, tokenizer, progress=False).sample(prompts, SamplingParams(max_new_tokens=6)).texts
        return sum(letters.score(texts, texts)) / len(texts)

    tuned = mean_letters()
    with policy.disable_adapter():
        untuned = mean_letters()
    assert tuned > untuned + 1.0, (tuned, untuned)


def test_reward_model_stage_scores_responses_and_initialises_the_value(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    write_jsonl(tmp_path / "rm.jsonl", marker_pairs(24, seed=0))
    recipe = ppo_recipe(tmp_path, {"value_model": "separate", "value_init": "reward", "max_steps": 2},
                        reward={"stage": "rm"}, **{"from": "sft"})
    recipe["stages"] = {
        "sft": {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0},
                "args": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no"}},
        "rm": {"kind": "reward_model", "from": "sft", "data": {"path": "rm.jsonl", "test_size": 0},
               "args": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                        "save_strategy": "no", "eval_strategy": "no"}},
        **recipe["stages"],
    }
    run = run_recipe(write_recipe(tmp_path, recipe), RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    stage, rm_dir = run.stage_dir("ppo"), run.stage_dir("rm") / "reward_model"
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2]

    # The scores PPO logged are the reward model's, as its own API computes them on a separate copy.
    samples = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
    standalone = RewardModel.load(rm_dir, run.recipe.model)
    expected = standalone.score([s["prompt"] for s in samples], [s["completion"] for s in samples])
    torch.testing.assert_close(torch.tensor([s["score"] for s in samples]), expected, atol=1e-4, rtol=0)

    # value_init: reward starts the value adapter and head as exact copies of the reward model's LoRA and head.
    model = OneBaseModel.build(run.recipe.model, resolve_model("tiny-random-llama"), None, "separate",
                               torch.device("cpu"), value_from=rm_dir)
    state = model.trainable_state()
    rm_weights = {k: v for k, v in load_file(rm_dir / "adapter_model.safetensors").items() if ".score." not in k}
    value = {k.removeprefix("value."): v for k, v in state.items() if k.startswith("value.")}
    assert value.keys() == rm_weights.keys() and all(torch.equal(value[k], rm_weights[k]) for k in value)
    assert torch.equal(state["value_head.weight"], load_file(rm_dir / HEAD_FILE)["weight"].float())
    # ... and then trained them: the saved value adapter moved away from the reward model's (the reward adapter,
    # attached after it, did not freeze it).
    trained = load_file(stage / "value" / "adapter_model.safetensors")
    assert trained.keys() == rm_weights.keys()
    assert any(not torch.equal(trained[k], rm_weights[k]) for k in trained if "lora_B" in k)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting exists in glibc only")
@pytest.mark.parametrize("release", [True, False])
def test_release_freed_memory_leaves_the_process_returning_freed_tensors_to_the_os(tmp_path, release):
    # The real allocator, in a subprocess (the setting would stay for the rest of the test session): after a PPO stage
    # with release_freed_memory, freed tensors leave the resident set; without it, glibc keeps them (the probe and
    # its numbers: tests/unit/test_allocator.py).
    recipe = write_recipe(tmp_path, ppo_recipe(tmp_path, {"max_steps": 1, "release_freed_memory": release}))
    script = ("from pathlib import Path\nfrom recipes.runner import RunOptions, run_recipe\n"
              f"run_recipe({str(recipe)!r}, RunOptions(overrides=[], output_dir=Path({str(tmp_path / 'runs')!r})))\n"
              + RETAINED_MIB)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    retained = float(out.stdout.strip().splitlines()[-1])
    assert retained < 4 if release else retained > 60, retained