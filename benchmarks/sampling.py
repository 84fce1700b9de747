"""Benchmark: the one sampler (`common.sampling.Sampler`) against the implementation it replaced, its share of this
machine's matrix-product ceiling, the PPO-rollout and eval shapes, and what one competing busy process does to
sampling and to a training step. Prints figures, asserts nothing.

    nice -n 10 .venv/bin/python benchmarks/sampling.py --adapter runs/sentiment/ID/sft/adapter [--repeats 3]
        [--contention] [--only prefs ceiling shapes forward contention] [--reward-model runs/.../rm/reward_model]
        [--prompts 128] [--k 4] [--max-new-tokens 40]
    .venv/bin/python benchmarks/sampling.py --tiny --contention     # smoke test on the tiny random model, seconds

The model is SmolLM2-135M-Instruct in float32 with the SFT LoRA adapter given by --adapter (a PEFT adapter dir);
without one, a stand-in is written to a temporary folder (a fresh r=16 all-linear LoRA with random A and B, B scaled
down so the model still writes text) and the script says so: its completion lengths, hence its timings, are not
the SFT policy's. "Before" is the implementation the sampler replaced, reproduced here (`generate_before`):
`model.generate` on the un-merged peft model, left-padded batches of a fixed row count, the K samples of a prompt
adjacent, a seed per batch. "After" is `Sampler` with its default token budget (LoRA folded in for the call). After a
warm-up (the same batches, 2 tokens long) the two alternate --repeats times, so a drift in the machine's speed hits
both; medians are printed.

What it prints, part by part:
- prefs: the default preferences workload (--prompts of prompts_train.jsonl x --k completions, --max-new-tokens, T=1):
  seconds, completions/s and mean completion length (tokens up to and including the EOS) of before (batches of 32)
  and after, and the speed-up, after's completions/s over before's (the issue's target: >= 2.5x).
- ceiling: the FLOPs of every token the sampler processed in the prefs run (counted as `token_counts` and
  `per_token_flops` document), float32 torch.mm throughput at two sizes (the best is the ceiling; bf16 too where
  `common.config.native_bf16()`, i.e. AMX), and the sampler's achieved GFLOP/s as a share of that ceiling (target:
  >= 50%).
- shapes: seconds of before (one batch of all rows) and after for a PPO rollout (16 prompts x 1, T=0.7) and the eval
  stage's sampling (40 held-out prompts x 1, T=1, with log-probs as the eval stage asks).
- forward: the eval stage's forward-only passes over its samples (--eval-prompts held-out prompts x 4, T=1, sampled
  once): the reference's log-probs for the KL estimate (`completion_logprobs` with the adapter active) un-folded and
  folded (`common.lora_folding`, the fold and the restore timed in), and every row run whole against each prompt run
  once for its samples (both folded); with --reward-model, reward scoring of the same completions by the saved reward
  model with its LoRA un-merged and merged (`RewardModel.load`), and, merged, every row whole in length-sorted
  batches against each shared prompt run once (`common.prefix_sharing`).
- contention (--contention, not run by default): the prefs workload's sampler and one training step (causal-LM
  forward and backward of 8 x 192 tokens on the LoRA model, AdamW step, float32), each in a subprocess (thread
  settings act only before torch starts), alone and while one busy pure-Python process runs, for torch threads
  {2, 1} x OMP_WAIT_POLICY {unset, PASSIVE}: seconds alone, seconds contended (medians of --repeats runs after a
  warm-up, model loading excluded) and the slowdown, contended / alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bf16_training import step_seconds  # noqa: E402
from common.config import LoraSpec, ModelConfig, native_bf16  # noqa: E402
from common.generation import pad_left, position_ids, response_logprobs  # noqa: E402
from common.models import (  # noqa: E402
    load_base_model,
    load_for_inference,
    load_tokenizer,
    load_trainable_model,
    lora_config,
    resolve_model,
)
from common.sampling import (  # noqa: E402
    DEFAULT_TOKEN_BUDGET,
    Sampler,
    Samples,
    SamplingParams,
    encode_prompts,
    plan_batches,
)

DATA = ROOT / "recipes" / "data" / "sentiment"
PARTS = ("prefs", "ceiling", "shapes", "forward", "contention")
FORWARD_SAMPLES = 4  # the default eval's samples a prompt
BEFORE_BATCH_ROWS = 32  # the preferences stage's batch size before the one sampler
# Thread settings of the contention table: (torch threads, OMP_WAIT_POLICY or None for unset).
CONTENTION_SETTINGS = [(2, None), (2, "PASSIVE"), (1, None), (1, "PASSIVE")]
# Scale of the stand-in's random B, so the model still writes text: with peft's init_lora_weights=False, B is as large
# as A and on SmolLM2-135M the update's norm is 14% of the base weight's on average (up to 59%); scaled, 0.14%.
STAND_IN_B_SCALE = 0.01


@dataclass(frozen=True)
class Sizes:
    """The workload sizes: the issue's for the real model, small ones for the tiny model's smoke test."""

    model: str
    prompts: int
    k: int
    max_new_tokens: int
    ppo_prompts: int
    eval_prompts: int
    gemm_sizes: tuple[int, ...]
    train_rows: int
    train_tokens: int


REAL = Sizes("smollm2-135m-instruct", prompts=128, k=4, max_new_tokens=40, ppo_prompts=16, eval_prompts=40,
             gemm_sizes=(2048, 4096), train_rows=8, train_tokens=192)
TINY = Sizes("tiny-random-llama", prompts=8, k=2, max_new_tokens=8, ppo_prompts=4, eval_prompts=4,
             gemm_sizes=(256, 512), train_rows=2, train_tokens=64)


# --- models and prompts -----------------------------------------------------------------------------------------

def model_config(sizes: Sizes) -> ModelConfig:
    return ModelConfig(base=sizes.model, dtype="float32", lora=LoraSpec(r=16, alpha=32, dropout=0.05))


def write_stand_in(cfg: ModelConfig, directory: Path) -> Path:
    """A LoRA adapter of the SFT stage's shape with random A and small random B, saved as a PEFT adapter dir."""
    from peft import get_peft_model

    torch.manual_seed(0)
    config = lora_config(cfg.lora)
    config.init_lora_weights = False
    model = get_peft_model(load_base_model(cfg, resolve_model(cfg.base), training=False), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(STAND_IN_B_SCALE)
    model.save_pretrained(directory)
    return directory


def load_policy(cfg: ModelConfig, adapter: Path) -> tuple[Any, Any]:
    """The base model with the adapter un-merged on it (a PeftModel, eval mode) and its tokenizer, as the
    preferences stage loads them."""
    resolved = resolve_model(cfg.base)
    return load_for_inference(cfg, resolved, adapter), load_tokenizer(resolved)


def prefs_workload(tokenizer: Any, sizes: Sizes) -> tuple[list[list[int]], SamplingParams]:
    """The preferences stage's sampling in the default recipe: K completions of each prompt, T=1, its seed."""
    prompt_ids = read_prompts(tokenizer, DATA / "prompts_train.jsonl", sizes.prompts)
    return prompt_ids, SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=1.0, n=sizes.k, seed=42)


