"""RLHF-PPO, the loop written out: one step = rollout, rewards, advantages, PPO epochs.

    for step in 1 .. max_steps:
        prompts      <- this process's share of the global batch (a seeded permutation per epoch)
        responses    <- sample from the policy (KV cache, temperature T), cut after the first EOS
        scores       <- gold scorer or reward model on (prompt, response); normalise; missing-EOS penalty; clip
        log-probs    <- policy (old) and reference, recomputed at temperature T; values V(s_t)
        rewards      <- score at the last token - beta * KL per token        (Ziegler et al. 2019, eq. 1)
        advantages   <- GAE(gamma, lambda), whitened over the global batch   (Schulman et al. 2016)
        for epoch in 1 .. ppo_epochs, for each minibatch (micro-batches accumulate gradients):
            loss = clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy  (Schulman et al. 2017)
            gradients averaged over processes, clipped, AdamW step
        beta         <- KL controller (fixed, or adaptive towards a target KL)

Data parallelism without DDP: every process samples its own share of the prompts; the few quantities that must be
global (score normalisation, advantage whitening, logged metrics) are reduced explicitly, and gradients are averaged
with one all-reduce of the flattened trainable parameters' gradients (the adapters are small). Every process then
applies the same update to the same weights, so the adapters stay identical without DDP's wrapper, which would
broadcast the frozen base at start and cannot follow a forward that switches adapters.

The loop itself (sampling, micro-batched forward passes, minibatch passes, gradient averaging, guards, checkpoints)
is `OnPolicyTrainer`, shared with the critic-free family in ppo.grpo_trainer; `PPOTrainer` adds the rollout's
values, GAE, the value loss and the KL controller.

Gold beside the proxy (Gao et al. 2022): with a gold scorer (`gold_fn`), each rollout is scored by it too and logged as
`objective/gold_scores` beside the learned reward `objective/scores`, with `objective/sqrt_kl`, the x-axis on which
over-optimisation shows (the proxy keeps rising while the gold peaks and falls). With `args.keep_best: gold` the
policy is also sampled on held-out prompts every `keep_best_every` steps and at the last step (the one sampler, a
fixed seed), `heldout/gold_scores` is logged, and the policy with the highest held-out gold (the earliest on a tie)
is kept, in every checkpoint too, and loaded back at the end: the stage saves it.

Guards: a step whose scores, log-probs, values or losses are not finite is skipped (counted in `guard/...`; the
learning-rate schedule still advances by the step's share);
`max_nonfinite_steps` in a row stop the run. A mean KL per response above `kl_ceiling` stops it before the update,
and sets aside the checkpoint that holds the offending policy, so --resume continues from the last good one.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from common.runs import drop_lines_after
from common.sampling import SamplingParams, encode_prompts
from common.tracking import Tracker
from ppo.adapters import POLICY, OneBaseModel
from ppo.advantages import gae, global_whiten, masked_mean, per_token_rewards
from ppo.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint, set_aside
from ppo.config import PPOArgs
from ppo.kl import kl_loss_terms, kl_penalty, make_kl_controller
from ppo.losses import policy_loss, value_loss

log = logging.getLogger(__name__)

# (prompts as given in the data, completion texts) -> one score per completion
RewardFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]
# Offsets mixed into per-step seeds, so that sampling and minibatch order draw independent streams.
SAMPLING, MINIBATCH_ORDER = 0, 1


class TrainingStopped(RuntimeError):
    """A guard stopped the run (non-finite values, KL ceiling); the message says why and what to do."""


@dataclass
class Prompt:
    prompt: Any  # as in the data: text or chat messages (what the reward function sees)
    ids: list[int]  # chat-templated, ready for generation


def rollout_prompts(tokenizer: Any, records: Sequence[Any], source: str) -> list[Prompt]:
    """The prompts of a rollout: each record with its model input (`common.sampling.encode_prompts`)."""
    encoded = encode_prompts(tokenizer, records, source)
    return [Prompt(record, ids) for record, ids in zip(records, encoded, strict=True)]


# --- pure helpers (tested on their own) ----------------------------------------------------------------------------

def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A seed for one (step, process, stream): a resumed run draws exactly what the uninterrupted one did, without
    depending on how much of the global RNG earlier steps consumed."""
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0])


