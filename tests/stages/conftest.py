"""Fixtures the stage tests share."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import write_jsonl

PROMPTS = [{"prompt": "What is the colour of the sky?"}, {"prompt": "Write a happy review of 'Heat'."},
           {"prompt": [{"role": "user", "content": "What is the colour of grass?"}]}]
QUESTIONS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0, "subject": "nature"},
    {"question": "What colour is grass?", "choices": ["blue", "green"], "answer": 1, "subject": "nature"},
    {"question": "2 + 2?", "choices": ["3", "4", "5", "6"], "answer": "B", "subject": "math"},
]
EVAL = {
    "kind": "eval",
    "models": ["base", "sft"],
    "generation": {"prompts": {"path": "prompts.jsonl"}, "samples_per_prompt": 2, "max_new_tokens": 6,
                   "token_budget": 512, "scorer": "vader", "reference": "base"},
    "mc": {"data": {"path": "mc.jsonl"}},
    "judge": {"baseline": "sft", "local": {"batch_size": 4}},
}


@pytest.fixture
def eval_recipe(recipe_file, tmp_path):
    def make(questions=QUESTIONS, prompts=PROMPTS, **changes):
        path = recipe_file()
        write_jsonl(tmp_path / "prompts.jsonl", prompts)
        write_jsonl(tmp_path / "mc.jsonl", questions)
        recipe = yaml.safe_load(path.read_text())
        recipe["stages"]["sft"]["args"]["max_steps"] = 2
        recipe["stages"]["eval"] = {**EVAL, **changes}
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return make