def read_prompts(tokenizer: Any, path: Path, count: int) -> list[list[int]]:
    """The first `count` prompts of a prompts jsonl, rendered as every stage renders them."""
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < count:
        sys.exit(f"{path}: {len(rows)} prompts, fewer than the {count} asked for; lower --prompts")
    return encode_prompts(tokenizer, rows[:count], str(path))


# --- before and after ---------------------------------------------------------------------------------------------

def generate_before(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], params: SamplingParams,
                    batch_rows: int) -> list[int]:
    """The sampling the one sampler replaced (common.generation.generate_responses under the preferences stage's
    loop, as of issue 18): `params.n` samples of each prompt, adjacent, in left-padded batches of `batch_rows` rows,
    `model.generate` with multinomial sampling and every other logits processor neutral, batch b seeded seed + b.
    Returns each completion's length: tokens up to and including the first EOS."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        max_new_tokens=params.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        typical_p=1.0, num_beams=1, num_return_sequences=1, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    jobs = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
    lengths: list[int] = []
    for b, start in enumerate(range(0, len(jobs), batch_rows)):
        ids, mask = pad_left([prompt_ids[i] for i in jobs[start:start + batch_rows]], tokenizer.pad_token_id)
        torch.manual_seed(params.seed + b)
        responses = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        is_eos = responses == tokenizer.eos_token_id
        first_eos = is_eos.int().argmax(dim=1)
        lengths += torch.where(is_eos.any(dim=1), first_eos + 1, responses.shape[1]).tolist()
    return lengths


def sample_after(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], params: SamplingParams) -> Samples:
    return Sampler(model, tokenizer, progress=False).sample(prompt_ids, params)


def warm_up(model: Any, tokenizer: Any, prompt_ids: list[list[int]], params: SamplingParams,
            before_rows: int | None = None) -> None:
    """Sample the same prompts in the same batch shapes but 2 tokens long, so one-off costs (allocations, kernel
    selection for each shape) stay out of the timed run: with the sampler and, given `before_rows`, before."""
    short = dataclasses.replace(params, max_new_tokens=2)
    if before_rows is not None:
        generate_before(model, tokenizer, prompt_ids, short, before_rows)
    sample_after(model, tokenizer, prompt_ids, short)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def compare(model: Any, tokenizer: Any, prompt_ids: list[list[int]], params: SamplingParams, batch_rows: int,
            repeats: int) -> tuple[list[float], list[int], list[float], Samples]:
    """Before and after, alternated `repeats` times after a warm-up of each. Returns before's seconds and lengths,
    after's seconds and last Samples."""
    warm_up(model, tokenizer, prompt_ids, params, batch_rows)
    before_s, after_s = [], []
    for _ in range(repeats):
        seconds, lengths = timed(lambda: generate_before(model, tokenizer, prompt_ids, params, batch_rows))
        before_s.append(seconds)
        seconds, samples = timed(lambda: sample_after(model, tokenizer, prompt_ids, params))
        after_s.append(seconds)
    return before_s, lengths, after_s, samples


