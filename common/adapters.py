"""Roles on one base model: switching a peft model's active adapter without changing what trains.

One base model in memory serves several roles through named LoRA adapters (policy, reference, value, reward). peft
ties training to activity: `set_adapter` makes the adapter it activates trainable and freezes every other one
(`inference_mode=True` freezes that one too), adding an adapter re-marks which adapters train, and leaving
`disable_adapter()` makes the active adapter trainable again (peft 0.21: `BaseTunerLayer.set_adapter`,
`BaseTunerLayer.enable_adapters`, `BaseTuner.inject_adapter`). A model with roles chooses what trains once
(`set_trainable`); every switch then goes through here, which keeps each parameter's `requires_grad` as it was. So
PPO's policy and value stay trainable and its reference frozen whichever role ran last, and a reward model attached
to the policy's base scores without touching what the policy trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


@contextlib.contextmanager
def kept_requires_grad(model: Any) -> Iterator[None]:
    """After the block, every parameter that existed before it requires grad exactly as it did, whatever peft did
    inside (new parameters, e.g. an added adapter's, keep the flags they were given)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def set_trainable(model: Any, adapters: Sequence[str]) -> None:
    """Exactly the named adapters of `model` (a PeftModel) train; every other adapter and the base are frozen."""
    model.requires_grad_(False)
    if adapters:
        model.set_requires_grad(list(adapters), True)


def activate(model: Any, name: str) -> None:
    """Make adapter `name` the active one until the next switch; what trains is unchanged."""
    with kept_requires_grad(model):
        model.set_adapter(name)


@contextlib.contextmanager
def adapters_off(model: Any) -> Iterator[None]:
    """The base model alone for the block; afterwards the same adapter is active and what trains is unchanged."""
    with kept_requires_grad(model), model.disable_adapter():
        yield


@contextlib.contextmanager
def using(model: Any, name: str | None) -> Iterator[None]:
    """Adapter `name` (None: the base alone) active and every module in eval mode for the block; afterwards the
    previous adapter is active and every train/eval flag and `requires_grad` is as it was."""
    previous = model.active_adapter
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if name is None:
            with adapters_off(model):
                yield
        else:
            activate(model, name)
            yield
    finally:
        activate(model, previous)
        for m, flag in modes:
            m.training = flag
