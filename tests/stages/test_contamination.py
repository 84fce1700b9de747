"""The contamination test on the tiny model: its sequence scores against a plain forward, and a copy fine-tuned on
the test set in canonical order is flagged while the untouched model is not."""

import copy

import pytest
import torch

from common.tiny import build_tiny_model, build_tiny_tokenizer
from eval.contamination import SEPARATOR, contamination_test, ordering_rows
from eval.mc.scoring import score_rows

TEXTS = [f"Question: what is {a} plus {b}?\nAnswer: {a + b}" for a, b in
         ((3, 4), (12, 9), (7, 7), (25, 1), (6, 30), (14, 2), (8, 19), (2, 2), (40, 5), (11, 11), (9, 3), (5, 17),
          (21, 4), (1, 1), (16, 8), (33, 6), (4, 27), (10, 10), (13, 5), (18, 2), (7, 24), (3, 39), (20, 20), (6, 6))]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=0), tokenizer


def test_ordering_scores_equal_a_plain_forward(tiny):
    model, tokenizer = tiny
    ids = tokenizer([t + SEPARATOR for t in TEXTS[:3]], add_special_tokens=False)["input_ids"]
    orders = [[0, 1, 2], [2, 0, 1]]
    fast = score_rows(model, ordering_rows(ids, orders, tokenizer.bos_token_id), 2, batch_size=2)
    for order, (score,) in zip(orders, fast, strict=True):
        seq = torch.tensor([[tokenizer.bos_token_id] + [t for j in order for t in ids[j]]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), -1)
        assert score == pytest.approx(float(logprobs.gather(1, seq[0, 1:, None]).sum()), abs=1e-4)


def test_a_model_fine_tuned_on_the_canonical_order_is_flagged_and_the_untouched_one_is_not(tiny):
    model, tokenizer = tiny
    clean = contamination_test(model, tokenizer, TEXTS, shards=6, permutations=10, seed=0, batch_size=11)
    assert clean["p_value"] > 0.05

    # "Contaminate" a copy: train it on the whole test file, in file order, as a pretraining corpus would hold it.
    tuned = copy.deepcopy(model).train()
    corpus = [tokenizer.bos_token_id] + tokenizer("".join(t + SEPARATOR for t in TEXTS),
                                                  add_special_tokens=False)["input_ids"]
    ids = torch.tensor([corpus])
    optimizer = torch.optim.Adam(tuned.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        loss = tuned(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    flagged = contamination_test(tuned.eval(), tokenizer, TEXTS, shards=6, permutations=10, seed=0, batch_size=11)
    # Measured: untouched p = 0.54, fine-tuned p = 0.021 (every shard's gap positive; the t-test over 6 shards is
    # held back by how unequal the gaps are, the first shard's largest since it starts the file).
    assert flagged["p_value"] < 0.05 and all(gap > 0 for gap in flagged["shard_gaps"])
