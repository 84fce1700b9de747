"""The preferences stage (`kind: preferences`): a labelled preference dataset for the reward model and DPO.

```yaml
prefs:
  kind: preferences
  from: sft                     # the policy to sample from (that stage's adapter); no `from` = the base model
  source: policy                # policy (sample and label) | dataset (an existing preference dataset)
  data: {path: prompts.jsonl, test_size: 0.1}    # prompts, or with source: dataset, preference pairs
  scorer: vader                 # the gold scorer (preferences.scorers); required with source: policy
  labeller: {kind: gold}        # gold (order by the gold score) | judge (an LLM judge, see below)
  samples_per_prompt: 4         # K
  max_new_tokens: 48
  temperature: 1.0              # top_k: 0, top_p: 1.0 (off) as well
  token_budget: 65536           # tokens a sampling batch may hold: rows x (prompt + max_new_tokens)
  strategy: best_vs_worst       # or all_pairs; pairs need a gold gap >= min_gap (and > 0)
  min_gap: 0.0
  noise: 0.1                    # each label flipped with this probability, seeded by the recipe seed
```

`source: policy`: every prompt (text, read as one user message, or chat messages) gets K completions sampled with
the policy's chat template (`common.sampling`), each scored by the gold scorer, and pairs are formed by score
(`preferences.pairs.form_pairs`: identical or blank completions and gold ties never make a pair), ordered by gold.
`source: dataset`: the pairs of `data` (a local file, a hub dataset or another stage; chat, text or Anthropic-HH
records, normalised by `common.data`) keep their labels; with a `scorer` both completions are scored, so that
agreement with the gold scorer is known.

Labeller `judge` (`labeller: {kind: judge, judge: {backend: local, local: {model: DIR}}}`, the judge section;
relative paths are relative to the recipe): each pair is shown to the judge in both orders
(`judge.judge_label_pairs`); it keeps or swaps the pair's order, and a pair it ties or judges inconsistently
across the two orders is dropped (`labels/judge_undecided`). Each kept pair records `judge_prob`, the judge's
order-averaged probability for its choice.

Noise, last: each label is flipped (chosen and rejected swapped, with their scores and indices) with probability
`noise`, one `numpy.random.default_rng(recipe seed)` draw per pair in pair order. `flipped: true` marks a label that
disagrees with its source (the gold order, or the dataset's label).

Split: by prompt, so that no prompt has pairs on both sides: `data.test_path` names the held-out prompts (or pairs);
otherwise `data.test_size` of the prompts are held out (seeded). A `data: {stage: NAME}` input keeps that stage's split.

Output (key `data`), in the stage folder:
- `data/train.jsonl`, `data/test.jsonl`: one pair a line, what `data: {stage: NAME}` reads. Sampled pairs are chat
  records (prompt: user messages; chosen / rejected: one assistant message), so trainers apply the model's chat
  template as the policy saw it. Besides prompt / chosen / rejected each record keeps its gold scores
  (`score_chosen`, `score_rejected`: a record with `flipped: true` has score_chosen < score_rejected, so the gold
  label of any pair is the sign of the difference) and provenance: `prompt_index` (the prompt's row in `data.path`,
  0-based, rows of `data.test_path` following), `chosen_index` / `rejected_index` (into the prompt's K samples) and
  `policy` (the stage sampled from, or `base:MODEL`).
- `dataset/`: the same splits as a `datasets.DatasetDict` (`load_from_disk`).
- `samples.jsonl` (source: policy): every prompt with its K completions and gold scores, for re-pairing.

Metrics: `perf/completions_per_s`, `time/sampling`, `time/scoring`, `labels/pairs`, `labels/train_pairs`,
`labels/test_pairs`, `labels/flipped`, `labels/agreement_with_gold` (the share of pairs whose chosen completion has
the higher gold score: 1 - the flip rate under the gold labeller), `labels/groups_without_pair`,
`labels/duplicate_completions`, `labels/completions_without_eos` (cut at max_new_tokens), `rewards/gold_mean` (over
every sample: the policy's quality), `rewards/gold_chosen`, `rewards/gold_rejected` (means over pairs), and with a
judge `labels/judge_undecided`.

Under a multi-process launch the processes share the sampling (each a share of the batches, the same completions as
one process; `common.sampling`), then the main process alone scores, labels and writes while the others wait at
the runner's barrier: a judge or an API scorer is asked once, and only the main process writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from accelerate import PartialState
from datasets import Dataset, DatasetDict

from common.agreement import gold_agreement
from common.config import Recipe, StageConfig, check_policy_source
from common.data import Splits, load_splits
from common.errors import InputError
from common.models import load_for_inference, load_tokenizer, resolve_model
from common.runs import StageContext, StageResult, atomic_write_text
from common.sampling import (
    DEFAULT_TOKEN_BUDGET,
    Sampler,
    SamplingParams,
    as_messages,
    completion_text,
    encode_prompts,
    scorer_text,
    shard_of,
)
from common.schema import to_dict
from common.tracking import Tracker
from judge import JudgeConfig, build_judge, build_templates, judge_label_pairs, open_cache, with_paths
from preferences.pairs import check_pair_options, flip_mask, form_pairs, split_train_test
from preferences.scorers import Scorer, build_scorer

log = logging.getLogger(__name__)

SHAPE = {"policy": "prompt", "dataset": "preference"}


@dataclass
class LabellerSpec:
    """Who orders each pair: the gold scorer, or an LLM judge (`judge:` is a judge block, judge.config)."""

    kind: Literal["gold", "judge"] = "gold"
    judge: JudgeConfig | None = None


@dataclass
class PreferencesStage(StageConfig):
    source: Literal["policy", "dataset"] = "policy"
    scorer: str | dict[str, Any] | None = None
    labeller: LabellerSpec = field(default_factory=LabellerSpec)
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    token_budget: int = DEFAULT_TOKEN_BUDGET
    strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
    min_gap: float = 0.0
    noise: float = 0.0

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        if self.args:
            raise InputError(f"recipe: {where}.args: a preferences stage trains nothing, so it takes no trainer args; "
                             "set samples_per_prompt, max_new_tokens, temperature, noise, ... on the stage itself")
        if self.data is None:
            raise InputError(f"recipe: {where} needs a data block: prompts (source: policy) or preference pairs "
                             "(source: dataset), from a path, a hub dataset or a stage")
        if self.scorer is not None:
            build_scorer(self.scorer, f"{where}.scorer", "recipe")
        check_pair_options(self.strategy, self.min_gap, self.noise, where)
        self._check_labeller(recipe, where)
        if self.source == "policy":
            check_policy_source(recipe, self.from_, where)
            if self.scorer is None:
                raise InputError(f"recipe: {where}.scorer: sampled completions are scored by a gold scorer; add "
                                 "one, e.g. scorer: vader")
            self._check_sampling(where)
        elif self.from_:
            raise InputError(f"recipe: {where}.from names a policy to sample from, but source is dataset; remove "
                             "from, or set source: policy")
        if self.data.path:  # local files are checked row by row now, not after the model has loaded
            load_splits(self.data, recipe, SHAPE[self.source], f"{where}.data")

    def _check_labeller(self, recipe: Recipe, where: str) -> None:
        if self.labeller.kind == "gold":
            if self.labeller.judge is not None:
                raise InputError(f"recipe: {where}.labeller.judge is read only with kind: judge; remove it or set "
                                 "labeller.kind: judge")
            return
        if self.labeller.judge is None:
            raise InputError(f"recipe: {where}.labeller: kind judge needs a judge block, e.g. judge: {{backend: "
                             "local, local: {model: path/to/model}}")
        judge_config(self.labeller.judge, recipe, f"{where}.labeller.judge")

    def _check_sampling(self, where: str) -> None:
        for key, minimum in (("samples_per_prompt", 2), ("max_new_tokens", 1), ("token_budget", 1)):
            if getattr(self, key) < minimum:
                raise InputError(f"recipe: {where}.{key} must be >= {minimum}, got {getattr(self, key)}")
        if not self.temperature > 0:
            raise InputError(f"recipe: {where}.temperature must be > 0 (completions are sampled), got "
                             f"{self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"recipe: {where}: expected top_k >= 0 and 0 < top_p <= 1, got top_k {self.top_k}, "
                             f"top_p {self.top_p}")


def train(cfg: PreferencesStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    where = f"stages.{ctx.name}"
    scorer = build_scorer(cfg.scorer, f"{where}.scorer") if cfg.scorer is not None else None
    # The split is made below, by prompt, not row by row as load_splits' test_size would.
    spec = dataclasses.replace(cfg.data, test_size=0.0)
    upstream = ctx.run.stage_dir(cfg.data.stage) if cfg.data.stage else None
    splits = load_splits(spec, recipe, SHAPE[cfg.source], f"{where}.data", upstream)
    if cfg.source == "policy":
        sampled = sample_pairs(cfg, ctx, splits, scorer)
    else:
        sampled = dataset_pairs(splits, scorer) if ctx.is_main else None
    if sampled is None:  # not the main process: it has sampled its share; the main process labels and writes
        return StageResult()
    sides, metrics = sampled
    if cfg.labeller.kind == "judge":
        sides, metrics["labels/judge_undecided"] = judge_order(cfg.labeller.judge, recipe, sides, where)
        if not any(sides):
            raise InputError(f"{where}.labeller.judge: the judge decided no pair (every one a tie or inconsistent "
                             "across the two orders); use a stronger judge or labeller: {kind: gold}")
    sides = add_noise(sides, cfg.noise, recipe.seed)
    if len(sides) == 2:  # held-out prompts or pairs were given
        train_records, test_records = sides
    else:
        train_records, test_records = split_train_test(sides[0], cfg.data.test_size, recipe.seed, "prompt", where)

    metrics.update(label_stats(train_records + test_records))
    metrics.update({"labels/train_pairs": len(train_records), "labels/test_pairs": len(test_records)})
    if ctx.is_main:
        write_dataset(ctx.dir, train_records, test_records)
        tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, to_dict(cfg))
        tracker.log(metrics, step=0)
        tracker.close()
    log.info("%s: %d train / %d test pairs, %d flipped, agreement with gold %.3f", ctx.name, len(train_records),
             len(test_records), metrics["labels/flipped"], metrics.get("labels/agreement_with_gold", float("nan")))
    outputs = {"data": "data", "dataset": "dataset"}
    if cfg.source == "policy":
        outputs["samples"] = "samples.jsonl"
    return StageResult(outputs=outputs, metrics=metrics)


# Pairs travel as "sides": [train] or, when held-out prompts or pairs were given, [train, test]; every step keeps
# the pairs in one order, train first, so the noise draws follow the pair order.

def _regroup(sides: list[list[dict]], values: list[dict | None]) -> list[list[dict]]:
    """Cut the flat `values` (one per pair of `sides`, None = dropped) back into sides."""
    out, start = [], 0
    for side in sides:
        out.append([v for v in values[start:start + len(side)] if v is not None])
        start += len(side)
    return out


def flip_label(record: dict[str, Any]) -> dict[str, Any]:
    """Swap chosen and rejected, with everything that travels with them (score_chosen <-> score_rejected,
    chosen_index <-> rejected_index), and toggle `flipped`."""
    out = dict(record)
    for key in record:
        other = key.replace("chosen", "rejected")
        if "chosen" in key and other in record:
            out[key], out[other] = record[other], record[key]
    out["flipped"] = not record.get("flipped", False)
    return out


def add_noise(sides: list[list[dict]], noise: float, seed: int) -> list[list[dict]]:
    flat = [r for side in sides for r in side]
    flips = flip_mask(len(flat), noise, np.random.default_rng(seed))
    return _regroup(sides, [flip_label(r) if f else r for r, f in zip(flat, flips, strict=True)])


# --- source: policy -----------------------------------------------------------------------------------

def load_policy(recipe: Recipe, ctx: StageContext, from_: str | None):
    """The model to sample from and its tokenizer: the base, or the base with `from_`'s adapter (or, after a full
    fine-tune, that stage's whole model)."""
    resolved = resolve_model(recipe.model.base)
    if from_ is None:
        return load_for_inference(recipe.model, resolved), load_tokenizer(resolved)
    if recipe.model.lora is None:
        full = resolve_model(str(ctx.input_path(from_, "model")))
        return load_for_inference(recipe.model, full), load_tokenizer(full)
    return load_for_inference(recipe.model, resolved, ctx.input_path(from_, "adapter")), load_tokenizer(resolved)


