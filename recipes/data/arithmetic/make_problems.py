"""Write the arithmetic word-problem set: train.jsonl and test.jsonl, each row a prompt, its answer and a worked
solution ending "#### <answer>" (GSM8K's format, which the "strict" exact-match extraction reads).

Problems come from hand-written templates (one or two operations on small whole numbers, answers whole and
non-negative) filled with seeded names, items and numbers; test prompts never occur in train.

    python recipes/data/arithmetic/make_problems.py           # rewrite train.jsonl and test.jsonl
    python recipes/data/arithmetic/make_problems.py --check   # exit 1 if the files differ from the output
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20250611
HERE = Path(__file__).resolve().parent
N_TRAIN, N_TEST = 200, 50
INSTRUCTION = "Solve the problem. End your answer with a line '#### <number>'."

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kemi", "Lars", "Mina", "Noor"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "cards", "coins", "stamps", "buttons"]


def problem(rng: random.Random) -> tuple[str, int, str]:
    """(question, answer, worked solution) from one of the templates."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return (f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?",
                a + b, f"{name} has {a} + {b} = {a + b} {item}.")
    if kind == 1:
        a = rng.randint(20, 90)
        b = rng.randint(1, a)
        return (f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?",
                a - b, f"{name} has {a} - {b} = {a - b} {item} left.")
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"{name} fills {a} boxes with {b} {item} each. How many {item} is that in all?",
                a * b, f"{a} boxes of {b} make {a} * {b} = {a * b} {item}.")
    if kind == 3:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?",
                q, f"Each friend gets {b * q} / {b} = {q} {item}.")
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
    return (f"{name} buys {a} packs of {item} with {b} in each pack, then finds {c} more. How many {item} does "
            f"{name} have?", a * b + c, f"The packs hold {a} * {b} = {a * b} {item}; with {c} more that is "
            f"{a * b} + {c} = {a * b + c}.")


def rows() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {"test": [], "train": []}
    for split, n in (("test", N_TEST), ("train", N_TRAIN)):
        while len(out[split]) < n:
            question, answer, solution = problem(rng)
            if question in seen:
                continue
            seen.add(question)
            out[split].append({"id": f"arith-{split}-{len(out[split]) + 1:03d}",
                               "prompt": f"{INSTRUCTION}\n\n{question}", "answer": str(answer),
                               "solution": f"{solution}\n#### {answer}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args()
    stale = []
    for split, data in rows().items():
        text = "".join(json.dumps(r) + "\n" for r in data)
        path = HERE / f"{split}.jsonl"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        sys.exit(f"out of date: {', '.join(stale)}; run {Path(__file__).name} to rewrite them")


if __name__ == "__main__":
    main()
