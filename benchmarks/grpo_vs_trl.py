"""Benchmark: our GRPO / RLOO (ppo.grpo_trainer) against trl 1.16's GRPOTrainer and RLOOTrainer; prints figures,
asserts nothing.

The same setting for all four: SmolLM2-135M-Instruct (the embedded default) with LoRA r=16 continued from an SFT
adapter (which is also the frozen reference: trl copies it as its "ref" adapter, we hold it as ours), the shipped
training prompts in the same order, G completions per prompt, the same max new tokens, temperature (no top-k / top-p),
learning rate, KL coefficient, steps, and the VADER gold scorer as the reward. One step
= one generation of prompts_per_step x G completions and one optimizer step over them (trl: steps_per_generation =
gradient_accumulation_steps = --micro-batches; ours: num_iterations 1, minibatch = the generation). Token-level loss
and group-std scaling are both trainers' defaults (trl loss_type "dapo", scale_rewards "group"). The KL: ours keeps
it in the loss as k3 weighted by the importance ratio (its gradient the reverse KL's), as trl's GRPOTrainer does by
default (use_bias_correction_kl); trl's RLOOTrainer subtracts beta * k1 from the reward instead. Gradient
checkpointing is on for both (trl's GRPOConfig and RLOOConfig default; it trades ~30% more backward time for
keeping one layer's activations instead of all of them); --no-gradient-checkpointing turns it off for both. Dropout:
ours switches every dropout off (the first pass of an update then starts at ratio 1 exactly); trl keeps the SFT
adapter's LoRA dropout (0.05 in the shipped recipe) in its sampling and its updates unless told disable_dropout:
--no-trl-dropout runs trl as ours does.

Each trainer runs in its own process (`--child`), so that its peak RSS (ru_maxrss, loading included) is its own.
Reported: seconds per step (median over the steps after the first), peak RSS at the end of training and at the end of
the process (after the held-out sampling, the same code for all), and the gold (VADER) reward gain over
the SFT policy on held-out prompts after the same number of steps: per prompt, the mean over --eval-samples samples
of the trained policy minus that of the SFT policy (sampled with the same seeds by the same sampler,
eval.generation.sample_model), with a 95% bootstrap interval over prompts (common.stats.bootstrap_ci).

    nice -n 10 .venv/bin/python benchmarks/grpo_vs_trl.py --sft runs/sentiment/ID/sft/adapter [--steps 16]
    .venv/bin/python benchmarks/grpo_vs_trl.py --sft ... --seeds 0 1 2 3 4 5 6 7 --only ours-grpo trl-grpo
    .venv/bin/python benchmarks/grpo_vs_trl.py --tiny      # the tiny random model, 2 steps: checks the script runs

Without --sft a stand-in SFT adapter (random LoRA weights) is written and used.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import LoraSpec, ModelConfig  # noqa: E402
from common.models import load_base_model, load_tokenizer, lora_config, resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "recipes/data/sentiment/prompts_train.jsonl"
HELDOUT = REPO / "recipes/data/sentiment/prompts_heldout.jsonl"
IMPLEMENTATIONS = ("ours-grpo", "trl-grpo", "ours-rloo", "trl-rloo")


def model_config(args) -> ModelConfig:
    base = "tiny-random-llama" if args.tiny else args.model
    return ModelConfig(base=base, dtype="float32", lora=LoraSpec(r=16, alpha=32, dropout=0.0),
                       gradient_checkpointing=args.gradient_checkpointing)


def read_prompts(path: Path, limit: int | None = None) -> list:
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def write_stand_in_sft(cfg: ModelConfig, directory: Path) -> Path:
    from peft import get_peft_model

    torch.manual_seed(0)
    config = lora_config(cfg.lora)
    config.init_lora_weights = False
    get_peft_model(load_base_model(cfg, resolve_model(cfg.base), training=False), config).save_pretrained(directory)
    return directory


def vader_reward(prompts, completions, **_) -> list[float]:
    """VADER compound of each completion; trl passes chat completions as message lists, ours passes text."""
    from preferences.scorers import build_scorer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return build_scorer("vader").score(["" for _ in texts], texts)


def heldout_gold(model, tokenizer, args) -> list[float]:
    """Per held-out prompt, the mean VADER reward of --eval-samples completions (the eval stage's sampler)."""
    from common.sampling import encode_prompts
    from eval.generation import SamplingSettings, sample_model

    prompts = read_prompts(HELDOUT, args.eval_prompts)
    settings = SamplingSettings(args.eval_samples, args.max_new_tokens, args.temperature, seed=1234)
    samples = sample_model(model, tokenizer, encode_prompts(tokenizer, prompts, "policy"), settings)
    scores = np.asarray(vader_reward(None, samples.texts)).reshape(len(prompts), args.eval_samples)
    return scores.mean(axis=1).tolist()


def run_ours(args, cfg: ModelConfig, sft: Path) -> dict:
    from accelerate import Accelerator

    from common.tracking import Tracker
    from ppo.adapters import OneBaseModel
    from ppo.grpo_config import GRPOArgs
    from ppo.grpo_trainer import GRPOTrainer, RewardTerm
    from ppo.trainer import rollout_prompts

    resolved = resolve_model(cfg.base)
    tokenizer = load_tokenizer(resolved)
    model = OneBaseModel.build(cfg, resolved, sft, "none", torch.device("cpu"))
    size = args.prompts_per_step * args.group_size
    grpo = GRPOArgs(max_steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                    minibatch_size=size, gradient_accumulation_steps=args.micro_batches, num_iterations=1,
                    learning_rate=args.lr, lr_scheduler_type="linear", max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, advantage=args.child.split("-")[1], kl_coef=args.beta,
                    kl_estimator="k3", loss_aggregation="token", save_steps=10**9)
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(grpo, model, tokenizer, rollout_prompts(tokenizer, read_prompts(TRAIN), str(TRAIN)),
                              [RewardTerm("vader", 1.0, vader_reward)], Accelerator(cpu=True),
                              Tracker(Path(out), is_main=False), Path(out), seed=args.seed)
        seconds = []
        for step in range(1, args.steps + 1):
            started = time.perf_counter()
            trainer.training_step(step)
            seconds.append(time.perf_counter() - started)
    trained_rss = peak_rss_mb()
    model.eval()
    model.peft.set_adapter("policy")
    return {"seconds": seconds, "train_peak_rss_mb": trained_rss, "gold": heldout_gold(model.peft, tokenizer, args)}


def run_trl(args, cfg: ModelConfig, sft: Path) -> dict:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    class StepTimes(TrainerCallback):
        """Wall time between optimizer steps (generation, scoring and the update of one step)."""

        def __init__(self):
            self.seconds, self.last = [], 0.0

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    resolved = resolve_model(cfg.base)
    tokenizer = load_tokenizer(resolved)
    model = PeftModel.from_pretrained(load_base_model(cfg, resolved), sft, is_trainable=True)
    size = args.prompts_per_step * args.group_size
    rows = [{"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else p} for p in read_prompts(TRAIN)]
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if args.child == "trl-grpo" else (RLOOConfig, RLOOTrainer)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = config_cls(output_dir=out, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear",
                            per_device_train_batch_size=size // args.micro_batches,
                            gradient_accumulation_steps=args.micro_batches, steps_per_generation=args.micro_batches,
                            num_generations=args.group_size, max_completion_length=args.max_new_tokens,
                            temperature=args.temperature, top_k=0, top_p=1.0, beta=args.beta, num_iterations=1,
                            epsilon=0.2, gradient_checkpointing=args.gradient_checkpointing, report_to="none",
                            save_strategy="no", logging_steps=1, bf16=False, disable_dropout=not args.trl_dropout,
                            use_cpu=not torch.cuda.is_available(), seed=args.seed, shuffle_dataset=True)
        trainer = trainer_cls(model=model, reward_funcs=vader_reward, args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    trained_rss = peak_rss_mb()
    policy = trainer.model
    if "ref" in policy.peft_config:
        policy.delete_adapter("ref")
    return {"seconds": timer.seconds, "train_peak_rss_mb": trained_rss,
            "gold": heldout_gold(policy.eval(), tokenizer, args)}


def run_sft(args, cfg: ModelConfig, sft: Path) -> dict:
    from common.models import load_for_inference

    resolved = resolve_model(cfg.base)
    return {"seconds": [], "gold": heldout_gold(load_for_inference(cfg, resolved, sft), load_tokenizer(resolved),
                                                args)}


def child(args) -> dict:
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    run = {"sft": run_sft, "ours": run_ours, "trl": run_trl}[args.child.split("-")[0]]
    result = run(args, cfg, args.sft)
    return result | {"peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_seconds_and_gain(run: dict, sft: dict) -> tuple[float, np.ndarray]:
    """A run's median seconds per step after the first (which also builds what later steps reuse) and its per-prompt
    held-out gold gain over the SFT policy."""
    return statistics.median(run["seconds"][1:] or run["seconds"]), np.asarray(run["gold"]) - np.asarray(sft["gold"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sft", type=Path, help="the SFT adapter to start from (else a random stand-in)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2, help="gradient-accumulation micro-batches per step")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds (data order, sampling), each run by every trainer; the held-out "
                        "evaluation samples with its own fixed seed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a child's one seed
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--trl-dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="trl keeps the adapter's LoRA dropout (its default); --no-trl-dropout switches it off")
    parser.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--tiny", action="store_true", help="the tiny random model, 2 steps, few prompts")
    parser.add_argument("--child", choices=("sft", *IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny and args.child is None:
        args.steps, args.prompts_per_step, args.group_size, args.max_new_tokens = 2, 2, 2, 8
        args.eval_prompts, args.micro_batches = 4, 1
    if args.child:
        print(json.dumps(child(args)))
        return

    from common.stats import bootstrap_ci, t_interval

    with tempfile.TemporaryDirectory() as tmp:
        if args.sft is None:
            args.sft = write_stand_in_sft(model_config(args), Path(tmp) / "sft")
        shared = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in ("only", "tiny", "child", "gradient_checkpointing", "trl_dropout", "seeds")
                  and v is not None]
        shared.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
        shared.append("--trl-dropout" if args.trl_dropout else "--no-trl-dropout")
        # The SFT policy's held-out gold does not depend on the training seed: measured once.
        runs = [("sft", args.seeds[0])] + [(name, seed) for seed in args.seeds for name in args.only]
        results = {}
        for number, (name, seed) in enumerate(runs, 1):
            print(f"[{number}/{len(runs)}] {name} seed {seed}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, *shared, f"--seed={seed}", *(["--tiny"] if args.tiny else []),
                   "--child", name]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=REPO)  # progress: stderr
            results[name, seed] = json.loads(proc.stdout.strip().splitlines()[-1])
            if name != "sft":  # each run's figures as it ends, so that a long sweep cut short still tells something
                seconds, gain = step_seconds_and_gain(results[name, seed], results["sft", args.seeds[0]])
                print(f"    {seconds:.2f} s/step, gold gain {gain.mean():+.4f}", file=sys.stderr, flush=True)
    sft_gold = np.asarray(results["sft", args.seeds[0]]["gold"])
    print(f"\n{args.steps} steps of {args.prompts_per_step} prompts x {args.group_size} completions, "
          f"{args.max_new_tokens} new tokens, lr {args.lr}, beta {args.beta}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, trl dropout {'on' if args.trl_dropout else 'off'}; "
          f"held-out gold over SFT on {len(sft_gold)} prompts x {args.eval_samples} samples "
          f"(SFT mean {sft_gold.mean():.4f}), 95% bootstrap interval over prompts")
    print(f"{'trainer':<10} {'seed':>5} {'s/step':>8} {'train RSS MB':>13} {'peak RSS MB':>12} {'gold gain':>10}"
          "  95% CI")
    gains: dict[str, list[float]] = {name: [] for name in args.only}
    for name, seed in runs[1:]:
        r = results[name, seed]
        seconds, gain = step_seconds_and_gain(r, results["sft", args.seeds[0]])
        low, high = bootstrap_ci(gain)
        gains[name].append(float(gain.mean()))
        print(f"{name:<10} {seed:>5} {seconds:>8.2f} {r['train_peak_rss_mb']:>13.0f} "
              f"{r['peak_rss_mb']:>12.0f} {gain.mean():>10.4f}  [{low:.4f}, {high:.4f}]")
    if len(args.seeds) > 1:
        # Runs of a few steps are chaotic (a different draw early sends a run elsewhere), so a trainer's gain is the
        # mean over seeds, with a Student-t interval over the seeds' gains.
        print(f"\nover {len(args.seeds)} seeds: mean gold gain, 95% t-interval over seeds")
        for name, values in gains.items():
            low, high = t_interval(values)
            print(f"{name:<10} {np.mean(values):>+8.4f}  [{low:+.4f}, {high:+.4f}]  sd {np.std(values, ddof=1):.4f}")
        for ours in (n for n in args.only if n.startswith("ours-")):
            theirs = "trl-" + ours.split("-")[1]
            if theirs in gains:
                from scipy.stats import ttest_ind

                welch = ttest_ind(gains[ours], gains[theirs], equal_var=False)
                low, high = welch.confidence_interval()
                print(f"{ours} - {theirs}: {np.mean(gains[ours]) - np.mean(gains[theirs]):+.4f}  "
                      f"Welch 95% [{low:+.4f}, {high:+.4f}], p = {welch.pvalue:.2f}")

if __name__ == "__main__":
    main()
