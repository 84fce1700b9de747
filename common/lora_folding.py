"""Running a LoRA adapter folded into its base weights, for forward passes without gradients.

A LoRA layer computes W x + (alpha / r) B A x: three matrix products where the base model has one, plus the sum.
For passes that only read the model (sampling, reference and KL log-probs, reward scoring, MC log-likelihoods) the
adapter can be folded in, W + (alpha / r) B A in place of W, so every linear layer costs what the base model's does;
afterwards the base weights are restored bit for bit. Folding costs a pass over the weights (~0.3 s for
SmolLM2-135M on 2 CPU cores), so it pays for a block of passes, not for one small batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from common.adapters import adapters_off


@contextlib.contextmanager
def folded_lora(model: Any) -> Iterator[Any]:
    """Run the active LoRA adapter of a peft model folded into its base weights: W + (alpha / r) B A in place of W,
    with the adapter layers switched off, so a forward pass costs what the base model's does.

    Yields the model to call. The base weights come back bit-identical (`add_exactly`, `subtract_exactly`), for the
    memory of the few elements that subtraction alone would not restore rather than a copy of every folded weight
    (which doubles what the linear layers hold); the adapter is never written. Models it cannot fold run as they
    are: not a peft model, no active LoRA adapter, the adapters switched off (the base alone, or already folded by an
    enclosing block), quantized base weights (4/8-bit: folding would re-quantize), DoRA (its magnitude vector is not
    in B A) or modules_to_save (their trained copies are bypassed when the adapter layers are off).
    """
    from peft import PeftType
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if hasattr(model, "peft_config") else []
    active = getattr(model, "active_adapter", None)
    config = model.peft_config.get(active) if layers and isinstance(active, str) else None
    foldable = (config is not None and config.peft_type == PeftType.LORA
                and not getattr(config, "modules_to_save", None) and not getattr(config, "use_dora", False)
                and not any(m.disable_adapters for m in layers)
                and all(m.get_base_layer().weight.dtype.is_floating_point for m in layers))
    if not foldable:
        yield model
        return
    folded = []
    try:
        with torch.no_grad():
            for layer in (m for m in layers if active in m.lora_A):
                weight = layer.get_base_layer().weight
                folded.append((layer, add_exactly(weight, layer.get_delta_weight(active).to(weight.dtype))))
        with adapters_off(model):
            yield model
    finally:
        with torch.no_grad():
            for layer, corrections in folded:
                weight = layer.get_base_layer().weight
                subtract_exactly(weight, layer.get_delta_weight(active).to(weight.dtype), corrections)


def add_exactly(weight: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """weight += delta in place, returning what `subtract_exactly` needs to restore `weight` bit for bit: the
    (flat index, original value) of each element where (weight + delta) - delta rounds to something else.

    Floating-point addition is not invertible, but nearly: with |delta| small against |weight| the sum keeps the
    weight's exponent and subtracting delta rounds back to the original. The exceptions (a sum crossing a power of
    two, a tie) were 0.19% of SmolLM2-135M's weights under a trained SFT adapter: corrections of ~1/170 of a copy."""
    as_bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]  # -0.0, NaNs: bits, not values
    total = weight + delta
    wrong = ((total - delta).view(as_bits) != weight.view(as_bits)).view(-1).nonzero().squeeze(1)
    corrections = (wrong, weight.view(-1)[wrong].clone())
    weight.copy_(total)
    return corrections


def subtract_exactly(weight: Tensor, delta: Tensor, corrections: tuple[Tensor, Tensor]) -> None:
    """Undo `add_exactly(weight, delta)`: the same delta must be passed (peft's get_delta_weight recomputes it
    identically from the unchanged adapter)."""
    weight.sub_(delta)
    index, values = corrections
    weight.view(-1)[index] = values
