"""Benchmark: the DPO stage's speed and memory; prints figures, asserts nothing.

The DPO stage's step time with each pair's prompt run once for its two rows (`common.prefix_sharing`, as the stage
trains) against every row run whole, with `precompute_ref_log_probs` off and on, and the peak RSS of LoRA-DPO whose
reference is a frozen adapter (what the stage does) next to the same LoRA-DPO holding a separate full reference
model (the base with the SFT adapter merged in). Every configuration runs in its own process, for a clean peak
RSS, on the same SFT adapter and the same preference pairs (the shipped SFT reviews, each paired with the next
row's review).

    nice -n 10 .venv/bin/python benchmarks/dpo.py [--model smollm2-135m-instruct] [--steps 8] [--batch 4]

DPO's efficacy (gold reward over SFT per beta, with KL to SFT) is measured on the default chain:
benchmarks/default_chain.py.
"""

from __future__ import annotations

import argparse
import contextlib
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
        "model": {"base": model, "dtype": "float32", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
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


def speed_worker(recipe_path: str, run_root: str, reference: str, precompute: bool, share: bool) -> None:
    from common.fused_head import completion_positions_only
    from common.prefix_sharing import trunk_shares_prefixes
    from common.runs import Run, StageContext
    from dpo.stage import build_trainer
    from recipes.runner import load

    recipe, _ = load(recipe_path, [f"stages.dpo.args.precompute_ref_log_probs={str(precompute).lower()}"])
    ctx = StageContext(Run(Path(run_root), recipe), "dpo")
    timer = StepTimer()
    started = time.perf_counter()
    build = build_trainer if reference == "adapter" else full_copy_trainer
    with completion_positions_only():  # as the stage trains, so that only the reference differs
        trainer = build(recipe.stages["dpo"], ctx, [timer])
        setup = time.perf_counter() - started
        with trunk_shares_prefixes(trainer.model) if share else contextlib.nullcontext():
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
    configs = [("adapter", False, False), ("adapter", False, True), ("adapter", True, True), ("full copy", False, True)]
    results = {}
    for reference, precompute, share in configs:
        print(f"--- reference = {reference}, precompute_ref_log_probs = {precompute}, prompts once = {share}",
              file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "_speed_worker", str(recipe), str(run.root), reference,
                              str(precompute), str(share)], stdout=subprocess.PIPE, text=True, check=True)
        results[reference, precompute, share] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nDPO speed and memory: {args.model}, LoRA r=16 on all linear layers, batch {args.batch} pairs, "
          f"{args.steps} steps (median step after the first), max_length 256, CPU threads "
          f"{__import__('torch').get_num_threads()}")
    print(f"{'reference':<12}{'precompute':<12}{'prompts':<9}{'setup s':>9}{'step s':>9}{'min step s':>12}"
          f"{'train RSS MB':>14}{'peak RSS MB':>13}")
    for (reference, precompute, share), r in results.items():
        print(f"{reference:<12}{str(precompute):<12}{'once' if share else 'per row':<9}{r['setup_s']:>9.1f}"
              f"{r['step_s']:>9.2f}{r['step_min_s']:>12.2f}{r['train_rss_mb']:>14.0f}{r['peak_rss_mb']:>13.0f}")
    whole, off, on = results["adapter", False, False], results["adapter", False, True], results["adapter", True, True]
    print(f"each pair's prompt once: step time x{off['step_s'] / whole['step_s']:.2f} "
          f"({whole['step_s']:.2f} -> {off['step_s']:.2f} s)")
    print(f"precompute: step time x{on['step_s'] / off['step_s']:.2f}, one-off reference pass "
          f"{on['setup_s'] - off['setup_s']:.1f} s over {args.pairs} pairs")
    full = results["full copy", False, True]
    print(f"separate full reference: peak RSS {full['peak_rss_mb'] - off['peak_rss_mb']:+.0f} MB, training RSS "
          f"{full['train_rss_mb'] - off['train_rss_mb']:+.0f} MB, "
          f"step time x{full['step_s'] / off['step_s']:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_speed_worker":
        recipe, root, reference, precompute, share = sys.argv[2:7]
        speed_worker(recipe, root, reference, precompute == "True", share == "True")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--workdir", help="where the temporary run goes (default: a new temporary folder)")
    args = parser.parse_args()
    speed(args)


if __name__ == "__main__":
    main()
