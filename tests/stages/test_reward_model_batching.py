"""The reward model's batching (reward_model.trainer): the pairs of one prompt in one batch, each distinct sequence
through the model once, and the loss and gradients of the full batch all the same."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from common.config import ModelConfig
from common.models import load_base_model, resolve_model
from common.prefix_sharing import shared_prefixes
from reward_model.trainer import PromptGroupedSampler, ScoreEachSequenceOnce, prompt_groups


def rewards_and_grads(model, forward, ids, mask, weights):
    """The rewards `forward` gives the rows, and the gradients of their weighted sum in `model`'s parameters."""
    model.zero_grad()
    logits = forward(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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

    full, full_grads = rewards_and_grads(model, model, ids, mask, weights)
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows_seen.append(len(kwargs["input_ids"])),
                                           with_kwargs=True)
    once, once_grads = rewards_and_grads(model, ScoreEachSequenceOnce(model), ids, mask, weights)
    hook.remove()
    # Six rows, four distinct; their common prefixes are too short to be worth a pass of their own.
    assert rows_seen == [4]
    torch.testing.assert_close(once, full, atol=1e-6, rtol=0)
    assert once[0] == once[3] and once[1] == once[4]
    assert full_grads.keys() == once_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(once_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rows_are_grouped_to_run_each_shared_prefix_once_for_the_fewest_tokens():
    a1, a2 = [1, 2, 3, 4, 5, 10], [1, 2, 3, 4, 5, 11, 12]  # one prompt [1 2 3 4 5], two completions
    b1, b2 = [1, 2, 7, 8, 20], [1, 2, 7, 8, 21, 22]  # another, [1 2 7 8]; every row shares [1 2]
    rows = [b2, a1, b1, a2]
    scored = [len(r) - 1 for r in rows]
    # Whole rows: 4 x 7 = 28 tokens. All four on [1 2]: 2 + 4 x 5 = 22. Per prompt: 2 x 5 + 4 x 2 = 18. A's pair and
    # B's rows alone (each up to its scored token): 3 x 5 + 4 x 2 = 23.
    assert shared_prefixes(rows, scored) == [([1, 3], 5), ([2, 0], 4)]
    # A prefix stops before the token the classifier reads: here a2's is its 5th, so the pair shares 4 tokens.
    assert shared_prefixes(rows, [5, 5, 4, 4]) == [([1, 3], 4), ([2, 0], 4)]
    assert shared_prefixes([[1, 2, 3], [4, 5, 6]], [2, 2]) is None  # nothing shared
    # Sharing that does not pay: whole rows 4 x 4 = 16; [5 6 7] and [5 6 7 0] on [5 6], the others alone: 3 x 3 + 4 x
    # 2 = 17; the first three on [5]: 2 x 3 + 4 x 3 = 18.
    assert shared_prefixes([[5, 6, 7], [5, 8], [5, 6, 7, 0], [9, 9, 9, 9]], [2, 1, 2, 3]) is None


def test_running_each_prompt_once_gives_the_rewards_and_gradients_of_whole_rows(tiny_model_dir):
    cfg = ModelConfig(base=str(tiny_model_dir), dtype="float32", lora=None)
    torch.manual_seed(0)
    base = load_base_model(cfg, resolve_model(cfg.base), task="seq-cls")
    base.config.pad_token_id = 0
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False)).eval()
    # Two prompts of different lengths, each with completions of different lengths, right-padded as trl collates.
    p, q = [5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 13, 14, 15, 16, 17]
    rows = [p + [20, 21], q + [30, 31, 32], p + [22, 23, 24, 25], q + [33], p + [26]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5])

    whole, whole_grads = rewards_and_grads(model, model, ids, mask, weights)
    fed = []
    embed = model.get_base_model().model.embed_tokens
    hook = embed.register_forward_hook(lambda module, inputs, output: fed.append(tuple(inputs[0].shape)))
    shared, shared_grads = rewards_and_grads(model, ScoreEachSequenceOnce(model), ids, mask, weights)
    hook.remove()
    # The two prompts once (the longer, 8 tokens, sets the width), then each row's completion (at most 4 tokens):
    # 2 x 8 + 5 x 4 = 36 tokens instead of 5 x 12 = 60.
    assert fed == [(2, 8), (5, 4)]
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert whole_grads.keys() == shared_grads.keys() and any("lora_" in n for n in whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
