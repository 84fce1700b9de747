"""Log-likelihood scoring of multiple-choice continuations, fast and exact.

What a question costs here, against lm-evaluation-harness (api/model.py, models/huggingface.py):

- Tokenisation is lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation,
  context + continuation is encoded whole and split at the length of the separately encoded context, and
  the model reads `context_enc + continuation_enc` minus the last token. So the log-probs are the same.
- When a question's continuations differ only in their last token (" A" / " B" / ... in letter mode: one
  token with most tokenizers; a shared " " then one letter with a byte-level one), ONE forward pass reads
  every choice's log-prob at the last position ("single" path). Otherwise each choice is a row of its own
  ("per-choice" path; cloze answers).
- Logits are computed only at scored positions: we run the model's decoder for hidden states and apply
  the output embedding to the few rows we score, instead of a full-vocabulary log-softmax at every
  position (for SmolLM2, 49k logits x every prompt token).
- Rows are sorted by length so a batch wastes little padding. Padding is on the right and no attention
  mask is passed: in a causal model a real token never attends to a later (pad) position, so the mask
  would change nothing we read.
- The prefix every question of a subject shares (the header and the k-shot examples; in chat mode the
  system turn too) is encoded ONCE; its KV cache is expanded over each batch. The shared prefix is the
  longest common prefix of the token ids, not of the text, so it is exact whatever the tokenizer merges
  at the boundary.
- Everything runs under `torch.inference_mode`.

`reference_logprobs` is the slow, obviously-right version (one forward per choice, full logits); tests and
benchmarks compare the fast scorer against it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from common.errors import InputError
from eval.mc.data import MCQuestion, few_shot_pool
from eval.mc.prompts import MCPrompt, build_prompt, check_mode

# ---------------------------------------------------------------------------------------------- tokens


def _bos_prefixed(tokenizer, text: str) -> bool:
    prefix = tokenizer.bos_token or tokenizer.eos_token
    return bool(prefix) and text.startswith(prefix)


def _encode(tokenizer, text: str) -> list[int]:
    """lm-eval's HFLM.tok_encode with its defaults (add_bos_token unset): the tokenizer's own special
    tokens, unless the text already starts with the BOS string (a chat template that writes it)."""
    kwargs = {"add_special_tokens": False} if _bos_prefixed(tokenizer, text) else {}
    return list(tokenizer.encode(text, **kwargs))


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the front of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models (api/model.py): encode context + continuation whole,
    split it at the length of the separately encoded context."""
    context, continuation = _split_trailing_space(context, continuation)
    whole = _encode(tokenizer, context + continuation)
    context_enc = _encode(tokenizer, context)
    return context_enc, whole[len(context_enc):]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """`encode_pair` over many pairs at once: each distinct text is encoded once (a question's context is
    shared by its choices), in one batched tokenizer call (the Rust tokenizers encode a batch in parallel)."""
    split = [_split_trailing_space(c, k) for c, k in pairs]
    texts = list(dict.fromkeys([c for c, _ in split] + [c + k for c, k in split]))
    ids: dict[str, list[int]] = {}
    for add_special in (True, False):
        batch = [t for t in texts if _bos_prefixed(tokenizer, t) != add_special]
        if batch:
            kwargs = {} if add_special else {"add_special_tokens": False}
            ids.update(zip(batch, tokenizer(batch, **kwargs)["input_ids"], strict=True))
    out = []
    for context, continuation in split:
        context_enc = list(ids[context])
        out.append((context_enc, list(ids[context + continuation][len(context_enc):])))
    return out


@dataclass
class Row:
    """One sequence to run. Positions `start .. len(tokens)-2` predict the shared `targets`; the last
    position predicts each of the `last` candidates, whose totals go to `(question, choice)` in `out`."""

    group: str
    tokens: list[int]
    start: int
    targets: list[int]
    last: list[int]
    out: list[tuple[int, int]]


