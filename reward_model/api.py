"""`RewardModel`: batch-score (prompt, completion) pairs with a reward model saved by the reward_model stage.

A saved reward model is a directory (the stage's `reward_model` output) holding a PEFT LoRA adapter for a
sequence-classification model (task SEQ_CLS, the scalar head `score` saved with it as a module to save), the
tokenizer, `score_head.safetensors` (the head alone) and `reward_model.json` (how inputs were formatted).

Two ways to hold it:

    rm = RewardModel.load(directory, recipe.model)        # its own base, in sequence-classification form
    rm = RewardModel.attach(policy, directory)            # one more frozen adapter on an existing causal-LM PeftModel
    rm.score(prompts, completions)                         # -> float32 tensor [N]

`attach` is PPO's one-base design: the policy's base weights serve the reward model too. The reward LoRA becomes a
named adapter ("reward") on the policy's PeftModel; scoring activates it, runs the trunk (the base without its LM
head), applies the scalar head at the last non-pad token, and restores the previously active adapter, every
parameter's `requires_grad` and the train/eval flags. Both ways give the same scores (tests/stages/test_reward_model).

Inputs are formatted exactly as trl's RewardTrainer formatted them in training (`reward_trainer.tokenize_fn`):
- chat format (the preferences stage writes chat records): the prompt (a text is one user message) followed by the
  completion as the assistant's message, through the tokenizer's chat template;
- text format: prompt + completion + EOS (EOS added unless the completion ends with it), tokenized as one text.
The score is read at the last non-pad token (for ChatML, the newline after the closing `<|im_end|>`).

Truncation: a sequence longer than the trained `max_length` keeps its last `max_length` tokens. The score is read at
the end and the completion being judged is at the end, so cutting the start of the prompt loses the least; trl drops
such pairs from training, so they are out of distribution either way and a warning counts them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer

from common.adapters import kept_requires_grad, using
from common.config import ModelConfig
from common.errors import InputError
from common.generation import position_ids
from common.models import load_base_model, resolve_model
from common.prefix_sharing import forward_with_shared_prefixes, grouped_rows
from common.sampling import Messages, as_messages

log = logging.getLogger(__name__)

HEAD = "score"  # the scalar head's attribute in transformers' *ForSequenceClassification models
HEAD_FILE = "score_head.safetensors"
INFO_FILE = "reward_model.json"


def last_token_index(attention_mask: Tensor) -> Tensor:
    """[B] index of each row's last attended position (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def keep_last(ids: list[int], max_length: int | None) -> list[int]:
    return ids if max_length is None or len(ids) <= max_length else ids[-max_length:]


