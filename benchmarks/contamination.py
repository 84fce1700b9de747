"""Benchmark: the contamination test (eval.contamination, Oren et al. 2023) on the shared MMLU-Redux questions; prints
figures, asserts nothing.

Three models score the same examples (each question as its letter-mode example with the answer, in file order),
sharded, every shard's canonical order against random orders of it:
- the embedded SmolLM2-135M-Instruct, on the first --limit questions;
- the tiny random model (common.tiny), untouched, and a copy of it fine-tuned on the shortest --tiny-limit of those
  questions as a pretraining corpus would hold them (each shard, in canonical order, one training sequence), then
  tested on the same questions. The tiny model reads characters and holds 1,024 positions, hence short questions.
A contaminated model should get p < 0.05, a clean one should not.

    .venv/bin/python benchmarks/contamination.py --limit 300 --shards 15 --permutations 19
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.config import ModelConfig  # noqa: E402
from common.models import load_base_model, load_tokenizer, resolve_model  # noqa: E402
from common.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from eval.contamination import SEPARATOR, contamination_test, example_texts, shard_orderings  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu-redux" / "mmlu_redux_29.jsonl"


def fine_tune_on_shards(model, tokenizer, texts: list[str], shards: int, epochs: int, lr: float) -> list[float]:
    """Train `model` on each shard of `texts` in canonical order, one sequence a shard; the loss of every epoch."""
    canonical = [shard[0] for shard in shard_orderings(len(texts), shards, permutations=1)]
    sequences = [torch.tensor([[tokenizer.bos_token_id] + tokenizer("".join(texts[i] + SEPARATOR for i in order),
                                                                    add_special_tokens=False)["input_ids"]])
                 for order in canonical]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for ids in sequences:
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(sequences))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=300, help="questions for the embedded model (file order)")
    parser.add_argument("--shards", type=int, default=15)
    parser.add_argument("--permutations", type=int, default=19)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tiny-limit", type=int, default=60, help="shortest questions for the tiny models")
    parser.add_argument("--tiny-shards", type=int, default=20)
    parser.add_argument("--tiny-epochs", type=int, default=40)
    parser.add_argument("--skip-embedded", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    texts = example_texts(args.data)
    results = {}

    if not args.skip_embedded:
        config = ModelConfig(base="smollm2-135m-instruct", dtype="float32", lora=None)
        resolved = resolve_model(config.base)
        model = load_base_model(config, resolved, training=False).eval()
        tokenizer = load_tokenizer(resolved)
        start = time.perf_counter()
        results["smollm2-135m-instruct"] = contamination_test(
            model, tokenizer, texts[:args.limit], args.shards, args.permutations, batch_size=args.batch_size)
        results["smollm2-135m-instruct"]["seconds"] = round(time.perf_counter() - start, 1)
        del model

    shortest = sorted(range(len(texts)), key=lambda i: len(texts[i]))[:args.tiny_limit]
    tiny_texts = [texts[i] for i in sorted(shortest)]  # the file's order among them
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    results["tiny, untouched"] = contamination_test(model.eval(), tokenizer, tiny_texts, args.tiny_shards,
                                                    args.permutations, batch_size=args.batch_size)
    losses = fine_tune_on_shards(model, tokenizer, tiny_texts, args.tiny_shards, args.tiny_epochs, lr=3e-3)
    results["tiny, fine-tuned on the set"] = contamination_test(model.eval(), tokenizer, tiny_texts, args.tiny_shards,
                                                                args.permutations, batch_size=args.batch_size)
    results["tiny, fine-tuned on the set"]["train_loss_first_last"] = [round(losses[0], 3), round(losses[-1], 3)]

    for result in results.values():
        result.pop("shard_gaps", None)
    print(json.dumps(results, indent=2))
    print(f"\n{'model':32} {'examples':>8} {'shards':>6} {'perms':>5} {'mean gap':>9} {'p':>8}")
    for name, r in results.items():
        print(f"{name:32} {r['n_examples']:8d} {r['shards']:6d} {r['permutations']:5d} "
              f"{r['mean_logprob_gap']:9.3f} {r['p_value']:8.4f}")


if __name__ == "__main__":
    main()
