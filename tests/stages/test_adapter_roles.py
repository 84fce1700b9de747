"""common.adapters on a tiny model with three LoRA roles (policy and value trainable, reference frozen): every switch
leaves exactly the chosen adapters trainable, a training step after the switches moves the policy and nothing else,
and `using` gives the role's (or the base's) outputs, then restores the adapter, the train/eval flags and the
trainable set."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from common.adapters import activate, adapters_off, set_trainable, using
from common.config import LoraSpec
from common.models import lora_config
from common.tiny import build_tiny_model, build_tiny_tokenizer

POLICY, REFERENCE, VALUE = "policy", "reference", "value"
IDS = torch.tensor([[5, 40, 41, 42, 43, 44]])


def random_lora():
    config = lora_config(LoraSpec(r=4, alpha=8, dropout=0.0))
    config.init_lora_weights = False  # random A and B: each adapter changes the outputs
    return config


@pytest.fixture
def roles():
    """(the peft model, the base's logits before any adapter was added)."""
    base = build_tiny_model(build_tiny_tokenizer())
    with torch.no_grad():
        base_logits = base(input_ids=IDS).logits
    torch.manual_seed(0)
    model = get_peft_model(base, random_lora(), adapter_name=POLICY)
    model.add_adapter(REFERENCE, random_lora())
    model.add_adapter(VALUE, random_lora())
    set_trainable(model, [POLICY, VALUE])
    activate(model, POLICY)
    return model, base_logits


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def params_of(model, adapter: str | None) -> dict[str, torch.Tensor]:
    """An adapter's LoRA weights, or (None) the base weights."""
    keep = (lambda n: "lora_" not in n) if adapter is None else (lambda n: f".{adapter}." in n)
    return {n: p.detach().clone() for n, p in model.named_parameters() if keep(n)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_switching_roles_keeps_exactly_the_chosen_adapters_trainable(roles):
    model, _ = roles
    expected = set(params_of(model, POLICY)) | set(params_of(model, VALUE))
    assert expected and trainable(model) == expected
    for switch in (lambda: activate(model, REFERENCE), lambda: activate(model, VALUE), lambda: activate(model, POLICY)):
        switch()
        assert trainable(model) == expected
    for name in (REFERENCE, None):
        with using(model, name):
            pass
        assert trainable(model) == expected
    with adapters_off(model):
        pass
    assert trainable(model) == expected
    model.set_adapter(REFERENCE)  # peft alone: the reference trains and the policy and value are frozen
    assert trainable(model) == set(params_of(model, REFERENCE))


def test_a_step_after_role_switches_moves_the_policy_only(roles):
    model, _ = roles
    base, reference, value = params_of(model, None), params_of(model, REFERENCE), params_of(model, VALUE)
    policy = params_of(model, POLICY)
    activate(model, REFERENCE)
    reference_logits = logits(model)
    with adapters_off(model):
        logits(model)
    activate(model, POLICY)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=IDS).logits.logsumexp(-1).mean().backward()
    optimizer.step()

    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in base.items()), "the base weights must not move"
    assert all(torch.equal(now[n], v) for n, v in reference.items()), "the reference must not move"
    assert all(torch.equal(now[n], v) for n, v in value.items()), "the value adapter had no loss this step"
    assert any(not torch.equal(now[n], v) for n, v in policy.items()), "the policy moved"
    activate(model, REFERENCE)
    assert torch.equal(logits(model), reference_logits)


def test_using_a_role_then_restoring_the_previous_one(roles):
    model, base_logits = roles
    model.train()
    policy_logits = logits(model)
    activate(model, REFERENCE)
    reference_logits = logits(model)
    activate(model, POLICY)
    assert not torch.allclose(policy_logits, reference_logits)

    with using(model, REFERENCE):
        assert model.active_adapter == REFERENCE and not model.training
        assert torch.equal(logits(model), reference_logits)
    with using(model, None):
        torch.testing.assert_close(logits(model), base_logits, rtol=0, atol=1e-6)
    assert model.active_adapter == POLICY and model.training
    assert all(m.training for m in model.modules())
    assert torch.equal(logits(model), policy_logits)
