"""The one sampler: every stage that generates text (preferences, PPO and the critic-free RL rollouts, generation
evals, the judge's answers, Best-of-N) renders its prompts and samples here.

Three things live here and nowhere else:

- **Prompt rendering.** A prompt record is a text (one user message) or chat messages (multi-turn included).
  `encode_prompt` turns it into model input (the chat template with the assistant turn opened); `scorer_text` into
  the text a scorer, a reward model on text or a judge reads. The same record renders the same way in every stage.
- **Batching by a token budget.** `plan_batches` sorts the (prompt, sample) jobs by prompt length and cuts them into
  batches whose rows x (longest prompt + max_new_tokens) stay within `token_budget`, a bound on the memory a batch
  holds in its KV cache; results come back in input order. A wide batch is what makes a CPU (or a GPU) fast here: the
  matrix products of one decoding step grow with the rows, the per-step overhead does not.
- **Sampling.** `Sampler.sample` decodes in a loop of its own (no `generate`), with a KV cache that holds each
  distinct prompt's keys and values once for all its samples (`common.shared_prompt_cache`): exactly
  softmax(logits / T) (optionally restricted by top_k / top_p), drawn by inverse CDF with one uniform per job and
  step from a random stream of the job's own (seed, prompt index, sample index). So a completion does not depend
  on which batch, process or token budget it was sampled in: re-sharding or re-batching changes nothing, and two
  models given the same seed see the same random numbers (common random numbers make their differences less
  noisy). Rows that have ended (EOS) leave the batch and its cache, so short completions stop costing compute.
  The draw (`common.token_draw`) runs fused with the LM head where the model's head is plain, so the
  [rows, vocabulary] logits of a step are never held.
  A LoRA adapter is folded into the base weights for the duration of the call (`common.lora_folding`), so each decoding
  step runs one matrix product per linear layer instead of three; the weights are restored bit for bit after.

Backends: `Sampler` is the transformers backend on whatever device the model sits on. Another backend (vLLM on a
GPU) would implement the same `sample(prompt_ids, params, ...) -> Samples`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor
from tqdm.auto import tqdm

from common.errors import InputError
from common.generation import accepts_logits_to_keep, logprobs_from_logits, pad_left, position_ids
from common.lora_folding import folded_lora
from common.shared_prompt_cache import SharedPromptCache, check_context_fits, decoding_attention
from common.token_draw import HeadDraw, draw_tokens, plain_lm_head

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Prompt = str | Messages

# Room for a batch of the default task: 512 completions of a ~40-token prompt and 40 new tokens (~30 KiB of KV
# cache a token for SmolLM2-135M: ~1.3 GB). Larger budgets stop paying once the matrix products are wide.
DEFAULT_TOKEN_BUDGET = 65536


# --- prompt rendering -------------------------------------------------------------------------------------------

def as_messages(text_or_messages: str | Messages, role: str) -> Messages:
    """A text becomes one message of `role`; a message list is kept as it is."""
    if isinstance(text_or_messages, str):
        return [{"role": role, "content": text_or_messages}]
    return list(text_or_messages)


def scorer_text(prompt: Prompt) -> str:
    """What a scorer, a text reward model or a judge reads as the prompt: a text prompt or a lone user message as it
    is; any other conversation (a system prompt, several turns) with one `role: content` line per message, so that
    nothing the model was shown is hidden from whoever grades its answer."""
    messages = as_messages(prompt, "user")
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def completion_text(completion: str | Messages) -> str:
    """The text of a completion: itself, or the content of its last (assistant) message."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def encode_prompt(tokenizer: Any, prompt: Prompt, where: str) -> list[int]:
    """Model input for a prompt: the chat template with the assistant turn opened, where generation starts; a
    tokenizer without a chat template takes a text prompt as it is. `where` names the prompt in errors."""
    if tokenizer.chat_template is None:
        if not isinstance(prompt, str):
            raise InputError(f"{where}: a chat prompt, but the model's tokenizer has no chat template; give text "
                             "prompts or use a chat model")
        return list(tokenizer(prompt)["input_ids"])
    return list(tokenizer.apply_chat_template(as_messages(prompt, "user"), add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], source: str) -> list[list[int]]:
    """`encode_prompt` for each prompt; errors name the source and the 1-based row."""
    return [encode_prompt(tokenizer, p, f"{source}: row {row}") for row, p in enumerate(prompts, 1)]


# --- batching ---------------------------------------------------------------------------------------------------

