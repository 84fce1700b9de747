"""The PPO stage: one base model with policy / reference / value (/ reward) adapters, trained by ppo.trainer.

Output: `adapter/` (the policy: a PEFT adapter + tokenizer that `PeftModel.from_pretrained` loads), `value/` (the
value head, and the value adapter for value_model: separate), `metrics.jsonl` (objective/..., policy/...,
loss/..., val/..., kl/coef, time/..., perf/tokens_per_s), `samples.jsonl` (completions with their scores every
`sample_every` steps) and `checkpoints/` (for --resume).
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from common.allocator import return_freed_memory_to_os
from common.config import autocasts_bf16
from common.data import load_splits
from common.models import load_tokenizer, resolve_model
from common.runs import StageContext, StageResult
from common.sampling import scorer_text
from common.schema import to_dict
from common.tracking import Tracker
from ppo.adapters import POLICY, REWARD, OneBaseModel
from ppo.config import PPOStage
from ppo.trainer import PPOTrainer, RewardFn, rollout_prompts

log = logging.getLogger(__name__)


def build_reward(cfg: PPOStage, ctx: StageContext, model: OneBaseModel) -> RewardFn:
    """A gold scorer, or the reward-model stage's adapter and head attached to the policy's base (one more frozen
    adapter: no second copy of the model), scoring at the response's last token."""
    if cfg.reward_stage is None:
        from preferences.scorers import build_scorer

        scorer = build_scorer(cfg.reward, f"stages.{ctx.name}.reward", str(ctx.recipe.source))
        return lambda prompts, completions: scorer.score([scorer_text(p) for p in prompts], completions)
    from reward_model.api import RewardModel

    reward_model = RewardModel.attach(model.peft, ctx.input_path(cfg.reward_stage, "reward_model"), REWARD)
    return reward_model.score


def train(cfg: PPOStage, ctx: StageContext) -> StageResult:
    recipe, where = ctx.recipe, f"stages.{ctx.name}"
    if cfg.args.release_freed_memory:
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
    value_from = ctx.input_path(cfg.reward_stage, "reward_model") if cfg.args.value_init == "reward" else None
    model = OneBaseModel.build(recipe.model, resolved, init_adapter, cfg.args.value_model, accelerator.device,
                               value_from=value_from)
    reward_fn = build_reward(cfg, ctx, model)
    log.info("ppo: %d prompts, %d steps of %d x %d responses; reference = %s", len(prompts), cfg.args.max_steps,
             cfg.args.rollout_batch_size, accelerator.num_processes,
             f"adapter from '{cfg.from_}'" if init_adapter else "the base model (adapters disabled)")

    tracker = Tracker(ctx.dir, recipe.report_to, f"{recipe.name}/{ctx.name}", ctx.is_main, to_dict(cfg.args))
    trainer = PPOTrainer(cfg.args, model, tokenizer, prompts, reward_fn, accelerator, tracker, ctx.dir, recipe.seed)
    try:
        final = trainer.train(resume=ctx.resume)
    finally:
        tracker.close()

    if ctx.is_main:
        model.save_adapter(POLICY, ctx.dir / "adapter")
        tokenizer.save_pretrained(ctx.dir / "adapter")
        model.save_value(ctx.dir / "value")
    accelerator.wait_for_everyone()
    keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy", "val/num_eos_tokens")
    return StageResult(outputs={"adapter": "adapter", "value": "value"},
                       metrics={k: final[k] for k in keys if k in final})
