"""Exact-match answers: extract a final answer from a completion by regex and compare it with the gold answer.

The two extractions are lm-evaluation-harness's GSM8K filters (lm_eval/tasks/gsm8k/gsm8k.yaml):

- "strict": the number after "#### " (regex `#### (\\-?[0-9\\.\\,]+)`, first match), the format the answer must
  follow;
- "flexible": the LAST number anywhere in the completion (regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`, group_select -1),
  for a model that answers right in its own words.

A completion with no match extracts "[invalid]" (lm-eval's fallback). Comparison is lm-eval's `exact_match` with
the GSM8K options: case ignored, and the regexes `,`, `\\$`, `(?s).*#### ` and `\\.$` removed from both sides
before comparing, so "1,000", "$1000" and "1000." all equal "1000".

As a verifiable reward for the RL stages, `reward` is a batched python scorer (reward_model/scorers.py):

    scorer: {scorer: python, function: "eval.exact_match:reward", batched: true,
             kwargs: {data: recipes/data/arithmetic/test.jsonl, extraction: flexible}}

It scores 1.0 for a right answer and 0.0 otherwise; `data` is a jsonl file with `prompt` and `answer` (a path
relative to the working directory), the prompt being how a completion finds its gold answer. In an eval stage the
same scorer's gold reward is the exact-match rate, with its bootstrap interval over prompts.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

from common.errors import InputError

PATTERNS = {
    "strict": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
EXTRACTIONS = tuple(PATTERNS)
INVALID = "[invalid]"
IGNORED = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))


def extract(completion: str, how: str = "flexible") -> str:
    """The answer a completion gives (lm-eval's RegexFilter + take_first): the `group_select`-th match; of a match
    with several groups, the first non-empty one; stripped. INVALID when nothing matches."""
    if how not in PATTERNS:
        raise InputError(f"exact-match extract: expected one of {', '.join(EXTRACTIONS)}, got {how!r}")
    pattern, group_select = PATTERNS[how]
    matches = pattern.findall(completion)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def normalize(text: str) -> str:
    """What exact match compares: the ignored regexes removed, lower-cased."""
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text.lower()


def is_exact_match(completion: str, answer: str, how: str = "flexible") -> bool:
    return normalize(extract(completion, how)) == normalize(str(answer))


@functools.cache
def _answers(path: str) -> dict[str, str]:
    """prompt -> gold answer of a jsonl file (read once per process)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: answers file not found; give a jsonl with 'prompt' and 'answer' (kwargs.data)")
    out = {}
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or row.get("answer") is None:
            raise InputError(f"{file}, line {line_no}: expected an object with 'prompt' (text) and 'answer'")
        out[row["prompt"]] = str(row["answer"])
    return out


def reward(prompts: Sequence[str], completions: Sequence[str], data: str, extraction: str = "flexible") -> list[float]:
    """1.0 where the completion's extracted answer is the gold answer of its prompt in `data`, else 0.0."""
    answers = _answers(str(data))
    missing = next((p for p in prompts if p not in answers), None)
    if missing is not None:
        raise InputError(f"{data}: no answer for the prompt {missing[:80]!r}; the scorer's data must hold every "
                         "prompt it scores")
    return [float(is_exact_match(c, answers[p], extraction)) for p, c in zip(prompts, completions, strict=True)]
