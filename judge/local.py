"""A local transformers causal LM as judge, reading label probabilities instead of generating text.

After the judge prompt (chat template applied when the tokenizer has one, with the generation prompt),
the judge's answer is one of a few labels ("A" / "B" / "C", or "1".."10"). Rather than sampling and
parsing, we compute the probability the model gives to each label *sequence* and renormalise over the
labels, so every verdict is parseable and comes with a probability.

Multi-token labels are scored as sequences: log P(l) = sum_t log P(l_t | prompt, l_<t). When one label
is a token-prefix of another ("1" and "10" in SmolLM2's and the byte-level tokenizer: "10" is "1","0"),
P("1" as a whole answer) is taken as P("1") - P("1","0"): the mass of "1" followed by a token that
continues a longer label belongs to that longer label. So scores 1..10 need one extra forward pass per
prompt (for "10"), and the expected score is sum_s s * p(s) over the ten renormalised probabilities.

Batches are left-padded with explicit position ids, so a prompt scores the same alone or in a batch
(tested). `label_mass` (the probability on valid labels before renormalising) is reported for each
answer: a judge that puts little mass on the labels is not following the instructions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import LabelSet, OnResult, RawAnswer, answer_from_probs


class LocalJudge:
    """Judge with a local causal LM.

    model, tokenizer: a loaded transformers causal LM (a PeftModel works too) and its tokenizer.
    batch_size:       prompts per forward pass.
    system_prompt:    optional system message before the judge prompt.
    answer_prefix:    text appended after the generation prompt (for base models without a chat
                      template, e.g. "Verdict: "); labels are scored right after it.
    judge_id:         cache identity; by default built from the model's name, config, a fingerprint of
                      its weights, and the prompt settings above. Pin it when you know better.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, system_prompt: str | None = None,
                 answer_prefix: str = "", judge_id: str | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.answer_prefix = answer_prefix
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.device = next(model.parameters()).device
        self.judge_id = judge_id or self._default_id()

    @classmethod
    def from_pretrained(cls, model_path: str | Path, gguf_file: str | None = None, dtype: str = "auto",
                        device: str | None = None, **kwargs: Any) -> LocalJudge:
        """Load a local model directory (or a GGUF file inside it) and build the judge."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        load_kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(model_path, **load_kw)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **load_kw)
        if device is not None:
            model = model.to(device)
        judge_id = kwargs.pop("judge_id", None)
        judge = cls(model, tokenizer, judge_id=judge_id or "pending", **kwargs)
        if judge_id is None:
            # The directory and file name identify a local checkpoint better than the config's path.
            judge.judge_id = judge._default_id(name=f"{Path(model_path).name}/{gguf_file or ''}")
        return judge

    # ----- identity -----

    def _default_id(self, name: str | None = None) -> str:
        h = hashlib.sha256()
        h.update(self.model.config.to_json_string(use_diff=False).encode())
        params = list(self.model.named_parameters())
        # A cheap weight fingerprint: a slice of the first and last few tensors and every adapter tensor,
        # so two random seeds, two checkpoints or two adapters of one base get different ids.
        chosen = params[:3] + params[-3:] + [p for p in params[3:-3] if "lora_" in p[0]]
        for pname, tensor in chosen:
            h.update(pname.encode())
            h.update(tensor.detach().flatten()[:1024].float().cpu().numpy().tobytes())
        h.update(f"{self.system_prompt!r}\0{self.answer_prefix!r}\0{self.model.dtype}".encode())
        label = name or getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        return f"local:{label}:{h.hexdigest()[:16]}"

    # ----- prompts -----

    def _prompt_text(self, query: str) -> tuple[str, bool]:
        """The text the label follows, and whether tokenizing it should add special tokens."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": query})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text + self.answer_prefix, False
        system = f"{self.system_prompt}\n\n" if self.system_prompt else ""
        return f"{system}{query}\n{self.answer_prefix}", True

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _label_ids(self, text: str, special: bool, prompt_ids: list[int], label: str) -> list[int]:
        """Token ids of `label` as the tokenizer spells it right after the prompt.

        Tokenizing prompt+label and keeping the tail respects merges and prefix spaces at the boundary;
        when the tokenizer merges across the boundary (the prompt's ids are not a prefix), fall back to
        the label tokenized alone.
        """
        joint = self._encode(text + label, special)
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids):]
        alone = self._encode(label, False)
        if not alone:
            raise ValueError(f"label {label!r} tokenizes to nothing")
        return alone

    # ----- scoring -----

    @torch.no_grad()
    def _last_logprobs(self, seqs: Sequence[list[int]], n_last: Sequence[int]) -> list[torch.Tensor]:
        """log-softmax over the vocabulary at the last n_last[i] positions of each sequence ([n, V])."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(seqs[i]) for i in chunk)
            keep = max(n_last[i] for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(seqs[i]):] = torch.tensor(seqs[i], dtype=torch.long)
                mask[row, width - len(seqs[i]):] = 1
            # Left padding shifts real tokens right; position ids counted over real tokens only keep
            # every prompt's positions what they are unbatched.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits[:, -keep:, :].float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                out[i] = logprobs[row, keep - n_last[i]:, :]
        return out  # type: ignore[return-value]

    def _score_chunk(self, queries: Sequence[str], labels: LabelSet) -> list[RawAnswer]:
        texts = [self._prompt_text(q) for q in queries]
        prompt_ids = [self._encode(t, s) for t, s in texts]
        label_ids = [[self._label_ids(t, s, p, lab) for lab in labels.labels]
                     for (t, s), p in zip(texts, prompt_ids, strict=True)]
        first = self._last_logprobs(prompt_ids, [1] * len(prompt_ids))
        # cum[i][j][t] = log P(label_j tokens 0..t | prompt_i)
        cum: list[list[list[float]]] = []
        ext_seqs: list[list[int]] = []
        ext_where: list[tuple[int, int]] = []
        for i, per_label in enumerate(label_ids):
            cum.append([[float(first[i][0, ids[0]])] for ids in per_label])
            for j, ids in enumerate(per_label):
                if len(ids) > 1:
                    ext_seqs.append(prompt_ids[i] + ids[:-1])
                    ext_where.append((i, j))
        if ext_seqs:
            ext = self._last_logprobs(ext_seqs, [len(label_ids[i][j]) - 1 for i, j in ext_where])
            for (i, j), lp in zip(ext_where, ext, strict=True):
                ids = label_ids[i][j]
                running = cum[i][j][0]
                for t in range(1, len(ids)):
                    running += float(lp[t - 1, ids[t]])
                    cum[i][j].append(running)
        return [self._answer(labels, label_ids[i], cum[i]) for i in range(len(queries))]

    @staticmethod
    def _answer(labels: LabelSet, ids: list[list[int]], cum: list[list[float]]) -> RawAnswer:
        exact: dict[str, float] = {}
        for j, lab in enumerate(labels.labels):
            mass = math.exp(cum[j][-1])
            n = len(ids[j])
            # Continuations of this label that spell a longer label: subtract P(label, next token) once
            # per distinct next token (see the module docstring).
            taken: set[int] = set()
            for k in range(len(ids)):
                if len(ids[k]) > n and ids[k][:n] == ids[j] and ids[k][n] not in taken:
                    taken.add(ids[k][n])
                    mass -= math.exp(cum[k][n])
            exact[lab] = max(mass, 0.0)
        total = sum(exact.values())
        if not total > 0:
            uniform = 1.0 / len(exact)
            return answer_from_probs({k: uniform for k in exact}, label_mass=0.0)
        return answer_from_probs({k: v / total for k, v in exact.items()}, label_mass=total)

    def ask(self, queries: Sequence[str], labels: LabelSet, on_result: OnResult | None = None) -> list[RawAnswer]:
        # Prompts of similar length share a batch (less padding); answers go back in the caller's order.
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]))
        answers: list[RawAnswer | None] = [None] * len(queries)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, answer in zip(idx, self._score_chunk([queries[i] for i in idx], labels), strict=True):
                answers[i] = answer
                if on_result is not None:
                    on_result(i, answer)
        return answers  # type: ignore[return-value]
