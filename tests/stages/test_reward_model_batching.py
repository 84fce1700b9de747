"""The reward model's batching (reward_model.trainer): the pairs of one prompt in one batch, each distinct sequence
through the model once, and the loss and gradients of the full batch all the same."""

from __future__ import annotations

import torch

from common.config import ModelConfig
from common.models import load_base_model, resolve_model
from reward_model.trainer import PromptGroupedSampler, ScoreEachSequenceOnce, prompt_groups


def test_prompt_groups_collect_the_rows_of_equal_prompts_chat_or_text():
    chat = [{"role": "user", "content": "a"}]
    assert prompt_groups(["x", "y", "x", "z", "y"]) == [[0, 2], [1, 4], [3]]
    assert prompt_groups([chat, "a", list(chat)]) == [[0, 2], [1]]


def test_grouped_sampler_yields_every_row_once_with_each_prompts_rows_together():
    groups = [[0, 7], [1], [2, 4, 5], [3, 6, 8, 9], [10, 11]]
    sampler = PromptGroupedSampler(groups, seed=3)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(12)) and len(sampler) == 12
        for group in groups:  # contiguous: the group's rows fill the span between its first and last position
            at = sorted(order.index(row) for row in group)
            assert at == list(range(at[0], at[0] + len(group))), (order, group)
        orders.append(order)
    assert orders[0] != orders[1], "a new order each epoch"
    again = PromptGroupedSampler(groups, seed=3)
    again.set_epoch(1)
    assert list(again) == orders[1], "the order is a function of (seed, epoch): every rank and a resume agree"


def test_scoring_distinct_rows_once_gives_the_full_batch_rewards_and_gradients(tiny_model_dir):
    cfg = ModelConfig(base=str(tiny_model_dir), dtype="float32", lora=None)
    torch.manual_seed(0)
    model = load_base_model(cfg, resolve_model(cfg.base), task="seq-cls").eval()
    model.config.pad_token_id = 0
    # A chosen / rejected batch as trl collates it (right-padded): rows 0 and 3 are the same completion, and so are
    # rows 1 and 4; row 2 shares row 0's tokens but not its length (its padding is attended), so it is distinct.
    a, b, c = [5, 6, 7, 0], [5, 8, 0, 0], [5, 6, 7, 0]
    ids = torch.tensor([a, b, c, a, b, [9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5, -1.0])

    def rewards_and_grads(forward):
        model.zero_grad()
        logits = forward(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        (logits * weights).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = rewards_and_grads(model)
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows_seen.append(len(kwargs["input_ids"])),
                                           with_kwargs=True)
    once, once_grads = rewards_and_grads(ScoreEachSequenceOnce(model))
    hook.remove()
    assert rows_seen == [4], "six rows, four distinct"
    torch.testing.assert_close(once, full, atol=1e-6, rtol=0)
    assert once[0] == once[3] and once[1] == once[4]
    assert full_grads.keys() == once_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(once_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
