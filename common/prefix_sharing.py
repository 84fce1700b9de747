"""Forward passes that run a prefix several rows share once: a prompt's completions scored by a reward model, the
two sides of preference pairs, rollouts that open with the same system prompt.

`shared_prefixes` groups the rows; `forward_with_shared_prefixes` runs each group's prefix once, with its KV cache,
copies the cache to the group's rows and runs the rows' rests against it. The outputs are those of the rests'
positions, equal to the whole rows' up to float rounding; gradients flow back through the copies into the prefixes'
pass. The rows must be right-padded (attended tokens first), as trl collates them; the model must take
`past_key_values` (every transformers decoder does).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from common.generation import pad_left, position_ids

Groups = list[tuple[list[int], int]]  # (the rows of a group, the length of the prefix they share)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def shared_prefixes(rows: list[list[int]], scored: list[int]) -> Groups | None:
    """Rows cut into groups that run a common prefix once. A prefix stops before each of its rows' `scored` position
    (where the caller reads its output), which runs with the rest of the row.

    Neighbours in sorted order whose common prefix reaches a threshold form a group; of all thresholds, the one whose
    groups run the fewest tokens (the prefixes padded to the longest, then every row's rest padded to the longest)
    wins. None when no grouping runs fewer tokens than the rows whole."""
    order = sorted(range(len(rows)), key=lambda r: rows[r])
    links = [common_prefix(rows[a], rows[b]) for a, b in itertools.pairwise(order)]
    best, fewest = None, len(rows) * max(len(r) for r in rows)
    for threshold in sorted(set(links) - {0}):
        groups, start = [], 0
        for i in range(len(order)):
            if i == len(order) - 1 or links[i] < threshold:
                members = order[start:i + 1]
                prefix = min([*links[start:i], *(scored[r] for r in members)])
                groups.append((members, prefix))
                start = i + 1
        if min(prefix for _, prefix in groups) < 1:
            continue
        tokens = (len(groups) * max(prefix for _, prefix in groups)
                  + len(rows) * max(len(rows[r]) - prefix for members, prefix in groups for r in members))
        if tokens < fewest:
            best, fewest = groups, tokens
    return best


def right_padded_rows(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]] | None:
    """Each row's attended tokens, or None unless every row's attended tokens come first."""
    lengths = attention_mask.sum(dim=1)
    first = torch.arange(attention_mask.shape[1], device=lengths.device) < lengths[:, None]
    if not torch.equal(attention_mask.bool(), first):
        return None
    return [ids[:n].tolist() for ids, n in zip(input_ids, lengths.tolist(), strict=True)]


def last_not(rows: list[list[int]], token: int) -> list[int]:
    """Each row's last position whose token is not `token` (-1 for none): where a sequence classifier pools."""
    return [max((i for i, t in enumerate(row) if t != token), default=-1) for row in rows]


def grouped_rows(input_ids: Tensor, attention_mask: Tensor, pad_id: int) -> tuple[list[list[int]], Groups] | None:
    """The rows of a batch scored at their last token that is not `pad_id` (a sequence classifier's pooling) and
    their `shared_prefixes` groups; None when the rows are not right-padded or sharing would not pay."""
    rows = right_padded_rows(input_ids, attention_mask)
    scored = last_not(rows, pad_id) if rows else None
    groups = shared_prefixes(rows, scored) if scored and min(scored) >= 1 else None
    return None if groups is None else (rows, groups)


def forward_with_shared_prefixes(call: Callable[..., Any], rows: list[list[int]], groups: Groups, pad_id: int,
                                 device: torch.device, **kwargs: Any) -> tuple[Any, Tensor]:
    """`call` (a model's forward: input_ids, attention_mask, position_ids, past_key_values, use_cache, **kwargs) over
    `rows` grouped by `groups`: each prefix once, then every row's rest. Returns the rests' output, in row order, and
    their attention mask ([rows, longest rest], right-padded)."""
    group_of = torch.empty(len(rows), dtype=torch.long, device=device)
    prefixes, rests = [], [torch.empty(0)] * len(rows)
    for g, (members, prefix) in enumerate(groups):
        prefixes.append(rows[members[0]][:prefix])
        for r in members:
            group_of[r] = g
            rests[r] = torch.tensor(rows[r][prefix:], dtype=torch.long, device=device)
    prefix_ids, prefix_mask = pad_left(prefixes, pad_id, device)
    cache = call(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                 use_cache=True).past_key_values
    cache.batch_select_indices(group_of)  # each row's copy of its prefix's keys and values
    rest_ids = pad_sequence(rests, batch_first=True, padding_value=pad_id)
    rest_mask = pad_sequence([torch.ones_like(r) for r in rests], batch_first=True, padding_value=0)
    context = prefix_mask[group_of]
    positions = context.sum(dim=1, keepdim=True) + torch.arange(rest_ids.shape[1], device=device)
    output = call(input_ids=rest_ids, attention_mask=torch.cat([context, rest_mask], dim=1), position_ids=positions,
                  past_key_values=cache, use_cache=True, **kwargs)
    return output, rest_mask
