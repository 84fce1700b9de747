"""Online DPO on the tiny model: each round samples from the previous round's policy (round 2 from round 1's adapter,
which moved away from the SFT adapter), keeps its samples, pairs, metrics and adapter in rounds/round-<r>/; bad
blocks fail at load with one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.models import load_for_inference, load_tokenizer, resolve_model
from common.sampling import Sampler, SamplingParams, as_messages, encode_prompts
from common.tracking import read_metrics
from recipes.cli import main
from recipes.runner import RunOptions, run_recipe
from tests.conftest import write_jsonl
from tests.stages.test_ppo_training import TOPICS

ONLINE = {"kind": "online_dpo", "from": "sft", "data": {"path": "prompts.jsonl", "test_size": 0}, "rounds": 2,
          "prompts_per_round": 6, "samples_per_prompt": 4, "max_new_tokens": 6,
          "labeller": {"kind": "gold", "scorer": {"scorer": "regex", "pattern": "[a-z]"}},
          "args": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "beta": 0.1,
                   "logging_steps": 1, "save_strategy": "no"}}


def online_recipe(recipe_file, tmp_path, **changes):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write about {t}."} for t in TOPICS])
    path = recipe_file()
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["sft"]["args"]["max_steps"] = 2
    recipe["stages"]["online"] = ONLINE | changes
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def lora(directory) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_round_two_samples_from_the_round_one_policy(recipe_file, tmp_path):
    run = run_recipe(online_recipe(recipe_file, tmp_path), RunOptions(overrides=[], output_dir=tmp_path / "runs"))
    stage, sft = run.stage_dir("online"), run.stage_dir("sft") / "adapter"
    rounds = [stage / "rounds" / f"round-{r}" for r in (1, 2)]
    for r in rounds:
        assert {p.name for p in r.iterdir()} >= {"samples.jsonl", "pairs.jsonl", "metrics.jsonl", "adapter",
                                                "done.json"}
        assert read_metrics(r / "metrics.jsonl"), "the round's DPO training metrics"
    assert [row["step"] for row in read_metrics(stage / "metrics.jsonl")] == [1, 2]
    first = lora(rounds[0] / "adapter")
    assert any(not torch.equal(first[k], v) for k, v in lora(sft).items()), "round 1 trained the policy"
    final = lora(stage / "adapter")
    assert all(torch.equal(final[k], v) for k, v in lora(rounds[1] / "adapter").items())

    # Round 2's completions are exactly what the round-1 policy samples with round 2's seed and prompts (and not
    # what the SFT policy would have).
    groups = [json.loads(line) for line in (rounds[1] / "samples.jsonl").read_text().splitlines()]
    messages = [as_messages(g["prompt"], "user") for g in groups]
    resolved = resolve_model(run.recipe.model.base)

    def resample(adapter) -> list[list[str]]:
        model, tokenizer = load_for_inference(run.recipe.model, resolved, adapter), load_tokenizer(resolved)
        params = SamplingParams(max_new_tokens=6, n=4, seed=run.recipe.seed + 2)
        samples = Sampler(model, tokenizer).sample(encode_prompts(tokenizer, messages, "round 2"), params)
        return [[c.text for c in group] for group in samples.grouped()]

    assert resample(rounds[0] / "adapter") == [g["completions"] for g in groups]
    assert resample(sft) != [g["completions"] for g in groups]
    pairs = [json.loads(line) for line in (rounds[1] / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["score_chosen"] > p["score_rejected"] for p in pairs)


@pytest.mark.parametrize("changes, message", [
    ({"rounds": 0}, "stages.online.rounds must be >= 1, got 0"),
    ({"from": None}, "stages.online.from: online DPO starts from a policy adapter"),
    ({"labeller": {"kind": "reward_model", "stage": "sft"}}, "stage 'sft' is a 'sft' stage"),
    ({"labeller": {"kind": "gold"}}, "stages.online.labeller: kind gold forms pairs by a gold scorer"),
])
def test_bad_online_blocks_exit_2_before_anything_runs(recipe_file, tmp_path, capsys, changes, message):
    path = online_recipe(recipe_file, tmp_path, **changes)
    assert main(["run", str(path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
