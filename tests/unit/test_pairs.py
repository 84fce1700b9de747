"""Pair formation, label noise and the grouped train/test split."""

import math
import random
import statistics

import numpy as np
import pytest

from common.errors import InputError
from preferences.pairs import check_pair_options, flip_mask, form_pairs, pair_indices, split_train_test


def group(scores, completions=None, prompt="p", **provenance):
    completions = completions or [f"completion {i}" for i in range(len(scores))]
    return {"prompt": prompt, "completions": completions, "scores": scores, **provenance}


def random_group(i, k=4):
    rng = random.Random(i)
    return group([rng.random() for _ in range(k)], prompt=str(i))


# --- which pairs ---------------------------------------------------------------------------------------

def test_best_vs_worst_on_hand_made_scores():
    out = form_pairs([group([0.1, 0.9, -0.5, 0.3], ["a", "b", "c", "d"], prompt_id=7)]).records
    assert out == [{"prompt": "p", "chosen": "b", "rejected": "c", "score_chosen": 0.9, "score_rejected": -0.5,
                    "flipped": False, "chosen_index": 1, "rejected_index": 2, "prompt_id": 7}]


def test_best_vs_worst_ties_resolve_to_the_first_index():
    assert pair_indices(["a", "b", "c", "d"], [1.0, 1.0, 0.0, 0.0]) == [(0, 2)]


def test_min_gap_best_vs_worst():
    # The spread is 0.9 - 0.1 = 0.8: a pair at min_gap 0.8 (0.9 - 0.1 is 0.8 only up to rounding), none at 0.81.
    assert pair_indices(["a", "b"], [0.1, 0.9], "best_vs_worst", min_gap=0.8) == [(1, 0)]
    assert pair_indices(["a", "b"], [0.1, 0.9], "best_vs_worst", min_gap=0.81) == []


def test_all_pairs_with_min_gap():
    # Gaps: |0.1 - 0.0| = 0.1 (< 0.2, no pair), |0.3 - 0.0| = 0.3, |0.3 - 0.1| = 0.2 (== min_gap up to float
    # rounding: 0.3 - 0.1 is 0.19999999999999998 in binary floating point, and still counts).
    assert pair_indices(["a", "b", "c"], [0.0, 0.1, 0.3], "all_pairs", min_gap=0.2) == [(2, 0), (2, 1)]
    # Without a gap every two distinct completions pair, better one first, in index order: K(K-1)/2 = 6.
    assert pair_indices(list("abcd"), [3.0, 1.0, 4.0, 2.0], "all_pairs") == [(0, 1), (2, 0), (0, 3), (2, 1),
                                                                              (3, 1), (2, 3)]


def test_ties_never_make_a_pair():
    assert pair_indices(["a", "b"], [0.5, 0.5]) == []
    assert pair_indices(["a", "b", "c"], [0.5, 0.5, 0.7], "all_pairs") == [(2, 0), (2, 1)]
    pairs = form_pairs([group([0.5, 0.5])])
    assert pairs.records == [] and pairs.stats["groups_without_pair"] == 1


def test_identical_and_blank_completions_never_pair():
    # The best (index 2) and worst (index 0) differ only in whitespace: they are one completion, kept as
    # index 0 with its score, so the pair is index 1 against index 0.
    assert pair_indices(["same", "other", " same\n", "   "], [0.0, 0.5, 9.0, -9.0]) == [(1, 0)]
    assert pair_indices(["x", " x", "x\n"], [0.0, 1.0, 2.0], "all_pairs") == []
    pairs = form_pairs([group([0.0, 0.5, 9.0, -9.0], ["same", "other", " same\n", "   "])], strategy="all_pairs")
    assert pairs.stats["duplicate_completions"] == 1 and pairs.stats["blank_completions"] == 1

    # And on random groups drawn from a small vocabulary (lots of duplicates), with and without noise.
    rng = random.Random(0)
    vocab = ["good", " good", "good ", "bad", "bad\n", "fine", "", "  "]
    groups = [group([rng.uniform(-1, 1) for _ in range(6)], [rng.choice(vocab) for _ in range(6)])
              for _ in range(300)]
    for strategy in ("best_vs_worst", "all_pairs"):
        for r in form_pairs(groups, strategy=strategy, noise=0.3, seed=1).records:
            assert r["chosen"].strip() != r["rejected"].strip()
            assert r["chosen"].strip() and r["rejected"].strip()


