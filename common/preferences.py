"""Existing preference datasets, normalised to prompt / chosen / rejected and checked row by row.

`validate_preference_records(records, source_name)` accepts three shapes of record (one shape per source):

(a) Explicit text: `{"prompt": str, "chosen": str, "rejected": str}`.

(b) Conversational: `chosen` / `rejected` are lists of `{"role", "content"}` messages, as in trl.
    - With a `prompt` (a list of messages, or a string, read as one user message) the completions are
      what follows it. If both completions repeat the prompt messages at their start (as some datasets
      store whole conversations next to a prompt column), that copy is removed.
    - Without a `prompt`, the prompt is the messages both conversations share up to their last
      assistant message, and each completion is that last assistant message.
    The output stays conversational (the prompt a list of messages, each completion a list starting
    with an assistant message), so the trainer applies the model's chat template.

(c) Anthropic-HH transcripts: no `prompt`; `chosen` / `rejected` are whole dialogues
    "\\n\\nHuman: ...\\n\\nAssistant: ...", possibly over many turns. The prompt is everything up to and
    including the last "\\n\\nAssistant:" shared by both, and each completion is the rest of its transcript,
    kept exactly (with its leading space), so that prompt + chosen is the original chosen transcript, as
    trl's RewardTrainer concatenates them.

Early divergence. In a few HH-style rows the two dialogues already differ before their last assistant
turn (an earlier reply or human turn is different, or one dialogue has more turns). Such a row is not
two answers to one prompt, so `early_divergence` says what to do:

- `"drop"` (the default): leave the row out; the count is in `PreferenceData.dropped` and a warning is
  logged. Public datasets have a few such rows, and the user cannot fix a hub dataset.
- `"keep"`: split after the last assistant marker (or, conversationally, before the last assistant
  message) that both dialogues still share; each completion then holds several turns. A reward model
  scores prompt + completion, i.e. the whole original dialogue, so this loses nothing for reward
  modelling, but DPO would train the policy to write the human's turns too.
- `"error"`: raise InputError naming the row.

Degenerate pairs. A row whose chosen or rejected response is empty (an HH transcript ending with an empty
"\n\nAssistant:" turn) or whose chosen and rejected are the same text (after stripping whitespace) teaches
no preference. `bad_rows` says what to do: `"error"` (the default here) raises InputError naming the row;
`"drop"` leaves it out, its 1-based row number in `PreferenceData.bad_rows`, with a warning naming the
count and the first row.

Malformed transcripts (not starting with a Human turn, no Assistant turn, ending with a Human turn)
always raise. Every row is also checked: a missing or wrongly typed field, an empty prompt, or a shape
other than the first row's all raise `InputError` naming the source and the 1-based row (for a jsonl file, pass the line
numbers as `row_numbers` if the loader skipped blank lines). Keys other than prompt / chosen / rejected
are provenance and pass through unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import InputError

log = logging.getLogger(__name__)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
EarlyDivergence = Literal["drop", "keep", "error"]
EARLY_DIVERGENCE = ("drop", "keep", "error")
BadRows = Literal["drop", "error"]
BAD_ROWS = ("drop", "error")
_SHAPES = ("explicit prompt/chosen/rejected text, conversational chosen/rejected message lists, or "
           "Anthropic-HH '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts")


@dataclass
class PreferenceData:
    """Normalised records; `format` is "text" or "conversational"; `dropped` counts early-divergent rows
    left out under early_divergence="drop"; `bad_rows` numbers the degenerate rows left out under
    bad_rows="drop"."""

    records: list[dict[str, Any]]
    format: Literal["text", "conversational"]
    dropped: int = 0
    bad_rows: list[int] = field(default_factory=list)


class _Dropped(Exception):
    """A row left out under early_divergence="drop"."""


class _Degenerate(Exception):
    """A row left out under bad_rows="drop"."""


# --- Anthropic-HH transcripts -------------------------------------------------------------------------

def looks_like_hh(text: str) -> bool:
    return ASSISTANT in text or text.lstrip(" \n").startswith("Human:")


def split_hh(chosen: str, rejected: str, early_divergence: EarlyDivergence = "drop",
             where: str = "row") -> tuple[str, str, str]:
    """Split two HH transcripts into (prompt, chosen, rejected); see the module docstring.

    Raises InputError (message prefixed by `where`) on a malformed transcript, and on early divergence
    when early_divergence is "error" (or "keep" and the dialogues share no assistant turn).
    """
    last = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.lstrip(" \n").startswith("Human:"):
            raise InputError(f"{where}: the {name} transcript does not start with a '\\n\\nHuman:' turn (it "
                             f"starts {text[:30]!r}); expected an Anthropic-HH dialogue or a 'prompt' field")
        i = text.rfind(ASSISTANT)
        if i < 0:
            raise InputError(f"{where}: the {name} transcript has no '\\n\\nAssistant:' turn; each transcript "
                             "must end with the assistant's reply")
        if HUMAN in text[i:]:
            raise InputError(f"{where}: the {name} transcript ends with a Human turn; expected it to end with "
                             "the assistant's reply (drop the trailing human turn)")
        last[name] = i
    shared = len(os.path.commonprefix([chosen, rejected]))
    end = last["chosen"] + len(ASSISTANT)
    if last["chosen"] == last["rejected"] and shared >= end:
        return chosen[:end], chosen[end:], rejected[end:]

    # The dialogues differ before their last assistant turn.
    if early_divergence == "drop":
        raise _Dropped
    if early_divergence == "error":
        raise InputError(f"{where}: chosen and rejected differ before their last assistant turn (from "
                         f"character {shared}: {chosen[shared:shared + 30]!r} vs "
                         f"{rejected[shared:shared + 30]!r}); they must share every turn but the last, or set "
                         "early_divergence to drop or keep")
    k = chosen.rfind(ASSISTANT, 0, shared)
    if k < 0:
        raise InputError(f"{where}: chosen and rejected differ already in the first human turn, so they are "
                         "not replies to one prompt; remove the row")
    end = k + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


# --- conversational records --------------------------------------------------------------------------

def _check_messages(value: Any, field: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages")
    for j, m in enumerate(value):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and m["role"]
                and isinstance(m.get("content"), str)):
            raise InputError(f"{where}: {field}[{j}] must be a message {{role: str, content: str}}, got {m!r}"[:300])
    return [dict(m) for m in value]


def _last_assistant(messages: list[dict], field: str, where: str) -> int:
    if messages[-1]["role"] != "assistant":
        raise InputError(f"{where}: '{field}' ends with a '{messages[-1]['role']}' message; expected it to end "
                         "with the assistant's reply")
    return len(messages) - 1


def _same(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["content"] == b["content"]


def split_conversation(chosen: list[dict], rejected: list[dict], early_divergence: EarlyDivergence = "drop",
                       where: str = "row") -> tuple[list[dict], list[dict], list[dict]]:
    """Implicit-prompt conversations -> (prompt, chosen, rejected) message lists; see the module docstring."""
    kc = _last_assistant(chosen, "chosen", where)
    kr = _last_assistant(rejected, "rejected", where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same(chosen[shared], rejected[shared]):
        shared += 1
    if kc == kr and shared >= kc:
        k = kc
    elif early_divergence == "drop":
        raise _Dropped
    elif early_divergence == "error":
        raise InputError(f"{where}: chosen and rejected differ before their last assistant message (at "
                         f"message {shared}); they must share every message but the last, or set "
                         "early_divergence to drop or keep")
    else:
        k = next((i for i in range(min(shared, kc, kr), 0, -1)
                  if chosen[i]["role"] == rejected[i]["role"] == "assistant"), 0)
    if k == 0:
        raise InputError(f"{where}: no prompt messages come before the assistant's reply; add a 'prompt' field "
                         "or start the conversations with the user's message")
    return chosen[:k], chosen[k:], rejected[k:]


# --- one record ---------------------------------------------------------------------------------------

def _blank(value: str | list[dict]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def _same_completion(a: str | list[dict], b: str | list[dict]) -> bool:
    if isinstance(a, str):
        return a.strip() == b.strip()
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b, strict=True))


def _normalize(record: Any, where: str, early_divergence: EarlyDivergence, bad_rows: BadRows) -> tuple[dict, str]:
    if not isinstance(record, Mapping):
        raise InputError(f"{where}: expected a mapping with chosen and rejected, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise InputError(f"{where}: missing '{key}'; expected {_SHAPES} (map other column names with "
                             "data.fields)")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    extras = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}

    if isinstance(chosen, str) and isinstance(rejected, str):
        shape = "text"
        if prompt is None:
            if not (looks_like_hh(chosen) or looks_like_hh(rejected)):
                raise InputError(f"{where}: missing 'prompt', and chosen / rejected are not Human/Assistant "
                                 "transcripts; add a prompt field (or map one with data.fields)")
            prompt, chosen, rejected = split_hh(chosen, rejected, early_divergence, where)
        elif not isinstance(prompt, str):
            raise InputError(f"{where}: 'prompt' is a {type(prompt).__name__} but chosen / rejected are text; "
                             "all three must be text, or all messages")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        shape = "conversational"
        chosen = _check_messages(chosen, "chosen", where)
        rejected = _check_messages(rejected, "rejected", where)
        if prompt is None:
            prompt, chosen, rejected = split_conversation(chosen, rejected, early_divergence, where)
        else:
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            prompt = _check_messages(prompt, "prompt", where)
            n = len(prompt)
            if all(len(c) > n and all(_same(x, y) for x, y in zip(c[:n], prompt, strict=True))
                   for c in (chosen, rejected)):
                chosen, rejected = chosen[n:], rejected[n:]
            for name, c in (("chosen", chosen), ("rejected", rejected)):
                if c[0]["role"] != "assistant":
                    raise InputError(f"{where}: after the prompt, '{name}' starts with a '{c[0]['role']}' "
                                     "message; expected the assistant's reply (drop the prompt messages from "
                                     "it, or drop the 'prompt' field)")
    else:
        raise InputError(f"{where}: chosen is {type(chosen).__name__} and rejected is "
                         f"{type(rejected).__name__}; both must be text or both lists of {{role, content}} "
                         "messages")

    if _blank(prompt):
        raise InputError(f"{where}: the prompt is empty; give each row a prompt")
    empty = next((name for name, c in (("chosen", chosen), ("rejected", rejected)) if _blank(c)), None)
    if empty or _same_completion(chosen, rejected):
        if bad_rows == "drop":
            raise _Degenerate
        problem = (f"'{empty}' is empty; remove the row or fill in the response" if empty else
                   "chosen and rejected are the same text, which teaches no preference; remove the row")
        raise InputError(f"{where}: {problem}, or set data.bad_rows: drop to leave such rows out")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extras}, shape


def validate_preference_records(records: Iterable[Mapping[str, Any]], source_name: str,
                                early_divergence: EarlyDivergence = "drop",
                                row_numbers: Sequence[int] | None = None,
                                bad_rows: BadRows = "error") -> PreferenceData:
    """Normalise and check every record (see the module docstring); raise InputError on the first bad row.

    `source_name` (a file path or hub id) and the row number start every error message; rows are
    numbered from 1 in the given order, or taken from `row_numbers` (e.g. jsonl line numbers).
    """
    if early_divergence not in EARLY_DIVERGENCE:
        raise InputError(f"{source_name}: early_divergence must be one of {', '.join(EARLY_DIVERGENCE)}, "
                         f"got {early_divergence!r}")
    if bad_rows not in BAD_ROWS:
        raise InputError(f"{source_name}: bad_rows must be one of {', '.join(BAD_ROWS)}, got {bad_rows!r}")
    out: list[dict[str, Any]] = []
    dropped: list[int] = []
    degenerate: list[int] = []
    first: tuple[str, int] | None = None
    for i, record in enumerate(records):
        row = row_numbers[i] if row_numbers is not None else i + 1
        where = f"{source_name}: row {row}"
        try:
            normalised, shape = _normalize(record, where, early_divergence, bad_rows)
        except _Dropped:
            dropped.append(row)
            continue
        except _Degenerate:
            degenerate.append(row)
            continue
        if first is None:
            first = (shape, row)
        elif shape != first[0]:
            raise InputError(f"{where}: is {shape} but row {first[1]} is {first[0]}; one source must use one "
                             "shape (all text, or all conversational)")
        out.append(normalised)
    if not out:
        if degenerate:
            raise InputError(f"{source_name}: no usable preference records ({len(degenerate)} have an empty response "
                             f"or chosen equal to rejected, {len(dropped)} differ before the last assistant turn); "
                             "check the data.fields mapping and the file")
        if dropped:
            raise InputError(f"{source_name}: no usable preference records (all {len(dropped)} differ before the "
                             "last assistant turn); set early_divergence: keep to split them there")
        raise InputError(f"{source_name}: no preference records; expected rows of {_SHAPES}")
    if degenerate:
        log.warning("%s: dropped %d of %d rows whose chosen or rejected response is empty or whose chosen and "
                    "rejected are the same text (first: row %d); data.bad_rows: error refuses them instead",
                    source_name, len(degenerate), len(degenerate) + len(dropped) + len(out), degenerate[0])
    if dropped:
        log.warning("%s: dropped %d of %d rows whose chosen and rejected dialogues differ before the last "
                    "assistant turn (first: row %d); set early_divergence: keep to use them",
                    source_name, len(dropped), len(dropped) + len(out), dropped[0])
    return PreferenceData(out, first[0], len(dropped), degenerate)
