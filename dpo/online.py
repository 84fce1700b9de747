"""Online (iterative) DPO (`kind: online_dpo`): K rounds of sample pairs from the current policy, label them, train DPO.

```yaml
online:
  kind: online_dpo
  from: sft                    # the round-1 policy, and the reference of every round
  data: {path: ../../data/sentiment/prompts_train.jsonl, test_size: 0}
  rounds: 3
  prompts_per_round: 64        # a fresh seeded draw of prompts each round; null = every prompt every round
  samples_per_prompt: 4        # max_new_tokens, temperature, batch_size: as in the preferences stage
  labeller: {kind: gold, scorer: vader}       # or {kind: reward_model, stage: rm}, or {kind: judge, scorer: vader,
                                              # judge: {...}}: the labellers of the preferences stage
  strategy: best_vs_worst                     # min_gap as well: preferences.pairs.form_pairs
  args: {beta: 0.1, max_steps: 16, per_device_train_batch_size: 8}    # trl DPOConfig, per round
```

Round r samples `samples_per_prompt` completions per prompt from the policy of round r - 1 (round 1: `from:`'s
adapter) with the one sampler (common.sampling), scores them, forms pairs as that stage
does (a judge re-orders the pairs the scorer formed and drops the ones it leaves undecided), and trains trl's
DPOTrainer from the current policy against the `from:` adapter: trl makes its frozen "ref" adapter a copy of the
policy it starts from, so from round 2 on its weights are replaced by the reference's (Xiong et al. 2024, "Iterative
Preference Learning from Human Feedback", keep the initial policy as the reference of every round; Guo et al. 2024).

Output, in the stage folder: `rounds/round-<r>/` with `samples.jsonl` (every prompt's completions and scores),
`pairs.jsonl`, `metrics.jsonl` (DPO's training metrics), `adapter/` (the round's policy) and `done.json`; `adapter/`
(the last round's policy) and `metrics.jsonl` with one row per round (step = round): `rewards/score_mean` (the
sampled policy's mean score under the labeller's scorer), labels/*, and the round's final DPO metrics. A resumed run
skips the rounds that have their done.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights
from trl import DPOConfig, DPOTrainer

from common.config import Recipe, StageConfig, check_reward_stage
from common.data import load_splits
from common.errors import InputError
from common.fused_head import completion_positions_only
from common.models import load_for_inference, load_tokenizer, load_trainable_model, resolve_model
from common.prefix_sharing import trunk_shares_prefixes
from common.runs import StageContext, StageResult, atomic_write_json, atomic_write_text
from common.sampling import (
    DEFAULT_TOKEN_BUDGET,
    Sampler,
    SamplingParams,
    as_messages,
    encode_prompts,
    scorer_text,
)
from common.tracking import MetricsCallback, Tracker
from dpo.stage import FINAL_METRICS, check_dpo_options, preference_pairs
from judge import JudgeConfig
from preferences.pairs import check_pair_options, form_pairs
from preferences.scorers import build_scorer
from preferences.stage import judge_order, label_stats

log = logging.getLogger(__name__)


@dataclass
class OnlineLabeller:
    kind: Literal["gold", "reward_model", "judge"] = "gold"
    scorer: Any = None  # gold / judge: a gold scorer spec (preferences.scorers); the judge re-orders its pairs
    stage: str | None = None  # reward_model: the reward-model stage that scores
    judge: JudgeConfig | None = None  # judge: the judge section (judge.config), as in the preferences stage


@dataclass
class OnlineDPOStage(StageConfig):
    trl_config = DPOConfig
    rounds: int = 2
    prompts_per_round: int | None = None
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    token_budget: int = DEFAULT_TOKEN_BUDGET  # tokens a sampling batch may hold: rows x (prompt + max_new_tokens)
    strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
    min_gap: float = 0.0
    labeller: OnlineLabeller = field(default_factory=OnlineLabeller)

    def references(self) -> list[str]:
        return super().references() + ([self.labeller.stage] if self.labeller.stage else [])

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        if recipe.model.lora is None:
            raise InputError(f"recipe: {where}: online DPO trains a LoRA adapter against a frozen one; add a "
                             "model.lora block")
        if self.from_ is None:
            raise InputError(f"recipe: {where}.from: online DPO starts from a policy adapter and keeps it as the "
                             "reference of every round; set from: sft (a stage that saves an adapter)")
        if self.data is None:
            raise InputError(f"recipe: {where} needs a data block with prompts (path, hub or stage)")
        for key, minimum in (("rounds", 1), ("samples_per_prompt", 2), ("max_new_tokens", 1), ("token_budget", 1)):
            if getattr(self, key) < minimum:
                raise InputError(f"recipe: {where}.{key} must be >= {minimum}, got {getattr(self, key)}")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise InputError(f"recipe: {where}.prompts_per_round must be >= 1 (or null for every prompt), got "
                             f"{self.prompts_per_round}")
        if not self.temperature > 0:
            raise InputError(f"recipe: {where}.temperature must be > 0 (completions are sampled), got "
                             f"{self.temperature}")
        check_pair_options(self.strategy, self.min_gap, 0.0, where)
        self._check_labeller(recipe, f"{where}.labeller")
        check_dpo_options(self.trainer_args(recipe, where, output_dir=tempfile.gettempdir()), f"{where}.args")
        if self.data.path:
            load_splits(self.data, recipe, "prompt", f"{where}.data")

    def _check_labeller(self, recipe: Recipe, where: str) -> None:
        lab = self.labeller
        if lab.kind == "reward_model":
            if lab.stage is None or lab.scorer is not None or lab.judge is not None:
                raise InputError(f"recipe: {where}: kind reward_model takes stage: NAME (a reward_model stage) "
                                 "and no scorer or judge")
            check_reward_stage(recipe, lab.stage, f"{where}.stage")
            return
        if lab.scorer is None or lab.stage is not None:
            raise InputError(f"recipe: {where}: kind {lab.kind} forms pairs by a gold scorer: give scorer: (e.g. "
                             "vader) and no stage")
        build_scorer(lab.scorer, f"{where}.scorer", str(recipe.source))
        if (lab.kind == "judge") != (lab.judge is not None):
            raise InputError(f"recipe: {where}.judge goes with kind: judge (and kind: judge needs it)")


def round_prompts(prompts: list[Any], per_round: int | None, round_: int, seed: int) -> list[Any]:
    """Round `round_`'s prompts: all of them, or `per_round` drawn without replacement (seeded by seed and round)."""
    if per_round is None or per_round >= len(prompts):
        return prompts
    picked = np.random.default_rng([seed, round_]).choice(len(prompts), size=per_round, replace=False)
    return [prompts[i] for i in sorted(picked)]