def build_rows(tokenizer, prompts: Sequence[MCPrompt], groups: Sequence[str]) -> tuple[list[Row], int]:
    """Tokenise every (context, continuation) pair into rows; returns the rows and how many questions
    took the single-forward path."""
    rows: list[Row] = []
    n_single = 0
    flat = encode_pairs(tokenizer, [(p.context, cont) for p in prompts for cont in p.continuations])
    offsets = [0]
    for p in prompts:
        offsets.append(offsets[-1] + len(p.continuations))
    for qi, (prompt, group) in enumerate(zip(prompts, groups, strict=True)):
        encoded = flat[offsets[qi]:offsets[qi + 1]]
        for ci, (ctx, cont) in enumerate(encoded):
            if not ctx or not cont:
                raise InputError(f"question {qi + 1}, choice {ci + 1}: the context or the continuation "
                                 f"{prompt.continuations[ci]!r} encodes to no tokens; check the question text")
        wholes = [ctx + cont for ctx, cont in encoded]
        n_ctx = {len(ctx) for ctx, _ in encoded}
        shared = {tuple(w[:-1]) for w in wholes}
        if len(n_ctx) == 1 and len(shared) == 1:
            # Every continuation = the same tokens + one distinct last token: one row scores them all.
            whole, start = wholes[0], len(encoded[0][0]) - 1
            rows.append(Row(group, whole[:-1], start, whole[start + 1:-1], [w[-1] for w in wholes],
                            [(qi, ci) for ci in range(len(wholes))]))
            n_single += 1
        else:
            for ci, ((ctx, _), whole) in enumerate(zip(encoded, wholes, strict=True)):
                start = len(ctx) - 1
                rows.append(Row(group, whole[:-1], start, whole[start + 1:-1], [whole[-1]], [(qi, ci)]))
    return rows, n_single


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token-id sequences."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for other in seqs[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


# ---------------------------------------------------------------------------------------------- model


