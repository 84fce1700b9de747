"""Each flag rule (eval.flags) on hand-made results: it fires at its threshold and not just short of it, and its
sentence carries the numbers."""

from __future__ import annotations

import pytest

from eval.flags import RULES, gold_peak, judge_flags, mc_flags, result_flags, shift_flags, trailing_mean, training_flags


def gen(length: float, distinct: float) -> dict:
    return {"gen": {"length_tokens": {"mean": length, "ci": [length - 1, length + 1], "n": 40},
                    "distinct_2": distinct}}


def test_thresholds_live_in_the_rule_table():
    assert RULES["length_shift"].thresholds == {"relative_change": 0.5}
    assert RULES["length_shift"].legend == "mean completion length moved by 50% or more of the reference's"
    assert RULES["mc_one_letter"].legend.startswith("MC accuracy within 1.96 standard errors of chance")


def test_length_shift_fires_at_half_the_reference_and_not_below():
    # sft writes 40 tokens: 20 is -50% (fires), 20.4 is -49% (does not); 60 is +50% (fires).
    models = {"sft": gen(40, 0.5), "ppo": gen(20, 0.5), "dpo": gen(20.4, 0.5), "long": gen(60, 0.5)}
    flags = shift_flags(models, "sft")
    assert [(f.rule, f.subject) for f in flags] == [("length_shift", "ppo"), ("length_shift", "long")]
    assert flags[0].text == "ppo: mean length 20.0 tokens vs 40.0 for sft (-50%)"
    assert flags[1].text == "long: mean length 60.0 tokens vs 40.0 for sft (+50%)"


def test_the_issues_example_reads_as_the_issue_says():
    flags = shift_flags({"sft": gen(29, 0.6), "ppo": gen(8, 0.6)}, "sft")
    assert [f.text for f in flags] == ["ppo: mean length 8.0 tokens vs 29.0 for sft (-72%)"]


def test_distinct_shift_fires_at_thirty_percent():
    models = {"sft": gen(30, 0.5), "ppo": gen(30, 0.35), "dpo": gen(30, 0.36)}
    flags = shift_flags(models, "sft")
    assert [(f.rule, f.subject, f.text) for f in flags] == [
        ("distinct_shift", "ppo", "ppo: distinct-2 0.350 vs 0.500 for sft (-30%)")]


def test_no_reference_or_no_generation_no_shift_flags():
    models = {"sft": gen(40, 0.5), "ppo": gen(10, 0.1), "mc_only": {"gen": None, "mc": {}}}
    assert shift_flags(models, None) == []
    assert [f.subject for f in shift_flags(models, "sft")] == ["ppo", "ppo"]


def judged(consistency, win_rate=0.5) -> dict:
    return {"judge": {"vs": "sft", "win_rate": win_rate, "ci": [0.5, 0.5], "position_consistency": consistency}}


def test_judge_position_bias_fires_below_the_threshold_only():
    flags = judge_flags({"ppo": judged(0.0), "dpo": judged(0.19), "edge": judged(0.2), "none": judged(None)})
    assert [f.subject for f in flags] == ["ppo", "dpo"]
    assert flags[0].text == ("ppo vs sft: the judge's position consistency is 0.00 (below 0.2): it picks by "
                             "position, so its win rate (0.500) is not evidence")


def mc(accuracy, stderr, shares, chance=0.25) -> dict:
    return {"mc": {"acc": {"accuracy": accuracy, "stderr": stderr},
                   "letters": {"predicted_share": shares, "chance": chance}}}


