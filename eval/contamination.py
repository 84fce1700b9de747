"""Test-set contamination: does a model prefer a benchmark's examples in the order the benchmark ships them?

Oren et al. 2023, "Proving Test Set Contamination in Black Box Language Models" (ICLR 2024). If a data set was
not seen in training, its examples are exchangeable: every order of them is equally likely under the model, so
the log-likelihood of the canonical order is one draw among those of random orders. A model that saw the file
(in its order) gives the canonical order a higher likelihood.

The sharded test (sec. 3.2): the examples, in canonical order, are cut into `shards` contiguous shards of nearly
equal size. In each shard k, the statistic is s_k = log p(canonical order of shard k) - mean_j log p(permutation j
of shard k), over `permutations` uniform random permutations. Under the null each s_k has mean 0, so the p-value
is that of a one-sided t-test of mean(s) > 0 over the shards. With one shard we report the exact permutation test
of sec. 3.1 instead: p = (1 + #{j : log p(permutation j) >= log p(canonical)}) / (1 + permutations).

Each example is tokenised once, on its own, ending with a blank line, and an ordering is the concatenation of its
examples' tokens after one start token (BOS, else EOS): every ordering of a shard is the same multiset of tokens,
and every token, the first example's too, is scored. Sequences are scored with the multiple-choice harness's fast
scorer (`eval.mc.scoring.score_rows`: length-sorted batches, logits only at scored positions, inference mode); the
shared-prefix KV cache has nothing to share here beyond the start token, since orderings differ from the first
example on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import InputError

SEPARATOR = "\n\n"


DEFAULTS = {"shards": 10, "permutations": 20, "seed": 0}


def mc_example_texts(questions) -> list[str]:
    """Multiple-choice questions as their lm-eval letter-mode example with the answer: question, options, Answer."""
    from eval.mc.prompts import TARGET_DELIMITER, choice_texts, question_text

    return [question_text(q, "letter") + TARGET_DELIMITER + choice_texts(q, "letter")[q.answer] for q in questions]


def example_texts(path: str | Path, field: str | None = None) -> list[str]:
    """The examples of a test set in file order: a multiple-choice set (anything `eval.mc.data.load_questions`
    reads) as `mc_example_texts`, or, with `field`, that key of each jsonl row."""
    from eval.mc.data import load_questions

    if field is None:
        return mc_example_texts(load_questions(path))
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    texts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {line_no}: not valid JSON ({err.msg}); write one JSON object per line") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise InputError(f"{path}, line {line_no}: expected an object whose {field!r} is a string; fix the row or "
                             "choose another --field")
        texts.append(row[field])
    return texts


def check_size(n_examples: int, shards: int, permutations: int, where: str) -> None:
    if n_examples < 2:
        raise InputError(f"{where}: a contamination test compares orders of examples and needs at least 2, got "
                         f"{n_examples}; give a larger test set")
    if shards < 1 or permutations < 1:
        raise InputError(f"{where}: shards and permutations must be >= 1, got {shards} and {permutations}")
    if n_examples < 2 * shards:
        raise InputError(f"{where}: {n_examples} examples cannot fill {shards} shards of at least 2 (each shard is "
                         f"reordered); use at most {n_examples // 2} shards")


def shard_orderings(n_examples: int, shards: int, permutations: int, seed: int = 0) -> list[list[list[int]]]:
    """Per shard: its canonical order (example indices) first, then `permutations` random orders of it."""
    rng = np.random.default_rng(seed)
    out = []
    for part in np.array_split(np.arange(n_examples), shards):
        out.append([part.tolist()] + [rng.permutation(part).tolist() for _ in range(permutations)])
    return out


def sharded_test(canonical: Sequence[float], permuted: Sequence[Sequence[float]]) -> dict:
    """The p-value from per-shard log-likelihoods: `canonical` [shards], `permuted` [shards, permutations]."""
    from scipy import stats

    canonical = np.asarray(canonical, dtype=float)
    permuted = np.asarray(permuted, dtype=float).reshape(len(canonical), -1)
    diffs = canonical - permuted.mean(axis=1)
    if len(canonical) == 1:
        test = "permutation"
        p = float((1 + np.sum(permuted[0] >= canonical[0])) / (1 + permuted.shape[1]))
    elif np.all(diffs == diffs[0]):  # no spread: the t statistic is undefined; the sign decides
        test, p = "t-test", 0.0 if diffs[0] > 0 else 1.0
    else:
        test = "t-test"
        p = float(stats.ttest_1samp(diffs, 0.0, alternative="greater").pvalue)
    return {"p_value": p, "test": test, "mean_logprob_gap": float(diffs.mean()), "shard_gaps": diffs.tolist()}


def ordering_rows(example_ids: Sequence[Sequence[int]], orderings: Sequence[Sequence[int]], start_token: int):
    """One scorer row per ordering: the whole sequence's log-likelihood after the start token."""
    from eval.mc.scoring import Row

    rows = []
    for i, order in enumerate(orderings):
        seq = [start_token] + [t for j in order for t in example_ids[j]]
        rows.append(Row("", seq[:-1], 0, seq[1:-1], [seq[-1]], [(i, 0)]))
    return rows


def contamination_test(model, tokenizer, texts: Sequence[str], shards: int = DEFAULTS["shards"],
                       permutations: int = DEFAULTS["permutations"], seed: int = DEFAULTS["seed"],
                       batch_size: int = 1, where: str = "contamination") -> dict:
    """Run the sharded test (module docstring) of `texts` (the test set in canonical order) on `model`. Every position
    of a sequence is scored, so a batch's logits are [its tokens, vocabulary]: hence one sequence per batch by
    default."""
    from eval.mc.scoring import score_rows

    check_size(len(texts), shards, permutations, where)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InputError(f"{where}: the tokenizer has neither a BOS nor an EOS token to start sequences with")
    example_ids = tokenizer([t + SEPARATOR for t in texts], add_special_tokens=False)["input_ids"]
    plan = shard_orderings(len(texts), shards, permutations, seed)
    flat = [order for shard in plan for order in shard]
    scores = score_rows(model, ordering_rows(example_ids, flat, start), len(flat), batch_size=batch_size,
                        progress=True, desc="contamination: shard orderings")
    totals = np.array([s[0] for s in scores]).reshape(shards, permutations + 1)
    return {"n_examples": len(texts), "shards": shards, "permutations": permutations, "seed": seed,
            **sharded_test(totals[:, 0], totals[:, 1:])}
