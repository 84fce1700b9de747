"""One base model in memory, several PPO roles as named LoRA adapters and scalar heads on it.

    role        what it is                                         trained
    policy      adapter "policy", initialised from `from:`'s one   yes
    reference   adapter "reference": the same weights, frozen;     no
                or, with no `from:`, the base with adapters off
    value       a scalar head on the policy's last hidden state    yes (value_model: shared: one forward for both)
                or adapter "value" + its own head                  yes (value_model: separate)
                or none (value_model: none: the critic-free family, ppo.grpo_trainer)
    reward      adapter "reward" + head, attached by               no
                reward_model.api when the reward is a stage

The base weights are loaded once (4-bit works too: QLoRA-PPO); a role is a different active adapter, never a
second copy of the model. Only the policy and value adapters and the value head are trainable.

What trains is chosen once, here (`common.adapters.set_trainable`), and every role switch goes through
`common.adapters`, which keeps it: a forward with the reference active must not make it trainable, nor freeze the
value adapter.

Each method activates the adapter it needs and leaves it active. With gradient checkpointing the backward pass
recomputes each layer's forward pass with whichever adapter is active at that time, so a role's loss must be
backpropagated before another role's forward pass runs (ppo.trainer does the policy's, then the value's).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.adapters import activate, adapters_off, set_trainable
from common.config import ModelConfig
from common.generation import position_ids, response_logprobs
from common.models import ResolvedModel, disable_dropout, load_base_model, lora_config
from common.sampling import Sampler, Samples, SamplingParams
from reward_model.api import HEAD_FILE as REWARD_HEAD_FILE
from reward_model.api import RewardModel

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"
VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyOutput(NamedTuple):
    """Per response token ([B, R], 0 on padding): log pi(token), the policy's entropy there (when asked), and
    the value V(s_t) of the state before the token (value_model: shared; None for a separate value adapter)."""

    logprobs: Tensor
    entropy: Tensor | None
    values: Tensor | None


class OneBaseModel:
    """The policy, reference and value function of PPO (and, attached from outside, the reward model) as
    adapters on one base model. See the module docstring."""

    def __init__(self, peft_model: PeftModel, value_model: str, has_reference_adapter: bool):
        self.peft = peft_model
        self.lm = peft_model.get_base_model()  # the transformers causal LM, with LoRA layers injected
        self.value_model = value_model
        self.has_reference_adapter = has_reference_adapter
        self.trainable_adapters = [POLICY, VALUE] if value_model == "separate" else [POLICY]
        device = next(self.lm.get_output_embeddings().parameters()).device
        # V(s) = w . h + b in float32 whatever the base dtype. Zero-initialised: the first values are 0 on every
        # process (no RNG involved), and the first value targets are the plain returns.
        self.value_head: nn.Linear | None = None
        if value_model != "none":
            self.value_head = nn.Linear(self.lm.config.hidden_size, 1, dtype=torch.float32, device=device)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # Dropout would make the PPO ratio noisy and break old == new log-probs at the first step (Huang et al.
        # 2024, "The N+ Implementation Details of RLHF with PPO", detail 1); train mode is still used, for
        # gradient checkpointing. Rates kept in the config and in attributes too (attention dropout), not only the
        # nn.Dropout modules, so the first ratio is 1 for any architecture.
        disable_dropout(self.peft)
        # bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval-mode forward (the
        # rollout) and from then on uses that kernel, which has no backward, in training too: the gradient through
        # the frozen base to earlier layers' adapters would silently vanish (bitsandbytes 0.50, nn/modules.py,
        # Linear4bit.forward). Keep the packing that trains.
        for module in self.peft.modules():
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
        set_trainable(self.peft, self.trainable_adapters)
        activate(self.peft, POLICY)

    @classmethod
    def build(cls, cfg: ModelConfig, resolved: ResolvedModel, init_adapter: Path | None, value_model: str,
              device: torch.device, value_from: Path | None = None) -> OneBaseModel:
        """Load the base once and add the adapters: policy (trainable) and reference (frozen) from `init_adapter`,
        or a fresh policy LoRA; for value_model: separate, a value adapter, fresh or (`value_from`, a saved reward
        model) a trainable copy of the reward model's LoRA with its scalar head as the value head."""
        base = load_base_model(cfg, resolved, training=True)
        if cfg.quantization == "none":  # bitsandbytes layers were placed on this process's device at load time
            base = base.to(device)
        if init_adapter is not None:
            peft_model = PeftModel.from_pretrained(base, init_adapter, adapter_name=POLICY, is_trainable=True)
            peft_model.load_adapter(init_adapter, adapter_name=REFERENCE, is_trainable=False)
        else:
            peft_model = get_peft_model(base, lora_config(cfg.lora), adapter_name=POLICY)
        if value_model == "separate" and value_from is None:
            peft_model.add_adapter(VALUE, lora_config(cfg.lora))
        elif value_model == "separate":
            # attach() loads the reward LoRA (frozen) under the name given; __init__ makes it trainable.
            RewardModel.attach(peft_model, value_from, adapter_name=VALUE)
        model = cls(peft_model, value_model, has_reference_adapter=init_adapter is not None)
        if value_from is not None:
            head = load_file(str(value_from / REWARD_HEAD_FILE))
            with torch.no_grad():
                model.value_head.weight.copy_(head["weight"].float())
                model.value_head.bias.copy_(head["bias"].float() if "bias" in head else torch.zeros(1))
        return model

    # --- roles --------------------------------------------------------------------------------------------------
    def sample(self, tokenizer: Any, prompts: list[list[int]], params: SamplingParams) -> Samples:
        """Sample from the policy with the one sampler (`common.sampling`: its adapter folded in for the call)."""
        activate(self.peft, POLICY)
        return Sampler(self.peft, tokenizer, progress=False).sample(prompts, params)

    def policy_forward(self, ids: Tensor, mask: Tensor, start: int, temperature: float,
                       with_entropy: bool = False) -> PolicyOutput:
        """Policy log-probs of the response tokens `ids[:, start:]` and, for value_model: shared, their values.

        The shared head reads the values off the very forward pass that gives the log-probs: the LM head's input
        (the last hidden state at the positions that predict response tokens) also feeds the value head. With
        value_model: separate, `values` is None here: call `values()` (a second pass, with the value adapter); with
        value_model: none there are no values.
        """
        activate(self.peft, POLICY)
        if self.value_model != "shared":
            out = response_logprobs(self.peft, ids, mask, start, temperature, return_entropy=with_entropy)
            return PolicyOutput(out.logprobs, out.entropy, None)
        captured: list[Tensor] = []
        hook = self.lm.get_output_embeddings().register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            out = response_logprobs(self.peft, ids, mask, start, temperature, return_entropy=with_entropy)
        finally:
            hook.remove()
        response_len = ids.shape[1] - start
        # The head saw the last hidden state at (at least) positions start - 1 ... end; the last one predicts past
        # the end of the sequence and has no token to value.
        hidden = captured[0][:, -(response_len + 1):-1]
        return PolicyOutput(out.logprobs, out.entropy, self._head(hidden, mask[:, start:]))

    def values(self, ids: Tensor, mask: Tensor, start: int) -> Tensor:
        """V(s_t) from the separate value adapter: its trunk's last hidden state, no LM head."""
        activate(self.peft, VALUE)
        hidden = self.lm.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                       use_cache=False).last_hidden_state
        return self._head(hidden[:, start - 1:-1], mask[:, start:])

    def _head(self, hidden: Tensor, response_mask: Tensor) -> Tensor:
        # float32 under a bf16 autocast too: values and returns are regressed to each other, bf16 would round both.
        with torch.autocast(hidden.device.type, enabled=False):
            values = self.value_head(hidden.to(torch.float32)).squeeze(-1)
        return torch.where(response_mask.bool(), values, torch.zeros_like(values))

    def reference_logprobs(self, ids: Tensor, mask: Tensor, start: int, temperature: float) -> Tensor:
        """log pi_ref of the response tokens: the frozen reference adapter, or the base with adapters off."""
        if self.has_reference_adapter:
            activate(self.peft, REFERENCE)
            return response_logprobs(self.peft, ids, mask, start, temperature).logprobs
        with adapters_off(self.peft):
            return response_logprobs(self.peft, ids, mask, start, temperature).logprobs

    # --- training state -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        head = list(self.value_head.parameters()) if self.value_head is not None else []
        return [p for p in self.peft.parameters() if p.requires_grad] + head

    def train(self) -> None:
        self.peft.train()

    def eval(self) -> None:
        self.peft.eval()

    def trainable_state(self) -> dict[str, Tensor]:
        """Everything the optimizer updates, flat: `policy.<key>`, `value.<key>`, `value_head.<key>`."""
        head = self.value_head.state_dict() if self.value_head is not None else {}
        state = {f"value_head.{k}": v for k, v in head.items()}
        for name in self.trainable_adapters:
            state.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(self.peft, adapter_name=name).items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}

        if self.value_head is not None:
            self.value_head.load_state_dict(part("value_head"))
        for name in self.trainable_adapters:
            result = set_peft_model_state_dict(self.peft, part(name), adapter_name=name)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} weights of adapter '{name}', e.g. {missing[0]}")

    def save_adapter(self, name: str, directory: Path) -> None:
        """Write adapter `name` as a standalone PEFT adapter: `PeftModel.from_pretrained(base, directory)`."""
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.peft.peft_config[name])
        config.inference_mode = True
        config.save_pretrained(str(directory))
        weights = get_peft_model_state_dict(self.peft, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(directory / "adapter_model.safetensors"))

    def save_value(self, directory: Path) -> None:
        """The value head (and, for value_model: separate, the value adapter) in `directory`."""
        if self.value_model == "separate":
            self.save_adapter(VALUE, directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(directory / VALUE_HEAD_FILE))