def test_mc_one_letter_needs_chance_accuracy_and_one_letter_throughout():
    all_a = {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    models = {
        "base": mc(0.25, 0.04, all_a),                                     # at chance, all A: fires
        "edge": mc(0.25 + 1.95 * 0.04, 0.04, {"A": 0.9, "B": 0.1}),         # 1.95 standard errors, 90% A: fires
        "above": mc(0.25 + 1.97 * 0.04, 0.04, all_a),                      # beyond 1.96 standard errors: no
        "spread": mc(0.25, 0.04, {"A": 0.89, "B": 0.11}),                  # 89% A: no
        "old": {"mc": {"acc": {"accuracy": 0.25, "stderr": 0.04}, "letters": {"predicted_share": all_a}}},  # no chance
    }
    flags = mc_flags(models)
    assert [f.subject for f in flags] == ["base", "edge"]
    assert flags[0].text == ("base: MC accuracy 0.250 is chance (0.250) and 100% of the answers are A: the score "
                             "measures the letter, not knowledge")


def test_trailing_mean_by_hand():
    assert trailing_mean([3.0, 6.0, 9.0, 0.0], 3) == [3.0, 4.5, 6.0, 5.0]


def rows(golds: list[float]) -> list[dict]:
    return [{"step": i + 1, "objective/gold_scores": g, "objective/scores": float(i)} for i, g in enumerate(golds)]


def test_gold_past_peak_fires_at_a_tenth_of_the_rise():
    # Window 3. Smoothed: 0, 0, 0, 1/3, 2/3, 1, 1, 1, then the drop. Rise from the first smoothed value to the peak
    # is 1 (step 6); the last smoothed value must be 0.9 or less to fire.
    rising = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    fires = gold_peak(rows(rising + [1.0, 1.0, 0.69]))  # last three: 1, 1, 0.69 -> 0.8967
    assert (fires.peak_step, fires.peak, fires.last_step) == (6, 1.0, 11)
    assert fires.last == pytest.approx(2.69 / 3, abs=1e-12) and fires.fell
    holds = gold_peak(rows(rising + [1.0, 1.0, 0.71]))  # -> 0.9033
    assert not holds.fell
    flags = training_flags("ppo", {}, rows(rising + [1.0, 0.4, 0.4]))
    assert [f.text for f in flags] == [
        "ppo: the gold score of its rollouts peaked at step 6 (1.000, mean of 3 steps) and fell to 0.600 by the last "
        "step (11): over-optimisation of the learned reward; keep_best: gold keeps the best held-out policy"]


def test_gold_rising_to_the_end_or_flat_or_absent_is_not_flagged():
    assert training_flags("ppo", {}, rows([0.0, 0.5, 1.0, 1.5])) == []
    assert training_flags("ppo", {}, rows([0.5] * 6)) == [], "flat: the peak is the first step and nothing fell"
    assert training_flags("ppo", {}, [{"step": 1, "objective/scores": 1.0}]) == []
    assert gold_peak([{"step": 1, "objective/scores": 1.0}]) is None


def test_a_peak_at_the_first_step_fires_on_any_drop():
    flags = training_flags("grpo", {}, rows([1.0, 0.9, 0.9, 0.9]))
    assert [f.rule for f in flags] == ["gold_past_peak"]


def test_kept_not_last_reads_done_json():
    done = {"metrics": {"heldout/best_step": 4.0, "heldout/best_gold_scores": 0.41,
                        "heldout/last_gold_scores": 0.3, "heldout/last_is_best": 0.0}}
    assert [f.text for f in training_flags("ppo", done, [])] == [
        "ppo: keep_best: gold kept step 4's policy (held-out gold 0.410); the last step's scored 0.300"]
    done["metrics"]["heldout/last_is_best"] = 1.0
    assert training_flags("ppo", done, []) == []


def test_rm_near_chance_reads_gold_accuracy_against_its_binomial_reach():
    def done(accuracy, pairs):
        return {"metrics": {"eval/gold_accuracy": accuracy, "eval/gold_pairs": pairs}}

    # 64 pairs: 1.96 * sqrt(0.25 / 64) = 0.1225 above 0.5.
    assert [f.text for f in training_flags("rm", done(0.477, 64.0), [])] == [
        "rm: held-out gold accuracy 0.477 over 64 pairs is within 0.122 of chance (0.5): a policy optimising this "
        "reward model chases noise"]
    assert [f.rule for f in training_flags("rm", done(0.62, 64.0), [])] == ["rm_near_chance"]
    assert training_flags("rm", done(0.625, 64.0), []) == []
    assert training_flags("rm", done(0.62, 400.0), []) == [], "more pairs, a shorter reach (0.049)"
    assert training_flags("rm", {"metrics": {"eval/gold_accuracy": 0.5}}, []) == [], "no pair count: no evidence"


def test_result_flags_gathers_every_rule():
    models = {"sft": gen(29, 0.6), "ppo": gen(8, 0.6) | judged(0.0) | mc(0.25, 0.04, {"A": 1.0})}
    assert [f.rule for f in result_flags(models, "sft")] == ["length_shift", "judge_position_bias", "mc_one_letter"]
