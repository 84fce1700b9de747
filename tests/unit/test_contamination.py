"""The contamination test's statistics (Oren et al. 2023) on synthetic log-likelihoods, worked by hand."""

import math

import numpy as np
import pytest

from common.errors import InputError
from eval.contamination import check_size, shard_orderings, sharded_test


def test_one_shard_is_the_exact_permutation_test():
    # canonical 5.0; permutations 1, 2, 6, 7: two are >= 5, so p = (1 + 2) / (1 + 4).
    out = sharded_test([5.0], [[1.0, 2.0, 6.0, 7.0]])
    assert out["test"] == "permutation" and out["p_value"] == pytest.approx(0.6, abs=1e-12)
    assert out["mean_logprob_gap"] == pytest.approx(1.0, abs=1e-12)


def test_sharded_t_test_matches_the_closed_form_for_two_degrees_of_freedom():
    # gaps 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 on 2 df, whose one-sided tail is
    # P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2.
    out = sharded_test([11.0, 12.0, 13.0], [[9.0, 11.0], [10.0, 10.0], [9.5, 10.5]])
    t = 2 * math.sqrt(3)
    assert out["shard_gaps"] == pytest.approx([1.0, 2.0, 3.0])
    assert out["p_value"] == pytest.approx((1 - t / math.sqrt(t * t + 2)) / 2, abs=1e-9)


def test_a_likelihood_that_favours_the_canonical_order_is_flagged_and_one_that_does_not_is_not():
    rng = np.random.default_rng(0)
    permuted = rng.normal(-500.0, 3.0, size=(20, 30))
    exchangeable = rng.normal(-500.0, 3.0, size=20)          # canonical: one more draw of the same law
    favoured = permuted.mean(axis=1) + 2.0 + rng.normal(0.0, 1.0, size=20)
    assert sharded_test(favoured, permuted)["p_value"] < 1e-6
    assert sharded_test(exchangeable, permuted)["p_value"] > 0.2


def test_shards_are_contiguous_and_permutations_reorder_within_them():
    plan = shard_orderings(7, 3, 4, seed=1)
    assert [shard[0] for shard in plan] == [[0, 1, 2], [3, 4], [5, 6]]
    assert all(sorted(order) == shard[0] for shard in plan for order in shard[1:]) and all(len(s) == 5 for s in plan)
    assert plan == shard_orderings(7, 3, 4, seed=1)


def test_fewer_than_two_examples_or_too_many_shards_are_refused():
    with pytest.raises(InputError, match=r"^d.jsonl: a contamination test compares orders of examples and needs at "
                                         r"least 2, got 1; give a larger test set$"):
        check_size(1, 1, 5, "d.jsonl")
    with pytest.raises(InputError, match=r"^d.jsonl: 5 examples cannot fill 3 shards .*use at most 2 shards$"):
        check_size(5, 3, 5, "d.jsonl")
