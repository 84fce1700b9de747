"""A KV cache for decoding several samples of the same prompts that holds each prompt's keys and values once, and the
attention that reads them once per decoding step for all of the prompt's samples.

Why: a decoding step's attention reads every key and value of every row's context from memory, and does little
arithmetic with each; in the preferences workload (4 samples of each ~65-token prompt, 40 new tokens) the prompt is
most of each row's context. A cache that copies the prompt's keys to each sample's row reads them n times a step (and
copies them again whenever ended rows leave the batch). Here the attention of a step is split in two parts and merged
exactly, by one softmax over both parts' scores:

- prompt part: the queries of a prompt's live rows, stacked into one block, against the prompt's keys and values: one
  matrix product per prompt and KV head, the prompt's keys and values read once for all its samples;
- sampled part: each row against the keys and values of the tokens it has drawn, a buffer of max_new_tokens
  positions per row written one position a step (rows leaving the batch copy only this part).

The model is given a `SharedPromptCache` as `past_key_values` and the same object as the keyword argument
`shared_prompts`, which transformers passes down to the attention function; `decoding_attention` switches the model
to `shared_prompt_attention` (registered in transformers' AttentionInterface) for one decoding forward pass. It
needs a model whose attention goes through that interface (every transformers decoder does) and is plain softmax
attention over the whole context (`check_context_fits`; the sampler checks the rest after its first step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface

from common.errors import InputError

ATTENTION_NAME = "alignlab_shared_prompts"


class SharedPromptCache:
    """Per layer: the distinct prompts' keys and values from the prefill ([P, kv heads, W, head dim], W the padded
    prompt width), the sampled tokens' keys and values per row ([B, kv heads, max_new_tokens, head dim]), and which
    prompt each row samples.

    Args:
        prefill: the transformers cache the prefill of the P distinct (left-padded) prompts filled.
        prompt_mask: [P, W] the prompts' attention mask (0 on left padding).
        row_prompt: [B] the prompt row (0 .. P - 1) each sampled row continues.
        max_new_tokens: positions the sampled part holds.
    """

    def __init__(self, prefill: Any, prompt_mask: Tensor, row_prompt: Tensor, max_new_tokens: int):
        self.prompt_keys = [layer.keys for layer in prefill.layers]
        self.prompt_values = [layer.values for layer in prefill.layers]
        # Added to the prompt part's scores: -inf on left padding (every prompt has a real token, so no row's
        # softmax is over -inf alone).
        self.prompt_bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
        self.prompt_bias.masked_fill_(~prompt_mask.bool(), float("-inf"))
        self.max_new_tokens = max_new_tokens
        self.sampled_keys: list[Tensor | None] = [None] * len(self.prompt_keys)
        self.sampled_values: list[Tensor | None] = [None] * len(self.prompt_keys)
        self.lengths = [0] * len(self.prompt_keys)
        self.attention_calls = 0  # by shared_prompt_attention: 0 after a step means the model bypassed it
        self._set_rows(row_prompt)

    def _set_rows(self, row_prompt: Tensor) -> None:
        """Rows -> slots of the per-prompt query blocks: row r is slot (prompt * block + its rank among the prompt's
        rows), `block` the most rows any prompt has."""
        self.row_prompt = row_prompt
        counts = torch.bincount(row_prompt, minlength=self.prompt_bias.shape[0])
        self.block = int(counts.max())
        order = torch.argsort(row_prompt, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(row_prompt)
        rank[order] = torch.arange(len(row_prompt), device=row_prompt.device) - starts[row_prompt[order]]
        self.slot = row_prompt * self.block + rank
        self.row_bias = self.prompt_bias[row_prompt][:, None, None, :]  # [B, 1, 1, W], for every layer of a step

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append one decoding step's keys and values ([B, kv heads, 1, head dim]) to the sampled part; returns the
        sampled part so far (the attention takes the prompt part from the cache itself)."""
        if key.shape[2] != 1:
            raise ValueError(f"SharedPromptCache: decodes one token a step, got {key.shape[2]} positions")
        if self.sampled_keys[layer_idx] is None:
            shape = (key.shape[0], key.shape[1], self.max_new_tokens, key.shape[3])
            self.sampled_keys[layer_idx] = key.new_zeros(shape)
            self.sampled_values[layer_idx] = value.new_zeros(shape[:3] + value.shape[3:])
        keys, values = self.sampled_keys[layer_idx], self.sampled_values[layer_idx]
        length = self.lengths[layer_idx]
        keys[:, :, length] = key[:, :, 0]
        values[:, :, length] = value[:, :, 0]
        self.lengths[layer_idx] = length + 1
        return keys[:, :, :length + 1], values[:, :, :length + 1]

    def select_rows(self, rows: Tensor) -> None:
        """Keep the given rows, in that order; prompts left without rows are dropped from the prompt part."""
        row_prompt = self.row_prompt[rows]
        alive, row_prompt = torch.unique(row_prompt, return_inverse=True)
        if len(alive) < self.prompt_bias.shape[0]:
            self.prompt_keys = [k[alive] for k in self.prompt_keys]
            self.prompt_values = [v[alive] for v in self.prompt_values]
            self.prompt_bias = self.prompt_bias[alive]
        self.sampled_keys = [None if k is None else k[rows] for k in self.sampled_keys]
        self.sampled_values = [None if v is None else v[rows] for v in self.sampled_values]
        self._set_rows(row_prompt)

    def to_blocks(self, per_row: Tensor) -> Tensor:
        """[B, kv heads, groups, X] -> [P, kv heads, block * groups, X]: each prompt's rows stacked (empty slots 0)."""
        rows, heads, groups, width = per_row.shape
        prompts = self.prompt_bias.shape[0]
        slots = per_row.new_zeros(prompts * self.block, heads, groups, width)
        slots[self.slot] = per_row
        return slots.view(prompts, self.block, heads, groups, width).transpose(1, 2).reshape(
            prompts, heads, self.block * groups, width)

    def from_blocks(self, blocks: Tensor) -> Tensor:
        """The inverse of `to_blocks`: [P, kv heads, block * groups, X] -> [B, kv heads, groups, X]."""
        prompts, heads, stacked, width = blocks.shape
        groups = stacked // self.block
        per_slot = blocks.view(prompts, heads, self.block, groups, width).transpose(1, 2)
        return per_slot.reshape(prompts * self.block, heads, groups, width)[self.slot]