def plan_batches(widths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Cut jobs of the given widths (tokens a row needs: prompt + max_new_tokens to sample, prompt + completion to
    score) into batches of at most `token_budget` tokens, rows x the batch's widest row.

    Jobs are sorted widest first (the largest batch shape comes first, so running out of memory shows at once), ties
    in job order, so each batch is as wide as its first job. Returns the job indices of each batch.
    """
    if token_budget < 1:
        raise ValueError(f"plan_batches: token_budget must be >= 1, got {token_budget}")
    batches: list[list[int]] = []
    for job in sorted(range(len(widths)), key=lambda j: (-widths[j], j)):
        if widths[job] > token_budget:
            raise InputError(f"sampling: token_budget {token_budget} is smaller than one row of {widths[job]} tokens "
                             f"(prompt + completion); raise token_budget to at least {widths[job]}")
        if batches and (len(batches[-1]) + 1) * widths[batches[-1][0]] <= token_budget:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches


def shard_batches(widths: Sequence[int], token_budget: int, shard: tuple[int, int]) -> list[list[int]]:
    """This process's batches: the jobs, widest first, dealt out in turn to the `shard[1]` processes (so that each
    gets about the same rows and tokens, however few the jobs), then `plan_batches` over its own jobs."""
    index, count = shard
    mine = sorted(range(len(widths)), key=lambda j: (-widths[j], j))[index::count]
    return [[mine[i] for i in batch] for batch in plan_batches([widths[j] for j in mine], token_budget)]


# --- the random streams -----------------------------------------------------------------------------------------

def job_uniforms(seed: int, prompt_index: int, sample_index: int, steps: int) -> Tensor:
    """The uniforms in [0, 1) that draw a job's tokens, one a step: float64 from a generator seeded by a hash of
    (seed, prompt, sample), independent of every other job and of the global RNG."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


# --- samples ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `n` completions per prompt; `logprobs` also returns each sampled token's log-prob under the
    full softmax(logits / T) (not the top_k / top_p restricted one)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    logprobs: bool = False

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"SamplingParams: temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"SamplingParams: max_new_tokens and n must be >= 1, got {self.max_new_tokens}, {self.n}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: expected top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")


@dataclass
class Completion:
    """One sampled completion: its token ids up to and including the first EOS (all max_new_tokens of them when it
    has none), the decoded text without special tokens, and, when asked, the sampled tokens' log-probs."""

    token_ids: list[int]
    text: str
    has_eos: bool
    logprobs: list[float] | None = None

    @property
    def length(self) -> int:
        """Tokens of the text the completion shows (without its EOS)."""
        return len(self.token_ids) - int(self.has_eos)


