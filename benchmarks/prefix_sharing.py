"""Benchmark: what running the prefixes rows share once (`common.prefix_sharing.trunk_shares_prefixes`) and trl's
fused LM head on the scored positions only (`common.fused_head.completion_positions_only`) buy the training passes of
SFT and PPO on the default task. Prints figures, asserts nothing.

    nice -n 10 .venv/bin/python benchmarks/prefix_sharing.py [--repeats 3]

SmolLM2-135M-Instruct in float32 with a fresh LoRA (r=16, all linear layers), as trl's SFT trainer patches it (the
fused LM head), on the machine's torch threads. Each pass is a forward and a backward, timed after a warm-up, the
configurations alternating --repeats times (medians printed), with the tokens the trunk was fed:
- SFT: 8 rows of the shipped SFT reviews (prompt + completion, right-padded, loss on the completion), as trl ships
  on CPU (the LM head over every position, rows whole), with the head on the completion positions only, and with
  the chat template's opening (every row's) run once on top.
- PPO: 4 and 8 rollouts (PPO's micro-batch and minibatch in the default recipe): prompts of prompts_train.jsonl
  left-padded, 40 random response tokens each; `response_logprobs` with gradients, rows whole against the system
  prompt they share run once.
DPO's step (each pair's prompt once for its chosen and rejected rows) is timed through trl's trainer by
benchmarks/dpo.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from common.config import LoraSpec, ModelConfig  # noqa: E402
from common.fused_head import completion_positions_only  # noqa: E402
from common.generation import response_logprobs  # noqa: E402
from common.models import load_base_model, load_tokenizer, lora_config, resolve_model  # noqa: E402
from common.prefix_sharing import trunk_shares_prefixes  # noqa: E402

DATA = ROOT / "recipes" / "data" / "sentiment"
MODEL = "smollm2-135m-instruct"


def chat_ids(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_batch(tokenizer, rows: int) -> dict[str, torch.Tensor]:
    records = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:rows]]
    ids, labels = [], []
    for r in records:
        prompt = chat_ids(tokenizer, r["prompt"], True)
        full = chat_ids(tokenizer, r["prompt"] + r["completion"], False)
        ids.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([i + [pad] * (width - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}


def rollout_batch(tokenizer, rows: int, response_tokens: int = 40) -> tuple[torch.Tensor, torch.Tensor, int]:
    records = [json.loads(line) for line in (DATA / "prompts_train.jsonl").read_text().splitlines()]
    rnd = random.Random(0)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str)
                        else r["prompt"], True) for r in rnd.sample(records, rows)]
    start = max(map(len, prompts))
    ids = torch.full((rows, start + response_tokens), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, start - len(p):start] = torch.tensor(p)
        ids[i, start:] = torch.tensor([rnd.randrange(1000, 40000) for _ in range(response_tokens)])
        mask[i, start - len(p):] = 1
    return ids, mask, start


@contextlib.contextmanager
def both(first, second):
    with first, second:
        yield


def compare(name: str, model, configurations: list[tuple[str, Callable[[], object], Callable[[], None]]],
            repeats: int) -> None:
    """Each configuration: (label, a context manager factory, the pass). Prints seconds and tokens fed."""
    fed: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, inputs, out: fed.append(inputs[0].numel()))
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in configurations}
    tokens: dict[str, int] = {}
    for round_ in range(repeats + 1):  # the first round warms up
        for label, context, run in configurations:
            model.zero_grad(set_to_none=True)
            fed.clear()
            with context():
                started = time.perf_counter()
                run()
                elapsed = time.perf_counter() - started
            if round_:
                seconds[label].append(elapsed)
            tokens[label] = sum(fed)
    hook.remove()
    first = statistics.median(seconds[configurations[0][0]])
    print(f"\n{name}")
    print(f"{'configuration':<44}{'tokens fed':>11}{'fwd+bwd s':>11}{'vs first':>10}")
    for label, _, _ in configurations:
        s = statistics.median(seconds[label])
        print(f"{label:<44}{tokens[label]:>11}{s:>11.3f}{s / first:>9.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    resolved = resolve_model(MODEL)
    tokenizer = load_tokenizer(resolved)
    base = load_base_model(ModelConfig(base=MODEL, dtype="float32", lora=None), resolved)
    add_fused_lm_head(base)  # as trl's SFT and DPO trainers do, before the adapter
    model = get_peft_model(base, lora_config(LoraSpec(r=16, alpha=32, dropout=0.0, target_modules="all-linear")))
    model.train()
    print(f"{MODEL}, float32, LoRA r=16 all-linear, torch threads {torch.get_num_threads()}, median of "
          f"{args.repeats} after a warm-up")

    batch = sft_batch(tokenizer, 8)

    def sft_step() -> None:
        model(**batch, fused_lm_head=True).loss.backward()

    compare("SFT: 8 reviews (prompt + completion), loss on the completion", model, [
        ("rows whole, LM head on every position", contextlib.nullcontext, sft_step),
        ("rows whole, LM head on completions", completion_positions_only, sft_step),
        ("shared opening once, head on completions", lambda: both(completion_positions_only(),
                                                                   trunk_shares_prefixes(model)), sft_step),
    ], args.repeats)

    for rows in (4, 8):
        ids, mask, start = rollout_batch(tokenizer, rows)

        def ppo_pass(ids=ids, mask=mask, start=start) -> None:
            response_logprobs(model, ids, mask, start, temperature=0.7).logprobs.sum().backward()

        compare(f"PPO: {rows} rollouts (left-padded prompts + 40 response tokens), log-probs with gradients", model, [
            ("rows whole", contextlib.nullcontext, ppo_pass),
            ("the shared system prompt once", lambda: trunk_shares_prefixes(model), ppo_pass),
        ], args.repeats)

if __name__ == "__main__":
    main()
