"""The shared-prompt KV cache and its attention (`common.shared_prompt_cache`) against attention over each row's whole
context written out: the prompt's keys (without its left padding) followed by the row's sampled keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.errors import InputError
from common.shared_prompt_cache import SharedPromptCache, check_context_fits, shared_prompt_attention

KV_HEADS, GROUPS, HEAD_DIM, WIDTH = 2, 3, 8, 5
# Three prompts; rows 0-2 continue prompt 0, rows 3-4 prompt 2, row 5 prompt 1 (rows need not be sorted by prompt).
ROW_PROMPT = torch.tensor([0, 0, 0, 2, 2, 1])
PROMPT_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


def make_cache(generator: torch.Generator) -> SharedPromptCache:
    shape = (len(PROMPT_MASK), KV_HEADS, WIDTH, HEAD_DIM)
    prefill = SimpleNamespace(layers=[SimpleNamespace(keys=torch.randn(shape, generator=generator),
                                                      values=torch.randn(shape, generator=generator))])
    return SharedPromptCache(prefill, PROMPT_MASK, ROW_PROMPT.clone(), max_new_tokens=4)


def written_out(cache_prompt_keys, cache_prompt_values, row_prompt, sampled_keys, sampled_values, query):
    """Plain softmax attention, one row at a time, over the prompt's real positions and the row's sampled ones."""
    out = []
    for row, prompt in enumerate(row_prompt.tolist()):
        real = PROMPT_MASK[prompt].bool()
        keys = torch.cat([cache_prompt_keys[prompt][:, real], sampled_keys[row]], dim=1)  # [kv heads, L, d]
        values = torch.cat([cache_prompt_values[prompt][:, real], sampled_values[row]], dim=1)
        q = query[row, :, 0].view(KV_HEADS, GROUPS, HEAD_DIM)
        weights = torch.softmax(q @ keys.transpose(-1, -2) / HEAD_DIM ** 0.5, dim=-1)
        out.append((weights @ values).reshape(KV_HEADS * GROUPS, HEAD_DIM))
    return torch.stack(out)[:, None]  # [B, 1, heads, d]


def step(cache, rows, generator):
    """One decoding step of layer 0: new keys and values into the cache, then the attention of a random query."""
    key, value = (torch.randn(rows, KV_HEADS, 1, HEAD_DIM, generator=generator) for _ in range(2))
    sampled_keys, sampled_values = cache.update(key, value, 0)
    query = torch.randn(rows, KV_HEADS * GROUPS, 1, HEAD_DIM, generator=generator)
    layer = SimpleNamespace(layer_idx=0)
    output, _ = shared_prompt_attention(layer, query, sampled_keys, sampled_values, None, scaling=HEAD_DIM ** -0.5,
                                        shared_prompts=cache)
    return query, sampled_keys, sampled_values, output


def test_attention_equals_attention_over_each_rows_whole_context_while_rows_and_prompts_leave():
    generator = torch.Generator().manual_seed(0)
    cache = make_cache(generator)
    prompt_keys, prompt_values = cache.prompt_keys[0].clone(), cache.prompt_values[0].clone()
    row_prompt = ROW_PROMPT.clone()
    for _ in range(2):
        query, keys, values, output = step(cache, len(row_prompt), generator)
        torch.testing.assert_close(output, written_out(prompt_keys, prompt_values, row_prompt, keys, values, query))
    # Rows 3 and 4 end: prompt 2 has no row left and leaves the prompt part; the rest keep their sampled keys.
    keep = torch.tensor([5, 0, 1, 2])
    cache.select_rows(keep)
    assert len(cache.prompt_keys[0]) == 2 and cache.block == 3
    prompt_keys, prompt_values, row_prompt = prompt_keys[:2], prompt_values[:2], ROW_PROMPT[keep]
    query, keys, values, output = step(cache, len(keep), generator)
    assert keys.shape[2] == 3  # two steps before the rows left, one after
    torch.testing.assert_close(output, written_out(prompt_keys, prompt_values, row_prompt, keys, values, query))


def test_rows_are_stacked_per_prompt_and_back():
    cache = make_cache(torch.Generator().manual_seed(1))
    assert cache.block == 3  # prompt 0 has the most rows
    assert cache.slot.tolist() == [0, 1, 2, 6, 7, 3]  # prompt * block + rank among the prompt's rows
    per_row = torch.arange(len(ROW_PROMPT), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, KV_HEADS, 1, 2)
    blocks = cache.to_blocks(per_row)
    assert blocks.shape == (3, KV_HEADS, 3, 2)
    assert blocks[2, 0, :, 0].tolist() == [3.0, 4.0, 0.0]  # prompt 2: rows 3, 4 and an empty slot
    assert torch.equal(cache.from_blocks(blocks), per_row)


def test_a_sliding_window_shorter_than_the_context_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(sliding_window=64))
    check_context_fits(model, 64)
    with pytest.raises(InputError, match="sliding window of 64 tokens, shorter than a prompt plus its completion"):
        check_context_fits(model, 65)