def test_groups_with_fewer_than_two_completions_make_no_pairs():
    pairs = form_pairs([group([]), group([1.0])])
    assert pairs.records == [] and pairs.stats == {"groups": 2, "pairs": 0, "flipped": 0, "groups_without_pair": 2,
                                                   "duplicate_completions": 0, "blank_completions": 0}


# --- label noise ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [0.05, 0.2, 0.5])
def test_flip_rate_within_binomial_99_interval(noise):
    n = 10_000
    groups = [group([1.0, 0.0], ["up", "down"], prompt=f"p{i}") for i in range(n)]
    pairs = form_pairs(groups, noise=noise, seed=123)
    assert pairs.stats["pairs"] == n
    flipped = pairs.stats["flipped"]
    assert flipped == sum(r["flipped"] for r in pairs.records)
    # The flip count is Binomial(n, noise). With n * noise * (1 - noise) >= 475 the normal approximation is
    # accurate to well under one count, so the central 99% interval is n p +- z sqrt(n p (1 - p)), with
    # z = Phi^-1(0.995) = 2.5758. For p = 0.2: 2000 +- 2.5758 * 40 = [1897, 2103].
    z = statistics.NormalDist().inv_cdf(0.995)
    half = z * math.sqrt(n * noise * (1 - noise))
    assert n * noise - half <= flipped <= n * noise + half


def test_flip_swaps_texts_scores_and_indices():
    pairs = form_pairs([group([1.0, 0.0], ["up", "down"], source_id="s")], noise=1.0)
    assert pairs.records == [{"prompt": "p", "chosen": "down", "rejected": "up", "score_chosen": 0.0,
                              "score_rejected": 1.0, "flipped": True, "chosen_index": 1, "rejected_index": 0,
                              "source_id": "s"}]
    assert not form_pairs([group([1.0, 0.0])], noise=0.0).records[0]["flipped"]
    # Unflipped labels always agree with the gold scores; flipped ones always disagree.
    groups = [random_group(i) for i in range(200)]
    records = form_pairs(groups, strategy="all_pairs", noise=0.4, seed=5).records
    assert len(records) == 200 * 6
    for r in records:
        assert (r["score_chosen"] < r["score_rejected"]) == r["flipped"]


def test_flip_mask_edges():
    rng = np.random.default_rng(0)
    assert not flip_mask(1000, 0.0, rng).any()
    assert flip_mask(1000, 1.0, rng).all()


def test_seeded_determinism():
    groups = [random_group(i) for i in range(300)]
    a = form_pairs(groups, strategy="all_pairs", noise=0.3, seed=42)
    b = form_pairs(groups, strategy="all_pairs", noise=0.3, seed=42)
    c = form_pairs(groups, strategy="all_pairs", noise=0.3, seed=43)
    assert len(a.records) == 300 * 6
    assert a.records == b.records and a.stats == b.stats
    assert [r["flipped"] for r in a.records] != [r["flipped"] for r in c.records]
    # A Generator may be passed instead of a seed: the same draws.
    assert form_pairs(groups, strategy="all_pairs", noise=0.3, seed=np.random.default_rng(42)).records == a.records