# --- part 1: the preferences workload -------------------------------------------------------------------------

def bench_prefs(model: Any, tokenizer: Any, sizes: Sizes, repeats: int) -> tuple[float, Samples]:
    prompt_ids, params = prefs_workload(tokenizer, sizes)
    before_s, before_lengths, after_s, samples = compare(model, tokenizer, prompt_ids, params, BEFORE_BATCH_ROWS,
                                                         repeats)
    jobs = sizes.prompts * sizes.k
    before, after = statistics.median(before_s), statistics.median(after_s)
    after_lengths = [len(c.token_ids) for c in samples.completions]
    print(f"\n[prefs] {sizes.prompts} prompts x {sizes.k} completions = {jobs}, {sizes.max_new_tokens} new tokens, "
          f"T=1, median of {repeats}")
    print(f"{'implementation':<44} {'seconds':>8} {'completions/s':>14} {'mean length':>12}")
    for name, seconds, lengths in ((f"before: generate, un-merged LoRA, {BEFORE_BATCH_ROWS} rows", before,
                                    before_lengths),
                                   (f"after: Sampler, token budget {DEFAULT_TOKEN_BUDGET}", after, after_lengths)):
        print(f"{name:<44} {seconds:>8.2f} {jobs / seconds:>14.2f} {statistics.mean(lengths):>12.2f}")
    print(f"speed-up (after / before completions/s): {before / after:.2f}x   (target >= 2.5x)")
    return after, samples


# --- part 2: the ceiling ----------------------------------------------------------------------------------------

@dataclass
class TokenCounts:
    prefill_tokens: int  # prompt tokens prefilled (each distinct prompt of a batch once, padding not counted)
    prefill_rows: int  # distinct prompts prefilled: one LM-head position each
    decode_rows: int  # decoding forward passes x rows in them (rows ended but not yet dropped included)
    useful_decode_rows: int  # of those, the rows that had not drawn their EOS yet
    context: float  # sum over every token processed of the positions it attends to


