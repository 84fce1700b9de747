"""Benchmark: peak memory (and the time split) of PPO steps on SmolLM2-135M, one base model vs separate copies.

    one-base   one base model in memory; policy, reference and value are LoRA adapters on it and the reward model
               one more frozen adapter + head (ppo.adapters.OneBaseModel + RewardModel.attach)
    separate   four models, each with its own weights: the policy (SFT merged in, a LoRA trained on top), the
               reference (SFT merged in), the value model (the reward model merged in, a LoRA trained on top) and
               the reward model (merged)

Both run the same PPO steps (ppo.trainer.PPOTrainer.training_step: generation, reward, log-probs, PPO epochs), each in
its own subprocess, so each peak RSS (ru_maxrss: loading included) is its own. Each design runs twice: with glibc's
default (dynamic) mmap threshold, under which freed activations stay resident (a few hundred MB, in both designs),
and with the threshold fixed (PPO's `release_freed_memory: true`, common/allocator.py), under which the peak RSS
follows the memory in use. With --run, the SFT adapter and reward model of a finished run are used
(runs/sentiment/ID with sft/ and rm/ done); without it, stand-ins of the same shapes (random LoRA weights) are
written to a temporary folder. Prints a table and the fractions of step time spent generating, scoring (the reward),
in the rollout's forward passes (old / reference log-probs, values) and training.

    nice -n 10 .venv/bin/python benchmarks/ppo_memory.py [--run runs/sentiment/ID] [--steps 2] [--batch 8]
        [--no-gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

from common.allocator import return_freed_memory_to_os  # noqa: E402
from common.config import LoraSpec, ModelConfig  # noqa: E402
from common.models import disable_dropout, load_base_model, load_tokenizer, lora_config, resolve_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "recipes/data/sentiment/prompts_train.jsonl"
MODEL = ModelConfig(base="smollm2-135m-instruct", dtype="float32", lora=LoraSpec(r=16, alpha=32, dropout=0.05))
TIMES = ("time/generate", "time/score", "time/forward", "time/train")


def write_stand_ins(directory: Path) -> tuple[Path, Path]:
    """An SFT adapter and a reward model in the reward_model stage's format, with random LoRA weights."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    from reward_model.api import HEAD, HEAD_FILE, INFO_FILE

    resolved = resolve_model(MODEL.base)
    tokenizer = load_tokenizer(resolved)
    torch.manual_seed(0)
    sft, rm = directory / "sft", directory / "rm"
    config = lora_config(MODEL.lora)
    config.init_lora_weights = False
    get_peft_model(load_base_model(MODEL, resolved, training=False), config).save_pretrained(sft)
    classifier = load_base_model(MODEL, resolved, task="seq-cls", training=False)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    rm_model = get_peft_model(classifier, lora_config(MODEL.lora, task_type="SEQ_CLS", modules_to_save=[HEAD]))
    rm_model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    head = {"weight": getattr(classifier, HEAD).weight.detach().clone()}
    save_file(head, str(rm / HEAD_FILE))
    (rm / INFO_FILE).write_text(json.dumps({"chat": True, "max_length": 256}))
    return sft, rm


class SeparateCopies:
    """The roles as four models, each holding its own weights as separately trained models do: the SFT adapter
    merged into the policy's and the reference's copy, the reward model's into the reward model's and the value
    model's (initialised from the reward model), and a fresh LoRA on the two that train. (Unmerged adapters over one
    memory-mapped base file would let the OS share the file's pages between the "copies" and hide their cost.)
    The interface is the one PPOTrainer uses (see ppo.adapters.OneBaseModel)."""

    def __init__(self, sft: Path, rm: Path, cfg: ModelConfig):
        from peft import PeftModel, get_peft_model
        from transformers import AutoTokenizer

        from reward_model.api import RewardModel

        resolved = resolve_model(cfg.base)

        def merged(adapter: Path, task: str, training: bool):
            base = load_base_model(cfg, resolved, task=task, training=training)
            model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            # Weights the merge left alone (embeddings, norms) would still be the shared pages of the one model file
            # every copy was loaded from: give each copy its own, as separately saved models have.
            for param in model.parameters():
                param.data = param.data.clone()
            return model

        self.policy = get_peft_model(merged(sft, "causal-lm", True), lora_config(cfg.lora))
        self.reference = merged(sft, "causal-lm", False).eval()
        self.value = get_peft_model(merged(rm, "seq-cls", True),
                                    lora_config(cfg.lora, task_type="SEQ_CLS", modules_to_save=["score"]))
        info = RewardModel.read_info(rm)
        self.reward = RewardModel.from_classifier(merged(rm, "seq-cls", False).eval(),
                                                  AutoTokenizer.from_pretrained(rm), info["chat"], info["max_length"])
        for model in (self.policy, self.reference, self.value):
            disable_dropout(model)  # as OneBaseModel does

    def sample(self, tokenizer, prompts, params):
        from common.sampling import Sampler

        return Sampler(self.policy, tokenizer, progress=False).sample(prompts, params)

    def policy_forward(self, ids, mask, start, temperature, with_entropy=False):
        from common.generation import response_logprobs
        from ppo.adapters import PolicyOutput

        out = response_logprobs(self.policy, ids, mask, start, temperature, return_entropy=with_entropy)
        return PolicyOutput(out.logprobs, out.entropy, None)

    def values(self, ids, mask, start):
        classifier = self.value.get_base_model()
        from common.generation import position_ids

        hidden = classifier.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        values = classifier.score(hidden[:, start - 1:-1]).squeeze(-1).float()
        return torch.where(mask[:, start:].bool(), values, 0.0)

    def reference_logprobs(self, ids, mask, start, temperature):
        from common.generation import response_logprobs

        return response_logprobs(self.reference, ids, mask, start, temperature).logprobs

    def trainable_parameters(self):
        return [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]

    def train(self):
        self.policy.train()
        self.value.train()

    def eval(self):
        self.policy.eval()
        self.value.eval()


