"""Benchmarks for the DPO stage; prints figures, asserts nothing.

speed: the DPO stage's step time with `precompute_ref_log_probs` off and on, and the peak RSS of LoRA-DPO whose
reference is a frozen adapter (what the stage does) next to the same LoRA-DPO holding a separate full reference
model (the base with the SFT adapter merged in). Every configuration runs in its own process, for a clean peak
RSS, on the same SFT adapter and the same preference pairs (the shipped SFT reviews, each paired with the next
row's review).

    nice -n 10 .venv/bin/python benchmarks/dpo.py speed [--model smollm2-135m-instruct] [--steps 8] [--batch 4]

efficacy: runs the default recipe's sft -> prefs -> dpo chain (every swept beta) and samples on the held-out
prompts from SFT and from each DPO adapter, on one base in memory. Prints the mean gold VADER reward per model,
DPO - SFT with a paired bootstrap CI over prompts, and KL(DPO || SFT) per completion, estimated on DPO's own
samples as the mean of sum_t [log pi_dpo(y_t) - log pi_sft(y_t)] (unbiased for the sequence-level KL).

    nice -n 10 .venv/bin/python benchmarks/dpo.py efficacy [--set KEY=VALUE ...] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "configs" / "smollm2-135m" / "sentiment.yaml"
SENTIMENT = REPO / "recipes" / "data" / "sentiment"


# --- speed ------------------------------------------------------------------------------------------

class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward and update of one batch), and the largest resident set
    seen at a step's end (the process's peak RSS may come from loading the model instead)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.train_rss_mb = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.train_rss_mb = max(self.train_rss_mb, current_rss_mb())


def current_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def write_speed_recipe(workdir: Path, model: str, steps: int, batch: int, pairs: int) -> Path:
    rows = [json.loads(line) for line in (SENTIMENT / "sft.jsonl").read_text().splitlines()]
    with open(workdir / "pairs.jsonl", "w") as f:
        for a, b in zip(rows[:pairs], rows[1:pairs + 1], strict=True):
            f.write(json.dumps({"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}) + "\n")
    recipe = {
        "name": "dpo-speed",
        "model": {"base": model, "dtype": "float32", "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "stages": {
            "sft": {"kind": "sft", "data": {"path": str(SENTIMENT / "sft.jsonl"), "test_size": 0},
                    "args": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no"}},
            "dpo": {"kind": "dpo", "from": "sft", "data": {"path": "pairs.jsonl", "test_size": 0},
                    "args": {"max_steps": steps, "per_device_train_batch_size": batch, "max_length": 256,
                             "learning_rate": 5.0e-5, "logging_steps": 1, "save_strategy": "no"}},
        },
    }
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def full_copy_trainer(cfg, ctx, callbacks):
    """What the stage avoids: the same LoRA policy, but the reference a second full model in memory."""
    from trl import DPOTrainer

    from common.data import load_splits
    from common.models import load_for_inference, load_tokenizer, load_trainable_model, resolve_model
    from dpo.stage import preference_pairs

    recipe = ctx.recipe
    resolved = resolve_model(recipe.model.base)
    adapter = ctx.input_path(cfg.from_, "adapter")
    splits = load_splits(cfg.data, recipe, "preference", "stages.dpo.data")
    reference = load_for_inference(recipe.model, resolved, adapter).merge_and_unload()
    return DPOTrainer(model=load_trainable_model(recipe.model, resolved, adapter), ref_model=reference,
                      args=cfg.trainer_args(recipe, "stages.dpo", ctx.dir / "checkpoints"),
                      train_dataset=preference_pairs(splits.train), processing_class=load_tokenizer(resolved),
                      callbacks=callbacks)


def speed_worker(recipe_path: str, run_root: str, reference: str, precompute: bool) -> None:
    from common.runs import Run, StageContext
    from dpo.stage import build_trainer
    from recipes.runner import load

    recipe, _ = load(recipe_path, [f"stages.dpo.args.precompute_ref_log_probs={str(precompute).lower()}"])
    ctx = StageContext(Run(Path(run_root), recipe), "dpo")
    timer = StepTimer()
    started = time.perf_counter()
    build = build_trainer if reference == "adapter" else full_copy_trainer
    trainer = build(recipe.stages["dpo"], ctx, [timer])
    setup = time.perf_counter() - started
    trainer.train()
    steps = timer.seconds[1:]  # the first step warms up allocators and kernels
    print(json.dumps({"setup_s": setup, "step_s": statistics.median(steps), "step_min_s": min(steps),
                      "train_rss_mb": timer.train_rss_mb,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def speed(args) -> None:
    from recipes.runner import RunOptions, run_recipe

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpo-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    recipe = write_speed_recipe(workdir, args.model, args.steps, args.batch, args.pairs)
    run = run_recipe(recipe, RunOptions(overrides=[], stage="sft", output_dir=workdir / "runs", run_id="bench",
                                        overwrite=True))
    configs = [("adapter", False), ("adapter", True), ("full copy", False)]
    results = {}
    for reference, precompute in configs:
        print(f"--- reference = {reference}, precompute_ref_log_probs = {precompute}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "_speed_worker", str(recipe), str(run.root), reference,
                              str(precompute)], stdout=subprocess.PIPE, text=True, check=True)  # progress: stderr
        results[reference, precompute] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nDPO speed and memory: {args.model}, LoRA r=16 on all linear layers, batch {args.batch} pairs, "
          f"{args.steps} steps (median step after the first), max_length 256, CPU threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"{'reference':<12}{'precompute':<12}{'setup s':>9}{'step s':>9}{'min step s':>12}{'train RSS MB':>14}"
          f"{'peak RSS MB':>13}")
    for (reference, precompute), r in results.items():
        print(f"{reference:<12}{str(precompute):<12}{r['setup_s']:>9.1f}{r['step_s']:>9.2f}{r['step_min_s']:>12.2f}"
              f"{r['train_rss_mb']:>14.0f}{r['peak_rss_mb']:>13.0f}")
    off, on = results["adapter", False], results["adapter", True]
    print(f"precompute: step time x{on['step_s'] / off['step_s']:.2f}, one-off reference pass "
          f"{on['setup_s'] - off['setup_s']:.1f} s over {args.pairs} pairs")
    full = results["full copy", False]
    print(f"separate full reference: peak RSS {full['peak_rss_mb'] - off['peak_rss_mb']:+.0f} MB, training RSS "
          f"{full['train_rss_mb'] - off['train_rss_mb']:+.0f} MB, "
          f"step time x{full['step_s'] / off['step_s']:.2f}")


# --- efficacy ---------------------------------------------------------------------------------------

def completions_and_kl(model, tokenizer, prompts: list[list[dict]], samples: int, max_new_tokens: int, seed: int,
                       adapter: str, reference: str, batch: int = 16):
    """Sample `samples` completions per prompt with `adapter` active; return their texts (per prompt) and the
    per-completion log-ratio sum_t [log pi_adapter - log pi_reference] of each sampled completion."""
    import torch

    from common.generation import generate_responses, truncate_after_eos
    from ppo.rollout import forward_logprobs

    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"] for p in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(samples)]
    texts: list[list[str]] = [[] for _ in prompts]
    log_ratios: list[float] = []
    for b, start in enumerate(range(0, len(jobs), batch)):
        owners = jobs[start:start + batch]
        model.set_adapter(adapter)
        gen = generate_responses(model, tokenizer, [encoded[i] for i in owners], max_new_tokens, seed=seed + b)
        cut = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ids = torch.cat([gen.query_ids, cut.ids], dim=1)
        mask = torch.cat([gen.query_mask, cut.mask], dim=1)
        with torch.no_grad():
            logps = {}
            for name in (adapter, reference):
                model.set_adapter(name)
                logps[name] = forward_logprobs(model, ids, mask, gen.response_start).logprobs.sum(dim=1)
        log_ratios += (logps[adapter] - logps[reference]).tolist()
        for owner, text in zip(owners, tokenizer.batch_decode(cut.ids, skip_special_tokens=True), strict=True):
            texts[owner].append(text)
    return texts, log_ratios


def efficacy(args) -> None:
    import numpy as np
    from peft import PeftModel

    from common.models import load_for_inference, load_tokenizer, resolve_model
    from common.stats import bootstrap_ci
    from recipes.runner import RunOptions, load, run_recipe
    from recipes.stages import STAGE_KINDS
    from reward_model.scorers import build_scorer

    recipe, _ = load(args.recipe, args.overrides)
    dpo = [name for name, st in recipe.stages.items() if st.kind == "dpo"]
    if "preferences" not in STAGE_KINDS or not dpo:
        sys.exit(f"efficacy needs the preferences stage and a dpo stage in {args.recipe}; not there yet")
    needed: list[str] = []
    for name in dpo:
        stack = [name]
        while stack:
            stage = stack.pop()
            if stage not in needed:
                needed.append(stage)
                stack += recipe.inputs(stage)
    sft = recipe.stages[dpo[0]].from_
    run_id = args.run_id or time.strftime("dpo-efficacy-%Y%m%d-%H%M%S")
    existing = ((args.output_dir or Path(recipe.output_dir)) / recipe.name / run_id).is_dir()
    for i, stage in enumerate(s for s in recipe.order() if s in needed):  # done stages are skipped on resume
        run = run_recipe(args.recipe, RunOptions(overrides=args.overrides, stage=stage, run_id=run_id,
                                                 resume=i > 0 or existing, output_dir=args.output_dir))

    resolved = resolve_model(recipe.model.base)
    tokenizer = load_tokenizer(resolved, padding_side="left")
    model = PeftModel.from_pretrained(load_for_inference(recipe.model, resolved), run.output(sft, "adapter"),
                                      adapter_name=sft)
    for name in dpo:
        model.load_adapter(run.output(name, "adapter"), adapter_name=name)
    model.eval()
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}]
               for line in (SENTIMENT / "prompts_heldout.jsonl").read_text().splitlines()]
    scorer = build_scorer({"scorer": "vader"})

    def gold(texts: list[list[str]]) -> np.ndarray:  # [prompts, samples]
        return np.array([scorer.score([""] * len(t), t) for t in texts])

    started = time.perf_counter()
    sft_texts, _ = completions_and_kl(model, tokenizer, prompts, args.samples, args.max_new_tokens, recipe.seed,
                                      sft, sft)
    sft_gold = gold(sft_texts)
    print(f"\nDPO efficacy: run {run.root}; {len(prompts)} held-out prompts x {args.samples} samples, "
          f"max_new_tokens {args.max_new_tokens}, temperature 1; gold = VADER compound")
    print(f"{'model':<16}{'beta':>6}{'gold mean':>11}{'DPO - SFT':>11}{'95% CI':>18}{'KL to SFT':>11}"
          f"{'>= 0.25':>9}")
    print(f"{sft:<16}{'':>6}{sft_gold.mean():>11.3f}")
    for name in dpo:
        texts, log_ratios = completions_and_kl(model, tokenizer, prompts, args.samples, args.max_new_tokens,
                                               recipe.seed, name, sft)
        per_prompt = gold(texts).mean(axis=1) - sft_gold.mean(axis=1)  # paired by prompt
        low, high = bootstrap_ci(per_prompt)
        beta = recipe.stages[name].trainer_args(recipe, f"stages.{name}", tempfile.gettempdir()).beta
        print(f"{name:<16}{beta:>6g}{gold(texts).mean():>11.3f}{per_prompt.mean():>+11.3f}"
              f"{f'[{low:+.3f}, {high:+.3f}]':>18}{np.mean(log_ratios):>11.3f}"
              f"{'yes' if per_prompt.mean() >= 0.25 else 'no':>9}")
    print(f"sampling and scoring: {time.perf_counter() - started:.0f} s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_speed_worker":
        recipe, root, reference, precompute = sys.argv[2:6]
        speed_worker(recipe, root, reference, precompute == "True")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("speed", help="step time with and without precomputed reference log-probs; peak RSS")
    sp.add_argument("--model", default="smollm2-135m-instruct")
    sp.add_argument("--steps", type=int, default=8)
    sp.add_argument("--batch", type=int, default=4)
    sp.add_argument("--pairs", type=int, default=32)
    sp.add_argument("--workdir", help="where the temporary run goes (default: a new temporary folder)")
    ef = sub.add_parser("efficacy", help="gold reward of DPO over SFT on held-out prompts, per beta")
    ef.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    ef.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ef.add_argument("--run-id", help="continue this run of the recipe (its done stages are reused)")
    ef.add_argument("--output-dir", type=Path, help="where runs go (default: the recipe's output_dir, runs/)")
    ef.add_argument("--samples", type=int, default=4, help="completions per held-out prompt")
    ef.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    speed(args) if args.command == "speed" else efficacy(args)


if __name__ == "__main__":
    main()
