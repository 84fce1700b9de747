"""Free-text verdict parsing for judges that answer in prose (HTTP chat endpoints).

Accepted, in order of precedence (the last match of a rule wins, as judges often restate):
1. MT-Bench's bracket format: "[[A]]", "[[7]]";
2. a keyword line: "Verdict: B", "Final answer: C", "Rating: 7", "Score - 7";
3. "7/10";
4. the whole answer is one label, give or take punctuation and markdown ("B", "**B**.", "tie");
5. the answer starts with a label followed by punctuation or a line break ("A. Because ...", "8 - good").
Anything else is unparseable (None), counted and reported, never guessed.
"""

from __future__ import annotations

import re

from .base import LabelSet

_STRIP = " \t\r\n*_`'\".,:;!()[]{}<>-"


def _lookup(token: str, labels: LabelSet) -> str | None:
    token = token.strip(_STRIP).upper()
    if token in labels.labels:
        return token
    return labels.aliases.get(token)


def _label_alternation(labels: LabelSet) -> str:
    words = sorted({*labels.labels, *labels.aliases}, key=len, reverse=True)  # "10" before "1"
    return "|".join(re.escape(w) for w in words)


def parse_label(text: str | None, labels: LabelSet) -> str | None:
    """The label a free-text judge answer gives, or None when it cannot be told."""
    if not text or not text.strip():
        return None
    alt = _label_alternation(labels)
    rules = [
        rf"\[\[\s*({alt})\s*\]\]",
        rf"(?:verdict|final answer|answer|rating|score|grade|choice)\s*(?:is)?\s*[:=\-]?\s*[*_`\"']*\[?\s*({alt})"
        rf"(?![A-Za-z0-9]|\.\d)",
        rf"(?<![A-Za-z0-9.])({alt})\s*/\s*10\b",
    ]
    for rule in rules:
        found = re.findall(rule, text, flags=re.IGNORECASE)
        for token in reversed(found):
            label = _lookup(token, labels)
            if label is not None:
                return label
    whole = _lookup(text, labels)
    if whole is not None:
        return whole
    start = re.match(rf"^[\s*_`\"'(\[]*({alt})(?!\.\d)(?:[\s*_`\"')\]]*(?:[.:,;)\-\n]|$))", text, flags=re.IGNORECASE)
    if start:
        return _lookup(start.group(1), labels)
    return None