def child(args: argparse.Namespace) -> dict:
    """Build one design, run the PPO steps, report memory and times (this process only)."""
    from accelerate import Accelerator

    from common.tracking import Tracker
    from ppo.adapters import OneBaseModel
    from ppo.config import PPOArgs
    from ppo.trainer import PPOTrainer, rollout_prompts
    from reward_model.api import RewardModel

    cfg = dataclasses.replace(MODEL, gradient_checkpointing=args.gradient_checkpointing)
    resolved = resolve_model(cfg.base)
    tokenizer = load_tokenizer(resolved)
    records = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    prompts = rollout_prompts(tokenizer, records, str(PROMPTS))
    if args.allocator == "fixed":
        return_freed_memory_to_os()
    rss_libraries = psutil.Process().memory_info().rss  # torch, transformers, peft, trl, ...: the same in both
    started = time.perf_counter()
    if args.child == "one-base":
        model = OneBaseModel.build(cfg, resolved, args.sft, "separate", torch.device("cpu"), value_from=args.rm)
        reward = RewardModel.attach(model.peft, args.rm, adapter_name="reward")
    else:
        model = SeparateCopies(args.sft, args.rm, cfg)
        reward = model.reward
    build_s = time.perf_counter() - started
    rss_built = psutil.Process().memory_info().rss
    ppo_args = PPOArgs(rollout_batch_size=args.batch, minibatch_size=args.batch // 2, max_steps=args.steps,
                       max_new_tokens=args.max_new_tokens, ppo_epochs=2, value_model="separate")
    with tempfile.TemporaryDirectory() as out:
        trainer = PPOTrainer(ppo_args, model, tokenizer, prompts, reward.score, Accelerator(cpu=True),
                             Tracker(Path(out), is_main=False), Path(out), seed=0)
        steps = [trainer.training_step(step) for step in range(1, args.steps + 1)]
    design = args.child if args.allocator == "fixed" else f"{args.child} (glibc default)"
    return {"design": design, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_libraries_mb": rss_libraries / 2**20, "rss_after_build_mb": rss_built / 2**20, "build_s": build_s,
            **{k: sum(s[k] for s in steps[1:] or steps) / len(steps[1:] or steps) for k in TIMES},
            "objective/scores": steps[-1]["objective/scores"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run with sft/ and rm/ done (else random stand-ins)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="rollout batch (minibatches of half)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in the backward pass (both designs); without it, activations "
                             "of the PPO update, the same in both designs, dominate the peak")
    parser.add_argument("--child", choices=["one-base", "separate"], help=argparse.SUPPRESS)
    parser.add_argument("--allocator", choices=["fixed", "default"], default="fixed", help=argparse.SUPPRESS)
    parser.add_argument("--sft", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rm", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            sft, rm = args.run / "sft" / "adapter", args.run / "rm" / "reward_model"
        else:
            sft, rm = write_stand_ins(Path(tmp))
        results = []
        for allocator, design in itertools.product(("default", "fixed"), ("one-base", "separate")):
            cmd = [sys.executable, __file__, "--child", design, "--allocator", allocator, "--sft", str(sft),
                   "--rm", str(rm), "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-new-tokens", str(args.max_new_tokens),
                   "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]
            print(f"running {design} (glibc mmap threshold {allocator}) ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                sys.exit(f"{design} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"PPO on {MODEL.base}, LoRA r={MODEL.lora.r}, {args.steps} steps of {args.batch} prompts x "
          f"{args.max_new_tokens} new tokens, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"CPU, {torch.get_num_threads()} threads; "
          f"{'run ' + str(args.run) if args.run else 'stand-in SFT adapter and reward model'}")
    print(f"{'design':<28} {'peak RSS MB':>12} {'RSS built MB':>13} {'build s':>8} "
          f"{'gen s':>6} {'score s':>8} {'fwd s':>6} {'train s':>8}")
    for r in results:
        print(f"{r['design']:<28} {r['peak_rss_mb']:>12.0f} {r['rss_after_build_mb']:>13.0f} {r['build_s']:>8.1f} "
              + " ".join(f"{r[k]:>{w}.2f}" for k, w in zip(TIMES, (6, 8, 6, 8), strict=True)))
    for allocator, (one, separate) in (("default", results[:2]), ("fixed", results[2:])):
        above = [r["peak_rss_mb"] - r["rss_libraries_mb"] for r in (one, separate)]
        print(f"glibc mmap threshold {allocator}: one-base peak RSS = "
              f"{one['peak_rss_mb'] / separate['peak_rss_mb']:.0%} of separate copies; above the "
              f"{one['rss_libraries_mb']:.0f} MB of imported libraries: {above[0]:.0f} vs {above[1]:.0f} MB = "
              f"{above[0] / above[1]:.0%}")
    one, fixed = results[0], results[2]
    print(f"one-base with the threshold fixed: peak RSS x{fixed['peak_rss_mb'] / one['peak_rss_mb']:.2f}, "
          f"step time x{sum(fixed[k] for k in TIMES) / sum(one[k] for k in TIMES):.2f}")
    total = sum(one[k] for k in TIMES)
    print("one-base step time split: " + ", ".join(f"{k.split('/')[1]} {one[k] / total:.0%}" for k in TIMES) +
          f" (of {total:.1f} s a step, after the first)")


if __name__ == "__main__":
    main()
