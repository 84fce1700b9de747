"""The critic-free stage's recipe block (`kind: grpo`): GRPO, Dr. GRPO, RLOO and REINFORCE++-baseline, typed.

    grpo:
      kind: grpo
      from: sft                      # the policy starts as this adapter, which is also the frozen reference
      data: {path: ../../data/sentiment/prompts_train.jsonl, test_size: 0}
      reward: {stage: rm}            # one source, or a list of sources whose weighted sum is the reward:
      # reward:
      #   - {stage: rm, weight: 1.0}                                 # a reward-model stage
      #   - {scorer: regex, pattern: "!", cap: 3, weight: 0.1}        # a gold scorer (preferences.scorers)
      #   - {python: "mypkg.rewards:exact_match", batched: true, name: exact}   # any function
      args: {advantage: grpo, group_size: 8, max_steps: 40}
      gold: auto                     # and heldout:, as for PPO (ppo.config.OnPolicyStage)

Each source is logged on its own as `rewards/<name>` (name: the `name` key, else the stage, scorer or function
name). Without `from:` the policy is a fresh LoRA and the reference is the base model with adapters disabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from common.config import Recipe, check_reward_stage
from common.data import load_splits
from common.errors import InputError
from ppo.config import OnPolicyStage, check_bounds, check_minibatches, check_one_base


@dataclass
class GRPOArgs:
    """Every hyperparameter of the critic-free family. One step = `prompts_per_step` prompts per process, each
    sampled `group_size` times, then `num_iterations` passes over those completions in minibatches."""

    max_steps: int = 40
    prompts_per_step: int = 4
    group_size: int = 4  # G completions per prompt: the group that is its own baseline
    minibatch_size: int = 16  # completions per optimizer step (per process); divides prompts_per_step * group_size
    gradient_accumulation_steps: int = 2  # micro-batches per minibatch; the micro-batch also bounds rollout forwards
    num_iterations: int = 1  # passes over each generation (mu in Shao et al. 2024, Algorithm 1)
    # --- optimizer (AdamW over the policy adapter only: there is no value function)
    learning_rate: float = 3.0e-4
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # --- sampling: softmax(logits / temperature), no top-k / top-p, as for PPO
    max_new_tokens: int = 48
    temperature: float = 0.7
    # --- the objective (ppo.group_advantages, ppo.losses)
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    epsilon_low: float = 0.2  # ratio clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = 0.2  # DAPO's clip-higher uses 0.28 (Yu et al. 2025)
    # token: DAPO; sequence: GRPO's per-response mean; constant: Dr. GRPO's sum / max_new_tokens
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"
    # beta * KL(pi || pi_ref) in the loss, estimated per token (Shao et al. 2024, eq. 4 use k3 and beta 0.04); 0
    # leaves it out of the loss (it is still measured and logged).
    kl_coef: float = 0.04
    kl_estimator: Literal["k3", "k2"] = "k3"
    # --- guards, memory, logging and checkpoints: as for PPO (ppo.config.PPOArgs)
    max_nonfinite_steps: int = 3
    kl_ceiling: float | None = None
    release_freed_memory: bool = False
    sample_every: int = 5
    num_samples: int = 4
    save_steps: int = 10
    save_total_limit: int = 2
    keep_best: Literal["last", "gold"] = "last"
    keep_best_every: int = 10

    def check(self, where: str) -> None:
        """Constraints between keys; each error names the key and the fix."""
        if self.group_size < 2:
            raise InputError(f"recipe: {where}.group_size must be >= 2, got {self.group_size}: a group of one "
                             "completion is its own baseline and every advantage is 0; e.g. group_size: 4")
        check_bounds(self, where,
                     at_least_one=["max_steps", "prompts_per_step", "minibatch_size", "gradient_accumulation_steps",
                                   "num_iterations", "max_new_tokens", "max_nonfinite_steps", "sample_every",
                                   "save_steps", "save_total_limit", "keep_best_every"],
                     positive=["learning_rate", "temperature", "epsilon_low", "epsilon_high", "max_grad_norm"],
                     non_negative=["kl_coef", "warmup_steps", "weight_decay", "num_samples"],
                     positive_or_null=["kl_ceiling"])
        check_minibatches(self, where, self.rollout_size, "prompts_per_step * group_size")

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps


class RewardSource(NamedTuple):
    """One term of the reward: `weight` times a reward-model stage's score or a gold scorer's (spec)."""

    name: str
    weight: float
    stage: str | None
    scorer: dict[str, Any] | None


SOURCE_KEYS = ("stage", "python", "scorer", "sum")


def reward_sources(reward: dict[str, Any] | list[dict[str, Any]], where: str, source: str) -> list[RewardSource]:
    """The recipe's reward block as a list of sources (checked: each has exactly one source, names are unique)."""
    items = reward if isinstance(reward, list) else [reward]
    if not items:
        raise InputError(f"{source}: {where} is an empty list; give at least one source, e.g. {{scorer: vader}}")
    sources = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]" if isinstance(reward, list) else where
        given = [k for k in SOURCE_KEYS if k in item]
        if len(given) != 1:
            raise InputError(f"{source}: {at} has {'no reward source' if not given else 'sources ' + str(given)}; "
                             "give exactly one of {stage: NAME} (a reward-model stage), {scorer: ...} (a gold "
                             "scorer), {python: module:function}")
        rest = {k: v for k, v in item.items() if k not in ("name", "weight")}
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InputError(f"{source}: {at}.weight must be a number, got {weight!r}")
        if "stage" in item:
            if set(rest) != {"stage"}:
                raise InputError(f"{source}: {at}: {{stage: ...}} takes only name and weight besides, got "
                                 f"{sorted(set(rest) - {'stage'})}")
            sources.append(RewardSource(str(item.get("name", item["stage"])), float(weight), item["stage"], None))
            continue
        if "python" in item:
            rest = {"scorer": "python", "function": rest.pop("python"), **rest}
        name = item.get("name") or (rest["function"].rpartition(":")[2] if "function" in rest
                                    else rest.get("scorer", "sum"))
        sources.append(RewardSource(str(name), float(weight), None, rest))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise InputError(f"{source}: {where}: two sources are named {sorted({n for n in names if names.count(n) > 1})};"
                         " give each a distinct name: key (it names the metric rewards/<name>)")
    return sources


@dataclass
class GRPOStage(OnPolicyStage):
    reward: dict[str, Any] | list[dict[str, Any]] | None = None
    args: GRPOArgs = field(default_factory=GRPOArgs)

    def reward_stages(self) -> list[str]:
        if self.reward is None:
            return []
        items = self.reward if isinstance(self.reward, list) else [self.reward]
        return [item["stage"] for item in items if "stage" in item]

    def references(self) -> list[str]:
        return super().references() + self.reward_stages()

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        check_one_base(recipe, self, where, "GRPO")
        if self.reward is None:
            raise InputError(f"recipe: {where} needs a reward block: {{scorer: vader}} (a gold scorer), "
                             "{stage: NAME} (a reward-model stage), {python: module:function}, or a list of them "
                             "(a weighted sum)")
        self.args.check(f"{where}.args")
        from preferences.scorers import build_scorer

        for s in reward_sources(self.reward, f"{where}.reward", str(recipe.source)):
            if s.stage is not None:
                check_reward_stage(recipe, s.stage, f"{where}.reward.stage")
            else:
                build_scorer(s.scorer, f"{where}.reward", str(recipe.source))
        self.validate_gold(recipe, where)
        if self.data.path:  # local prompt files are checked row by row now, not after the model has loaded
            load_splits(self.data, recipe, "prompt", f"{where}.data")