def _unwrap(model):
    """The transformers model under a PeftModel (whose LoRA layers live inside it, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class LogitReader:
    """Logits at chosen positions. Normally decoder hidden states + output embedding at those rows only;
    if that disagrees with the model's own forward on a probe (a model that post-processes its logits,
    e.g. soft-capping), it falls back to the full forward and reads the rows from its logits."""

    def __init__(self, model):
        self.model = model
        base = _unwrap(model)
        self.decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        self.head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        self.direct = self.decoder is not None and self.head is not None and self.decoder is not base
        emb = base.get_input_embeddings()
        self.device = emb.weight.device if emb is not None else next(base.parameters()).device

    def _run(self, ids: torch.Tensor, cache, use_cache: bool):
        if self.direct:
            return self.decoder(input_ids=ids, past_key_values=cache, use_cache=use_cache)
        return self.model(input_ids=ids, past_key_values=cache, use_cache=use_cache)

    def prefix_cache(self, ids: list[int]):
        out = self._run(torch.tensor([ids], device=self.device), None, True)
        return out.past_key_values

    def logits(self, ids: torch.Tensor, cache, b_idx: torch.Tensor, s_idx: torch.Tensor) -> torch.Tensor:
        out = self._run(ids, cache, cache is not None)
        states = out.last_hidden_state if self.direct else out.logits
        # With a model split over devices (device_map) the last layer's output may live elsewhere.
        picked = states[b_idx.to(states.device), s_idx.to(states.device)]
        return (self.head(picked) if self.direct else picked).float()

    def check(self, tokens: list[int]) -> None:
        """Compare the direct path with `model(...)` on one short probe; switch to the fallback if they differ."""
        if not self.direct:
            return
        ids = torch.tensor([tokens[:32]], device=self.device)
        pos = torch.arange(ids.shape[1], device=self.device)
        mine = torch.log_softmax(self.logits(ids, None, torch.zeros_like(pos), pos), -1)
        theirs = torch.log_softmax(self.model(input_ids=ids, use_cache=False).logits[0].float(), -1)
        if not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3):
            self.direct = False


def _expand_cache(prefix, batch: int):
    """A fresh DynamicCache holding the prefix's keys/values broadcast over `batch` rows (the forward
    concatenates onto it, so the shared prefix cache itself is never modified)."""
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                        for k, v, *_ in prefix])


def _reusable(cache) -> bool:
    """Only plain full-attention layers can be expanded and extended this simply (sliding-window, linear
    attention or shared-KV layers keep other state)."""
    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer and layer.keys is not None
                                                   for layer in cache.layers)


@dataclass
class ScoreStats:
    questions: int = 0
    single_forward_questions: int = 0
    rows: int = 0
    forward_passes: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    prefix_tokens_reused: int = 0
    direct_logits: bool = True
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        path = ("single" if self.single_forward_questions == self.questions else
                "per_choice" if self.single_forward_questions == 0 else "mixed")
        return {"path": path, "questions": self.questions, "single_forward_questions": self.single_forward_questions,
                "rows": self.rows, "forward_passes": self.forward_passes, "tokens": self.tokens,
                "padded_tokens": self.padded_tokens, "prefix_tokens_reused": self.prefix_tokens_reused,
                "direct_logits": self.direct_logits, "seconds": round(self.seconds, 4)}


def score_rows(model, rows: Sequence[Row], n_questions: int, batch_size: int = 8, reuse_prefix: bool = True,
               progress: bool = False, stats: ScoreStats | None = None, desc: str = "mc") -> list[list[float]]:
    """Total log-prob of every (question, choice) the rows name, as `scores[question][choice]`; `progress` shows a
    bar labelled `desc`."""
    if batch_size < 1:
        raise InputError(f"mc batch_size: expected a positive integer, got {batch_size}; set batch_size >= 1")
    stats = stats if stats is not None else ScoreStats()
    scores: list[dict[int, float]] = [{} for _ in range(n_questions)]
    if not rows:
        return [[] for _ in range(n_questions)]
    reader = LogitReader(model)
    was_training = getattr(model, "training", False)
    model.eval()  # dropout would make scores random
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=desc, unit="row")
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            reader.check(rows[0].tokens)
            stats.direct_logits = reader.direct
            for group_rows in groups.values():
                _score_group(reader, group_rows, scores, batch_size, reuse_prefix, stats, bar)
    finally:
        if was_training:
            model.train()
        if bar is not None:
            bar.close()
    stats.rows += len(rows)
    stats.seconds += time.perf_counter() - t0
    return [[s[c] for c in range(len(s))] for s in scores]


def plan_group(rows: Sequence[Row], batch_size: int, reuse_prefix: bool = True) -> tuple[int, list[list[Row]]]:
    """How `score_rows` runs one group: the length of the shared prefix it encodes once (0: none) and its
    batches. Exposed so that a benchmark can time the bare model over exactly these batches."""
    n_prefix = 0
    if reuse_prefix and len(rows) > 1:
        # The shared prefix must end before the first scored position, whose hidden state the suffix pass computes.
        n_prefix = min(common_prefix_len([r.tokens for r in rows]), min(r.start for r in rows))
    # Longest first (as lm-eval does): similar lengths share a batch, and an out-of-memory shows up at once.
    order = sorted(rows, key=lambda r: -len(r.tokens))
    return n_prefix, [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


def batch_inputs(batch: Sequence[Row], n_prefix: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """A batch's token ids after the shared prefix (right-padded with 0) and the (row, position) pairs whose
    logits are read: every row's scored positions, row after row."""
    width = max(len(r.tokens) for r in batch) - n_prefix
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    b_idx: list[int] = []
    s_idx: list[int] = []
    for b, row in enumerate(batch):
        suffix = row.tokens[n_prefix:]
        ids[b, :len(suffix)] = torch.tensor(suffix)
        positions = range(row.start - n_prefix, len(row.tokens) - n_prefix)
        b_idx += [b] * len(positions)
        s_idx += positions
    return ids, b_idx, s_idx


