"""Benchmark: a LoRA training step of the embedded model in float32 and under bf16 autocast
(`model.mixed_precision`), side by side; prints figures, asserts nothing.

Two steps the default recipe takes most often: a causal-LM step (SFT, DPO and PPO's policy) on 8 SFT
conversations, and a reward-model step (a scalar head on the last token) on 8 pairs (16 sequences). Each
configuration alternates with the other, `--repeats` times, and the median is reported, so that a drift in the
machine's speed hits both. The weights, LoRA adapters and optimizer state stay float32 in both: autocast runs the
matmuls in bf16, which on a CPU with AMX are fast (`mixed_precision: auto` turns it on there; with AVX512-BF16 alone
a step took 1.29x (causal LM) and 1.49x (reward model) as long as in float32).

    nice -n 10 .venv/bin/python benchmarks/bf16_training.py [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from common.config import LoraSpec, ModelConfig, native_bf16  # noqa: E402
from common.models import load_base_model, load_tokenizer, lora_config, resolve_model  # noqa: E402

SFT_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "sentiment" / "sft.jsonl"


def batches(tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """8 SFT conversations (causal LM, labels = inputs) and 16 reviews (8 pairs) for the reward model."""
    rows = [json.loads(line) for line in SFT_DATA.read_text().splitlines()[:16]]
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    lm = tokenizer(texts[:8], padding=True, truncation=True, max_length=192, return_tensors="pt")
    lm["labels"] = lm["input_ids"].masked_fill(lm["attention_mask"] == 0, -100)
    rm = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    return {"causal-lm": dict(lm), "seq-cls": dict(rm)}


def step_seconds(model, batch: dict, autocast: bool, optimizer) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**batch)
    loss = out.loss if out.loss is not None else out.logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    cfg = ModelConfig(base=args.model, dtype="float32", lora=LoraSpec(r=16, alpha=32, dropout=0.0))
    resolved = resolve_model(cfg.base)
    tokenizer = load_tokenizer(resolved)
    data = batches(tokenizer)
    caps = torch.cpu.get_capabilities()
    print(f"{args.model}, LoRA r=16 on all linear layers, {torch.get_num_threads()} threads; "
          f"CPU capabilities amx_bf16 {caps.get('amx_bf16', False)}, avx512_bf16 {caps.get('avx512_bf16', False)}; "
          f"mixed_precision: auto turns bf16 on here: {native_bf16()}")
    print(f"{'step':<10} {'tokens':>7} {'float32 s':>10} {'bf16 autocast s':>16} {'ratio':>6}")
    for task, batch in data.items():
        model = get_peft_model(load_base_model(cfg, resolved, task=task),
                               lora_config(cfg.lora, task_type="SEQ_CLS", modules_to_save=["score"])
                               if task == "seq-cls" else lora_config(cfg.lora))
        model.config.pad_token_id = tokenizer.pad_token_id
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        step_seconds(model, batch, False, optimizer)  # warm-up: page the weights in, allocate the optimizer state
        step_seconds(model, batch, True, optimizer)
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for autocast in (False, True):
                times[autocast].append(step_seconds(model, batch, autocast, optimizer))
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        tokens = int(batch["attention_mask"].sum())
        print(f"{task:<10} {tokens:>7} {fp32:>10.2f} {bf16:>16.2f} {bf16 / fp32:>6.2f}")


if __name__ == "__main__":
    main()
