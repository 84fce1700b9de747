"""common.lora_folding: the exact undo on cases worked by hand, and the fold on a tiny model with two adapters."""

from __future__ import annotations

import torch

from common.lora_folding import add_exactly, folded_lora, subtract_exactly


def test_add_exactly_is_undone_bit_for_bit_and_keeps_only_the_elements_subtraction_gets_wrong():
    ulp = 2.0 ** -23
    # 1 + 2^-24 ties to even (1.0), which subtracts to 1 - 2^-24; (1 + ulp) + 1 crosses into [2, 4), where the
    # spacing is 2 ulp, ties to 2.0 and subtracts to 1.0; -0.0 + 0.0 is +0.0 (equal as values, not as bits). Kept by
    # subtraction: 0.1 + 1e-9 (0.1's exponent), and a NaN weight, which stays the same NaN.
    original = torch.tensor([1.0, 1.0 + ulp, -0.0, 0.1, float("nan")])
    delta = torch.tensor([2.0 ** -24, 1.0, 0.0, 1e-9, 0.5])
    weight = original.clone()
    index, values = add_exactly(weight, delta)
    torch.testing.assert_close(weight[:4], original[:4] + delta[:4], rtol=0, atol=0)
    assert index.tolist() == [0, 1, 2]
    subtract_exactly(weight, delta, (index, values))
    assert torch.equal(weight.view(torch.int32), original.view(torch.int32))


def test_add_exactly_on_a_realistic_lora_delta_stores_a_small_fraction_and_restores_every_bit():
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(256, 128, generator=generator) * 0.05
    # A rank-4 delta about 0.4% of the weight in size, as a trained LoRA's is.
    delta = (torch.randn(256, 4, generator=generator) @ torch.randn(4, 128, generator=generator)) * 1e-4
    weight = original.clone()
    index, values = add_exactly(weight, delta)
    assert 0 < len(index) < original.numel() // 50
    subtract_exactly(weight, delta, (index, values))
    assert torch.equal(weight.view(torch.int32), original.view(torch.int32))


def lora_model(use_dora: bool = False):
    """A tiny model with two LoRA adapters, "policy" (active) and "other", both with random (not zero) B."""
    from peft import LoraConfig, get_peft_model

    from common.tiny import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    base = build_tiny_model(build_tiny_tokenizer(), hidden_size=16, num_layers=1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    model = get_peft_model(base, config, adapter_name="policy")
    model.add_adapter("other", config)
    model.set_adapter("policy")
    return model.eval()


PROBE = torch.tensor([[5, 40, 41, 42, 43, 7]])


def test_folded_lora_computes_the_adapters_logits_and_gives_every_weight_and_flag_back():
    model = lora_model()
    with torch.no_grad():
        plain = model(input_ids=PROBE).logits
        with model.disable_adapter():
            base = model(input_ids=PROBE).logits
    state = {name: value.clone() for name, value in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad(), folded_lora(model) as folded:
        weight = folded.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
        torch.testing.assert_close(folded(input_ids=PROBE).logits, plain, atol=1e-5, rtol=0)
        assert not torch.equal(weight, state["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"])
        # A fold inside a fold (an eval model's block around the sampler's call) leaves the weights as they are.
        once = weight.clone()
        with folded_lora(folded):
            assert torch.equal(weight, once)
            torch.testing.assert_close(folded(input_ids=PROBE).logits, plain, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, base, atol=1e-3), "the adapter changes the logits, so the fold matters"
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())  # bit for bit
    assert trainable == {name: p.requires_grad for name, p in model.named_parameters()}
    assert model.active_adapter == "policy"


def test_a_dora_adapter_is_not_folded_since_its_magnitude_is_not_in_b_a():
    model = lora_model(use_dora=True)
    with torch.no_grad():
        plain = model(input_ids=PROBE).logits
        weight = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
        with folded_lora(model) as same:
            assert torch.equal(same.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight, weight)
            torch.testing.assert_close(same(input_ids=PROBE).logits, plain, atol=0, rtol=0)
