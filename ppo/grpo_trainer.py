"""The critic-free family (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline) on PPO's loop: one step = rollout of groups,
group advantages, `num_iterations` clipped-surrogate passes.

    for step in 1 .. max_steps:
        prompts      <- this process's share of the global batch (as PPO: ppo.trainer.prompt_indices)
        completions  <- G samples per prompt from the policy (the sampler PPO uses: OnPolicyTrainer.sample)
        rewards      <- weighted sum of the reward sources, each logged as rewards/<name>
        log-probs    <- policy (old), reference, entropy: no value function
        advantages   <- one per completion from its group (ppo.group_advantages), given to every token
        for iteration in 1 .. num_iterations, for each minibatch (micro-batches accumulate gradients):
            loss = clipped surrogate (eps_low, eps_high) + kl_coef * KL_k3|k2(pi || pi_ref) (k3 importance-weighted:
                   ppo.kl.kl_loss_terms), aggregated per token,
                   per sequence or by a constant (Shao et al. 2024, eq. 3; Yu et al. 2025, eq. 8-12; Liu et al. 2025)
            gradients averaged over processes, clipped, AdamW step

The KL is in the loss, not in the reward (GRPO's choice, Shao et al. 2024, sec. 4.1.1): the advantage is the reward's
alone. Guards, checkpoints, --resume, the gold scores beside the reward and keep_best are the shared loop's
(ppo.trainer.OnPolicyTrainer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from common.tracking import Tracker
from ppo.adapters import OneBaseModel
from ppo.group_advantages import group_advantages, group_statistics
from ppo.grpo_config import GRPOArgs
from ppo.kl import kl_loss_terms
from ppo.losses import aggregate, policy_loss
from ppo.trainer import OnPolicyTrainer, Prompt, RewardFn, Rollout


class RewardTerm(NamedTuple):
    """One source of the reward: the reward is the sum of weight * fn(prompts, completions) over the terms."""

    name: str
    weight: float
    fn: RewardFn


class GRPOTrainer(OnPolicyTrainer):
    name = "grpo"
    nonfinite_hint = "check each rewards/<name> source"
    kl_hint = ""

    def __init__(self, args: GRPOArgs, model: OneBaseModel, tokenizer: Any, prompts: list[Prompt],
                 rewards: list[RewardTerm], accelerator: Any, tracker: Tracker, stage_dir: Path, seed: int,
                 gold_fn: RewardFn | None = None, heldout: Sequence[Prompt] = ()):
        minibatches = args.rollout_size // args.minibatch_size
        super().__init__(args, model, tokenizer, prompts, accelerator, tracker, stage_dir, seed,
                         optimizer_steps=args.max_steps * args.num_iterations * minibatches, gold_fn=gold_fn,
                         heldout=heldout)
        self.rewards = rewards

    def training_step(self, step: int) -> dict[str, float]:
        args, acc = self.args, self.accelerator
        # Each prompt G times in a row: rows [g * G, (g + 1) * G) are group g.
        batch = [p for p in self.step_prompts(step, args.prompts_per_step) for _ in range(args.group_size)]
        rollout, completions, components, timing = self.rollout(batch, step)
        if not self.finite(rollout, (rollout.logprobs, rollout.ref_logprobs)):
            return self._skip(step, "rewards or log-probs")
        kl_per_response = self.rollout_kl(rollout, args.kl_estimator, step)[0].sum(1)
        mask = rollout.mask.bool()

        groups = rollout.scores.view(-1, args.group_size)
        advantages = group_advantages(groups, args.advantage, self._sum).reshape(-1, 1)
        rollout.advantages = torch.where(mask, advantages.to(rollout.logprobs.dtype), 0.0)

        started = time.perf_counter()
        update = self.update(rollout, step, args.num_iterations, self.backward)
        timing["time/train"] = time.perf_counter() - started
        if update is None:
            return self._skip(step, "losses or gradients")
        self.nonfinite_in_a_row = 0

        if acc.is_main_process and (step % args.sample_every == 0 or step == 1):
            self.write_samples(step, batch, completions, rollout.scores, kl_per_response)
        group_std, no_signal = group_statistics(self._gather(groups))
        per_source = self._gather(torch.stack(list(components.values()), dim=1)).mean(0)
        return {**self.metrics(rollout, rollout.scores, kl_per_response, args.kl_coef, update, timing),
                "objective/group_std": float(group_std), "objective/no_signal_fraction": float(no_signal),
                **{f"rewards/{name}": float(v) for name, v in zip(components, per_source, strict=True)}}

    def rollout(self, batch: list[Prompt], step: int) -> tuple[Rollout, list[str], dict[str, Tensor],
                                                                 dict[str, float]]:
        """The shared rollout (`collect`) with the reward's sources scored one by one; returns them too."""
        model, temperature = self.model, self.args.temperature
        components: dict[str, Tensor] = {}

        def score(prompts: list[Any], completions: list[str]) -> Tensor:
            for term in self.rewards:
                components[term.name] = torch.as_tensor(term.fn(prompts, completions), dtype=torch.float32)
            return sum(term.weight * components[term.name] for term in self.rewards)

        def compute(ids: Tensor, attention: Tensor, start: int) -> dict[str, Tensor]:
            out = model.policy_forward(ids, attention, start, temperature, with_entropy=True)
            return {"logprobs": out.logprobs, "entropy": out.entropy,
                    "ref_logprobs": model.reference_logprobs(ids, attention, start, temperature)}

        rollout, completions, timing = self.collect(batch, step, score, compute)
        return rollout, completions, {k: v.to(self.device) for k, v in components.items()}, timing

    @property
    def weighs_tokens(self) -> bool:
        return self.args.loss_aggregation == "token"

    def backward(self, mb: Rollout, share: float) -> dict[str, Tensor] | None:
        """The loss of one micro-batch, backpropagated weighted by its `share` of the step; None when it is not
        finite on some process."""
        args = self.args
        with self.accelerator.autocast():
            out = self.model.policy_forward(mb.ids, mb.attention, mb.start, args.temperature)
        mask = mb.mask
        how = {"aggregation": args.loss_aggregation, "constant_length": args.max_new_tokens}
        pg_loss, stats = policy_loss(out.logprobs, mb.logprobs, mb.advantages, mask, args.epsilon_low,
                                     args.epsilon_high, **how)
        kl = aggregate(kl_loss_terms(out.logprobs, mb.logprobs, mb.ref_logprobs, mask, args.kl_estimator), mask, **how)
        if not self._backward(pg_loss + args.kl_coef * kl, share):
            return None
        return {"policy/approxkl_avg": stats["approx_kl"], "policy/clipfrac_avg": stats["clipfrac"],
                "loss/policy_avg": pg_loss.detach(), "loss/kl_avg": kl.detach(), "val/ratio": stats["ratio_mean"]}