def token_counts(samples: Samples, params: SamplingParams, token_budget: int) -> TokenCounts:
    """What `Sampler.sample` processed, from its inputs and outputs alone.

    Prefill: the batches are the ones the sampler plans (`plan_batches` over the same widths); in each, every
    distinct prompt is prefilled once (its keys and values held once for its samples), one LM-head position per
    prompt.
    Decode: `Samples.tokens_processed` is prefill tokens + the rows of every decoding forward pass, so the row-steps
    are the difference. A completion of L tokens needed L - 1 of them (its first token comes from the prefill
    logits, each later one from a forward pass of the token before); the rest are rows that drew their EOS and stay
    in the batch until an eighth of it has ended (`Sampler._decode`).
    Context (for attention): a prefilled prompt of P tokens attends to 1 + 2 + ... + P positions (causal; the
    padding the batch computes over is not counted); decoding step t of a completion of a P-token prompt attends to
    P + t + 1; rows kept after their EOS are counted at the mean decoding context.
    """
    n = samples.n
    widths = [len(samples.prompt_ids[j // n]) + params.max_new_tokens for j in range(len(samples.completions))]
    prefilled = [len(samples.prompt_ids[i]) for jobs in plan_batches(widths, token_budget)
                 for i in sorted({j // n for j in jobs})]
    prefill_tokens = sum(prefilled)
    decode_rows = samples.tokens_processed - prefill_tokens
    steps = [(len(samples.prompt_ids[j // n]), len(c.token_ids) - 1) for j, c in enumerate(samples.completions)]
    useful = sum(s for _, s in steps)
    decode_context = sum(s * p + s * (s + 1) / 2 for p, s in steps)
    idle_context = (decode_rows - useful) * decode_context / useful if useful else 0.0
    return TokenCounts(prefill_tokens, len(prefilled), decode_rows, useful,
                       sum(p * (p + 1) / 2 for p in prefilled) + decode_context + idle_context)


def per_token_flops(model: Any) -> tuple[int, int, int]:
    """FLOPs a token costs, from the model's actual layer shapes: the linear layers of the body (2 x in x out each;
    the LoRA folded in, so the base layers' shapes, not lora_A / lora_B), the LM head, and attention per context
    position (scores q.k and the weighted sum of values: 2 x 2 x head_dim per query head and layer)."""
    head = model.get_output_embeddings()
    body = sum(2 * m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim
    return body, 2 * head.in_features * head.out_features, attention


def gemm_gflops(size: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best-of-`repeats` throughput of one square torch.mm (2 n^3 FLOPs) after a warm-up."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    seconds = min(timed(lambda: torch.mm(a, b))[0] for _ in range(repeats))
    return 2 * size**3 / seconds / 1e9


def bench_ceiling(model: Any, samples: Samples, seconds: float, params: SamplingParams, sizes: Sizes) -> None:
    body, head, attention = per_token_flops(model)
    counts = token_counts(samples, params, DEFAULT_TOKEN_BUDGET)
    flops = {"linear layers": body * (counts.prefill_tokens + counts.decode_rows),
             "LM head": head * (counts.prefill_rows + counts.decode_rows),
             "attention (approx.)": attention * counts.context}
    total = sum(flops.values())
    achieved = total / seconds / 1e9
    print(f"\n[ceiling] the sampler's run of [prefs]; per token: linear layers {body / 1e6:.1f} MFLOP (base shapes, "
          f"LoRA folded), LM head {head / 1e6:.1f} MFLOP where logits are computed, attention {attention} FLOP per "
          "context position (approx.: causal context, prompt padding not counted)")
    print(f"prefill: {counts.prefill_tokens} tokens of {counts.prefill_rows} distinct prompts; decode: "
          f"{counts.decode_rows} row-steps (tokens_processed - prefill), of which {counts.useful_decode_rows} before "
          f"EOS (sum of len(token_ids) - 1) and {counts.decode_rows - counts.useful_decode_rows} ended rows not yet "
          "dropped")
    for name, value in flops.items():
        print(f"  {name:<20} {value / 1e9:>10.2f} GFLOP")
    print(f"  {'total':<20} {total / 1e9:>10.2f} GFLOP in {seconds:.2f} s: {achieved:.1f} GFLOP/s")
    ceilings = {"float32": torch.float32, **({"bfloat16": torch.bfloat16} if native_bf16() else {})}
    for name, dtype in ceilings.items():
        measured = {size: gemm_gflops(size, dtype) for size in sizes.gemm_sizes}
        best = max(measured.values())
        shown = ", ".join(f"{size}: {value:.1f}" for size, value in measured.items())
        print(f"torch.mm {name} GFLOP/s ({torch.get_num_threads()} threads) {shown}; share of the {name} ceiling "
              f"{achieved / best:.1%}" + ("   (target >= 50%)" if dtype == torch.float32 else ""))
    if len(ceilings) == 1:
        print("bfloat16: not measured (no AMX: common.config.native_bf16() is False, the sampler runs float32)")


# --- part 3: PPO rollout and eval shapes ----------------------------------------------------------------------

def bench_shapes(model: Any, tokenizer: Any, sizes: Sizes, repeats: int) -> None:
    shapes = [
        (f"PPO rollout: {sizes.ppo_prompts} x 1, T=0.7", DATA / "prompts_train.jsonl", sizes.ppo_prompts,
         SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=0.7, seed=1)),
        (f"eval: {sizes.eval_prompts} held-out x 1, T=1", DATA / "prompts_heldout.jsonl", sizes.eval_prompts,
         SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=1.0, seed=1, logprobs=True)),
    ]
    print(f"\n[shapes] {sizes.max_new_tokens} new tokens; before: generate on the un-merged LoRA, one batch of all "
          f"rows; after: Sampler; median of {repeats}")
    print(f"{'shape':<36} {'before s':>9} {'after s':>9} {'speed-up':>9}")
    for name, path, count, params in shapes:
        prompt_ids = read_prompts(tokenizer, path, count)
        before_s, _, after_s, _ = compare(model, tokenizer, prompt_ids, params, count, repeats)
        before, after = statistics.median(before_s), statistics.median(after_s)
        print(f"{name:<36} {before:>9.2f} {after:>9.2f} {before / after:>8.2f}x")


# --- part 4: forward-only passes ---------------------------------------------------------------------------

def bench_forward(model: Any, tokenizer: Any, sizes: Sizes, repeats: int, reward_model: Path | None) -> None:
    from peft import PeftModel

    from common.lora_folding import folded_lora
    from common.sampling import completion_logprobs, scorer_text
    from reward_model.api import RewardModel

    prompts = [json.loads(line)["prompt"] for line in (DATA / "prompts_heldout.jsonl").read_text().splitlines()]
    prompts = prompts[:sizes.eval_prompts]
    params = SamplingParams(max_new_tokens=sizes.max_new_tokens, temperature=1.0, n=FORWARD_SAMPLES, seed=1)
    samples = sample_after(model, tokenizer, encode_prompts(tokenizer, prompts, "eval"), params)
    pad = tokenizer.pad_token_id

    def folded(logprobs: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            with folded_lora(model):
                logprobs()
        return run

    def whole_rows() -> None:
        """The reference pass before each prompt ran once for its samples: every row whole, prompt and completion."""
        widths = [len(samples.prompt_ids[j // samples.n]) + len(c.token_ids) for j, c in enumerate(samples.completions)]
        with torch.no_grad():
            for jobs in plan_batches(widths, DEFAULT_TOKEN_BUDGET):
                batch = samples.padded(jobs, pad)
                response_logprobs(model, batch.ids, batch.attention_mask, batch.response_start, 1.0)

    shared = lambda: completion_logprobs(model, samples, 1.0, pad)  # noqa: E731
    rows = [("reference log-probs (KL)", shared, folded(shared)),
            ("KL: whole rows, prompt once", folded(whole_rows), folded(shared))]
    if reward_model is not None:
        merged = RewardModel.load(reward_model, model_config(sizes))
        base = load_base_model(model_config(sizes), resolve_model(sizes.model), task="seq-cls", training=False)
        info = RewardModel.read_info(reward_model)
        unmerged = RewardModel.from_classifier(PeftModel.from_pretrained(base, str(reward_model)).eval(),
                                               merged.tokenizer, info["chat"], info["max_length"])
        texts = [scorer_text(p) for p in prompts for _ in range(FORWARD_SAMPLES)]

        def whole_scores() -> None:
            """Reward scores before shared prompts ran once: the distinct inputs in length-sorted batches of 16, every
            row whole, through the merged model (`_call` is its forward)."""
            encoded = sorted({tuple(merged.encode(t, c)) for t, c in zip(texts, samples.texts, strict=True)}, key=len)
            with torch.no_grad():
                for start in range(0, len(encoded), 16):
                    batch = [list(ids) for ids in encoded[start:start + 16]]
                    width = max(len(ids) for ids in batch)
                    ids = torch.tensor([row + [pad] * (width - len(row)) for row in batch])
                    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in batch])
                    merged._call(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)

        rows.append(("reward scores", lambda: unmerged.score(texts, samples.texts),
                     lambda: merged.score(texts, samples.texts)))
        rows.append(("RM: whole rows, prompt once", whole_scores, lambda: merged.score(texts, samples.texts)))
    print(f"\n[forward] the eval's passes over {len(samples.completions)} completions ({sizes.eval_prompts} held-out "
          f"prompts x {FORWARD_SAMPLES}); LoRA un-folded vs folded (fold and restore included) / merged, and "
          f"every row run whole vs each prompt once for its samples; median of {repeats} after a warm-up")
    print(f"{'pass':<28} {'before s':>8} {'after s':>9} {'speed-up':>9}")
    for name, plain, fast in rows:
        plain(), fast()  # warm-up
        plain_s, fast_s = [], []
        for _ in range(repeats):
            plain_s.append(timed(plain)[0])
            fast_s.append(timed(fast)[0])
        before, after = statistics.median(plain_s), statistics.median(fast_s)
        print(f"{name:<28} {before:>8.2f} {after:>9.2f} {before / after:>8.2f}x")


# --- part 5: contention ---------------------------------------------------------------------------------------

def training_batch(tokenizer: Any, rows: int, tokens: int) -> dict[str, torch.Tensor]:
    """`rows` SFT conversations padded (or cut) to exactly `tokens` tokens, labels = inputs off the padding."""
    records = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:rows]]
    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in records]
    batch = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def worker(task: str, sizes: Sizes, adapter: Path, repeats: int) -> float:
    """The median seconds of `repeats` runs of `task` in this (fresh) process: "sample", the prefs workload's
    sampler, or "train", one training step; after a warm-up, so loading and one-off costs stay out."""
    cfg = model_config(sizes)
    if task == "sample":
        model, tokenizer = load_policy(cfg, adapter)
        prompt_ids, params = prefs_workload(tokenizer, sizes)
        warm_up(model, tokenizer, prompt_ids, params)
        return statistics.median(timed(lambda: sample_after(model, tokenizer, prompt_ids, params))[0]
                                 for _ in range(repeats))
    resolved = resolve_model(cfg.base)
    model = load_trainable_model(cfg, resolved, init_adapter=adapter)
    batch = training_batch(load_tokenizer(resolved), sizes.train_rows, sizes.train_tokens)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step_seconds(model, batch, False, optimizer)
    return statistics.median(step_seconds(model, batch, False, optimizer) for _ in range(repeats))


def run_worker(task: str, threads: int, wait_policy: str | None, busy: bool, worker_args: list[str]) -> float:
    """`worker(task)` in a subprocess with OMP_NUM_THREADS / torch threads and OMP_WAIT_POLICY set before torch
    starts; with `busy`, a pure-Python busy loop runs in another process from before it starts until it ends."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["OMP_NUM_THREADS"] = str(threads)
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--threads", str(threads), *worker_args]
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if result.returncode != 0:
        sys.exit(f"contention worker {task} (threads {threads}, OMP_WAIT_POLICY {wait_policy}) failed:\n"
                 f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def bench_contention(sizes: Sizes, repeats: int, worker_args: list[str]) -> None:
    print(f"\n[contention] each run in a fresh process (median of {repeats}), alone and beside one busy pure-Python "
          f"process; sample: "
          f"{sizes.prompts} x {sizes.k} completions of {sizes.max_new_tokens} tokens; train: one LoRA step on "
          f"{sizes.train_rows} x {sizes.train_tokens} tokens (forward, backward, AdamW)")
    print(f"{'threads':>7} {'OMP_WAIT_POLICY':>15} | {'sample alone s':>14} {'contended s':>11} {'slowdown':>8} | "
          f"{'train alone s':>13} {'contended s':>11} {'slowdown':>8}")
    for threads, wait_policy in CONTENTION_SETTINGS:
        cells = []
        for task in ("sample", "train"):
            alone = run_worker(task, threads, wait_policy, False, worker_args)
            contended = run_worker(task, threads, wait_policy, True, worker_args)
            cells.append(f"{alone:>{14 if task == 'sample' else 13}.2f} {contended:>11.2f} {contended / alone:>7.2f}x")
        print(f"{threads:>7} {wait_policy or 'unset':>15} | {cells[0]} | {cells[1]}")


def run_in_process(policy: tuple[Any, Any], parts: list[str], sizes: Sizes, repeats: int,
                   reward_model: Path | None) -> None:
    """The parts that time in this process, on one loaded model: prefs, ceiling (on prefs' sampler run, or its own
    when prefs is not asked for), shapes and forward."""
    model, tokenizer = policy
    after_s, samples = None, None
    if "prefs" in parts:
        after_s, samples = bench_prefs(model, tokenizer, sizes, repeats)
    if "ceiling" in parts:
        prompt_ids, params = prefs_workload(tokenizer, sizes)
        if samples is None:
            warm_up(model, tokenizer, prompt_ids, params)
            after_s, samples = timed(lambda: sample_after(model, tokenizer, prompt_ids, params))
        bench_ceiling(model, samples, after_s, params, sizes)
    if "shapes" in parts:
        bench_shapes(model, tokenizer, sizes, repeats)
    if "forward" in parts:
        bench_forward(model, tokenizer, sizes, repeats, reward_model)


# --- main -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, help="the SFT stage's PEFT adapter dir (default: a random stand-in)")
    parser.add_argument("--reward-model", type=Path, help="a reward_model stage's reward_model dir: the forward "
                        "part also times its scores")
    parser.add_argument("--prompts", type=int, help="prompts of the prefs workload (default 128)")
    parser.add_argument("--k", type=int, help="completions per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per completion (default 40)")
    parser.add_argument("--repeats", type=int, default=1, help="before/after alternations; medians are printed")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--contention", action="store_true", help="also run the contention part (minutes)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model and tiny sizes: a smoke test")
    parser.add_argument("--worker", choices=("sample", "train"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        parser.error(f"--adapter {args.adapter}: no adapter_config.json there; give a PEFT adapter dir such as "
                     "runs/sentiment/ID/sft/adapter, or leave --adapter out for a stand-in")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TINY if args.tiny else REAL
    sizes = dataclasses.replace(base, **{name: value for name in ("prompts", "k", "max_new_tokens")
                                         if (value := getattr(args, name)) is not None})
    if args.worker:
        print(json.dumps({"seconds": worker(args.worker, sizes, args.adapter, args.repeats)}))
        return
    parts = args.only or [p for p in PARTS if p != "contention" or args.contention]
    cfg = model_config(sizes)

    with tempfile.TemporaryDirectory() as scratch:
        adapter = args.adapter
        if adapter is None:
            adapter = write_stand_in(cfg, Path(scratch) / "stand-in-adapter")
            print(f"adapter: a STAND-IN (no --adapter): random LoRA r=16 all-linear, B scaled by {STAND_IN_B_SCALE}; "
                  "not the SFT policy, so its completion lengths and timings differ from the real workload's")
        print(f"{sizes.model} float32, adapter {adapter}; {torch.get_num_threads()} torch threads, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"bf16 matmuls native (AMX): {native_bf16()}")
        if set(parts) - {"contention"}:
            run_in_process(load_policy(cfg, adapter), parts, sizes, args.repeats, args.reward_model)
        if "contention" in parts:
            worker_args = ["--adapter", str(adapter), "--prompts", str(sizes.prompts), "--k", str(sizes.k),
                           "--max-new-tokens", str(sizes.max_new_tokens), "--repeats", str(args.repeats)]
            worker_args += ["--tiny"] if args.tiny else []
            bench_contention(sizes, args.repeats, worker_args)


if __name__ == "__main__":
    main()