def prompt_indices(num_prompts: int, step: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
    """The prompts process `rank` samples at `step` (1-based).

    The prompts are read as an endless sequence of epochs, each a fresh permutation seeded by (seed, epoch); step s
    takes the global batch at positions [(s - 1) * G, s * G) with G = batch_size * world_size, and process r the
    r-th block of `batch_size` of it. Pure in its arguments, so resuming needs no data-loader state.
    """
    global_batch = batch_size * world_size
    first = (step - 1) * global_batch + rank * batch_size
    indices, cached = [], {}
    for position in range(first, first + batch_size):
        epoch = position // num_prompts
        if epoch not in cached:
            cached[epoch] = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        indices.append(cached[epoch][position % num_prompts])
    return indices


def trim_padding(ids: Tensor, mask: Tensor, start: int) -> tuple[slice, slice, int]:
    """Columns of a (micro-)batch that hold at least one real token: (sequence columns, response columns, new start).
    Left padding shared by every row and right padding after every response cost compute and change nothing."""
    real = mask.bool().any(dim=0)
    left = int(real.long().argmax())
    right = int(real.shape[0] - real.flip(0).long().argmax())
    right = max(right, start + 1)  # keep at least one response column
    return slice(left, right), slice(0, right - start), start - left


# --- the rollout ---------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """One step's experience on this process. Per-token tensors are [B, R] over the response tokens."""

    ids: Tensor  # [B, P + R] left-padded prompts, then responses (padded after their EOS)
    attention: Tensor  # [B, P + R]
    start: int  # P
    has_eos: Tensor  # [B]
    logprobs: Tensor  # log pi_old(token)
    ref_logprobs: Tensor  # log pi_ref(token)
    entropy: Tensor  # entropy of pi_old at each token (a statistic)
    scores: Tensor  # [B] raw scores from the reward
    gold_scores: Tensor | None = None  # [B] the gold scorer's, when there is one (logged, never trained on)
    values: Tensor | None = None  # V_old(s_t); None without a value function (the critic-free family)
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        return self.attention[:, self.start:]

    def micro_batch(self, rows: Tensor) -> Rollout:
        """Rows `rows`, with all-padding columns trimmed."""
        columns, response_columns, start = trim_padding(self.ids[rows], self.attention[rows], self.start)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ids", "attention"):
                picked[f.name] = value[rows][:, columns]
            elif isinstance(value, Tensor) and value.dim() == 2:
                picked[f.name] = value[rows][:, response_columns]
            elif isinstance(value, Tensor):
                picked[f.name] = value[rows]
        return Rollout(start=start, **picked)


@dataclass
class PolicySamples:
    """Completions sampled from the policy on this process, cut after their first EOS."""

    ids: Tensor  # [B, P + R] left-padded prompts, then responses (padded after their EOS)
    attention: Tensor  # [B, P + R]
    start: int  # P
    has_eos: Tensor  # [B]
    completions: list[str]  # the decoded responses


class OnPolicyTrainer:
    """The loop PPO and the critic-free family (ppo.grpo_trainer) share: sampling, micro-batched no-grad forward
    passes, the update's minibatch passes with gradients averaged over processes, the guards, checkpoints and
    resume, the gold beside the proxy and keep_best (module docstring). A subclass implements
    `training_step(step) -> metrics` (and, for its own state, `trainer_state` / `load_trainer_state`); `name`
    prefixes its logs."""

    name = "ppo"
    # What the guards' messages suggest besides a lower learning rate.
    nonfinite_hint = "set args.score_clip / normalize_scores"
    kl_hint = " (or set kl_target)"
    # Whether each micro-batch's loss is a mean over its tokens (PPO's every term) rather than over its responses.
    weighs_tokens = True

    def __init__(self, args: Any, model: OneBaseModel, tokenizer: Any, prompts: list[Prompt], accelerator: Any,
                 tracker: Tracker, stage_dir: Path, seed: int, optimizer_steps: int, gold_fn: RewardFn | None = None,
                 heldout: Sequence[Prompt] = ()):
        if args.keep_best == "gold" and (gold_fn is None or not heldout):
            raise ValueError(f"{self.name}: keep_best: gold needs a gold scorer and held-out prompts")
        self.args, self.model, self.tokenizer, self.prompts = args, model, tokenizer, prompts
        self.gold_fn, self.heldout = gold_fn, list(heldout)
        self.accelerator, self.tracker, self.seed = accelerator, tracker, seed
        self.stage_dir, self.checkpoints = stage_dir, stage_dir / "checkpoints"
        if accelerator.is_main_process:
            stage_dir.mkdir(parents=True, exist_ok=True)
        self.device = accelerator.device
        self.params = model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, weight_decay=args.weight_decay)
        self.optimizer_steps_per_step = optimizer_steps // args.max_steps
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, num_warmup_steps=args.warmup_steps,
                                       num_training_steps=optimizer_steps)
        self.step = 0  # completed steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_metrics: dict[str, float] = {}
        # keep_best: gold: {"step", "gold"} of the best held-out evaluation so far and {"last_step", "last_gold"} of
        # the latest; the best policy's adapter weights (`policy.<key>`, as in trainable_state).
        self.best: dict[str, float] = {}
        self.best_policy: dict[str, Tensor] = {}

    # --- reductions over processes -------------------------------------------------------------------------------
    def _sum(self, x: Tensor) -> Tensor:
        return self.accelerator.reduce(x, reduction="sum") if self.accelerator.num_processes > 1 else x

    def _gather(self, x: Tensor) -> Tensor:
        return self.accelerator.gather(x) if self.accelerator.num_processes > 1 else x

    def _anywhere(self, flag: bool) -> bool:
        """True on every process when it is true on any (all processes must take the same branch)."""
        return bool(self._sum(torch.tensor(float(flag), device=self.device)) > 0)

    # --- the loop ------------------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> dict[str, float]:
        if resume:
            self._resume()
        args = self.args
        bar = tqdm(total=args.max_steps, initial=self.step, desc=self.name,
                   disable=not self.accelerator.is_main_process)
        while self.step < args.max_steps:
            step = self.step + 1
            metrics = self.training_step(step)
            if args.keep_best == "gold" and (step % args.keep_best_every == 0 or step == args.max_steps):
                metrics |= self.evaluate_heldout(step)
            self.step = step
            self.tracker.log(metrics, step)
            bar.update(1)
            if "objective/scores" in metrics:  # not a skipped step
                self.last_metrics = metrics
                bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if step % args.save_steps == 0 or step == args.max_steps:
                self.save(step)
        bar.close()
        if args.keep_best == "gold":
            return self.last_metrics | self.restore_best()
        return self.last_metrics

    def training_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def step_prompts(self, step: int, batch_size: int) -> list[Prompt]:
        acc = self.accelerator
        return [self.prompts[i] for i in prompt_indices(len(self.prompts), step, batch_size, acc.process_index,
                                                        acc.num_processes, self.seed)]

    # --- sampling and the rollout's forward passes ---------------------------------------------------------------
    def sample(self, prompt_ids: list[list[int]], step: int) -> PolicySamples:
        """One completion per entry of `prompt_ids` from the policy: every stage of this family samples here."""
        args, tok = self.args, self.tokenizer
        self.model.eval()
        # Under the update's autocast: the tokens are drawn from the distribution whose log-probs the update
        # recomputes (the first pass starts at ratio 1).
        with self.accelerator.autocast():
            params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    seed=step_seed(self.seed, step, self.accelerator.process_index, SAMPLING))
            samples = self.model.sample(tok, prompt_ids, params)
        batch = samples.padded(range(len(prompt_ids)), tok.pad_token_id, self.device)
        return PolicySamples(ids=batch.ids, attention=batch.attention_mask, start=batch.response_start,
                             has_eos=batch.has_eos, completions=samples.texts)

    def collect(self, batch: list[Prompt], step: int, score: Callable[[list[Any], list[str]], Tensor],
                compute: Callable[[Tensor, Tensor, int], dict[str, Tensor]]) -> tuple[Rollout, list[str],
                                                                                      dict[str, float]]:
        """The rollout: sample one completion per prompt of `batch`, `score` them (prompts as in the data,
        completions -> [B] scores) and run `compute` over the samples (see `per_token`)."""
        t0 = time.perf_counter()
        samples = self.sample([p.ids for p in batch], step)
        t1 = time.perf_counter()
        scores = score([p.prompt for p in batch], samples.completions).to(self.device)
        t2 = time.perf_counter()
        gold = None if self.gold_fn is None else self.gold(batch, samples.completions)
        t3 = time.perf_counter()
        per_token = self.per_token(samples, compute)
        t4 = time.perf_counter()
        rollout = Rollout(ids=samples.ids, attention=samples.attention, start=samples.start,
                          has_eos=samples.has_eos, scores=scores, gold_scores=gold, **per_token)
        timing = {"time/generate": t1 - t0, "time/score": t2 - t1, "time/forward": t4 - t3, "time/rollout": t4 - t0}
        if gold is not None:
            timing["time/gold"] = t3 - t2
        return rollout, samples.completions, timing

    def gold(self, batch: Sequence[Prompt], completions: list[str]) -> Tensor:
        """[B] gold scores of completions to `batch` (the gold scorer is given them as the reward is)."""
        return torch.as_tensor(self.gold_fn([p.prompt for p in batch], completions), dtype=torch.float32,
                               device=self.device)

    def per_token(self, samples: PolicySamples,
                  compute: Callable[[Tensor, Tensor, int], dict[str, Tensor]]) -> dict[str, Tensor]:
        """`compute(ids, attention, start)` -> per-token tensors, run without gradients over micro-batches with
        their all-padding columns trimmed; the results padded back to [B, R] (0 on padding)."""
        ids, attention, start = samples.ids, samples.attention, samples.start
        width = ids.shape[1] - start
        parts: dict[str, list[Tensor]] = {}
        with torch.no_grad(), self.accelerator.autocast():
            for rows in torch.arange(ids.shape[0]).split(self.args.micro_batch_size):
                columns, response_columns, micro_start = trim_padding(ids[rows], attention[rows], start)
                for name, value in compute(ids[rows][:, columns], attention[rows][:, columns], micro_start).items():
                    padded = torch.zeros(len(rows), width, dtype=value.dtype, device=value.device)
                    padded[:, response_columns] = value
                    parts.setdefault(name, []).append(padded)
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def finite(self, rollout: Rollout, per_token: tuple[Tensor, ...]) -> bool:
        """Whether the scores and `per_token` (on the response tokens) are finite on every process."""
        mask = rollout.mask.bool()
        finite = all(bool(torch.isfinite(t[mask]).all()) for t in per_token)
        return not self._anywhere(not (finite and bool(torch.isfinite(rollout.scores).all())))

    def rollout_kl(self, rollout: Rollout, estimator: str, step: int) -> tuple[Tensor, float]:
        """Per-token KL(pi || pi_ref) estimates of the rollout (0 on padding) and their mean sum per response over
        the global batch; a mean above args.kl_ceiling stops the run here, before the update."""
        mask = rollout.mask.bool()
        kl = torch.where(mask, kl_penalty(rollout.logprobs, rollout.ref_logprobs, estimator), 0.0)
        mean_kl = float(self._gather(kl.sum(1)).mean())
        if self.args.kl_ceiling is not None and mean_kl > self.args.kl_ceiling:
            self._stop_for_kl(step, mean_kl)
        return kl, mean_kl

    # --- update --------------------------------------------------------------------------------------------------
    def update(self, rollout: Rollout, step: int, passes: int,
               backward: Callable[[Rollout, float], dict[str, Tensor] | None]) -> dict[str, float] | None:
        """`passes` passes over the rollout in shuffled minibatches (one optimizer step each; `backward` each
        micro-batch, with its share of the step's loss: `loss_shares`). Returns the averaged statistics, or None
        when a loss or gradient was not finite (the rest of the update is then skipped; minibatches already applied
        stay applied)."""
        args, model = self.args, self.model
        model.train()
        order_rng = torch.Generator().manual_seed(step_seed(self.seed, step, self.accelerator.process_index,
                                                            MINIBATCH_ORDER))
        totals: dict[str, float] = {}
        count = 0
        size = rollout.ids.shape[0]
        for _ in range(passes):
            order = torch.randperm(size, generator=order_rng)
            for minibatch in order.split(args.minibatch_size):
                micro_batches = [rows.to(rollout.ids.device) for rows in minibatch.split(args.micro_batch_size)]
                for rows, share in zip(micro_batches, self.loss_shares(rollout, micro_batches), strict=True):
                    stats = backward(rollout.micro_batch(rows), share)
                    if stats is None:
                        self.optimizer.zero_grad(set_to_none=True)
                        return None
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0.0) + float(v)
                    count += 1
                if not self.optimizer_step():
                    return None
        averaged = torch.tensor([totals[k] / count for k in totals], device=self.device)
        averaged = self._sum(averaged) / self.accelerator.num_processes
        return dict(zip(totals, averaged.tolist(), strict=True))

    def loss_shares(self, rollout: Rollout, micro_batches: list[Tensor]) -> list[float]:
        """The weight of each micro-batch's loss (a mean over its own tokens, or for `weighs_tokens` False its own
        responses) in the optimizer step: its tokens (responses) over the minibatch's on every process, times the
        number of processes (`optimizer_step` averages the gradients over them). The step's gradient is then that of
        one mean over all the minibatch's tokens, however it was split into micro-batches and processes, as DAPO's
        token-level loss is defined (Yu et al. 2025, eq. 12; trl's "dapo" loss normalises the same way). Dividing by
        the number of micro-batches instead would give a token of a micro-batch of short responses more weight."""
        if self.weighs_tokens:
            counts = torch.stack([rollout.mask[rows].sum() for rows in micro_batches]).float()
        else:
            counts = torch.tensor([float(len(rows)) for rows in micro_batches], device=self.device)
        total = self._sum(counts.sum())
        return (counts * self.accelerator.num_processes / total).tolist()

    def _backward(self, loss: Tensor, share: float) -> bool:
        if self._anywhere(not bool(torch.isfinite(loss))):
            return False
        (loss * share).backward()
        return True

    def optimizer_step(self) -> bool:
        """Average gradients over processes, clip, step. False (and no step) when the gradient is not finite."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.accelerator.num_processes > 1:
            flat = self._sum(torch.cat([g.reshape(-1) for g in grads])) / self.accelerator.num_processes
            for p, g in zip(self.params, flat.split([g.numel() for g in grads]), strict=True):
                p.grad = g.view_as(p).clone()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm)
        if not bool(torch.isfinite(norm)):  # identical on every process: the gradients are
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # --- metrics, samples, guards --------------------------------------------------------------------------------
    def metrics(self, rollout: Rollout, scores: Tensor, kl_per_response: Tensor, beta: float,
                update: dict[str, float], timing: dict[str, float]) -> dict[str, float]:
        """The step's metrics, over the global batch.

        objective/scores: mean raw score (before the missing-EOS penalty, normalisation and clipping);
        objective/gold_scores (with a gold scorer): mean gold score of the same responses;
        objective/kl: mean over responses of the summed per-token KL estimate (args.kl_estimator_used);
        objective/sqrt_kl: its square root (0 for a negative estimate), Gao et al. 2022's distance from the
        initial policy, d = sqrt(KL(pi || pi_init)) per response, on which gold and proxy are plotted;
        objective/non_score_reward: -beta * objective/kl; objective/rlhf_reward: mean of (shaped score - beta * KL),
        the objective PPO maximises; objective/entropy: mean entropy of the policy at the response tokens.
        policy/*, loss/*, val/clipfrac_avg and val/ratio: means over the update's micro-batches;
        val/num_eos_tokens: how many responses ended with EOS; time/*: seconds of this step, on this process.
        """
        mask = rollout.mask.bool()
        per_response = torch.stack([rollout.scores, kl_per_response, scores - beta * kl_per_response,
                                    rollout.has_eos.float(), mask.sum(1).float()], dim=1)
        per_response = self._gather(per_response)
        token_sums = self._sum(torch.stack([torch.where(mask, rollout.entropy, 0.0).sum(), mask.sum().float()]))
        seconds = timing["time/rollout"] + timing["time/train"]
        response_tokens = float(per_response[:, 4].sum())
        mean_kl = float(per_response[:, 1].mean())
        gold = {} if rollout.gold_scores is None else {
            "objective/gold_scores": float(self._gather(rollout.gold_scores).mean())}
        return {
            "objective/scores": float(per_response[:, 0].mean()),
            **gold,
            "objective/kl": mean_kl,
            "objective/sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
            "objective/non_score_reward": float(-beta * per_response[:, 1].mean()),
            "objective/rlhf_reward": float(per_response[:, 2].mean()),
            "objective/entropy": float(token_sums[0] / token_sums[1]),
            **update,
            "val/num_eos_tokens": float(per_response[:, 3].sum()),
            "val/response_length": float(per_response[:, 4].mean()),
            "kl/coef": beta,
            "train/learning_rate": self.scheduler.get_last_lr()[0],
            "guard/nonfinite_steps": float(self.nonfinite_total),
            **timing,
            "perf/tokens_per_s": response_tokens / seconds,
        }

    def write_samples(self, step: int, batch: list[Prompt], completions: list[str], scores: Tensor,
                      kl: Tensor) -> None:
        rows = [{"step": step, "prompt": p.prompt, "completion": c, "score": float(s), "kl": float(k)}
                for p, c, s, k in list(zip(batch, completions, scores, kl, strict=True))[: self.args.num_samples]]
        with open(self.stage_dir / "samples.jsonl", "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    def _skip(self, step: int, what: str) -> dict[str, float]:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._advance_schedule_to(step)
        log.warning("%s step %d: non-finite %s; the batch is skipped (%d in a row) and the learning-rate schedule "
                    "moves on as if it had trained", self.name, step, what, self.nonfinite_in_a_row)
        if self.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            self.tracker.log({"guard/nonfinite_steps": float(self.nonfinite_total)}, step)
            raise TrainingStopped(
                f"{self.name}: {self.nonfinite_in_a_row} steps in a row had non-finite {what} (up to step {step}); "
                f"stopped. Lower args.learning_rate, {self.nonfinite_hint}, or check the reward; "
                f"--resume continues from {latest_checkpoint(self.checkpoints) or 'the start'}")
        return {"guard/nonfinite_steps": float(self.nonfinite_total)}

    def _advance_schedule_to(self, step: int) -> None:
        """Step the scheduler to where it is after `step` steps that all trained: the schedule is laid out over
        max_steps (warm-up, decay to the end), and a skipped step (or the rest of one, when a minibatch failed
        half-way) would otherwise shift every later learning rate and leave the decay unfinished at the last step."""
        with warnings.catch_warnings():  # a first step skipped steps the scheduler before any optimizer.step()
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            while self.scheduler.last_epoch < step * self.optimizer_steps_per_step:
                self.scheduler.step()

    def _stop_for_kl(self, step: int, mean_kl: float) -> None:
        """The policy sampled at `step` is the one saved after step - 1: that checkpoint is set aside, so --resume
        takes the last one whose policy stayed within the ceiling."""
        self.tracker.log({"objective/kl": mean_kl, "guard/kl_ceiling_exceeded": 1.0}, step)
        self.accelerator.wait_for_everyone()
        bad = checkpoint_dir(self.checkpoints, step - 1)
        note = ""
        if self.accelerator.is_main_process and bad.is_dir():
            note = f"; {bad.name} (that policy) was renamed {set_aside(bad, 'kl-ceiling').name}"
        self.accelerator.wait_for_everyone()
        good = latest_checkpoint(self.checkpoints)
        raise TrainingStopped(
            f"{self.name}: objective/kl = {mean_kl:.4g} at step {step} exceeds args.kl_ceiling = "
            f"{self.args.kl_ceiling}; stopped before updating{note}. Last good checkpoint: {good or 'none'}. Raise "
            f"args.kl_coef{self.kl_hint}, lower args.learning_rate, or raise kl_ceiling")

    # --- keep_best: gold -----------------------------------------------------------------------------------------
    def evaluate_heldout(self, step: int) -> dict[str, float]:
        """The policy's mean gold score on the held-out prompts, one sample each at a fixed seed (the same random
        draws at every evaluation, so two evaluations differ by the policy alone); keeps the policy when it beats
        the best so far. Every process samples and scores all of them, so every process keeps the same one."""
        args = self.args
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=self.seed)
        self.model.eval()
        with self.accelerator.autocast():
            samples = self.model.sample(self.tokenizer, [p.ids for p in self.heldout], params)
        gold = float(self.gold(self.heldout, samples.texts).mean())
        if not self.best or gold > self.best["gold"] or math.isnan(self.best["gold"]):
            self.best.update(step=step, gold=gold)
            # A copy: on a CPU, trainable_state's tensors share the live parameters' memory.
            self.best_policy = {k: v.clone() for k, v in self.model.trainable_state().items()
                                if k.startswith(f"{POLICY}.")}
        self.best.update(last_step=step, last_gold=gold)
        return {"heldout/gold_scores": gold, "heldout/best_step": float(self.best["step"])}

    def restore_best(self) -> dict[str, float]:
        """Load the best held-out policy back into the model (what the stage then saves); its numbers, and a
        warning when it is not the last step's policy."""
        best = self.best
        self.model.load_trainable_state(self.model.trainable_state() | self.best_policy)
        if best["step"] != best["last_step"]:
            log.warning("%s: the last step is not the best: held-out gold peaked at step %d (%.4g), the last step "
                        "(%d) scored %.4g; the saved adapter is step %d's (keep_best: gold)", self.name,
                        best["step"], best["gold"], best["last_step"], best["last_gold"], best["step"])
        return {"heldout/best_step": float(best["step"]), "heldout/best_gold_scores": best["gold"],
                "heldout/last_gold_scores": best["last_gold"],
                "heldout/last_is_best": float(best["step"] == best["last_step"])}

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "nonfinite_total": self.nonfinite_total, "last_metrics": self.last_metrics, "best": self.best}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.nonfinite_in_a_row, self.nonfinite_total = state["nonfinite_in_a_row"], state["nonfinite_total"]
        self.last_metrics = state["last_metrics"]
        self.best = state.get("best", {})

    def save(self, step: int) -> None:
        # The best policy so far travels in the checkpoint (as `best.policy.<key>`), so a resumed run still knows it.
        trainable = self.model.trainable_state() | {f"best.{k}": v for k, v in self.best_policy.items()}
        save_checkpoint(self.checkpoints, step, trainable, self.optimizer, self.scheduler, self.trainer_state(),
                        self.accelerator, keep=self.args.save_total_limit)

    def _resume(self) -> None:
        path = latest_checkpoint(self.checkpoints) if self.checkpoints.is_dir() else None
        for torn in sorted(self.checkpoints.glob("checkpoint-*.partial")):
            log.warning("%s: passing over %s: the run was stopped while it was written", self.name, torn)
        if path is None:
            log.info("%s: no checkpoint in %s; starting from step 0", self.name, self.checkpoints)
            return
        trainable, state = load_checkpoint(path, self.optimizer, self.scheduler, self.accelerator)
        self.model.load_trainable_state(trainable)  # reads the `policy.` / `value.` / `value_head.` keys only
        self.best_policy = {k.removeprefix("best."): v for k, v in trainable.items() if k.startswith("best.")}
        self.load_trainer_state(state)
        log.info("%s: resumed from %s (step %d of %d)", self.name, path, self.step, self.args.max_steps)
        if self.accelerator.is_main_process:  # later lines will be written again, by the steps that follow
            for name in ("metrics.jsonl", "samples.jsonl"):
                drop_lines_after(self.stage_dir / name, self.step)
        self.accelerator.wait_for_everyone()


class PPOTrainer(OnPolicyTrainer):
    def __init__(self, args: PPOArgs, model: OneBaseModel, tokenizer: Any, prompts: list[Prompt], reward_fn: RewardFn,
                 accelerator: Any, tracker: Tracker, stage_dir: Path, seed: int, gold_fn: RewardFn | None = None,
                 heldout: Sequence[Prompt] = ()):
        minibatches = args.rollout_batch_size // args.minibatch_size
        super().__init__(args, model, tokenizer, prompts, accelerator, tracker, stage_dir, seed,
                         optimizer_steps=args.max_steps * args.ppo_epochs * minibatches, gold_fn=gold_fn,
                         heldout=heldout)
        self.reward_fn = reward_fn
        self.kl_ctl = make_kl_controller(args.kl_coef, args.kl_target, args.kl_horizon)

    def training_step(self, step: int) -> dict[str, float]:
        """One rollout and its PPO epochs (see the module docstring); returns the step's metrics."""
        args, acc = self.args, self.accelerator
        batch = self.step_prompts(step, args.rollout_batch_size)
        rollout, completions, timing = self.rollout(batch, step)
        beta = self.kl_ctl.value
        mask = rollout.mask.bool()
        if not self.finite(rollout, (rollout.logprobs, rollout.ref_logprobs, rollout.values)):
            return self._skip(step, "scores, log-probs or values")
        kl, mean_kl = self.rollout_kl(rollout, args.kl_estimator_used, step)
        kl_per_response = kl.sum(1)

        scores = self.shape_scores(rollout.scores, rollout.has_eos)
        rewards = per_token_rewards(scores, kl, beta if args.kl_in_reward else 0.0, mask)
        advantages, returns = gae(rewards, rollout.values, mask, args.gamma, args.lam)
        rollout.advantages = global_whiten(advantages, mask, self._sum)
        rollout.returns = returns

        started = time.perf_counter()
        update = self.update(rollout, step, args.ppo_epochs, lambda mb, share: self.backward(mb, beta, share))
        timing["time/train"] = time.perf_counter() - started
        if update is None:
            return self._skip(step, "losses or gradients")
        self.nonfinite_in_a_row = 0
        self.kl_ctl.update(mean_kl, n_steps=args.rollout_batch_size * acc.num_processes)

        if acc.is_main_process and (step % args.sample_every == 0 or step == 1):
            self.write_samples(step, batch, completions, rollout.scores, kl_per_response)
        return self.metrics(rollout, scores, kl_per_response, beta, update, timing)

    # --- rollout -------------------------------------------------------------------------------------------------
    def rollout(self, batch: list[Prompt], step: int) -> tuple[Rollout, list[str], dict[str, float]]:
        model, temperature = self.model, self.args.temperature

        def score(prompts: list[Any], completions: list[str]) -> Tensor:
            return torch.as_tensor(self.reward_fn(prompts, completions), dtype=torch.float32)

        def compute(ids: Tensor, attention: Tensor, start: int) -> dict[str, Tensor]:
            out = model.policy_forward(ids, attention, start, temperature, with_entropy=True)
            values = out.values if out.values is not None else model.values(ids, attention, start)
            return {"logprobs": out.logprobs, "ref_logprobs": model.reference_logprobs(ids, attention, start,
                                                                                         temperature),
                    "values": values, "entropy": out.entropy}

        return self.collect(batch, step, score, compute)

    def shape_scores(self, scores: Tensor, has_eos: Tensor) -> Tensor:
        """The score that enters the reward: (optionally) standardised over the global batch, then the missing-EOS
        penalty, then clipped. Penalising after standardising keeps the penalty in the units the recipe gives it
        (standardising after would cost a response penalty / sigma and inflate sigma itself). trl's PPO trainer
        did the same: it subtracted the penalty from the reward model's scores, which the N+ recipe has normalised
        beforehand (Huang et al. 2024, details 8 and 10)."""
        args = self.args
        if args.normalize_scores:
            everyone = self._gather(scores)
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-8)
        if args.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - args.missing_eos_penalty)
        if args.score_clip is not None:
            scores = scores.clamp(-args.score_clip, args.score_clip)
        return scores

    # --- update --------------------------------------------------------------------------------------------------
    def backward(self, mb: Rollout, beta: float, share: float) -> dict[str, Tensor] | None:
        """The losses of one micro-batch (per-token means), backpropagated weighted by its `share` of the step
        (gradients add up over its minibatch); None when a loss is not finite on some process (nothing more is
        backpropagated then).

        A separate value adapter gets its own forward and backward pass after the policy's: gradient checkpointing
        recomputes layers during the backward pass with the adapter active at that time (see ppo.adapters).
        """
        args, model, mask = self.args, self.model, mb.mask
        with self.accelerator.autocast():
            out = model.policy_forward(mb.ids, mb.attention, mb.start, args.temperature,
                                       with_entropy=args.entropy_coef > 0)
        pg_loss, pg_stats = policy_loss(out.logprobs, mb.logprobs, mb.advantages, mask, args.clip_range)
        loss = pg_loss
        if args.entropy_coef > 0:
            loss = loss - args.entropy_coef * masked_mean(out.entropy, mask)
        if not args.kl_in_reward:
            # The KL term in the loss: mean per-token term, differentiated through the policy's log-probs along the
            # reverse KL (ppo/kl.py).
            loss = loss + beta * masked_mean(kl_loss_terms(out.logprobs, mb.logprobs, mb.ref_logprobs, mask,
                                                           args.kl_estimator_used), mask)
        values = out.values
        if values is None:
            if not self._backward(loss, share):
                return None
            loss = torch.zeros((), device=loss.device)
            with self.accelerator.autocast():
                values = model.values(mb.ids, mb.attention, mb.start)
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mask, args.clip_range_value)
        if not self._backward(loss + args.vf_coef * vf_loss, share):
            return None
        return {"policy/approxkl_avg": pg_stats["approx_kl"], "policy/clipfrac_avg": pg_stats["clipfrac"],
                "loss/policy_avg": pg_loss.detach(), "loss/value_avg": vf_loss.detach(),
                "val/clipfrac_avg": vf_stats["clipfrac"], "val/ratio": pg_stats["ratio_mean"]}

    def trainer_state(self) -> dict[str, Any]:
        return super().trainer_state() | {"kl_controller": self.kl_ctl.state_dict()}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        self.kl_ctl.load_state_dict(state["kl_controller"])