# --- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("groups", "message"), [
    (["text"], r"^scored completions: group 1: expected a mapping with prompt, completions and scores, got str$"),
    ([{"prompt": "p", "completions": ["a"]}], r"group 1: missing 'scores'; each group needs prompt, completions"),
    ([group([1.0, 0.0]), group([1.0], ["a", "b"])], r"group 2: 'scores' must be a list with one number per "
                                                    r"completion \(2\), got 1$"),
    ([group([1.0, float("nan")])], r"group 1: score 2 is nan; gold scores must be finite numbers"),
    ([group([1.0, "0.5"])], r"group 1: score 2 is '0.5'"),
    ([group([1.0], [3])], r"group 1: 'completions' must be a list of strings"),
    ([group([1.0], "a")], r"group 1: 'completions' must be a list of strings"),
    ([group([1.0, 0.0], chosen="x")], r"group 1: key\(s\) chosen would overwrite the pair's own fields; rename"),
])
def test_bad_groups(groups, message):
    with pytest.raises(InputError, match=message):
        form_pairs(groups)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"strategy": "best_vs_rest"}, r"^recipe: stages\.prefs\.strategy: unknown pairing strategy 'best_vs_rest'; "
                                   r"expected one of best_vs_worst, all_pairs$"),
    ({"min_gap": -0.1}, r"stages\.prefs\.min_gap: expected a number >= 0, got -0\.1"),
    ({"noise": 1.5}, r"stages\.prefs\.noise: expected a flip probability in \[0, 1\], got 1\.5"),
    ({"noise": True}, r"stages\.prefs\.noise: expected a flip probability"),
])
def test_bad_options(kwargs, message):
    options = {"strategy": "best_vs_worst", "min_gap": 0.0, "noise": 0.0, **kwargs}
    with pytest.raises(InputError, match=message):
        check_pair_options(**options)
    with pytest.raises(InputError, match=message):
        form_pairs([group([1.0, 0.0])], **options)


# --- train / test split --------------------------------------------------------------------------------

def records_for(n_prompts, per_prompt=3):
    return [{"prompt": f"prompt {i}", "chosen": f"c{i}.{j}", "rejected": f"r{i}.{j}"}
            for i in range(n_prompts) for j in range(per_prompt)]


def test_split_is_grouped_sized_and_ordered():
    records = records_for(40)
    train, test = split_train_test(records, test_size=0.1, seed=0)
    train_prompts, test_prompts = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert len(test_prompts) == 4 and len(train_prompts) == 36  # round(0.1 * 40) prompts held out
    assert not train_prompts & test_prompts                   # no prompt on both sides
    assert len(train) + len(test) == len(records)
    # Each side keeps the input order.
    assert train == [r for r in records if r["prompt"] in train_prompts]
    assert test == [r for r in records if r["prompt"] in test_prompts]


def test_split_is_deterministic_and_independent_of_record_order():
    records = records_for(50)
    a = split_train_test(records, test_size=0.2, seed=3)
    assert split_train_test(records, test_size=0.2, seed=3) == a
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    assert {r["prompt"] for r in split_train_test(shuffled, 0.2, seed=3)[1]} == {r["prompt"] for r in a[1]}
    assert {r["prompt"] for r in split_train_test(records, 0.2, seed=4)[1]} != {r["prompt"] for r in a[1]}


def test_split_edges():
    records = records_for(3)
    assert split_train_test(records, test_size=0.0) == (records, [])
    # At least one group held out, and at least one kept.
    assert len({r["prompt"] for r in split_train_test(records, test_size=0.01)[1]}) == 1
    assert len({r["prompt"] for r in split_train_test(records, test_size=0.99)[0]}) == 1
    # Record by record.
    train, test = split_train_test(records, test_size=0.5, group_key=None, seed=0)
    assert len(test) == round(0.5 * 9) and len(train) + len(test) == 9
    # Conversational prompts (lists of messages) group too.
    conv = [{"prompt": [{"role": "user", "content": str(i % 4)}], "chosen": "c", "rejected": "r"} for i in range(8)]
    train, test = split_train_test(conv, test_size=0.25)
    assert len(test) == 2 and {test[0]["prompt"][0]["content"]} == {test[1]["prompt"][0]["content"]}


@pytest.mark.parametrize(("records", "kwargs", "message"), [
    (records_for(1), {}, r"^pairs: cannot hold out 10% of 1 group\(s\) by 'prompt'; add data or set test_size: 0"),
    (records_for(3), {"test_size": 1.0}, r"^pairs: test_size must be in \[0, 1\), got 1\.0$"),
    ([{"chosen": "c"}, {"chosen": "d"}], {}, r"^pairs: record 1 has no 'prompt' to group the split by$"),
])
def test_split_errors(records, kwargs, message):
    with pytest.raises(InputError, match=message):
        split_train_test(records, **kwargs)