class RewardModel:
    """Scores (prompt, completion) pairs; build it with `load` or `attach`."""

    def __init__(self, call: Callable[..., Any], pool: Callable[[Any, Tensor], Tensor], tokenizer: Any, chat: bool,
                 max_length: int | None, device: torch.device):
        self._call = call  # the model's forward: input_ids, attention_mask, position_ids, past_key_values, use_cache
        self._pool = pool  # (its output, the attention mask of the positions it covers) -> rewards [B]
        self.tokenizer = tokenizer
        self.chat = chat
        self.max_length = max_length
        self.device = device

    # --- construction ---------------------------------------------------------------------------------
    @staticmethod
    def read_info(directory: str | Path) -> dict[str, Any]:
        path = Path(directory) / INFO_FILE
        if not path.is_file():
            raise InputError(f"{directory}: not a saved reward model (no {INFO_FILE}); give the reward_model output "
                             "of a reward_model stage, e.g. runs/NAME/RUN/rm/reward_model")
        return json.loads(path.read_text())

    @classmethod
    def load(cls, directory: str | Path, model_cfg: ModelConfig) -> RewardModel:
        """The reward model on its own base (the recipe's `model` block), in sequence-classification form, for
        scoring only: on an unquantized base its LoRA is merged into the weights (a base of its own, so nothing to
        restore), and a forward pass costs the base model's, not the base's plus the adapter's (~20% less on a CPU)."""
        info = cls.read_info(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        base = load_base_model(model_cfg, resolve_model(model_cfg.base), task="seq-cls", training=False)
        model = PeftModel.from_pretrained(base, str(directory)).eval()
        if model_cfg.quantization == "none":  # merging into 4/8-bit weights would re-quantize them
            model = model.merge_and_unload()
        return cls.from_classifier(model, tokenizer, info["chat"], info["max_length"])

    @classmethod
    def from_classifier(cls, model: Any, tokenizer: Any, chat: bool, max_length: int | None) -> RewardModel:
        """Wrap a sequence-classification model with one output (or a PeftModel of one) held in memory, e.g. the
        reward_model stage's own model right after training. The caller chooses train or eval mode."""
        # The head pools at the last token that is not padding (as in training, where trl sets the same id).
        model.config.pad_token_id = tokenizer.pad_token_id

        def pool(output: Any, mask: Tensor) -> Tensor:
            return output.logits[:, 0]

        return cls(model, pool, tokenizer, chat, max_length, next(model.parameters()).device)

    @classmethod
    def attach(cls, peft_model: Any, directory: str | Path, adapter_name: str = "reward") -> RewardModel:
        """Load the reward LoRA as a frozen adapter `adapter_name` on `peft_model` (a causal-LM PeftModel over the
        same base) and the scalar head beside it; scoring switches to that adapter and back."""
        info = cls.read_info(directory)
        if adapter_name in peft_model.peft_config:
            raise ValueError(f"RewardModel.attach: the model already has an adapter named {adapter_name!r}")
        config = PeftConfig.from_pretrained(str(directory))
        # The same LoRA on the causal-LM trunk: the head is applied separately, dropout is a training-time thing.
        config.task_type = peft_model.peft_config[peft_model.active_adapter].task_type
        config.modules_to_save = None
        config.inference_mode = True
        config.lora_dropout = 0.0
        with kept_requires_grad(peft_model):  # the new adapter is frozen (inference_mode); the others as they were
            peft_model.add_adapter(adapter_name, config)
        weights = {k: v for k, v in load_peft_weights(str(directory)).items() if f".{HEAD}." not in k}
        loaded = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
        misfit = loaded.unexpected_keys + [k for k in loaded.missing_keys if f".{adapter_name}." in k]
        if misfit:
            raise ValueError(f"RewardModel.attach: the adapter in {directory} does not fit the model ({len(misfit)} "
                             f"weights, first: {misfit[0]}); is the model the reward model's base?")

        trunk_params = next(peft_model.parameters())
        head_state = load_file(str(Path(directory) / HEAD_FILE))
        out_features, in_features = head_state["weight"].shape
        head = torch.nn.Linear(in_features, out_features, bias="bias" in head_state)
        head.load_state_dict(head_state)
        head = head.to(device=trunk_params.device, dtype=head_state["weight"].dtype).requires_grad_(False)
        # The decoder without the LM head (LlamaModel inside LlamaForCausalLM), with the LoRA layers injected.
        trunk = peft_model.get_base_model().base_model

        def call(**inputs: Any) -> Any:
            with using(peft_model, adapter_name):
                return trunk(**inputs)

        def pool(output: Any, mask: Tensor) -> Tensor:
            hidden = output.last_hidden_state
            last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(mask)]
            return head(last.to(head.weight.dtype))[:, 0]

        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(call, pool, tokenizer, info["chat"], info["max_length"], trunk_params.device)

    # --- scoring --------------------------------------------------------------------------------------
    def encode(self, prompt: str | Messages, completion: str | Messages) -> list[int]:
        """Token ids of one pair, formatted as in training (see the module docstring), before truncation."""
        tok = self.tokenizer
        if self.chat:
            messages = as_messages(prompt, "user") + as_messages(completion, "assistant")
            return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("RewardModel.encode: this reward model was trained on text pairs; pass text, not messages")
        text = prompt + completion
        return list(tok(text if text.endswith(tok.eos_token) else text + tok.eos_token).input_ids)

    @torch.no_grad()
    def score(self, prompts: Sequence[str | Messages], completions: Sequence[str | Messages],
              batch_size: int = 16) -> Tensor:
        """Rewards of the pairs (prompts[i], completions[i]): a float32 tensor [N] on the CPU.

        Each distinct input is scored once (all-pairs preference sets repeat every completion in several pairs),
        in sorted order, so that the completions of one prompt share a batch and their prompt runs once
        (`score_ids`)."""
        if len(prompts) != len(completions):
            raise ValueError(f"RewardModel.score: {len(prompts)} prompts but {len(completions)} completions")
        encoded = [tuple(self.encode(p, c)) for p, c in zip(prompts, completions, strict=True)]
        distinct = sorted(set(encoded))
        too_long = sum(self.max_length is not None and len(ids) > self.max_length for ids in encoded)
        if too_long:
            log.warning("reward model: %d of %d inputs are longer than max_length %d; scoring their last %d tokens",
                        too_long, len(encoded), self.max_length, self.max_length)
        out = []
        for start in range(0, len(distinct), batch_size):
            rows = [torch.tensor(keep_last(list(ids), self.max_length)) for ids in distinct[start:start + batch_size]]
            # Right-padded, as trl's DataCollatorForPreference batched them in training.
            ids = pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)
            mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
            out.append(self.score_ids(ids, mask))
        if not out:
            return torch.zeros(0)
        row_of = {ids: i for i, ids in enumerate(distinct)}
        return torch.cat(out)[[row_of[ids] for ids in encoded]]

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards of a batch of formatted token ids ([B, T], padded on either side): float32 [B] on the CPU.

        Positions are counted over attended tokens only (`common.generation.position_ids`), so a left-padded row
        gets the positions it would have alone, as in training. Right-padded rows that share a prefix (a prompt's
        completions, or the chat template's system prompt) run it once (`common.prefix_sharing`).
        """
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        pad_id = self.tokenizer.pad_token_id
        grouped = grouped_rows(ids, mask, pad_id)
        if grouped is None:
            output = self._call(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            return self._pool(output, mask).float().cpu()
        passes = forward_with_shared_prefixes(self._call, *grouped, pad_id, self.device)
        return self._pool(passes.rests, passes.rest_mask).float().cpu()