def sample_pairs(cfg: PreferencesStage, ctx: StageContext, splits: Splits,
                 scorer: Scorer) -> tuple[list[list[dict]], dict[str, float]] | None:
    """Sample, score and pair (ordered by gold, no noise yet); also writes samples.jsonl. Every process of a launch
    samples its share of the completions; all but the main one then return None."""
    recipe = ctx.recipe
    prompts = [as_messages(p, "user") for p in splits.train["prompt"]]
    n_train = len(prompts)
    if splits.test is not None:
        prompts += [as_messages(p, "user") for p in splits.test["prompt"]]
    model, tokenizer = load_policy(recipe, ctx, cfg.from_)
    state = PartialState()
    if recipe.model.quantization == "none":  # this process's GPU (bitsandbytes layers were placed when they loaded)
        model = model.to(state.device)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, n=cfg.samples_per_prompt, seed=recipe.seed)
    sampler = Sampler(model, tokenizer, token_budget=cfg.token_budget, shard=shard_of(state))
    samples = sampler.sample(encode_prompts(tokenizer, prompts, f"stages.{ctx.name}.data"), params,
                             "sampling completions")
    del model, sampler
    if not ctx.is_main:
        return None

    started = time.perf_counter()
    texts = [scorer_text(p) for p in prompts]
    k = cfg.samples_per_prompt
    flat = scorer.score([texts[j // k] for j in range(len(samples.completions))], samples.texts)
    scoring_s = time.perf_counter() - started
    groups = [{"prompt": texts[i], "completions": [c.text for c in group], "scores": flat[i * k:(i + 1) * k],
               "prompt_index": i} for i, group in enumerate(samples.grouped())]
    if ctx.is_main:
        atomic_write_text(ctx.dir / "samples.jsonl", "".join(
            json.dumps(g | {"prompt": prompts[i]}) + "\n" for i, g in enumerate(groups)))

    pairs = form_pairs(groups, cfg.strategy, cfg.min_gap, noise=0.0, source=f"stages.{ctx.name}")
    if not pairs.records:
        raise InputError(f"stages.{ctx.name}: no pair could be formed: in every prompt's {k} completions the gold "
                         f"scores tie (or differ by less than min_gap {cfg.min_gap}) or the texts are identical; "
                         "raise temperature, samples_per_prompt or max_new_tokens, or lower min_gap")
    policy = cfg.from_ or f"base:{recipe.model.base}"
    records = [r | {"prompt": prompts[r["prompt_index"]], "chosen": as_messages(r["chosen"], "assistant"),
                    "rejected": as_messages(r["rejected"], "assistant"), "policy": policy} for r in pairs.records]
    # Groups are numbered train prompts first, so the held-out side is the tail.
    sides = [records] if splits.test is None else [[r for r in records if r["prompt_index"] < n_train],
                                                   [r for r in records if r["prompt_index"] >= n_train]]
    metrics = {
        "perf/completions_per_s": len(flat) / samples.seconds,
        "time/sampling": samples.seconds,
        "time/scoring": scoring_s,
        "labels/groups_without_pair": pairs.stats["groups_without_pair"],
        "labels/duplicate_completions": pairs.stats["duplicate_completions"],
        "labels/completions_without_eos": sum(not c.has_eos for c in samples.completions),
        "rewards/gold_mean": float(np.mean(flat)),
    }
    return sides, metrics


# --- source: dataset ----------------------------------------------------------------------------------

def dataset_pairs(splits: Splits, scorer: Scorer | None) -> tuple[list[list[dict]], dict[str, float]]:
    """The dataset's pairs as labelled, with gold scores when a scorer is given."""
    sides = [list(splits.train)] + ([list(splits.test)] if splits.test is not None else [])
    flat = [r | {"flipped": r.get("flipped", False)} for side in sides for r in side]
    started = time.perf_counter()
    if scorer is not None:
        prompts = [scorer_text(r["prompt"]) for r in flat]
        chosen = scorer.score(prompts, [completion_text(r["chosen"]) for r in flat])
        rejected = scorer.score(prompts, [completion_text(r["rejected"]) for r in flat])
        flat = [r | {"score_chosen": c, "score_rejected": s} for r, c, s in zip(flat, chosen, rejected, strict=True)]
    return _regroup(sides, flat), {"time/scoring": time.perf_counter() - started}


# --- labeller: judge ----------------------------------------------------------------------------------

def judge_config(cfg: JudgeConfig, recipe: Recipe, where: str) -> JudgeConfig:
    """The labeller's judge with its paths (a local judge's model directory too) relative to the recipe."""
    cfg = with_paths(cfg, recipe.resolve_path, where)
    if cfg.backend == "http":
        return cfg
    model = cfg.local.model
    if model is None or not recipe.resolve_path(model).is_dir():
        raise InputError(f"recipe: {where}.local.model: {model} is not a directory; give a local model directory "
                         "(relative paths are relative to the recipe)")
    return dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, model=str(recipe.resolve_path(model))))


def judge_order(spec: JudgeConfig, recipe: Recipe, sides: list[list[dict]],
                where: str) -> tuple[list[list[dict]], int]:
    """Let the judge keep or swap each pair; drop the pairs it leaves undecided. Returns the sides and how many
    were dropped."""
    cfg = judge_config(spec, recipe, f"{where}.labeller.judge")
    judge = build_judge(cfg)
    flat = [r for side in sides for r in side]
    cache = open_cache(cfg)
    try:
        verdicts = judge_label_pairs(judge, [scorer_text(r["prompt"]) for r in flat],
                                     [completion_text(r["chosen"]) for r in flat],
                                     [completion_text(r["rejected"]) for r in flat],
                                     template=build_templates(cfg)["pairwise"], cache=cache)
    finally:
        if cache is not None:
            cache.close()
    # winner 0: the judge prefers the current chosen; 1: the current rejected; None: a tie or inconsistent.
    decided = [None if winner is None else (flip_label(r) if winner == 1 else r) | {"judge_prob": prob}
               for r, (winner, prob) in zip(flat, verdicts, strict=True)]
    return _regroup(sides, decided), sum(d is None for d in decided)


# --- both -------------------------------------------------------------------------------------------

def label_stats(records: list[dict[str, Any]]) -> dict[str, float]:
    stats: dict[str, float] = {"labels/pairs": len(records),
                               "labels/flipped": sum(bool(r.get("flipped")) for r in records)}
    if records and all("score_chosen" in r and "score_rejected" in r for r in records):
        chosen = np.array([r["score_chosen"] for r in records], dtype=float)
        rejected = np.array([r["score_rejected"] for r in records], dtype=float)
        # A label says "chosen is better": a predicted gap of +1 for every pair.
        stats["labels/agreement_with_gold"] = gold_agreement(np.ones(len(records)), chosen - rejected)
        stats["rewards/gold_chosen"] = float(chosen.mean())
        stats["rewards/gold_rejected"] = float(rejected.mean())
    return stats


def write_dataset(directory: Path, train: list[dict], test: list[dict]) -> None:
    data = directory / "data"
    atomic_write_text(data / "train.jsonl", "".join(json.dumps(r) + "\n" for r in train))
    if test:
        atomic_write_text(data / "test.jsonl", "".join(json.dumps(r) + "\n" for r in test))
    else:  # a retry with test_size 0 must not leave an earlier attempt's held-out pairs behind
        (data / "test.jsonl").unlink(missing_ok=True)
    parts = {"train": Dataset.from_list(train)} | ({"test": Dataset.from_list(test)} if test else {})
    shutil.rmtree(directory / "dataset", ignore_errors=True)
    DatasetDict(parts).save_to_disk(str(directory / "dataset"))