def score_samples(cfg: OnlineDPOStage, ctx: StageContext, texts: list[str], messages: list[Any],
                  completions: list[list[str]]) -> list[float]:
    """The labeller's score of every completion (flat, prompt-major)."""
    flat = [c for group in completions for c in group]
    if cfg.labeller.kind == "reward_model":
        from reward_model.api import RewardModel

        reward_model = RewardModel.load(ctx.input_path(cfg.labeller.stage, "reward_model"), ctx.recipe.model)
        prompts = messages if reward_model.chat else texts
        return reward_model.score([prompts[i] for i, g in enumerate(completions) for _ in g], flat).tolist()
    scorer = build_scorer(cfg.labeller.scorer, f"stages.{ctx.name}.labeller.scorer")
    return scorer.score([texts[i] for i, g in enumerate(completions) for _ in g], flat)


def run_round(cfg: OnlineDPOStage, ctx: StageContext, round_: int, policy: Path, reference: Path,
              prompts: list[Any]) -> dict[str, float]:
    """Sample from `policy`, label, train DPO from `policy` against `reference`; everything in rounds/round-<r>/."""
    recipe, where = ctx.recipe, f"stages.{ctx.name}"
    out = ctx.dir / "rounds" / f"round-{round_}"
    resolved = resolve_model(recipe.model.base)
    tokenizer = load_tokenizer(resolved)
    messages = [as_messages(p, "user") for p in round_prompts(prompts, cfg.prompts_per_round, round_, recipe.seed)]
    model = load_for_inference(recipe.model, resolved, policy)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            n=cfg.samples_per_prompt, seed=recipe.seed + round_)
    samples = Sampler(model, tokenizer, token_budget=cfg.token_budget).sample(
        encode_prompts(tokenizer, messages, f"{where}.data"), params, f"sampling round {round_}")
    del model
    texts = [scorer_text(m) for m in messages]
    completions = [[c.text for c in group] for group in samples.grouped()]
    scores = score_samples(cfg, ctx, texts, messages, completions)
    k = cfg.samples_per_prompt
    groups = [{"prompt": texts[i], "completions": group, "scores": scores[i * k:(i + 1) * k], "prompt_index": i}
              for i, group in enumerate(completions)]
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(g) + "\n" for g in groups))
    pairs = form_pairs(groups, cfg.strategy, cfg.min_gap, source=f"{where} round {round_}")
    records = [r | {"prompt": messages[r["prompt_index"]], "chosen": as_messages(r["chosen"], "assistant"),
                    "rejected": as_messages(r["rejected"], "assistant")} for r in pairs.records]
    metrics = {"rewards/score_mean": float(np.mean(scores)), "labels/groups_without_pair":
               pairs.stats["groups_without_pair"]}
    if cfg.labeller.kind == "judge":
        [records], metrics["labels/judge_undecided"] = judge_order(cfg.labeller.judge, recipe, [records], where)
    if not records:
        raise InputError(f"{where}: round {round_} formed no pair (tied scores, identical completions or an "
                         "undecided judge); raise temperature or samples_per_prompt, or lower min_gap")
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    metrics.update(label_stats(records))

    args = cfg.trainer_args(recipe, where, output_dir=out / "checkpoints")
    args.eval_strategy, args.seed = "no", recipe.seed + round_
    tracker = Tracker(out, recipe.report_to, f"{recipe.name}/{ctx.name}/round-{round_}", ctx.is_main, cfg.args)
    metrics_cb = MetricsCallback(tracker)
    with completion_positions_only():
        trainer = DPOTrainer(model=load_trainable_model(recipe.model, resolved, policy), args=args,
                             train_dataset=preference_pairs(Dataset.from_list(records)), processing_class=tokenizer,
                             callbacks=[metrics_cb])
        if policy != reference:  # trl's "ref" is a copy of the policy it starts from: make it the reference
            set_peft_model_state_dict(trainer.model, load_peft_weights(str(reference)), adapter_name="ref")
        with trunk_shares_prefixes(trainer.model):  # a pair's prompt once for its chosen and rejected rows
            trainer.train()
    tracker.close()
    trainer.model.delete_adapter("ref")
    trainer.save_model(str(out / "adapter"))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    metrics.update({k: metrics_cb.last[k] for k in FINAL_METRICS if k in metrics_cb.last})
    atomic_write_json(out / "done.json", metrics)
    return metrics


def train(cfg: OnlineDPOStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    splits = load_splits(cfg.data, recipe, "prompt", f"stages.{ctx.name}.data",
                         ctx.run.stage_dir(cfg.data.stage) if cfg.data.stage else None)
    prompts = list(splits.train["prompt"])
    reference = ctx.input_path(cfg.from_, "adapter")
    tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, cfg.args)
    policy, metrics = reference, {}
    for round_ in range(1, cfg.rounds + 1):
        done = ctx.dir / "rounds" / f"round-{round_}" / "done.json"
        if ctx.resume and done.is_file():
            metrics = json.loads(done.read_text())
            log.info("%s: round %d was done; skipped", ctx.name, round_)
        else:
            metrics = run_round(cfg, ctx, round_, policy, reference, prompts)
            tracker.log(metrics | {"online/round": round_}, step=round_)
        policy = done.parent / "adapter"
    tracker.close()
    shutil.copytree(policy, ctx.dir / "adapter", dirs_exist_ok=True)
    return StageResult(outputs={"adapter": "adapter", "rounds": "rounds"}, metrics=metrics)
