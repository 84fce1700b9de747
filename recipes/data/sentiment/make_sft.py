"""Write the sentiment task's SFT set, sft.jsonl: one short review per training prompt.

The reviews are assembled from hand-written sentence pieces about the film's title, genre and premise,
with a seeded choice of verdict: about 40% warm, 40% harsh, 20% mixed. SFT teaches the model the task
(write a short review, stop) without teaching it a side, so the policy that PPO and DPO start from has a
gold reward (VADER sentiment) near zero and room to move either way, as in the DPO paper's IMDb setting.

    python recipes/data/sentiment/make_sft.py           # rewrite sft.jsonl from prompts_train.jsonl
    python recipes/data/sentiment/make_sft.py --check   # exit 1 if sft.jsonl differs from the output
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20241123
HERE = Path(__file__).resolve().parent

OPENERS = {
    "warm": ["I loved '{title}'.", "'{title}' is a delight from start to finish.",
             "What a pleasant surprise '{title}' turned out to be.",
             "'{title}' is the best {genre} I have seen this year."],
    "harsh": ["I did not enjoy '{title}'.", "'{title}' is a tedious mess.",
              "'{title}' was a disappointment.",
              "'{title}' is the worst {genre} I have sat through in years."],
    "mixed": ["'{title}' is a film of two halves.", "I left '{title}' unsure what to think.",
              "'{title}' has good ideas and clumsy execution."],
}
PREMISE = ["It follows {premise}.", "The story is about {premise}.", "The film tells the story of {premise}."]
MIDDLES = {
    "warm": ["The acting is wonderful and the script is sharp and funny.",
             "The cast is superb, and every scene feels alive.",
             "The photography is beautiful and the music is lovely.",
             "It is moving, clever and often genuinely joyful."],
    "harsh": ["The acting is wooden and the script is dull.",
              "The pacing is painfully slow and the dialogue is awful.",
              "The plot makes no sense and the ending is a mess.",
              "It is boring, predictable and badly edited."],
    "mixed": ["The lead performance is strong, but the second half drags.",
              "Some scenes are beautiful, while others are flat and confusing.",
              "The first hour is gripping; the ending is weak."],
}
CLOSERS = {
    "warm": ["Highly recommended.", "Go and see it.", "A great night at the cinema."],
    "harsh": ["Avoid it.", "Not worth your time.", "I would not recommend it."],
    "mixed": ["Worth a look if you like {genre}s.", "Wait for it to come to streaming.",
              "A flawed but interesting film."],
}
CONTINUATIONS = {
    "warm": ["would be good, and it is even better than that.", "was special, and they were right."],
    "harsh": ["was worth seeing, and they were wrong.", "would be good, but it is a real letdown."],
    "mixed": ["was uneven, and that is fair.", "would divide people, and I can see why."],
}


def verdict(rng: random.Random) -> str:
    return rng.choices(["warm", "harsh", "mixed"], weights=[4, 4, 2])[0]


def review(row: dict, rng: random.Random) -> str:
    tone = verdict(rng)
    fill = {"title": row["title"], "genre": row["genre"], "premise": row["premise"]}
    parts = [rng.choice(MIDDLES[tone]), rng.choice(CLOSERS[tone])]
    if row.get("style") == "continue":
        return " ".join([rng.choice(CONTINUATIONS[tone]), *parts]).format(**fill)
    return " ".join([rng.choice(OPENERS[tone]), rng.choice(PREMISE), *parts]).format(**fill)


def build() -> str:
    rng = random.Random(SEED)
    lines = []
    for line in (HERE / "prompts_train.jsonl").read_text().splitlines():
        row = json.loads(line)
        lines.append(json.dumps({
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": review(row, rng)}],
        }))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    text, target = build(), HERE / "sft.jsonl"
    if parser.parse_args().check:
        return 0 if target.is_file() and target.read_text() == text else 1
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
