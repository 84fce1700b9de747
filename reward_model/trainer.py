"""trl's RewardTrainer, batching each prompt's pairs together and scoring each distinct sequence once.

A preference set built from K completions per prompt repeats every completion in several pairs (the default
recipe's all-pairs set: 902 chosen / rejected sequences, 425 of them distinct). trl shuffles pairs one by one and
runs the model on both sides of every pair. Here:

- `PromptGroupedSampler` orders the pairs prompt by prompt (prompts shuffled each epoch, pairs shuffled within their
  prompt), so the pairs of one prompt land in the same batch. This is InstructGPT's choice (Ouyang et al. 2022,
  sec. 3.5: all comparisons of a prompt as one batch element, which they found both cheaper and less prone to
  overfitting than shuffling comparisons as independent pairs).
- `ScoreEachSequenceOnce` runs the model on the batch's distinct rows only and hands every pair its rows' rewards,
  so a completion that is chosen in one pair and rejected in another costs one forward and backward pass. The loss,
  its gradients and trl's metrics are those of the full batch (up to dropout, which now draws one mask per
  sequence rather than one per occurrence).
- It runs the prefix those rows share once, too (`common.prefix_sharing`): one pass over each prompt, whose keys
  and values its completions' rows then attend to (gradients flow back through them), and a second over the
  completions. With the default task's ~60-token prompts and ~35-token reviews a batch runs about half the tokens.
  Under DDP, or with gradient checkpointing (which turns the cache off), every row runs whole: DDP syncs the
  gradients of one forward call a step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler
from trl import RewardTrainer

from common.prefix_sharing import forward_with_shared_prefixes, grouped_rows


def prompt_groups(prompts: list[Any]) -> list[list[int]]:
    """Row indices grouped by equal prompt, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(repr(prompt), []).append(row)
    return list(groups.values())


class PromptGroupedSampler(Sampler[int]):
    """Every row once per epoch, the rows of one prompt consecutive; the order is a function of (seed, epoch) alone,
    so every process draws the same one and a resumed run the uninterrupted run's."""

    def __init__(self, groups: list[list[int]], seed: int):
        self.groups, self.seed, self.epoch = groups, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        for group in rng.sample(self.groups, len(self.groups)):
            yield from rng.sample(group, len(group))


class ScoreEachSequenceOnce:
    """Calls `model` (a sequence classifier, pooled at each row's last token that is not padding) on the distinct rows
    of (input_ids, attention_mask), the prefix they share run once, and returns its output with the logits of every
    original row, in the original order (gradients flow back through the indexing)."""

    def __init__(self, model: Any):
        self.model = model
        self.pad_id = getattr(model, "module", model).config.pad_token_id  # through a DDP wrapper
        # DDP syncs the gradients of one forward call; gradient checkpointing turns the cache off.
        self.share_prefixes = not (isinstance(model, DistributedDataParallel)
                                   or getattr(model, "is_gradient_checkpointing", False))

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        distinct, inverse = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0, return_inverse=True)
        if len(distinct) == len(input_ids):
            return self.forward(input_ids, attention_mask, **kwargs)
        # One representative row per distinct sequence: its first occurrence.
        rows = torch.arange(len(input_ids), device=input_ids.device)
        first = torch.full((len(distinct),), len(input_ids), device=input_ids.device).scatter_reduce(
            0, inverse, rows, reduce="amin")
        out = self.forward(input_ids[first], attention_mask[first], **kwargs)
        out.logits = out.logits[inverse]
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
        grouped = grouped_rows(input_ids, attention_mask, self.pad_id) if self.share_prefixes else None
        if grouped is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("use_cache", None)
        return forward_with_shared_prefixes(self.model, *grouped, self.pad_id, input_ids.device, **kwargs).rests


class GroupedRewardTrainer(RewardTrainer):
    """RewardTrainer with prompt-grouped batches (when `group_by_prompt`) and one forward pass per distinct sequence."""

    def __init__(self, *args: Any, group_by_prompt: bool = True, **kwargs: Any):
        self.group_by_prompt = group_by_prompt
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: datasets.Dataset | None = None) -> Sampler | None:
        # The dataset handed in has lost its prompt column (trl keeps only the token ids); the trainer's has it.
        dataset = self.train_dataset
        if not self.group_by_prompt or "prompt" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        return PromptGroupedSampler(prompt_groups(dataset["prompt"]), self.args.seed)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        return super().compute_loss(ScoreEachSequenceOnce(model), inputs, return_outputs, num_items_in_batch)
