"""The critic-free stage (`kind: grpo`): the one-base model with policy / reference (/ reward) adapters and no value
function, trained by ppo.grpo_trainer.

Output: `adapter/` (the policy: a PEFT adapter + tokenizer; with `args.keep_best: gold` the best one on held-out gold,
as for PPO), `metrics.jsonl` (PPO's names where they mean the same, gold scores and heldout/... included, plus
objective/group_std, objective/no_signal_fraction and rewards/<source>), `samples.jsonl` and `checkpoints/`.
"""

from __future__ import annotations

import logging

from common.runs import StageContext, StageResult
from ppo.adapters import REWARD
from ppo.grpo_config import GRPOStage, reward_sources
from ppo.grpo_trainer import GRPOTrainer, RewardTerm
from ppo.stage import final_metrics, reward_function, run_trainer, save_policy, set_up

log = logging.getLogger(__name__)


def train(cfg: GRPOStage, ctx: StageContext) -> StageResult:
    recipe, where = ctx.recipe, f"stages.{ctx.name}.reward"
    base = set_up(cfg, ctx, "none", cfg.args.release_freed_memory)
    sources = reward_sources(cfg.reward, where, str(recipe.source))
    # Each reward-model stage is its own frozen adapter on the one base (named after the stage when there are two).
    rm_count = sum(s.stage is not None for s in sources)
    rewards = [RewardTerm(s.name, s.weight, reward_function(
        {"stage": s.stage} if s.stage else s.scorer, where, ctx, base.model,
        REWARD if rm_count == 1 else f"{REWARD}_{s.stage}")) for s in sources]
    log.info("grpo (%s): %d prompts, %d steps of %d prompts x %d samples x %d processes; reference = %s",
             cfg.args.advantage, len(base.prompts), cfg.args.max_steps, cfg.args.prompts_per_step,
             cfg.args.group_size, base.accelerator.num_processes, base.reference)

    final = run_trainer(lambda tracker: GRPOTrainer(cfg.args, base.model, base.tokenizer, base.prompts, rewards,
                                                    base.accelerator, tracker, ctx.dir, recipe.seed, base.gold_fn,
                                                    base.heldout), cfg.args, ctx)
    save_policy(base, ctx)
    base.accelerator.wait_for_everyone()
    keys = ("objective/scores", "objective/gold_scores", "objective/kl", "objective/sqrt_kl", "objective/rlhf_reward",
            "objective/entropy", "objective/group_std", "objective/no_signal_fraction", "val/num_eos_tokens")
    return StageResult(outputs={"adapter": "adapter"}, metrics=final_metrics(final, keys))
