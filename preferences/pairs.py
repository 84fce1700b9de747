"""Preference pairs from scored completions, with optional label noise, and a grouped train/test split.

Input: one group per prompt, a mapping

    {"prompt": str, "completions": [str, ...K], "scores": [float, ...K], **provenance}

where `scores` are gold-scorer scores (see `preferences.scorers`) and any other key (`prompt_id`,
`sampler`, ...) is provenance, copied unchanged into every record made from that group.

Output: one record per pair,

    {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "flipped",
     "chosen_index", "rejected_index", **provenance}

`chosen_index` / `rejected_index` point into the group's `completions`.

Rules:

- Completions are compared after `str.strip()`: a blank completion is never used, and of several
  identical ones only the first is kept (its score stands for all), so no pair is ever made of two
  identical texts.
- `best_vs_worst`: one pair per prompt, the highest-scoring completion against the lowest (the first one
  on ties). `all_pairs`: every two distinct completions, in index order (K(K-1)/2 at most).
- A pair needs a score gap of at least `min_gap` (up to float rounding: 0.3 - 0.1 counts as 0.2), and
  always a gap above zero: a tie says nothing about which is better, so it never makes a pair.
- Label noise: each pair, independently, has its label flipped (chosen and rejected swapped) with
  probability `noise`, drawn from `numpy.random.default_rng(seed)` in record order, so the same input and
  seed give the same records. Scores travel with their texts, so a flipped record has
  `score_chosen < score_rejected` and `flipped: true`; noise-free labels are `score_chosen > score_rejected`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.errors import InputError

STRATEGIES = ("best_vs_worst", "all_pairs")
OUTPUT_KEYS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "flipped", "chosen_index",
               "rejected_index")
INPUT_KEYS = ("prompt", "completions", "scores")


@dataclass
class Pairs:
    """The records and counts worth logging (`stats` keys: groups, pairs, flipped, groups_without_pair,
    duplicate_completions, blank_completions)."""

    records: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)


def check_pair_options(strategy: str, min_gap: float, noise: float, where: str = "stages.prefs",
                       source: str = "recipe") -> None:
    """Raise InputError for options `form_pairs` cannot use; a stage config can call this at load time."""
    if strategy not in STRATEGIES:
        raise InputError(f"{source}: {where}.strategy: unknown pairing strategy {strategy!r}; expected one of "
                         f"{', '.join(STRATEGIES)}")
    if isinstance(min_gap, bool) or not (isinstance(min_gap, int | float) and math.isfinite(min_gap)
                                         and min_gap >= 0):
        raise InputError(f"{source}: {where}.min_gap: expected a number >= 0, got {min_gap!r}")
    if isinstance(noise, bool) or not (isinstance(noise, int | float) and 0 <= noise <= 1):
        raise InputError(f"{source}: {where}.noise: expected a flip probability in [0, 1], got {noise!r}")


def _enough_gap(gap: float, min_gap: float) -> bool:
    return gap > 0 and (gap >= min_gap or math.isclose(gap, min_gap, rel_tol=1e-9, abs_tol=1e-12))


def pair_indices(completions: Sequence[str], scores: Sequence[float], strategy: str = "best_vs_worst",
                 min_gap: float = 0.0) -> list[tuple[int, int]]:
    """The (better, worse) index pairs of one group, by the rules in the module docstring."""
    seen: set[str] = set()
    keep: list[int] = []
    for i, c in enumerate(completions):
        text = c.strip()
        if text and text not in seen:
            seen.add(text)
            keep.append(i)
    if len(keep) < 2:
        return []
    if strategy == "best_vs_worst":
        # max/min return the first of equal keys, so ties resolve to the lowest index.
        hi = max(keep, key=lambda i: scores[i])
        lo = min(keep, key=lambda i: scores[i])
        return [(hi, lo)] if _enough_gap(scores[hi] - scores[lo], min_gap) else []
    if strategy == "all_pairs":
        out = []
        for a_pos, a in enumerate(keep):
            for b in keep[a_pos + 1:]:
                hi, lo = (a, b) if scores[a] >= scores[b] else (b, a)
                if _enough_gap(scores[hi] - scores[lo], min_gap):
                    out.append((hi, lo))
        return out
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def flip_mask(n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """n independent Bernoulli(noise) draws: True means flip that pair's label."""
    # random() is in [0, 1), so noise 0 never flips and noise 1 always does.
    return rng.random(n) < noise