@dataclass
class Samples:
    """What `Sampler.sample` returns: completions in flat input order, j = prompt * n + sample."""

    prompt_ids: list[list[int]]
    n: int
    completions: list[Completion]
    seconds: float = 0.0
    tokens_processed: int = 0  # prompt tokens prefilled + decoding steps x rows, over every process

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    def grouped(self) -> list[list[Completion]]:
        """The n completions of each prompt."""
        return [self.completions[i:i + self.n] for i in range(0, len(self.completions), self.n)]

    def padded(self, jobs: Sequence[int], pad_id: int, device: torch.device | str | None = None) -> PaddedBatch:
        """Jobs as one left-padded-prompt, right-padded-response batch (the layout `response_logprobs` takes)."""
        query_ids, query_mask = pad_left([self.prompt_ids[j // self.n] for j in jobs], pad_id, device)
        width = max(len(self.completions[j].token_ids) for j in jobs)
        response_ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)
        response_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, j in enumerate(jobs):
            ids = self.completions[j].token_ids
            response_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            response_mask[row, :len(ids)] = 1
        has_eos = torch.tensor([self.completions[j].has_eos for j in jobs])
        return PaddedBatch(query_ids, query_mask, response_ids.to(device), response_mask.to(device), has_eos.to(device))


@dataclass
class PaddedBatch:
    query_ids: Tensor  # [B, P] left-padded prompts
    query_mask: Tensor  # [B, P]
    response_ids: Tensor  # [B, R] right-padded responses (pad id after the EOS)
    response_mask: Tensor  # [B, R] 1 up to and including the EOS
    has_eos: Tensor  # [B] bool

    @property
    def response_start(self) -> int:
        return self.query_ids.shape[1]

    @property
    def ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


class Sampler:
    """The transformers backend: samples from `model` (a causal LM, peft or not) where it sits.

    `token_budget` bounds each batch's rows x (prompt + max_new_tokens); `shard=(index, count)` deals the jobs out to
    the processes of a distributed launch (`shard_batches`), which exchange their completions (a collective: every
    process calls `sample`) and each return all of them; `fold_lora` folds an active LoRA adapter in for the call.
    """

    def __init__(self, model: Any, tokenizer: Any, *, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 shard: tuple[int, int] = (0, 1), fold_lora: bool = True, progress: bool = True):
        pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        if pad_id is None or eos_id is None or pad_id == eos_id:
            raise ValueError(f"Sampler: the tokenizer needs distinct pad and eos tokens (pad={pad_id}, eos={eos_id}); "
                             "add a pad token (e.g. '<|pad|>') so padding is never mistaken for the end of a response")
        self.model, self.tokenizer = model, tokenizer
        self.token_budget, self.shard, self.fold_lora, self.progress = token_budget, shard, fold_lora, progress

    def sample(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, desc: str = "sampling") -> Samples:
        """`params.n` completions of each prompt (token ids, e.g. from `encode_prompts`), in input order."""
        prompts = [list(p) for p in prompt_ids]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Sampler.sample: give at least one prompt, each of at least one token")
        index, count = self.shard
        widths = [len(prompts[j // params.n]) + params.max_new_tokens for j in range(len(prompts) * params.n)]
        mine = shard_batches(widths, self.token_budget, self.shard)
        started = time.perf_counter()
        done: list[tuple[int, Completion]] = []
        processed = 0
        fold = folded_lora(self.model) if self.fold_lora else contextlib.nullcontext(self.model)
        bar = tqdm(total=sum(len(b) for b in mine), desc=desc, unit="completion", disable=not self.progress)
        with _eval_mode(self.model), torch.no_grad(), fold as model, bar:
            for jobs in mine:
                completions, tokens = self._decode(model, prompts, jobs, params)
                done += zip(jobs, completions, strict=True)
                processed += tokens
                bar.update(len(jobs))
        if count > 1:
            log.info("%s: sampled %d of %d completions on process %d of %d", desc, len(done), len(prompts) * params.n,
                     index, count)
            gathered = gather_object([(done, processed)])
            done = [item for part, _ in gathered for item in part]
            processed = sum(tokens for _, tokens in gathered)
        done.sort(key=lambda item: item[0])
        return Samples(prompts, params.n, [c for _, c in done], time.perf_counter() - started, processed)

    def _decode(self, model: Any, prompts: list[list[int]], jobs: list[int],
                params: SamplingParams) -> tuple[list[Completion], int]:
        """Sample one batch: each distinct prompt (by its tokens: n samples of a prompt, or a prompt repeated as a
        group) is prefilled once and its keys and values are held once for all its rows (`SharedPromptCache`); rows
        leave the batch after their EOS."""
        from transformers import DynamicCache

        tok, n, steps = self.tokenizer, params.n, params.max_new_tokens
        device = next(model.parameters()).device
        job_prompts = [tuple(prompts[j // n]) for j in jobs]
        distinct = list(dict.fromkeys(job_prompts))
        ids, mask = pad_left(distinct, tok.pad_token_id, device)
        check_context_fits(model, ids.shape[1] + steps)
        prefill = DynamicCache(config=model.config)
        next_tokens = NextTokens(model, params, len(jobs))
        state = next_tokens.forward(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                    past_key_values=prefill, use_cache=True)
        processed = int(mask.sum())
        row_of_prompt = {prompt: row for row, prompt in enumerate(distinct)}
        row_prompt = torch.tensor([row_of_prompt[p] for p in job_prompts], device=device)
        cache = SharedPromptCache(prefill, mask, row_prompt, steps)
        state = state[row_prompt]
        next_position = position_ids(mask)[row_prompt, -1:] + 1
        uniforms = torch.stack([job_uniforms(params.seed, j // n, j % n, steps) for j in jobs])
        tokens: list[list[int]] = [[] for _ in jobs]
        logprobs: list[list[float]] = [[] for _ in jobs]
        live = torch.arange(len(jobs))  # the batch's rows -> their index in `jobs`
        done = torch.zeros(len(jobs), dtype=torch.bool)  # rows that have drawn their EOS (until they leave)
        for step in range(steps):
            drawn, picked = next_tokens.draw(state, uniforms[live, step])
            drawn = drawn.cpu()
            rows, drawn_list = live.tolist(), drawn.tolist()
            picked_list = picked.tolist() if picked is not None else None
            for i in (~done).nonzero().squeeze(-1).tolist():
                tokens[rows[i]].append(drawn_list[i])
                if picked_list is not None:
                    logprobs[rows[i]].append(picked_list[i])
            done |= drawn == tok.eos_token_id
            if step == steps - 1 or bool(done.all()):
                break
            # Ended rows leave the batch once they are an eighth of it: the copy costs less than a step.
            if int(done.sum()) * 8 >= len(live):
                keep = (~done).nonzero().squeeze(-1)
                live, drawn, done, next_position = live[keep], drawn[keep], done[keep], next_position[keep.to(device)]
                cache.select_rows(keep.to(device))
            processed += len(live)
            with decoding_attention(model):
                state = next_tokens.forward(input_ids=drawn[:, None].to(device), position_ids=next_position,
                                            past_key_values=cache, use_cache=True, shared_prompts=cache)
            if cache.attention_calls == 0:
                raise ValueError(f"sampling: {type(model).__name__}'s attention does not go through transformers' "
                                 "AttentionInterface, which the sampler's shared-prompt cache needs")
            next_position = next_position + 1
        eos = tok.eos_token_id
        completions = [Completion(t, tok.decode(t, skip_special_tokens=True), t[-1] == eos,
                                  logprobs[row] if params.logprobs else None) for row, t in enumerate(tokens)]
        return completions, processed


class NextTokens:
    """How a decoding forward pass turns into drawn tokens. Where the model's logits are a plain LM head over the
    last hidden states (`common.token_draw.plain_lm_head`) and the sampling is unrestricted (no top_k / top_p),
    `forward` runs the decoder alone and `draw` runs the head and the draw together (`HeadDraw`, no logits held);
    otherwise `forward` runs the model for its last position's logits and `draw` is `draw_tokens`. Same
    distribution either way."""

    def __init__(self, model: Any, params: SamplingParams, max_rows: int):
        weight = plain_lm_head(model) if params.top_k == 0 and params.top_p == 1.0 else None
        self.fused = HeadDraw(weight, max_rows) if weight is not None else None
        self.model, self.params = model, params

    def forward(self, **inputs: Any) -> Tensor:
        """[rows, hidden] last hidden states (fused) or [rows, vocabulary] float32 logits at the last position."""
        if self.fused is not None:
            return self.model.get_decoder()(**inputs).last_hidden_state[:, -1]
        return self.model(**inputs, logits_to_keep=1).logits[:, -1].float()

    def draw(self, state: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor | None]:
        p = self.params
        if self.fused is not None:
            return self.fused(state, uniforms, p.temperature, with_logprobs=p.logprobs)
        return draw_tokens(state, uniforms, p.temperature, p.top_k, p.top_p, with_logprobs=p.logprobs)


@torch.no_grad()
def completion_logprobs(model: Any, samples: Samples, temperature: float, pad_id: int, *,
                        token_budget: int = DEFAULT_TOKEN_BUDGET, shard: tuple[int, int] = (0, 1)) -> list[list[float]]:
    """Each completion's token log-probs under `model` (e.g. a reference, for a KL estimate), in input order.

    Each prompt runs once for all its n completions: its keys and values are copied to its completions' rows, which
    then run only their own tokens. With the eval's 4 samples of a ~60-token prompt and 40 new tokens that is about
    half the tokens of running every row whole (`response_logprobs` over `Samples.padded`), for the same log-probs up
    to float rounding. Batches hold whole prompts, their rows x (prompt + longest completion) within `token_budget`;
    sharded like `Sampler.sample`."""
    n = samples.n
    widths = [len(samples.prompt_ids[p]) + max(len(c.token_ids) for c in group)
              for p, group in enumerate(samples.grouped())]
    device = next(model.parameters()).device
    last_logits_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    mine: list[tuple[int, list[float]]] = []
    with _eval_mode(model):
        for prompts in shard_batches(widths, max(token_budget // n, 1), shard):
            prompt_ids, prompt_mask = pad_left([samples.prompt_ids[p] for p in prompts], pad_id, device)
            prefill = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                            use_cache=True, **last_logits_only)
            jobs = [p * n + k for p in prompts for k in range(n)]
            batch = samples.padded(jobs, pad_id, device)
            ids, mask = batch.response_ids, batch.response_mask
            logits = prefill.logits[:, -1:].repeat_interleave(n, dim=0)  # predicts each completion's first token
            if ids.shape[1] > 1:  # the completions' tokens but the last predict the rest
                cache = prefill.past_key_values
                cache.batch_repeat_interleave(n)
                context = prompt_mask.repeat_interleave(n, dim=0)
                positions = context.sum(dim=1, keepdim=True) + torch.arange(ids.shape[1] - 1, device=device)
                rest = model(input_ids=ids[:, :-1], attention_mask=torch.cat([context, mask[:, :-1]], dim=1),
                             position_ids=positions, past_key_values=cache, use_cache=True).logits
                logits = torch.cat([logits, rest], dim=1)
            values = logprobs_from_logits(logits, ids, temperature)
            for row, j in enumerate(jobs):
                mine.append((j, values[row, :len(samples.completions[j].token_ids)].tolist()))
    if shard[1] > 1:
        mine = [item for part in gather_object([mine]) for item in part]
    return [values for _, values in sorted(mine, key=lambda item: item[0])]


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    # Dropout off for sampling, each submodule's flag restored after: a frozen part may be deliberately in eval mode
    # inside a training model.
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def shard_of(accelerator: Any | None) -> tuple[int, int]:
    """(process index, process count) of a launch, (0, 1) without one."""
    if accelerator is None:
        return (0, 1)
    return (accelerator.process_index, accelerator.num_processes)