def shared_prompt_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                            scaling: float | None = None, dropout: float = 0.0,
                            shared_prompts: SharedPromptCache | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """softmax(q k / sqrt(d)) v over [the row's prompt, the tokens it sampled], for one decoding position.

    query: [B, heads, 1, head dim]; key, value: the sampled part, [B, kv heads, t, head dim] (from
    `SharedPromptCache.update`). Returns the attention output [B, 1, heads, head dim], as transformers' attention
    functions do.
    """
    if shared_prompts is None:
        raise ValueError("shared_prompt_attention: call the model with shared_prompts=<the SharedPromptCache>")
    if dropout or kwargs.get("softcap"):
        raise ValueError("shared_prompt_attention: plain softmax attention only (no dropout, no logit soft-capping)")
    cache, layer = shared_prompts, module.layer_idx
    cache.attention_calls += 1
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    scaling = head_dim ** -0.5 if scaling is None else scaling
    # Query head h reads KV head h // groups (transformers' repeat_kv order); scaled once here, not in the scores.
    grouped = query.view(rows, kv_heads, heads // kv_heads, head_dim) * scaling
    prompt_keys, prompt_values = cache.prompt_keys[layer], cache.prompt_values[layer]
    prompt_scores = cache.from_blocks(torch.matmul(cache.to_blocks(grouped), prompt_keys.transpose(-1, -2)))
    sampled_scores = torch.matmul(grouped, key.transpose(-1, -2))
    scores = torch.cat([prompt_scores.float() + cache.row_bias, sampled_scores.float()], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    width = prompt_keys.shape[2]
    from_prompt = cache.from_blocks(torch.matmul(cache.to_blocks(probs[..., :width].to(prompt_values.dtype)),
                                                 prompt_values))
    from_sampled = torch.matmul(probs[..., width:].to(value.dtype), value)
    output = (from_prompt + from_sampled).to(query.dtype)
    return output.reshape(rows, 1, heads, head_dim), None


AttentionInterface.register(ATTENTION_NAME, shared_prompt_attention)


def check_context_fits(model: Any, context_length: int) -> None:
    """Raise if the model attends to less than a whole context of `context_length` tokens (a sliding window shorter
    than it), which `shared_prompt_attention` does not do."""
    window = getattr(model.config, "sliding_window", None)
    if window is not None and window < context_length:
        raise InputError(f"sampling: the model attends through a sliding window of {window} tokens, shorter than a "
                         f"prompt plus its completion ({context_length} tokens); shorten the prompts or "
                         "max_new_tokens")


@contextlib.contextmanager
def decoding_attention(model: Any) -> Iterator[None]:
    """The model's attention is `shared_prompt_attention` inside the block (one decoding forward pass)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