def _check_group(group: Any, g: int, source: str) -> tuple[str, list[str], list[float], dict]:
    where = f"{source}: group {g}"
    if not isinstance(group, Mapping):
        raise InputError(f"{where}: expected a mapping with prompt, completions and scores, got "
                         f"{type(group).__name__}")
    for key in INPUT_KEYS:
        if key not in group:
            raise InputError(f"{where}: missing '{key}'; each group needs prompt, completions and scores")
    prompt, completions, scores = group["prompt"], group["completions"], group["scores"]
    if not isinstance(prompt, str):
        raise InputError(f"{where}: 'prompt' must be text, got {type(prompt).__name__}")
    if not isinstance(completions, Sequence) or isinstance(completions, str) \
            or not all(isinstance(c, str) for c in completions):
        raise InputError(f"{where}: 'completions' must be a list of strings")
    if not isinstance(scores, Sequence) or isinstance(scores, str) or len(scores) != len(completions):
        n = len(scores) if isinstance(scores, Sequence) else type(scores).__name__
        raise InputError(f"{where}: 'scores' must be a list with one number per completion "
                         f"({len(completions)}), got {n}")
    clean = []
    for j, s in enumerate(scores):
        try:
            value = float(s)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(s, str) or not math.isfinite(value):
            raise InputError(f"{where}: score {j + 1} is {s!r}; gold scores must be finite numbers (check the "
                             "scorer)")
        clean.append(value)
    provenance = {k: v for k, v in group.items() if k not in INPUT_KEYS}
    clash = sorted(set(provenance) & set(OUTPUT_KEYS))
    if clash:
        raise InputError(f"{where}: key(s) {', '.join(clash)} would overwrite the pair's own fields; rename them")
    return prompt, list(completions), clean, provenance


def form_pairs(groups: Iterable[Mapping[str, Any]], strategy: str = "best_vs_worst", min_gap: float = 0.0,
               noise: float = 0.0, seed: int | np.random.Generator = 0,
               source: str = "scored completions") -> Pairs:
    """Form preference pairs from scored groups and apply label noise; see the module docstring.

    `source` names the data in error messages, which give the 1-based group number.
    """
    check_pair_options(strategy, min_gap, noise)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    records: list[dict[str, Any]] = []
    stats = {"groups": 0, "pairs": 0, "flipped": 0, "groups_without_pair": 0, "duplicate_completions": 0,
             "blank_completions": 0}
    for g, group in enumerate(groups, start=1):
        prompt, completions, scores, provenance = _check_group(group, g, source)
        stats["groups"] += 1
        stripped = [c.strip() for c in completions]
        stats["blank_completions"] += sum(1 for t in stripped if not t)
        stats["duplicate_completions"] += sum(1 for t in stripped if t) - len({t for t in stripped if t})
        found = pair_indices(completions, scores, strategy, min_gap)
        if not found:
            stats["groups_without_pair"] += 1
        for hi, lo in found:
            records.append({"prompt": prompt, "chosen": completions[hi], "rejected": completions[lo],
                            "score_chosen": scores[hi], "score_rejected": scores[lo], "flipped": False,
                            "chosen_index": hi, "rejected_index": lo, **provenance})
    # One draw per pair, after all pairs are known: the flips depend only on the seed and the pair order.
    for record, flip in zip(records, flip_mask(len(records), noise, rng), strict=True):
        if flip:
            record.update(chosen=record["rejected"], rejected=record["chosen"],
                          score_chosen=record["score_rejected"], score_rejected=record["score_chosen"],
                          chosen_index=record["rejected_index"], rejected_index=record["chosen_index"],
                          flipped=True)
    stats["pairs"] = len(records)
    stats["flipped"] = sum(r["flipped"] for r in records)
    return Pairs(records, stats)


def _group_id(value: Any) -> str:
    # Prompts are usually text; conversational prompts are lists of messages, so serialise anything else.
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def split_train_test(records: Sequence[Mapping[str, Any]], test_size: float = 0.1, seed: int = 0,
                     group_key: str | None = "prompt",
                     source: str = "pairs") -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Deterministic seeded split into (train, test), each in the input's order.

    Records sharing `group_key` (by default the prompt) land on the same side, so pairs made from one
    prompt never straddle the split; `group_key=None` splits record by record. `round(test_size * groups)`
    groups (at least one, at most all but one) are held out. The groups are sorted before the seeded
    permutation, so the split does not depend on the order of the records.
    """
    if not 0 <= test_size < 1:
        raise InputError(f"{source}: test_size must be in [0, 1), got {test_size}")
    if test_size == 0:
        return list(records), []
    if group_key is None:
        ids = [str(i) for i in range(len(records))]
    else:
        ids = []
        for i, r in enumerate(records, start=1):
            if group_key not in r:
                raise InputError(f"{source}: record {i} has no '{group_key}' to group the split by")
            ids.append(_group_id(r[group_key]))
    unique = sorted(set(ids))
    if len(unique) < 2:
        raise InputError(f"{source}: cannot hold out {test_size:.0%} of {len(unique)} group(s) by "
                         f"'{group_key}'; add data or set test_size: 0 and give a separate test set")
    n_test = min(max(1, round(test_size * len(unique))), len(unique) - 1)
    perm = np.random.default_rng(seed).permutation(len(unique))
    test_ids = {unique[i] for i in perm[:n_test]}
    train = [r for r, k in zip(records, ids, strict=True) if k not in test_ids]
    test = [r for r, k in zip(records, ids, strict=True) if k in test_ids]
    return train, test
