"""Shared prefixes run once inside a causal LM's trunk (common.prefix_sharing.trunk_shares_prefixes): PPO's
left-padded rollouts, whose rows open with the same system prompt, get the log-probs and gradients of whole rows from
fewer tokens; calls with a cache (generation) run as shipped; the trunk is as shipped after the block."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from common.config import ModelConfig
from common.generation import response_logprobs
from common.models import load_base_model, resolve_model
from common.prefix_sharing import attended_rows, trunk_shares_prefixes


def lora_lm(tiny_model_dir):
    cfg = ModelConfig(base=str(tiny_model_dir), dtype="float32", lora=None)
    torch.manual_seed(0)
    base = load_base_model(cfg, resolve_model(cfg.base))
    return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                           init_lora_weights=False)).eval()


def rollout_batch():
    """Three rollouts as PPO holds them: prompts left-padded to a common start, responses right-padded after EOS.
    Every prompt opens with the same 6 tokens (a system prompt)."""
    system = [5, 6, 7, 8, 9, 10]
    prompts = [system + [20, 21, 22], system + [30], system + [40, 41]]
    responses = [[50, 51, 52, 2], [60, 2], [70, 71, 72]]
    start = max(map(len, prompts))
    width = start + max(map(len, responses))
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, start - len(p):start + len(r)] = torch.tensor(p + r)
        mask[i, start - len(p):start + len(r)] = 1
    return ids, mask, start


def test_attended_rows_finds_each_rows_run_of_tokens_on_either_side_of_padding():
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 0], [0, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0]])
    assert attended_rows(ids, mask) == ([[3, 4], [5, 6, 7], [8, 9]], [2, 0, 1])
    assert attended_rows(ids, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0]])) is None  # a gap


def test_left_padded_rollouts_get_the_log_probs_and_gradients_of_whole_rows_from_fewer_tokens(tiny_model_dir):
    model = lora_lm(tiny_model_dir)
    ids, mask, start = rollout_batch()
    response_mask = mask[:, start:].bool()
    weights = torch.linspace(-1, 2, ids.shape[1] - start)
    fed = []
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].numel()))

    def logprobs_and_grads():
        model.zero_grad()
        logprobs = response_logprobs(model, ids, mask, start, temperature=0.7).logprobs
        (torch.where(response_mask, logprobs, 0.0) * weights).sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = logprobs_and_grads()
    with trunk_shares_prefixes(model):
        shared, shared_grads = logprobs_and_grads()
        with torch.no_grad():  # a call with a cache, as generation makes, and one asking for a tuple run rows whole
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            trunk_out = model.get_base_model().base_model(input_ids=ids, attention_mask=mask, use_cache=False,
                                                          return_dict=False)
    assert "forward" not in model.get_base_model().base_model.__dict__, "the trunk is as shipped after the block"

    # Whole: 3 rows x 13 columns. Shared: the system prompt once (6), then the rests (3 rows x the longest, 7).
    assert fed == [39, 6, 21, 39, 39]
    assert isinstance(trunk_out, tuple)
    torch.testing.assert_close(shared[response_mask], whole[response_mask], atol=1e-5, rtol=0)
    assert whole_grads.keys() == shared_grads.keys() and any("lora_" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