def _score_group(reader: LogitReader, rows: list[Row], scores, batch_size: int, reuse_prefix: bool,
                 stats: ScoreStats, bar) -> None:
    n_prefix, batches = plan_group(rows, batch_size, reuse_prefix)
    prefix = None
    if n_prefix > 0:
        prefix = reader.prefix_cache(rows[0].tokens[:n_prefix])
        stats.forward_passes += 1
        stats.tokens += n_prefix
        if not _reusable(prefix):
            prefix, n_prefix = None, 0
    device = reader.device
    for batch in batches:
        ids, b_idx, s_idx = batch_inputs(batch, n_prefix)
        # Where each row's scored log-probs sit among the rows read (row after row, as batch_inputs lists them).
        tgt_pos, tgt_tok, tgt_row, last_pos, last_tok, last_row = [], [], [], [], [], []
        n = 0
        for b, row in enumerate(batch):
            tgt_pos += range(n, n + len(row.targets))
            tgt_tok += row.targets
            tgt_row += [b] * len(row.targets)
            n += len(row.tokens) - row.start
            last_pos += [n - 1] * len(row.last)
            last_tok += row.last
            last_row += [b] * len(row.last)
        cache = _expand_cache(prefix, len(batch)) if prefix is not None else None
        logits = reader.logits(ids.to(device), cache, torch.tensor(b_idx, device=device),
                               torch.tensor(s_idx, device=device))
        logprobs = torch.log_softmax(logits, dim=-1)
        # Gather the few scored log-probs on the device; only they travel back. Sums in float64 on the CPU.
        picked = logprobs[torch.tensor(tgt_pos + last_pos, device=logprobs.device),
                          torch.tensor(tgt_tok + last_tok, device=logprobs.device)].cpu().double()
        shared = torch.zeros(len(batch), dtype=torch.float64)
        if tgt_pos:
            shared.index_add_(0, torch.tensor(tgt_row, dtype=torch.long), picked[:len(tgt_pos)])
        totals = shared[torch.tensor(last_row)] + picked[len(tgt_pos):]
        k = 0
        for row in batch:
            for qi, ci in row.out:
                scores[qi][ci] = float(totals[k])
                k += 1
        stats.forward_passes += 1
        stats.tokens += sum(len(r.tokens) - n_prefix for r in batch)
        stats.padded_tokens += ids.numel()
        stats.prefix_tokens_reused += n_prefix * len(batch)
        if bar is not None:
            bar.update(len(batch))


# ---------------------------------------------------------------------------------------------- entry


def build_prompts(questions: Sequence[MCQuestion], dev_questions: Sequence[MCQuestion] | None = None,
                  shots: int = 0, mode: str = "letter", chat_template: bool = False,
                  tokenizer=None, fewshot_as_multiturn: bool = True) -> list[MCPrompt]:
    """Prompts for every question; the k-shot examples are the first `shots` dev questions of its subject
    (lm-eval's `first_n` sampler), so the prompt is deterministic."""
    check_mode(mode)
    if shots < 0:
        raise InputError(f"mc shots: expected a number >= 0, got {shots}; set shots to 0 or more")
    pool = few_shot_pool(dev_questions)
    if shots > 0 and not pool:
        raise InputError(f"mc shots: {shots}-shot needs a dev split; give dev questions or set shots to 0")
    prompts = []
    for q in questions:
        examples = pool.get(q.subject, [])
        if len(examples) < shots:
            raise InputError(f"mc dev split: subject {q.subject or '(none)'!r} has {len(examples)} dev question(s), "
                             f"{shots}-shot needs {shots}; add dev questions for it or lower shots")
        prompts.append(build_prompt(q, examples[:shots], mode, chat_template=chat_template, tokenizer=tokenizer,
                                    fewshot_as_multiturn=fewshot_as_multiturn))
    return prompts


def score_prompts(model, tokenizer, prompts: Sequence[MCPrompt], groups: Sequence[str] | None = None,
                  batch_size: int = 8, reuse_prefix: bool = True, progress: bool = False,
                  stats: ScoreStats | None = None) -> list[list[float]]:
    """Fast log-likelihood of every continuation of every prompt. `groups` (e.g. the subjects) say which
    prompts may share a cached prefix; by default all prompts form one group."""
    stats = stats if stats is not None else ScoreStats()
    groups = list(groups) if groups is not None else [""] * len(prompts)
    rows, n_single = build_rows(tokenizer, prompts, groups)
    stats.questions += len(prompts)
    stats.single_forward_questions += n_single
    return score_rows(model, rows, len(prompts), batch_size=batch_size, reuse_prefix=reuse_prefix,
                      progress=progress, stats=stats)


