"""Benchmark: does PPO raise the gold reward (VADER sentiment) of SmolLM2-135M over its SFT model on held-out prompts?

    .venv/bin/alignlab run recipes/configs/smollm2-135m/sentiment.yaml --stage sft --run-id eff   # the SFT adapter
    nice -n 10 .venv/bin/python benchmarks/ppo_efficacy.py --run-id eff [--set stages.ppo.args.max_steps=40]

Runs the recipe's `ppo` stage in that run (skipped when already done with the same config; the stages it reads from
must be done: sft, and rm when the reward is {stage: rm}; `--set 'stages.ppo.reward={scorer: vader}'` trains on the
gold reward itself). Then samples `--samples` completions per held-out prompt from the SFT and the PPO policies (two
adapters on one base, the same seeds, the stage's temperature and max_new_tokens), scores them with VADER and prints
the mean gold reward of each, the per-prompt paired difference with a 95% bootstrap CI, KL(PPO || SFT) estimated on
PPO's samples (sum over tokens of log pi_PPO - log pi_SFT), PPO's wall time, and the learned reward
(objective/scores) beside the gold score of the stage's sample table over the steps, to show whether the learned
reward kept rising while the gold fell. Target: +0.25 or more, with the CI excluding zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.generation import generate_responses, truncate_after_eos  # noqa: E402
from common.models import load_base_model, load_tokenizer, resolve_model  # noqa: E402
from common.stats import bootstrap_ci  # noqa: E402
from common.tracking import read_metrics  # noqa: E402
from ppo.rollout import forward_logprobs  # noqa: E402
from ppo.stage import encode_prompts  # noqa: E402
from recipes.runner import RunOptions, load, run_recipe  # noqa: E402
from reward_model.scorers import build_scorer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/configs/smollm2-135m/sentiment.yaml"
HELDOUT = REPO / "recipes/data/sentiment/prompts_heldout.jsonl"


def sample(model, adapter: str, tokenizer, prompts: list, repeats: int, args, batch_size: int):
    """`repeats` completions per prompt from one adapter: (texts [P * repeats], ids, masks, starts) by batch."""
    model.set_adapter(adapter)
    batches, texts = [], []
    rows = [p for p in prompts for _ in range(repeats)]
    for first in range(0, len(rows), batch_size):
        gen = generate_responses(model, tokenizer, [p.ids for p in rows[first:first + batch_size]],
                                 args.max_new_tokens, args.temperature, seed=first)
        response = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts += tokenizer.batch_decode(response.ids, skip_special_tokens=True)
        batches.append((torch.cat([gen.query_ids, response.ids], 1), torch.cat([gen.query_mask, response.mask], 1),
                        gen.response_start))
    return texts, batches


@torch.no_grad()
def kl_on_samples(model, batches, temperature: float) -> float:
    """Mean over PPO's samples of sum_t log pi_PPO - log pi_SFT: the k1 estimate of KL(PPO || SFT)."""
    per_response = []
    for ids, mask, start in batches:
        logps = {}
        for adapter in ("ppo", "sft"):
            model.set_adapter(adapter)
            logps[adapter] = forward_logprobs(model, ids, mask, start, temperature).logprobs
        per_response += (logps["ppo"] - logps["sft"]).sum(1).tolist()
    return float(np.mean(per_response))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--run-id", required=True, help="a run of the recipe whose sft stage is done")
    parser.add_argument("--output-dir", type=Path, help="where runs go (the recipe's output_dir by default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--samples", type=int, default=2, help="completions per held-out prompt and model")
    parser.add_argument("--batch-size", type=int, default=16)
    cli = parser.parse_args()

    recipe, _ = load(cli.recipe, cli.overrides)
    done_file = (cli.output_dir or Path(recipe.output_dir)) / recipe.name / cli.run_id / "ppo" / "done.json"
    before = done_file.read_text() if done_file.is_file() else None
    run = run_recipe(cli.recipe, RunOptions(overrides=cli.overrides, stage="ppo", resume=True, run_id=cli.run_id,
                                            output_dir=cli.output_dir))
    stage, cfg = run.stage_dir("ppo"), run.recipe.stages["ppo"]
    done = json.loads(done_file.read_text())
    print(f"ppo stage: {done['seconds']:.0f} s ({'run now' if done_file.read_text() != before else 'done before'}); "
          f"reward {cfg.reward}, {cfg.args.max_steps} steps of {cfg.args.rollout_batch_size}")

    from peft import PeftModel

    resolved = resolve_model(run.recipe.model.base)
    tokenizer = load_tokenizer(resolved)
    model = PeftModel.from_pretrained(load_base_model(run.recipe.model, resolved, training=False),
                                      run.output(cfg.from_, "adapter"), adapter_name="sft")
    model.load_adapter(stage / "adapter", adapter_name="ppo")
    model.eval()
    records = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines() if line.strip()]
    prompts = encode_prompts(records, tokenizer, str(HELDOUT))
    vader = build_scorer("vader")
    gold, batches = {}, {}
    for adapter in ("sft", "ppo"):
        t0 = time.time()
        texts, batches[adapter] = sample(model, adapter, tokenizer, prompts, cli.samples, cfg.args, cli.batch_size)
        gold[adapter] = np.array(vader.score([""] * len(texts), texts)).reshape(len(prompts), cli.samples).mean(1)
        print(f"{adapter}: {len(texts)} completions in {time.time() - t0:.0f} s, e.g. {texts[0][:100]!r}")
    kl = kl_on_samples(model, batches["ppo"], cfg.args.temperature)

    diff = gold["ppo"] - gold["sft"]
    low, high = bootstrap_ci(diff)
    print(f"\nheld-out gold reward (VADER, {len(prompts)} prompts x {cli.samples}): SFT {gold['sft'].mean():+.3f}, "
          f"PPO {gold['ppo'].mean():+.3f}")
    print(f"PPO - SFT: {diff.mean():+.3f}, 95% bootstrap CI [{low:+.3f}, {high:+.3f}]; KL(PPO || SFT) = {kl:.2f} nats "
          f"per response; PPO wall time {done['seconds']:.0f} s")
    verdict = diff.mean() >= 0.25 and low > 0
    print(f"target (>= +0.25, CI excluding 0): {'met' if verdict else 'NOT met'}")

    metrics = {r["step"]: r for r in read_metrics(stage / "metrics.jsonl") if "objective/scores" in r}
    table: dict[int, list[str]] = {}
    for line in (stage / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        table.setdefault(row["step"], []).append(row["completion"])
    print("\nstep  learned reward (objective/scores)  gold of the sample table (VADER)  objective/kl")
    for step, completions in sorted(table.items()):
        if step in metrics:
            print(f"{step:>4}  {metrics[step]['objective/scores']:>32.3f}  "
                  f"{np.mean(vader.score([''] * len(completions), completions)):>32.3f}  "
                  f"{metrics[step]['objective/kl']:>12.2f}")


if __name__ == "__main__":
    main()
