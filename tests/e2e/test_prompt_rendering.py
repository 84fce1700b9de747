"""One prompt record (a text, a chat message, a multi-turn conversation) reaches every stage that samples the same
way: the preferences stage's scorer, PPO's reward, the eval stage's scorer and its samples (which the judge reads)
all see `common.sampling.scorer_text` of the record, and every stage's model input is `encode_prompt` of it."""

from __future__ import annotations

import json

import yaml

from common.models import load_tokenizer, resolve_model
from common.sampling import encode_prompt, scorer_text
from ppo.trainer import rollout_prompts
from recipes.runner import RunOptions, run_recipe
from tests.conftest import sft_rows, write_jsonl

RECORDS = [
    "Review the film Alien.",
    [{"role": "user", "content": "Review the film Heat."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Review Up."},
     {"role": "assistant", "content": "Which one?"}, {"role": "user", "content": "The 2009 one."}],
]
SEEN: dict[str, list[str]] = {"prefs": [], "ppo": [], "eval": []}


def _recorder(stage: str):
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        SEEN[stage] += prompts
        return [float(len(c)) for c in completions]  # lengths differ, so preference pairs form
    return score


seen_by_prefs, seen_by_ppo, seen_by_eval = _recorder("prefs"), _recorder("ppo"), _recorder("eval")


def scorer(stage: str) -> dict:
    return {"scorer": "python", "function": f"tests.e2e.test_prompt_rendering:seen_by_{stage}", "batched": True}


def test_a_record_renders_the_same_in_every_stage(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r} for r in RECORDS])
    recipe = {
        "name": "t",
        "model": {"base": "tiny-random-llama", "dtype": "float32", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "stages": {
            "sft": {"kind": "sft", "data": {"path": "sft.jsonl", "test_size": 0.0},
                    "args": {"max_steps": 1, "save_strategy": "no"}},
            "prefs": {"kind": "preferences", "from": "sft", "data": {"path": "prompts.jsonl", "test_size": 0.0},
                      "scorer": scorer("prefs"), "samples_per_prompt": 2, "max_new_tokens": 6},
            "ppo": {"kind": "ppo", "from": "sft", "data": {"path": "prompts.jsonl", "test_size": 0.0},
                    "reward": scorer("ppo"), "gold": None,
                    "args": {"max_steps": 1, "rollout_batch_size": 3, "minibatch_size": 3,
                             "gradient_accumulation_steps": 1, "max_new_tokens": 6, "save_steps": 1}},
            "eval": {"kind": "eval", "models": ["base", "sft", "ppo"],
                     "generation": {"prompts": {"path": "prompts.jsonl"}, "samples_per_prompt": 1,
                                    "max_new_tokens": 6, "scorer": scorer("eval"), "reference": "sft"},
                     "judge": {"baseline": "sft", "local": {"batch_size": 4}}},
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for seen in SEEN.values():
        seen.clear()
    run = run_recipe(tmp_path / "recipe.yaml", RunOptions(overrides=[], output_dir=tmp_path / "runs"))

    expected = {scorer_text(r) for r in RECORDS}
    assert "system: You are terse.\nuser: Review Up.\nassistant: Which one?\nuser: The 2009 one." in expected
    assert {stage: set(seen) for stage, seen in SEEN.items()} == {stage: expected for stage in SEEN}
    # The judge reads the prompts the eval stage wrote beside each answer.
    rows = [json.loads(line) for line in (run.stage_dir("eval") / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert {row["prompt"] for row in rows} == expected
    # Model input: the chat template with the whole conversation and the assistant turn opened, in every stage.
    tokenizer = load_tokenizer(resolve_model("tiny-random-llama"))
    assert [p.ids for p in rollout_prompts(tokenizer, RECORDS, "prompts")] == \
        [encode_prompt(tokenizer, r, "prompts") for r in RECORDS]
    text = tokenizer.decode(encode_prompt(tokenizer, RECORDS[2], "prompts"))
    assert text.index("You are terse.") < text.index("Which one?") < text.index("The 2009 one.")