def reference_logprobs(model, tokenizer, prompts: Sequence[MCPrompt]) -> list[list[float]]:
    """The slow reference: one forward per (question, choice), full logits, full log-softmax (what
    lm-eval computes). For tests and benchmarks only."""
    model.eval()
    device = _unwrap(model).get_input_embeddings().weight.device
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            row = []
            for cont in prompt.continuations:
                ctx_enc, cont_enc = encode_pair(tokenizer, prompt.context, cont)
                ids = torch.tensor([(ctx_enc + cont_enc)[:-1]], device=device)
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                positions = torch.arange(len(ctx_enc) - 1, len(ctx_enc) + len(cont_enc) - 1)
                row.append(float(logprobs[positions, torch.tensor(cont_enc)].double().sum()))
            out.append(row)
    return out


def evaluate_mc(model, tokenizer, questions: Sequence[MCQuestion], dev_questions: Sequence[MCQuestion] | None = None,
                shots: int = 0, mode: str = "letter", chat_template: bool = False, batch_size: int = 8,
                progress: bool = True, reuse_prefix: bool = True, n_bins: int = 10,
                include_records: bool = True, fewshot_as_multiturn: bool = True, circular: bool = False) -> dict:
    """Score `questions` and return the metrics as a JSON-serialisable dict (see `eval.mc.results`).

    `mode` "letter" scores " A"/" B"/... after lm-eval's MMLU prompt; "cloze" scores each answer text
    (acc and length-normalised acc_norm). `chat_template=True` wraps the prompt in the tokenizer's chat
    template (instruct models), the examples as user/assistant turns unless `fewshot_as_multiturn=False`.
    `shots` examples come from `dev_questions`, first k of each subject. `reuse_prefix=False` turns off the
    shared-prefix KV cache (same scores, slower; for checks). `n_bins`: calibration bins. `circular` also scores
    every rotation of each question's options (CircularEval, `eval.mc.results.rotations`) and reports `circular`,
    the share of questions answered right under all of them; the other metrics are those of the unrotated questions.
    """
    from eval.mc.results import aggregate, circular_correct, rotations

    if not questions:
        raise InputError("mc questions: the question list is empty; check the data source and split")
    t0 = time.perf_counter()
    scored = [r for q in questions for r in rotations(q)] if circular else list(questions)
    prompts = build_prompts(scored, dev_questions, shots, mode, chat_template, tokenizer, fewshot_as_multiturn)
    t_prompt = time.perf_counter() - t0
    stats = ScoreStats()
    logprobs = score_prompts(model, tokenizer, prompts, [q.subject for q in scored], batch_size=batch_size,
                             reuse_prefix=reuse_prefix, progress=progress, stats=stats)
    total = time.perf_counter() - t0
    correct = circular_correct(questions, logprobs) if circular else None
    if circular:  # rotation 0 of each question is the question as given
        starts = itertools.accumulate([len(q.choices) for q in questions[:-1]], initial=0)
        logprobs = [logprobs[k] for k in starts]
    result = aggregate(questions, logprobs, mode=mode, shots=shots, chat_template=chat_template, n_bins=n_bins,
                       include_records=include_records, circular=correct)
    result["scoring"] = stats.as_dict()
    result["scoring"]["batch_size"] = batch_size
    result["time"] = {"prompts_s": round(t_prompt, 4), "total_s": round(total, 4)}
    result["metrics"]["time/mc_s"] = round(total, 4)
    result["metrics"]["perf/mc_questions_per_s"] = round(len(questions) / total, 3) if total > 0 else 0.0
    result["metrics"]["perf/mc_tokens_per_s"] = round(stats.tokens / stats.seconds, 1) if stats.seconds else 0.0
    return result
