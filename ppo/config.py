"""The PPO stage's recipe block: where prompts and rewards come from, and every hyperparameter, typed.

    ppo:
      kind: ppo
      from: sft                      # the policy starts as this stage's adapter, which is also the frozen reference
      data: {path: ../../data/sentiment/prompts_train.jsonl, test_size: 0}
      reward: {scorer: vader}        # a gold scorer spec (preferences.scorers), or {stage: rm}: a reward-model stage
      args: {max_steps: 40, rollout_batch_size: 16, kl_coef: 0.05}
      gold: auto                     # a gold scorer logged beside the reward; auto: see OnPolicyStage
      heldout: {path: ../../data/sentiment/prompts_heldout.jsonl}   # for args.keep_best: gold

Without `from:` the policy is a fresh LoRA and the reference is the base model with adapters disabled. Only the
`train` split of `data` is used (PPO samples its own completions; set `test_size: 0` to train on every prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from common.config import DataSpec, Recipe, StageConfig, check_reward_stage
from common.data import load_splits
from common.errors import InputError


@dataclass
class PPOArgs:
    """Every PPO hyperparameter. The defaults fit SmolLM2-135M with LoRA on a 2-core CPU: about 30 s a step."""

    # --- schedule: one step = one rollout of `rollout_batch_size` prompts per process, then the PPO epochs.
    max_steps: int = 40
    rollout_batch_size: int = 16
    minibatch_size: int = 8  # responses per optimizer step (per process); divides rollout_batch_size
    gradient_accumulation_steps: int = 2  # micro-batches per minibatch; micro-batch size also bounds rollout forwards
    ppo_epochs: int = 2
    # --- optimizer (AdamW over the policy / value adapters and the value head only)
    learning_rate: float = 3.0e-4
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0  # optimizer steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # --- sampling: softmax(logits / temperature), no top-k / top-p (the scored distribution is the sampled one)
    max_new_tokens: int = 48
    temperature: float = 0.7
    # Subtracted from the score of a response that has no EOS within max_new_tokens (Huang et al. 2024, detail 8).
    missing_eos_penalty: float | None = None
    # --- scores: optional standardisation over the global batch, then clipping to [-score_clip, score_clip]
    normalize_scores: bool = False
    score_clip: float | None = None
    # --- KL penalty against the reference: beta fixed, or adaptive when kl_target is set (Ziegler et al. 2019)
    kl_coef: float = 0.05
    # null: k1 in the reward, k2 in the loss (ppo/kl.py: the estimators whose value, resp. on-policy gradient, is
    # that of KL(pi || pi_ref)). The same estimator measures objective/kl for the controller and the ceiling.
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    # true: -beta * KL per token in the reward (Ziegler et al.); false: beta * KL added to the loss instead
    # (k2 by default; k3, as in GRPO, Shao et al. 2024, eq. 4, weighted by the importance ratio so that its gradient
    # is the reverse KL's too: ppo.kl.kl_loss_terms).
    kl_in_reward: bool = True
    # --- advantages and losses
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    # --- value function: a scalar head on the policy's trunk (one forward for both), or its own LoRA + head,
    # freshly initialised or copied from the reward model (reward: {stage: ...} only).
    value_model: Literal["shared", "separate"] = "shared"
    value_init: Literal["fresh", "reward"] = "fresh"
    # --- guards: stop after this many consecutive steps with non-finite rewards / log-probs / losses; stop when
    # the mean KL per response exceeds kl_ceiling (the last checkpoint within it is kept for --resume).
    max_nonfinite_steps: int = 3
    kl_ceiling: float | None = None
    # --- memory: on a CPU with glibc, return the memory of freed tensors to the OS at once (common/allocator.py).
    # Peak RSS of the embedded model's PPO steps x0.76, step time x1.67 (benchmarks/ppo_memory.py): for runs short
    # of RAM.
    release_freed_memory: bool = False
    # --- logging and checkpoints
    sample_every: int = 5  # append sample completions with their scores to samples.jsonl every N steps
    num_samples: int = 4
    save_steps: int = 10
    save_total_limit: int = 2
    # --- which policy the stage saves: the last, or (gold) the one whose mean gold score on the held-out prompts
    # was highest, measured every keep_best_every steps and at the last step (see OnPolicyStage).
    keep_best: Literal["last", "gold"] = "last"
    keep_best_every: int = 10

    def check(self, where: str) -> None:
        """Constraints between keys; each error names the key and the fix."""
        check_bounds(self, where,
                     at_least_one=["max_steps", "rollout_batch_size", "minibatch_size", "gradient_accumulation_steps",
                                   "ppo_epochs", "max_new_tokens", "max_nonfinite_steps", "sample_every",
                                   "save_steps", "save_total_limit", "keep_best_every"],
                     positive=["learning_rate", "temperature", "clip_range", "clip_range_value", "max_grad_norm",
                               "kl_horizon"],
                     non_negative=["kl_coef", "vf_coef", "entropy_coef", "warmup_steps", "weight_decay",
                                   "num_samples"],
                     positive_or_null=["kl_target", "kl_ceiling", "score_clip"])
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise InputError(f"recipe: {where}.{key} must be in [0, 1], got {getattr(self, key)}")
        check_minibatches(self, where, self.rollout_batch_size, "rollout_batch_size")
        if not self.kl_in_reward and self.kl_estimator == "k1":
            raise InputError(f"recipe: {where}.kl_estimator: k1 with kl_in_reward: false puts beta * mean(log pi - "
                             "log pi_ref) in the loss, whose gradient averages to zero on-policy (the reference "
                             "is never enforced); use kl_estimator: k2 (or null), or kl_in_reward: true")
        if self.value_init == "reward" and self.value_model != "separate":
            raise InputError(f"recipe: {where}.value_init: reward copies the reward model's adapter into the value "
                             "adapter; set value_model: separate too")
        if self.value_init == "reward" and self.normalize_scores:
            # The copied head predicts the reward model's raw scores, while the returns it would be fitted to are
            # standardised per batch: the first value targets would sit on another scale than its predictions.
            raise InputError(f"recipe: {where}.value_init: reward starts the value head at the reward model's raw "
                             "scores, but normalize_scores: true standardises the returns; set one of them off "
                             "(value_init: fresh, or normalize_scores: false)")

    @property
    def kl_estimator_used(self) -> str:
        """`kl_estimator`, or when it is null the default for where the KL goes (see the field's comment)."""
        return self.kl_estimator or ("k1" if self.kl_in_reward else "k2")

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps


# `gold: auto` (the default): the scorer that labelled the reward model's preferences (see OnPolicyStage.gold_spec).
AUTO = "auto"


@dataclass
class OnPolicyStage(StageConfig):
    """The keys PPO and the critic-free family share besides their reward: the gold scorer and held-out prompts.

    `gold`: a gold scorer spec (preferences.scorers, as a preferences stage's `scorer:`). Each step's rollouts are
    scored by it too and logged as `objective/gold_scores` beside the learned reward `objective/scores`, with
    `objective/sqrt_kl`: Gao et al. 2022 plot both rewards against sqrt(KL) to see over-optimisation, the proxy
    rising while the gold peaks and falls. `auto` (the default) takes the scorer of the preferences stage that the
    reward-model stage(s) in `reward:` were trained on, when there is exactly one such scorer; otherwise, and with a
    gold scorer as the reward itself (whose score objective/scores already is), no gold is logged. `null`: none.

    `heldout`: the prompts `args.keep_best: gold` samples (every row, or the held-out file where the source has
    one); unset, the `data` block's test split (data.test_size > 0 or data.test_path). The policy is sampled there
    with the one sampler at a fixed seed (the same draws at every evaluation, so checkpoints differ only by their
    weights), scored by `gold`, and the best one is the stage's `adapter/`.
    """

    gold: str | dict[str, Any] | None = AUTO
    heldout: DataSpec | None = None

    def reward_stages(self) -> list[str]:
        """The reward-model stages the reward reads."""
        raise NotImplementedError

    def references(self) -> list[str]:
        held_out = [self.heldout.stage] if self.heldout is not None and self.heldout.stage else []
        return super().references() + held_out

    def gold_spec(self, recipe: Recipe) -> str | dict[str, Any] | None:
        """The gold scorer spec in force (see the class docstring), or None."""
        if self.gold != AUTO:
            return self.gold
        specs = []
        for name in self.reward_stages():
            data = recipe.stages[name].data
            prefs = recipe.stages.get(data.stage) if data is not None and data.stage else None
            spec = getattr(prefs, "scorer", None) if prefs is not None and prefs.kind == "preferences" else None
            if spec is not None and spec not in specs:
                specs.append(spec)
        return specs[0] if len(specs) == 1 else None

    def validate_gold(self, recipe: Recipe, where: str) -> None:
        """The gold scorer, the held-out prompts and keep_best: gold, which needs both."""
        from preferences.scorers import build_scorer

        if self.gold not in (None, AUTO):
            build_scorer(self.gold, f"{where}.gold", str(recipe.source))
        if self.heldout is not None and self.heldout.path:
            load_splits(self.heldout, recipe, "prompt", f"{where}.heldout")
        if self.args.keep_best != "gold":
            return
        if self.gold_spec(recipe) is None:
            raise InputError(f"{recipe.source}: {where}.args.keep_best: gold scores held-out samples with a gold "
                             "scorer, but none is known here (no preferences stage with a scorer behind the reward); "
                             "set gold: {scorer: ...} on the stage, or keep_best: last")
        data = self.data
        if self.heldout is None and not (data.test_path or data.stage or data.test_size > 0):
            raise InputError(f"{recipe.source}: {where}.args.keep_best: gold needs held-out prompts, and data."
                             "test_size is 0; set data.test_size (e.g. 0.1), data.test_path, or heldout: {path: ...}")


@dataclass
class PPOStage(OnPolicyStage):
    # `{stage: NAME}`: the reward-model stage NAME scores responses. Anything else is a gold scorer spec, checked
    # by preferences.scorers.build_scorer: {scorer: vader}, {scorer: regex, pattern: "!", cap: 3}, {sum: [...]}.
    reward: dict[str, Any] | None = None
    args: PPOArgs = field(default_factory=PPOArgs)

    @property
    def reward_stage(self) -> str | None:
        return (self.reward or {}).get("stage")

    def reward_stages(self) -> list[str]:
        return [self.reward_stage] if self.reward_stage else []

    def references(self) -> list[str]:
        return super().references() + ([self.reward_stage] if self.reward_stage else [])

    def validate(self, recipe: Recipe, where: str) -> None:
        super().validate(recipe, where)
        check_one_base(recipe, self, where, "PPO")
        if self.reward is None:
            raise InputError(f"recipe: {where} needs a reward block: {{scorer: vader}} (a gold scorer) or "
                             "{stage: NAME} (a reward-model stage)")
        self.args.check(f"{where}.args")
        if self.reward_stage is None:
            if self.args.value_init == "reward":
                raise InputError(f"recipe: {where}.args.value_init: reward copies a reward model, but the reward is "
                                 "a gold scorer; use value_init: fresh, or reward: {stage: NAME}")
            from preferences.scorers import build_scorer

            build_scorer(self.reward, f"{where}.reward", str(recipe.source))
        else:
            if set(self.reward) != {"stage"}:
                extra = sorted(set(self.reward) - {"stage"})
                raise InputError(f"{recipe.source}: {where}.reward: {{stage: ...}} takes no other keys, got {extra}; "
                                 "a reward comes from a reward-model stage or from a gold scorer, not both")
            check_reward_stage(recipe, self.reward_stage, f"{where}.reward.stage")
        self.validate_gold(recipe, where)
        if self.data.path:  # local prompt files are checked row by row now, not after the model has loaded
            load_splits(self.data, recipe, "prompt", f"{where}.data")


def check_bounds(args: Any, where: str, at_least_one: Sequence[str] = (), positive: Sequence[str] = (),
                 non_negative: Sequence[str] = (), positive_or_null: Sequence[str] = ()) -> None:
    """The range checks of an args block: each failure names the key and the value it got."""
    for key in at_least_one:
        if getattr(args, key) < 1:
            raise InputError(f"recipe: {where}.{key} must be >= 1, got {getattr(args, key)}")
    for key in positive:
        if not getattr(args, key) > 0:
            raise InputError(f"recipe: {where}.{key} must be > 0, got {getattr(args, key)}")
    for key in non_negative:
        if getattr(args, key) < 0:
            raise InputError(f"recipe: {where}.{key} must be >= 0, got {getattr(args, key)}")
    for key in positive_or_null:
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise InputError(f"recipe: {where}.{key} must be > 0 (or null to switch it off), got {value}")


def check_minibatches(args: Any, where: str, rollout_size: int, rollout_name: str) -> None:
    """minibatch_size divides the completions of a step, gradient_accumulation_steps divides minibatch_size."""
    if rollout_size % args.minibatch_size:
        raise InputError(f"recipe: {where}.minibatch_size ({args.minibatch_size}) must divide {rollout_name} "
                         f"({rollout_size}); e.g. minibatch_size: {rollout_size // 2 or 1}")
    if args.minibatch_size % args.gradient_accumulation_steps:
        raise InputError(f"recipe: {where}.gradient_accumulation_steps ({args.gradient_accumulation_steps}) must "
                         f"divide minibatch_size ({args.minibatch_size})")


def check_one_base(recipe: Recipe, stage: StageConfig, where: str, method: str) -> None:
    """A stage on the one-base model (ppo.adapters) needs LoRA adapters and a prompt data block."""
    if recipe.model.lora is None:
        raise InputError(f"recipe: {where}: {method} keeps one base model and trains LoRA adapters on it, but "
                         "model.lora is null; add a lora block (e.g. lora: {r: 16})")
    if stage.data is None:
        raise InputError(f"recipe: {where} needs a data block with prompts (path, hub or stage)")
