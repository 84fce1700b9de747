"""Forward passes that run a prefix several rows share once: a prompt's completions scored by a reward model, the
two sides of preference pairs, rows that open with the same system prompt.

`shared_prefixes` groups the rows (lists of their attended tokens); `forward_with_shared_prefixes` runs each group's
prefix once, with its KV cache, copies the cache to the group's rows and runs the rows' rests against it. The
outputs equal the whole rows' up to float rounding; gradients flow back through the copies into the prefixes' pass.
The model must take `past_key_values` (every transformers decoder does). Two ways in:
- a model called directly on right-padded rows (the reward model's classifier: `grouped_rows`, then
  `forward_with_shared_prefixes`), which reads the rests' outputs;
- `trunk_shares_prefixes`, inside a causal LM's trunk, for trainers that call the whole model (trl's SFT and DPO,
  PPO's and GRPO's passes): they get every row's hidden states, left- or right-padded, as if each ran whole."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
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


def attended_rows(input_ids: Tensor, attention_mask: Tensor) -> tuple[list[list[int]], list[int]] | None:
    """Each row's attended tokens and the column where they start, or None unless each row's attended tokens are one
    run (padding on the left, the right or both: prompts left-padded before their completions)."""
    lengths = attention_mask.sum(dim=1)
    starts = attention_mask.long().argmax(dim=1)
    columns = torch.arange(attention_mask.shape[1], device=lengths.device)
    run = (columns >= starts[:, None]) & (columns < (starts + lengths)[:, None])
    if not torch.equal(attention_mask.bool(), run):
        return None
    starts, lengths = starts.tolist(), lengths.tolist()
    return [ids[s:s + n].tolist() for ids, s, n in zip(input_ids, starts, lengths, strict=True)], starts


def right_padded_rows(input_ids: Tensor, attention_mask: Tensor) -> list[list[int]] | None:
    """Each row's attended tokens, or None unless every row's attended tokens come first."""
    found = attended_rows(input_ids, attention_mask)
    return found[0] if found is not None and not any(found[1]) else None


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


@dataclass
class SharedPrefixPasses:
    """The two passes of `forward_with_shared_prefixes`: the prefixes' output (left-padded, [groups, P] positions)
    and the rests' (right-padded, [rows, R]), with the group each row belongs to."""
    prefixes: Any
    prefix_mask: Tensor
    group_of: Tensor
    rests: Any
    rest_mask: Tensor

    def whole_rows(self, prefix_states: Tensor, rest_states: Tensor, width: int, starts: list[int]) -> Tensor:
        """Per-position outputs ([groups, P, ...] of the prefixes, [rows, R, ...] of the rests) arranged as the rows'
        whole, each from its column in `starts` ([rows, width, ...], zeros on padding): a causal model's outputs at a
        prefix's positions are the same for every row that has it."""
        groups, prefix_width = self.prefix_mask.shape
        rows, rest_width = self.rest_mask.shape
        prefix_len = self.prefix_mask.sum(dim=1)[self.group_of, None]  # [rows, 1]
        row_len = prefix_len + self.rest_mask.sum(dim=1)[:, None]
        device = prefix_len.device
        t = torch.arange(width, device=device)[None, :] - torch.tensor(starts, device=device)[:, None]  # in the row
        # Each position's index into [prefix positions, rest positions, one zero]: prefixes are left-padded.
        from_prefix = self.group_of[:, None] * prefix_width + prefix_width - prefix_len + t
        row = torch.arange(rows, device=device)[:, None]
        from_rest = groups * prefix_width + row * rest_width + t - prefix_len
        zero = groups * prefix_width + rows * rest_width
        index = torch.where((t >= 0) & (t < prefix_len), from_prefix,
                            torch.where((t >= prefix_len) & (t < row_len), from_rest, zero))
        flat = torch.cat([prefix_states.flatten(0, 1), rest_states.flatten(0, 1),
                          rest_states.new_zeros(1, *rest_states.shape[2:])])
        return flat[index]


