"""Shipped recipes end to end on the tiny in-process model.

- The default recipe's `quick-qlora` profile: every stage (SFT, preference sampling, reward model, DPO, PPO, eval)
  runs over a 4-bit base, on the CPU (bitsandbytes >= 0.49 has CPU kernels).
- The GPU recipes (hub model and hub data) with the tiny model and local files whose rows are shaped like their hub
  datasets' (UltraChat's `messages`; UltraFeedback's `prompt` text with `chosen` / `rejected` chats that repeat it),
  so that everything but the download and the size is exercised offline.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import bitsandbytes as bnb
import pytest
from safetensors.torch import load_file

from recipes import stages
from recipes.runner import RunOptions, run_recipe
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes/configs"


def test_every_stage_of_the_quick_qlora_chain_runs_through_4bit_layers(tmp_path, monkeypatch):
    # Count the 4-bit layers' forward passes per stage: a stage that quietly loaded the base in float32 would run
    # none. Every stage loads its own model, so this checks each of them, not only the first.
    forwards: Counter[str] = Counter()
    current = {"stage": None}
    linear4bit_forward = bnb.nn.Linear4bit.forward

    def counting_forward(self, *args, **kwargs):
        forwards[current["stage"]] += 1
        return linear4bit_forward(self, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", counting_forward)
    for kind, entry in stages.STAGE_KINDS.items():
        def train(cfg, ctx, _train=entry.train):
            current["stage"] = ctx.name
            return _train(cfg, ctx)

        monkeypatch.setitem(stages.STAGE_KINDS, kind, entry._replace(train=train))

    run = run_recipe(CONFIGS / "smollm2-135m/sentiment.yaml",
                     RunOptions(overrides=["profile=quick-qlora"], output_dir=tmp_path, run_id="q"))

    names = list(run.recipe.stages)
    assert names == ["sft", "prefs", "rm", "dpo-beta0p1", "dpo-beta0p5", "ppo", "eval"]
    assert run.recipe.model.quantization == "4bit" and run.recipe.model.base == "tiny-random-llama"
    assert all(run.is_done(name) for name in names)
    assert set(forwards) == set(names) and all(forwards[name] > 0 for name in names), forwards
    # The trained stages save LoRA adapters only, never the (quantized) base weights.
    for name in ("sft", "dpo-beta0p1", "dpo-beta0p5", "ppo"):
        saved = load_file(run.stage_dir(name) / "adapter" / "adapter_model.safetensors")
        assert saved and all("lora_" in key for key in saved), name
    assert (run.root / "report.html").is_file()


def hub_shaped_rows(tmp_path: Path) -> tuple[Path, Path]:
    """Local stand-ins for HuggingFaceH4/ultrachat_200k and HuggingFaceH4/ultrafeedback_binarized, column for
    column (their dataset cards)."""
    qa = [("What is the capital of France?", "Paris."), ("How many legs does a spider have?", "Eight."),
          ("Name a prime number above 10.", "Eleven."), ("What colour is a clear sky?", "Blue.")]
    chats = []
    for i in range(16):
        q, a = qa[i % 4]
        turns = [{"content": q, "role": "user"}, {"content": a, "role": "assistant"},
                 {"content": "And why?", "role": "user"}, {"content": f"Because: {a}", "role": "assistant"}]
        chats.append({"prompt": q, "prompt_id": f"c{i}", "messages": turns[:2 + 2 * (i % 2)]})
    pairs = []
    for i in range(16):
        q, a = qa[i % 4][0] + f" ({i})", qa[i % 4][1]
        chosen = [{"content": q, "role": "user"}, {"content": a, "role": "assistant"}]
        rejected = [{"content": q, "role": "user"}, {"content": "No idea." * (1 + i % 3), "role": "assistant"}]
        pairs.append({"prompt": q, "prompt_id": f"p{i}", "chosen": chosen, "rejected": rejected, "messages": chosen,
                      "score_chosen": 8.0, "score_rejected": float(2 + i % 3)})
    return write_jsonl(tmp_path / "ultrachat.jsonl", chats), write_jsonl(tmp_path / "ultrafeedback.jsonl", pairs)


@pytest.mark.parametrize("recipe", ["smollm2-1.7b/ultrafeedback.yaml", "qwen2.5-1.5b/ultrafeedback.yaml"])
def test_gpu_recipe_chain_runs_on_the_tiny_model_with_hub_shaped_rows(recipe, tmp_path):
    chats, pairs = hub_shaped_rows(tmp_path)
    overrides = [
        "model.base=tiny-random-llama",
        f"stages.sft.data={{path: {chats}, test_size: 0.25}}",
        f"stages.prefs.data={{path: {pairs}, test_size: 0.25}}",
        *(f"stages.{s}.args.max_steps=1" for s in ("sft", "rm", "dpo", "ppo")),
        "stages.ppo.args.rollout_batch_size=4", "stages.ppo.args.minibatch_size=2",
        "stages.ppo.args.gradient_accumulation_steps=1", "stages.ppo.args.max_new_tokens=8",
        "stages.eval.generation.max_new_tokens=8", "stages.eval.generation.prompts.limit=2",
        f"stages.eval.mc.data={{path: {REPO / 'recipes/data/mc'}, limit: 4}}",
    ]
    run = run_recipe(CONFIGS / recipe, RunOptions(overrides=overrides, output_dir=tmp_path / "runs", run_id="h"))

    assert all(run.is_done(name) for name in ["sft", "prefs", "rm", "dpo", "ppo", "eval"])
    # The pairs lose the prompt copy at the head of chosen / rejected and keep the ratings as gold scores.
    first = json.loads((run.stage_dir("prefs") / "data" / "train.jsonl").read_text().splitlines()[0])
    assert first["prompt"][0]["role"] == "user" and [m["role"] for m in first["chosen"]] == ["assistant"]
    assert first["score_chosen"] == 8.0
    assert "eval/gold_accuracy" in json.loads((run.stage_dir("rm") / "done.json").read_text())["metrics"]
    results = json.loads((run.stage_dir("eval") / "results.json").read_text())["models"]
    assert set(results) == {"base", "sft", "dpo", "ppo"}
