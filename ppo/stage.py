"""The PPO stage: one base model with policy / reference / value (/ reward) adapters, trained by ppo.trainer.

Output: `adapter/` (the policy: a PEFT adapter + tokenizer that `PeftModel.from_pretrained` loads; with
`args.keep_best: gold` the policy of the step with the best held-out gold score, not necessarily the last),
`value/` (the value head, and the value adapter for value_model: separate; always the last step's),
`metrics.jsonl` (objective/..., with a gold scorer objective/gold_scores, policy/..., loss/..., val/..., kl/coef,
time/..., perf/tokens_per_s, with keep_best heldout/...), `samples.jsonl` (completions with their scores every
`sample_every` steps) and `checkpoints/` (for --resume). done.json's metrics say with keep_best which step was
kept (`heldout/best_step`) and whether it was the last (`heldout/last_is_best`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator

from common.allocator import return_freed_memory_to_os
from common.config import autocasts_bf16
from common.data import Splits, load_splits
from common.errors import InputError
from common.models import load_tokenizer, resolve_model
from common.prefix_sharing import trunk_shares_prefixes
from common.runs import StageContext, StageResult
from common.sampling import scorer_text
from common.schema import to_dict
from common.tracking import Tracker
from ppo.adapters import POLICY, REWARD, OneBaseModel
from ppo.config import OnPolicyStage, PPOStage
from ppo.trainer import OnPolicyTrainer, PPOTrainer, Prompt, RewardFn, rollout_prompts

log = logging.getLogger(__name__)


def reward_function(spec: dict[str, Any], where: str, ctx: StageContext, model: OneBaseModel,
                    adapter_name: str = REWARD) -> RewardFn:
    """A gold scorer spec, or `{stage: NAME}`: that reward-model stage's adapter and head attached to the policy's
    base as `adapter_name` (one more frozen adapter: no second copy of the model), scoring at the response's last
    token."""
    if "stage" not in spec:
        from preferences.scorers import build_scorer

        scorer = build_scorer(spec, where, str(ctx.recipe.source))
        return lambda prompts, completions: scorer.score([scorer_text(p) for p in prompts], completions)
    from reward_model.api import RewardModel

    return RewardModel.attach(model.peft, ctx.input_path(spec["stage"], "reward_model"), adapter_name).score


class OneBase(NamedTuple):
    """What a stage on the one-base model starts from."""

    accelerator: Accelerator
    tokenizer: Any
    prompts: list[Prompt]
    model: OneBaseModel
    reference: str  # for the log: where the reference comes from
    gold_fn: RewardFn | None  # the gold scorer (OnPolicyStage.gold_spec), or None
    heldout: list[Prompt]  # keep_best: gold's prompts (empty without it)


def set_up(cfg: OnPolicyStage, ctx: StageContext, value_model: str, release_freed_memory: bool,
           value_from: Path | None = None) -> OneBase:
    """The accelerator, tokenizer, encoded prompts (the data's train split) and the one-base model: policy and
    reference from `from:` (or a fresh policy over the bare base), and the value function `value_model` asks for;
    the gold scorer and, for keep_best: gold, the held-out prompts."""
    recipe, where = ctx.recipe, f"stages.{ctx.name}"
    if release_freed_memory:
        return_freed_memory_to_os()
    # None, not "no": an earlier stage's trainer in this process may have set the shared state (bf16 weights).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if autocasts_bf16(recipe.model) else None)
    resolved = resolve_model(recipe.model.base)
    tokenizer = load_tokenizer(resolved)
    splits = load_splits(cfg.data, recipe, "prompt", f"{where}.data",
                         ctx.run.stage_dir(cfg.data.stage) if cfg.data.stage else None)
    prompts = rollout_prompts(tokenizer, list(splits.train["prompt"]), splits.source)
    init_adapter = ctx.input_path(cfg.from_, "adapter") if cfg.from_ else None
    model = OneBaseModel.build(recipe.model, resolved, init_adapter, value_model, accelerator.device,
                               value_from=value_from)
    reference = f"adapter from '{cfg.from_}'" if init_adapter else "the base model (adapters disabled)"
    gold = cfg.gold_spec(recipe)
    spec = {"scorer": gold} if isinstance(gold, str) else gold  # a scorer's name is a spec too
    gold_fn = reward_function(spec, f"{where}.gold", ctx, model) if gold is not None else None
    if gold is not None:
        log.info("%s: gold scorer %s, logged beside the reward as objective/gold_scores", ctx.name, gold)
    heldout = held_out_prompts(cfg, ctx, tokenizer, splits) if cfg.args.keep_best == "gold" else []
    return OneBase(accelerator, tokenizer, prompts, model, reference, gold_fn, heldout)


def held_out_prompts(cfg: OnPolicyStage, ctx: StageContext, tokenizer: Any, splits: Splits) -> list[Prompt]:
    """keep_best's prompts: every row of `heldout:` (its held-out file where the source has one), else the test
    split of the stage's data."""
    where = f"stages.{ctx.name}"
    if cfg.heldout is not None:
        spec = dataclasses.replace(cfg.heldout, test_size=0.0)
        splits = load_splits(spec, ctx.recipe, "prompt", f"{where}.heldout",
                             ctx.run.stage_dir(spec.stage) if spec.stage else None)
        rows = splits.test if splits.test is not None else splits.train
    else:
        rows = splits.test
    if rows is None or len(rows) == 0:
        raise InputError(f"{splits.source}: {where}.args.keep_best: gold found no held-out prompts there; set "
                         "data.test_size or data.test_path, or heldout: {path: ...}")
    return rollout_prompts(tokenizer, list(rows["prompt"]), splits.source)


def run_trainer(make: Callable[[Tracker], OnPolicyTrainer], args: Any, ctx: StageContext) -> dict[str, float]:
    """Train (resuming when the run is resumed) with a tracker over the stage directory; the final metrics."""
    tracker = Tracker(ctx.dir, ctx.recipe.report_to, f"{ctx.recipe.name}/{ctx.name}", ctx.is_main, to_dict(args))
    try:
        trainer = make(tracker)
        # The rows' shared openings (a group's prompt, the chat template's system prompt) run once a forward pass.
        with trunk_shares_prefixes(trainer.model.peft):
            return trainer.train(resume=ctx.resume)
    finally:
        tracker.close()


def final_metrics(final: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """done.json's metrics: `keys` of the last step, and with keep_best which step was kept (heldout/...)."""
    return {k: v for k, v in final.items() if k in keys or k.startswith("heldout/")}


def save_policy(base: OneBase, ctx: StageContext) -> None:
    """The trained policy as a plain PEFT adapter with its tokenizer, in `adapter/`."""
    if ctx.is_main:
        base.model.save_adapter(POLICY, ctx.dir / "adapter")
        base.tokenizer.save_pretrained(ctx.dir / "adapter")


def train(cfg: PPOStage, ctx: StageContext) -> StageResult:
    recipe = ctx.recipe
    value_from = ctx.input_path(cfg.reward_stage, "reward_model") if cfg.args.value_init == "reward" else None
    base = set_up(cfg, ctx, cfg.args.value_model, cfg.args.release_freed_memory, value_from)
    reward_fn = reward_function(cfg.reward, f"stages.{ctx.name}.reward", ctx, base.model)
    log.info("ppo: %d prompts, %d steps of %d x %d responses; reference = %s", len(base.prompts), cfg.args.max_steps,
             cfg.args.rollout_batch_size, base.accelerator.num_processes, base.reference)

    final = run_trainer(lambda tracker: PPOTrainer(cfg.args, base.model, base.tokenizer, base.prompts, reward_fn,
                                                   base.accelerator, tracker, ctx.dir, recipe.seed, base.gold_fn,
                                                   base.heldout), cfg.args, ctx)

    save_policy(base, ctx)
    if ctx.is_main:
        base.model.save_value(ctx.dir / "value")
    base.accelerator.wait_for_everyone()
    keys = ("objective/scores", "objective/gold_scores", "objective/kl", "objective/sqrt_kl", "objective/rlhf_reward",
            "objective/entropy", "val/num_eos_tokens")
    return StageResult(outputs={"adapter": "adapter", "value": "value"}, metrics=final_metrics(final, keys))
