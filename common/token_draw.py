"""Drawing the next token: exactly softmax(logits / T), optionally restricted to the top_k tokens and the top_p
nucleus, by inverse CDF with one uniform per row (the sampler's random streams give the uniforms).

Two ways in, one distribution:

- `draw_tokens(logits, ...)`: from a model's logits; top_k and top_p allowed.
- `HeadDraw(lm_head_weight, ...)(hidden, ...)`: from the last hidden states, the LM head and the draw in one pass
  over the vocabulary, for unrestricted sampling on models whose logits are `hidden @ weight.T` exactly
  (`plain_lm_head`). At a decoding step of 512 rows SmolLM2's head writes [512, 49,152] floats (100 MB) that the
  softmax, the block sums and the gathers then read back four or five times: memory traffic that cost about as much
  as the matrix product on 2 CPU cores. `HeadDraw` runs the head a vocabulary chunk at a time and reduces each chunk
  while it is still in cache (its maximum, exp(z - max), the block sums the inverse CDF needs), so no logits are
  materialised; the head and the draw take ~30% less time at 512 rows (`benchmarks/sampling.py`, prefs part).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

BLOCK = 256  # tokens per block of the two-level inverse CDF
HEAD_CHUNK = 4096  # vocabulary rows of the LM head per matrix product in `HeadDraw`: [512 rows, chunk] is 8 MB
# Model types whose causal-LM forward returns lm_head(last hidden state) as it is: no logit soft-capping (Gemma 2),
# scaling (Cohere, Granite) or bias, so `HeadDraw` computes exactly their logits.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})


def draw_tokens(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                with_logprobs: bool = False) -> tuple[Tensor, Tensor | None]:
    """One token per row from softmax(logits / T) restricted to the top_k tokens and the top_p nucleus (0 and 1.0:
    unrestricted), by inverse CDF: the first token whose cumulative probability exceeds the row's uniform.

    Returns the tokens and, with `with_logprobs`, their log-probs under the full (unrestricted) softmax(logits / T).
    The probabilities are float32 like the logits, their cumulative sums float64 (`inverse_cdf`), so that over a
    50k-token vocabulary a token's share of [0, 1) is its probability to ~1e-7 rather than the ~1e-3 a float32 sum
    can drift.
    """
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    probs = torch.softmax(z, dim=-1)
    picked_probs = probs
    if top_k > 0 and top_k < z.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et al. 2020): a token stays
        # if the mass of the tokens more likely than it is still below top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = inverse_cdf(probs, uniforms.to(probs.device))
    if not with_logprobs:
        return tokens, None
    return tokens, torch.log(picked_probs.gather(-1, tokens[:, None]).squeeze(-1))


def inverse_cdf(probs: Tensor, uniforms: Tensor, block: int = BLOCK) -> Tensor:
    """For each row, the first index whose cumulative (unnormalised) probability exceeds uniform * the row's total.

    In two levels, so that the whole [rows, vocabulary] tensor is read once, by a vectorised sum: sums of blocks of
    `block` tokens (float32 sums of 256 terms, exact to ~1e-7 of the block), their float64 cumulative sum to find each
    row's block, then the float64 cumulative sum within that block alone.
    """
    rows, vocab = probs.shape
    if vocab % block:
        probs = torch.nn.functional.pad(probs, (0, block - vocab % block))
    blocks = probs.view(rows, -1, block)
    return pick_in_blocks(blocks, blocks.sum(-1), uniforms, vocab)[0]


def pick_in_blocks(blocks: Tensor, block_mass: Tensor, uniforms: Tensor, vocab: int,
                   block_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The inverse CDF over blocks: `blocks` [rows, B, block] holds unnormalised probabilities, each block's true
    values being `blocks * block_scale` (per [rows, B]; 1 when None) and its mass `block_mass` [rows, B] (scaled
    already). Returns each row's token and its total mass (float64)."""
    rows, _, block = blocks.shape
    block_cdf = block_mass.double().cumsum(-1)
    target = uniforms * block_cdf[:, -1]
    which = torch.searchsorted(block_cdf, target[:, None], right=True).squeeze(-1).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(which > 0, block_cdf.gather(-1, (which - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    inside = blocks[torch.arange(rows, device=blocks.device), which]
    if block_scale is not None:
        inside = inside * block_scale.gather(-1, which[:, None])
    inside = inside.cumsum(-1, dtype=torch.float64)
    offset = torch.searchsorted(inside, (target - before)[:, None], right=True).squeeze(-1).clamp_(max=block - 1)
    return (which * block + offset).clamp_(max=vocab - 1), block_cdf[:, -1]


def plain_lm_head(model: Any) -> Tensor | None:
    """The weight of `model`'s LM head when its logits are exactly `last hidden state @ weight.T` (a plain
    nn.Linear without bias or hooks, on a model type in PLAIN_HEAD_MODEL_TYPES, not behind a prompt-learning adapter,
    which calling the decoder directly would skip); else None, and the caller goes through the model's own forward."""
    peft_configs = getattr(model, "peft_config", {})
    if any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values()):
        return None
    head = model.get_output_embeddings()
    plain = (getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and type(head) is torch.nn.Linear
             and head.bias is None and head.weight.dtype.is_floating_point
             and not head._forward_hooks and not head._forward_pre_hooks)
    return head.weight if plain else None


class HeadDraw:
    """`draw_tokens(hidden @ weight.T, uniforms, temperature, with_logprobs=...)` without top_k / top_p, a
    vocabulary chunk of the LM head at a time (module docstring). Holds a [max_rows, vocabulary] float32 buffer of
    exp(z - the chunk's max) across calls, so a decoding loop allocates it once."""

    def __init__(self, weight: Tensor, max_rows: int, chunk: int = HEAD_CHUNK, block: int = BLOCK):
        if chunk % block:
            raise ValueError(f"HeadDraw: chunk {chunk} must be a multiple of block {block}")
        self.weight, self.chunk, self.block = weight, chunk, block
        self.vocab = weight.shape[0]
        self.blocks = math.ceil(self.vocab / block)
        # The padding past the vocabulary stays 0: no mass, never drawn.
        self.exp = torch.zeros(max_rows, self.blocks * block, dtype=torch.float32, device=weight.device)

    def __call__(self, hidden: Tensor, uniforms: Tensor, temperature: float,
                 with_logprobs: bool = False) -> tuple[Tensor, Tensor | None]:
        rows, block = hidden.shape[0], self.block
        scaled = hidden / temperature if temperature != 1.0 else hidden
        exp = self.exp[:rows]
        sums = torch.empty(rows, self.blocks, dtype=torch.float32, device=hidden.device)
        maxima = []
        for start in range(0, self.vocab, self.chunk):
            stop = min(start + self.chunk, self.vocab)
            z = torch.nn.functional.linear(scaled, self.weight[start:stop]).float()
            top = z.amax(-1, keepdim=True)
            e = exp[:, start:stop]
            torch.exp(z.sub_(top), out=e)
            if (stop - start) % block:  # the vocabulary's last, partial block
                e = torch.nn.functional.pad(e, (0, block - (stop - start) % block))
            sums[:, start // block:math.ceil(stop / block)] = e.reshape(rows, -1, block).sum(-1)
            maxima.append(top)
        chunk_max = torch.cat(maxima, dim=1)  # [rows, chunks]
        row_max = chunk_max.amax(-1, keepdim=True)
        # Each block's values are exp(z - its chunk's max): times exp(chunk max - row max), exp(z - row max).
        block_scale = torch.exp(chunk_max - row_max).repeat_interleave(self.chunk // block, dim=1)[:, :self.blocks]
        tokens, total = pick_in_blocks(exp.view(rows, self.blocks, block), sums * block_scale,
                                       uniforms.to(hidden.device), self.vocab, block_scale)
        if not with_logprobs:
            return tokens, None
        # log softmax at the drawn token from its own logit (one dot product a row): z - row max - log(total).
        picked = (scaled.float() * self.weight[tokens].float()).sum(-1)
        return tokens, (picked - row_max.squeeze(-1) - total.log()).float()