def forward_with_shared_prefixes(call: Callable[..., Any], rows: list[list[int]], groups: Groups, pad_id: int,
                                 device: torch.device, **kwargs: Any) -> SharedPrefixPasses:
    """`call` (a model's forward: input_ids, attention_mask, position_ids, past_key_values, use_cache, **kwargs) over
    `rows` grouped by `groups`: each prefix once, then every row's rest against a copy of its prefix's cache."""
    group_of = torch.empty(len(rows), dtype=torch.long, device=device)
    prefixes, rests = [], [torch.empty(0)] * len(rows)
    for g, (members, prefix) in enumerate(groups):
        prefixes.append(rows[members[0]][:prefix])
        for r in members:
            group_of[r] = g
            rests[r] = torch.tensor(rows[r][prefix:], dtype=torch.long, device=device)
    prefix_ids, prefix_mask = pad_left(prefixes, pad_id, device)
    prefix_output = call(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids(prefix_mask),
                         use_cache=True)
    cache = prefix_output.past_key_values
    prefix_output.past_key_values = None  # the rows' copies below hold it
    cache.batch_select_indices(group_of)  # each row's copy of its prefix's keys and values
    rest_ids = pad_sequence(rests, batch_first=True, padding_value=pad_id)
    rest_mask = pad_sequence([torch.ones_like(r) for r in rests], batch_first=True, padding_value=0)
    context = prefix_mask[group_of]
    positions = context.sum(dim=1, keepdim=True) + torch.arange(rest_ids.shape[1], device=device)
    output = call(input_ids=rest_ids, attention_mask=torch.cat([context, rest_mask], dim=1), position_ids=positions,
                  past_key_values=cache, use_cache=True, **kwargs)
    return SharedPrefixPasses(prefix_output, prefix_mask, group_of, output, rest_mask)


# Keyword arguments of a decoder trunk's forward that `trunk_shares_prefixes` handles; any other one set (a cache,
# embeddings, hidden states asked for) runs the rows whole.
PLAIN_ARGUMENTS = {"input_ids", "attention_mask", "position_ids", "use_cache", "return_dict"}


@contextlib.contextmanager
def trunk_shares_prefixes(model: nn.Module) -> Iterator[None]:
    """Within the block, a forward of `model`'s trunk (the decoder under a transformers causal LM, PEFT-wrapped or
    not: `base_model`, e.g. LlamaModel, which trl's fused LM head and the model's own forward call) over rows that
    share prefixes runs each shared prefix once (`shared_prefixes`, `forward_with_shared_prefixes`) and returns the
    rows' `last_hidden_state` as if run whole (to float rounding; zeros on padding), no cache. It takes calls
    without a cache (`use_cache=False`) whose rows' attended tokens are one run each (left- or right-padded) and
    whose positions, if given, count attended tokens from 0 (`common.generation.position_ids`). Any other call
    (generation, gradient checkpointing, which turns the cache off, a batch whose sharing would not pay) runs as
    shipped. The trunk is as it was after the block."""
    backbone = getattr(model, "get_base_model", lambda: model)().base_model
    shipped = backbone.__dict__.get("forward")
    plain = backbone.forward
    pad_id = backbone.config.pad_token_id or 0

    def runs_whole(args: tuple, kwargs: dict[str, Any]) -> bool:
        ids, mask, positions = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("position_ids")
        return (bool(args) or ids is None or mask is None or len(ids) < 2 or kwargs.get("use_cache") is not False
                or kwargs.get("return_dict") is False  # a tuple, which has no last_hidden_state to rebuild
                or any(k not in PLAIN_ARGUMENTS and v is not None and v is not False for k, v in kwargs.items())
                or (backbone.training and getattr(backbone, "gradient_checkpointing", False))
                or (positions is not None
                    and not torch.equal(positions[mask.bool()], position_ids(mask)[mask.bool()])))

    def forward(*args: Any, **kwargs: Any) -> Any:
        found = None if runs_whole(args, kwargs) else attended_rows(kwargs["input_ids"], kwargs["attention_mask"])
        rows, starts = found or (None, None)
        # Every row keeps at least its last position for the rests' pass.
        groups = shared_prefixes(rows, [len(r) - 1 for r in rows]) if rows and min(map(len, rows)) > 1 else None
        if groups is None:
            return plain(*args, **kwargs)
        ids = kwargs["input_ids"]
        passes = forward_with_shared_prefixes(plain, rows, groups, pad_id, ids.device)
        output = passes.rests
        output.last_hidden_state = passes.whole_rows(passes.prefixes.last_hidden_state, output.last_hidden_state,
                                                     ids.shape[1], starts)
        output.past_key_values = None
        return output

    backbone.forward = forward
    try:
        yield
    finally:
        if shipped is None:
            del backbone.forward
        else:
            backbone.forward = shipped
