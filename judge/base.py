"""What a judge backend is: a thing that answers rendered judge prompts with one label of a label set.

The protocols (pairwise with swapped orders, single grading) live in `protocol.py` and talk to
backends only through `Judge.ask`, so a scripted judge in a test, the local transformers judge and
the HTTP judge are interchangeable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class LabelSet:
    """The answers a judge may give. `aliases` maps other spellings (upper-cased) onto a label."""

    name: str
    labels: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)


# "C" rather than "tie": a single letter is one token in every tokenizer we use (the byte-level test
# tokenizer spells "tie" with three), so the local judge reads all three verdicts from one next-token
# distribution. Free-text judges may still answer "tie", which the alias maps to "C".
TIE = "C"
PAIRWISE_LABELS = LabelSet("pairwise", ("A", "B", TIE), {"TIE": TIE})
# 1..10 on the MT-Bench scale. "10" is two tokens ("1", "0") in SmolLM2's and the byte-level tokenizer;
# the local judge scores label *sequences* and separates "1" from "10" (see local.py).
SCORE_LABELS = LabelSet("score", tuple(str(i) for i in range(1, 11)))


@dataclass
class RawAnswer:
    """One judge call's answer to one rendered prompt.

    label:      the chosen label, or None when a free-text answer could not be parsed.
    probs:      label -> probability (sums to 1) for judges that read probabilities; None otherwise.
    text:       the free-text answer, for judges that generate text; None otherwise.
    label_mass: total next-token probability the model put on valid labels before renormalising
                (local judge); low values mean the model wanted to say something else.
    """

    label: str | None
    probs: dict[str, float] | None = None
    text: str | None = None
    label_mass: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "probs": self.probs, "text": self.text, "label_mass": self.label_mass}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RawAnswer:
        return cls(label=data.get("label"), probs=data.get("probs"), text=data.get("text"),
                   label_mass=data.get("label_mass"))

    @property
    def parsed(self) -> bool:
        return self.label is not None


def answer_from_probs(probs: Mapping[str, float], label_mass: float | None = None) -> RawAnswer:
    """A RawAnswer whose label is the most probable one (first label wins exact ties)."""
    label = max(probs, key=lambda k: probs[k])
    return RawAnswer(label=label, probs={k: float(v) for k, v in probs.items()}, label_mass=label_mass)


def expected_score(probs: Mapping[str, float]) -> float:
    """E[score] = sum_s s * p(s) over numeric labels (the G-Eval style probability-weighted score,
    Liu et al. 2023, eq. 1)."""
    total = sum(probs.values())
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"score probabilities must have a positive finite sum, got {dict(probs)}")
    return sum(float(k) * v for k, v in probs.items()) / total


OnResult = Callable[[int, RawAnswer], None]


@runtime_checkable
class Judge(Protocol):
    """A judge backend.

    judge_id: a stable name of everything that changes the judge's answers (backend, model, decoding
              settings, system prompt); it is part of every cache key. It must never contain secrets.
    ask:      answer each rendered prompt with a label from `labels`; call `on_result(i, answer)` as each
              answer arrives (in the caller's thread), so the caller can cache it before the next one.
    """

    judge_id: str

    def ask(self, queries: Sequence[str], labels: LabelSet,
            on_result: OnResult | None = None) -> list[RawAnswer]: ...
