"""The loop's own pieces: which prompts a process samples at a step, whitening over processes, padding trims, and
the rollout's log-probs matching the training forward pass (the first PPO ratio is 1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from common.models import resolve_model
from ppo.adapters import VALUE, OneBaseModel
from ppo.advantages import whiten
from ppo.trainer import global_whiten, prompt_indices, step_seed, trim_padding
from tests.stages.test_ppo_adapters import DEVICE, MODEL, make_trainer


def test_prompt_indices_walk_seeded_epochs():
    # 12 prompts, 4 a step: steps 1-3 are one epoch (each prompt once), steps 4-6 the next, in another order.
    first = [i for s in (1, 2, 3) for i in prompt_indices(12, s, 4, 0, 1, seed=7)]
    second = [i for s in (4, 5, 6) for i in prompt_indices(12, s, 4, 0, 1, seed=7)]
    assert sorted(first) == sorted(second) == list(range(12)) and first != second
    assert first == torch.randperm(12, generator=torch.Generator().manual_seed(7)).tolist()
    # 10 prompts, 4 a step: step 3 takes the last 2 of epoch 0 and the first 2 of epoch 1.
    epoch0 = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    epoch1 = torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert prompt_indices(10, 3, 4, 0, 1, seed=7) == epoch0[8:] + epoch1[:2]
    # Two processes split the global batch a single process of twice the batch size would take.
    for step in (1, 2, 5):
        both = prompt_indices(12, step, 3, 0, 2, seed=7) + prompt_indices(12, step, 3, 1, 2, seed=7)
        assert both == prompt_indices(12, step, 6, 0, 1, seed=7)


def test_step_seeds_differ_per_step_process_and_stream():
    seeds = {step_seed(1, step, rank, stream) for step in range(5) for rank in range(2) for stream in range(2)}
    assert len(seeds) == 20 and step_seed(1, 3, 0, 0) == step_seed(1, 3, 0, 0)


def test_global_whiten_by_hand_and_over_two_processes():
    # [1, 2, 3] (padding ignored): mean 2, unbiased variance ((-1)^2 + 0 + 1^2) / 2 = 1, so [-1, 0, 1].
    values = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(global_whiten(values, mask, lambda s: s), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))

    torch.manual_seed(0)
    values, mask = torch.randn(6, 5), torch.rand(6, 5) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(global_whiten(values, mask, lambda s: s), whiten(values, mask), atol=1e-6, rtol=0)

    def local_stats(v, m):
        box = []
        global_whiten(v, m, lambda s: box.append(s) or s)
        return box[0]

    # Process 0 holds rows 0-2, process 1 rows 3-5; reduce_sum adds both processes' sums.
    total = local_stats(values[:3], mask[:3]) + local_stats(values[3:], mask[3:])
    halves = [global_whiten(values[rows], mask[rows], lambda s: total) for rows in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(torch.cat(halves), whiten(values, mask), atol=1e-6, rtol=0)


def test_trim_padding_by_hand():
    # Columns 0-1 are padding in every row, column 6 too (both responses ended before it); response starts at 4.
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0]])
    columns, response_columns, start = trim_padding(torch.zeros_like(mask), mask, start=4)
    assert (columns, response_columns, start) == (slice(2, 6), slice(0, 2), 2)


def test_rollout_logprobs_equal_the_training_forward_so_the_first_ratio_is_one(tmp_path):
    torch.manual_seed(0)
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "separate", DEVICE)
    torch.nn.init.normal_(model.value_head.weight)  # non-zero values to compare
    trainer = make_trainer(model, tmp_path, max_new_tokens=8)
    rollout, completions, _ = trainer.rollout(trainer.prompts[:8], step=1)
    assert len(completions) == 8 and rollout.logprobs.shape == rollout.mask.shape
    model.train()
    rows = torch.tensor([5, 2, 7])  # a minibatch in another order and size than the rollout's chunks
    micro = rollout.micro_batch(rows)
    with torch.no_grad():
        logprobs = model.policy_forward(micro.ids, micro.attention, micro.start, 1.0).logprobs
        values = model.values(micro.ids, micro.attention, micro.start)
    assert micro.ids.shape[1] <= rollout.ids.shape[1] and micro.values.abs().max() > 0
    torch.testing.assert_close(logprobs, micro.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, micro.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value_model", ["shared", "separate"])
def test_gradient_checkpointing_leaves_the_gradients_unchanged(tmp_path, value_model):
    """Checkpointing recomputes layers in the backward pass with the adapter active then: the policy's and the
    separate value's losses must each be backpropagated while their own adapter is active."""
    grads = {}
    for checkpointing in (False, True):
        cfg = dataclasses.replace(MODEL, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = OneBaseModel.build(cfg, resolve_model(cfg.base), None, value_model, DEVICE)
        torch.nn.init.normal_(model.value_head.weight)  # so that the value loss reaches the trunk
        trainer = make_trainer(model, tmp_path / str(checkpointing), max_new_tokens=6)
        rollout, _, _ = trainer.rollout(trainer.prompts[:4], step=1)
        noise = torch.Generator().manual_seed(1)
        rollout.advantages = torch.randn(rollout.mask.shape, generator=noise).to(DEVICE) * rollout.mask
        rollout.returns = torch.randn(rollout.mask.shape, generator=noise).to(DEVICE) * rollout.mask
        model.train()
        assert trainer.backward(rollout.micro_batch(torch.arange(4)), beta=0.05, share=1.0) is not None
        grads[checkpointing] = {n: p.grad for n, p in model.peft.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and any(f".{VALUE}." in n for n in grads[True]) == (
        value_model == "separate")
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_scores_are_penalised_normalised_and_clipped_by_hand(tmp_path):
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", DEVICE)
    trainer = make_trainer(model, tmp_path, missing_eos_penalty=1.0, normalize_scores=True, score_clip=1.2)
    scores, has_eos = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([True, True, False, True])
    # Standardised first: [1, 2, 3, 6] has mean 3 and unbiased std sqrt(14 / 3) = 2.1602469, so (x - 3) / 2.1602469
    # = [-0.9258201, -0.4629100, 0, 1.3887301]. Then the third, with no EOS, loses the full penalty: 0 - 1 = -1 (had
    # the penalty come first, it would cost 1 / sigma and change sigma). Clipping to [-1.2, 1.2] caps the last.
    shaped = trainer.shape_scores(scores.to(DEVICE), has_eos.to(DEVICE))
    torch.testing.assert_close(shaped.cpu(), torch.tensor([-0.9258201, -0.4629100, -1.0, 1.2]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("term, expect_gradient", [({}, False), ({"kl_in_reward": False}, True),
                                                   ({"entropy_coef": 0.1}, True)])
def test_kl_in_the_loss_and_the_entropy_bonus_move_the_policy_without_any_advantage(tmp_path, term, expect_gradient):
    torch.manual_seed(0)
    model = OneBaseModel.build(MODEL, resolve_model(MODEL.base), None, "shared", DEVICE)
    with torch.no_grad():  # a policy away from its reference (the base), so that the KL term has a gradient
        for name, param in model.peft.named_parameters():
            if "lora_B.policy" in name:
                param.normal_(std=0.1)
    trainer = make_trainer(model, tmp_path, **term)  # in the loss, the default estimator: k2
    rollout, _, _ = trainer.rollout(trainer.prompts[:4], step=1)
    rollout.advantages = torch.zeros_like(rollout.logprobs)  # no policy-gradient signal ...
    rollout.returns = rollout.values.clone()  # ... and no value error
    model.train()
    batch = rollout.micro_batch(torch.arange(4))
    assert trainer.backward(batch, beta=0.5, share=1.0) is not None
    grads = [p.grad for n, p in model.peft.named_parameters() if "lora_" in n and p.grad is not None]
    moved = any(g.abs().max() > 0 for g in grads)
    assert moved == expect_gradient
    if term == {"kl_in_reward": False}:
        # The direction, not only a gradient: one optimizer step brings the policy's log-probs of the sampled
        # tokens closer to the reference's (a sign error in the loss would push them apart).
        def gap() -> float:
            with torch.no_grad():
                logprobs = model.policy_forward(batch.ids, batch.attention, batch.start,
                                                trainer.args.temperature).logprobs
            return float((logprobs - batch.ref_logprobs)[batch.mask.bool()].abs().mean())

        before = gap()
        assert trainer.optimizer_step()
        assert gap() < before
