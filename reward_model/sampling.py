"""K completions per prompt from a policy, in batches, with the policy's chat template applied.

The preferences stage samples here: each prompt (text, read as one user message, or chat messages) is rendered
with `apply_chat_template(..., add_generation_prompt=True)`, repeated K times, and the flat list of prompts is sent
through `common.generation.generate_responses` `batch_size` sequences at a time. Responses are cut after their
first EOS and decoded without special tokens. Batch b is sampled with seed `seed + b`, so the same prompts, seed
and batch size give the same completions.

Under a multi-process launch (`shard=(process_index, num_processes)`) process i samples batches i, i + n, ... and the
processes exchange what they sampled (`accelerate.utils.gather_object`, a collective: every process calls), so each
ends with the completions one process alone would have sampled, in the same order, in about 1/n of the time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from common.generation import generate_responses, truncate_after_eos

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


def as_messages(text_or_messages: str | Messages, role: str) -> Messages:
    """A text becomes one message of `role`; a message list is kept as it is."""
    return [{"role": role, "content": text_or_messages}] if isinstance(text_or_messages, str) else text_or_messages


def last_content(text_or_messages: str | Messages) -> str:
    """What a gold scorer reads: the text itself, or the content of the last message (the user's request in a
    prompt, the assistant's reply in a completion)."""
    return text_or_messages if isinstance(text_or_messages, str) else text_or_messages[-1]["content"]


@dataclass
class Samples:
    """completions[i] holds the K completions of prompt i; `without_eos` counts those cut at max_new_tokens."""

    completions: list[list[str]]
    without_eos: int
    seconds: float


def sample_completions(model: Any, tokenizer: Any, prompts: Sequence[Messages], k: int, *, max_new_tokens: int,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 16,
                       seed: int = 0, shard: tuple[int, int] = (0, 1)) -> Samples:
    encoded = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for messages in prompts]
    jobs = [i for i in range(len(prompts)) for _ in range(k)]
    index, count = shard
    batches = list(enumerate(range(0, len(jobs), batch_size)))[index::count]  # (b, first job) of this process
    mine: list[tuple[int, str, bool]] = []  # (job, completion, has EOS) for the jobs this process samples
    started = time.perf_counter()
    with tqdm(total=sum(len(jobs[start:start + batch_size]) for _, start in batches), desc="sampling completions",
              unit="completion") as bar:
        for b, start in batches:
            owners = jobs[start:start + batch_size]
            gen = generate_responses(model, tokenizer, [encoded[i] for i in owners], max_new_tokens,
                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + b)
            cut = truncate_after_eos(gen.response_ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(cut.ids.cpu(), skip_special_tokens=True)
            mine += zip(range(start, start + len(owners)), texts, cut.has_eos.tolist(), strict=True)
            bar.update(len(owners))
    if count > 1:
        log.info("sampled %d of %d completions on process %d of %d", len(mine), len(jobs), index, count)
    rows = sorted(gather_object(mine) if count > 1 else mine)
    completions: list[list[str]] = [[] for _ in prompts]
    for job, text, _ in rows:
        completions[jobs[job]].append(text)
    return Samples(completions, sum(not has_eos for *_, has_eos in rows), time.perf_counter() - started)
