"""Reading pairs to judge from a jsonl file.

One JSON object per line, in either shape:
- {"prompt", "answer_a", "answer_b"} with optional gold scores "gold_a", "gold_b" and an "id";
- trl's preference shape {"prompt", "chosen", "rejected"} with optional "score_chosen", "score_rejected"
  (chosen becomes answer a). Both orders are judged anyway, so which answer is "a" does not bias results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.errors import InputError

from .protocol import Pair

_SHAPES = (
    ("answer_a", "answer_b", "gold_a", "gold_b"),
    ("chosen", "rejected", "score_chosen", "score_rejected"),
)


def _gold(row: dict[str, Any], key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{where}: '{key}' must be a finite number, got {value!r}; fix or remove it")
    return float(value)


def pair_from_row(row: Any, where: str) -> Pair:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}; write one object per line")
    shape = next((s for s in _SHAPES if s[0] in row or s[1] in row), None)
    if shape is None:
        raise InputError(f"{where}: expected keys 'prompt', 'answer_a', 'answer_b' (or 'prompt', 'chosen', "
                         f"'rejected'), found {sorted(row)}; rename the fields")
    a_key, b_key, ga_key, gb_key = shape
    for key in ("prompt", a_key, b_key):
        if not isinstance(row.get(key), str):
            raise InputError(f"{where}: '{key}' must be a string, got {row.get(key)!r}; fix the row")
    pair_id = row.get("id")
    return Pair(prompt=row["prompt"], answer_a=row[a_key], answer_b=row[b_key],
                gold_a=_gold(row, ga_key, where), gold_b=_gold(row, gb_key, where),
                id=None if pair_id is None else str(pair_id))


def load_pairs(path: str | Path) -> list[Pair]:
    """Read pairs from a jsonl file; every problem names the file and the 1-based line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: pairs file not found; give a jsonl file of pairs")
    pairs: list[Pair] = []
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{file}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg}); write one JSON object per line") from None
            pairs.append(pair_from_row(row, where))
    if not pairs:
        raise InputError(f"{file}: no pairs in the file; add one JSON object per line")
    return pairs
