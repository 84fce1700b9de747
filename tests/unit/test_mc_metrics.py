"""The `evaluate` metric modules and the results dict, on predictions worked by hand."""

import json
import math

import pytest

from eval.mc.data import MCQuestion
from eval.mc.results import aggregate, circular_correct, rotations, softmax_over_choices
from eval.metrics import load_metric, metric_path

# Five questions; confidences kept away from bin edges so the bin of each is unambiguous.
PROBS = [
    [0.85, 0.10, 0.05],        # pred 0, gold 0: correct, conf .85 -> bin (0.8, 0.9]
    [0.05, 0.85, 0.10],        # pred 1, gold 0: wrong,   conf .85 -> bin (0.8, 0.9]
    [0.35, 0.65],              # pred 1, gold 1: correct, conf .65 -> bin (0.6, 0.7]
    [0.25, 0.25, 0.25, 0.25],  # tie -> first, pred 0, gold 0: correct, conf .25 -> bin (0.2, 0.3]
    [0.45, 0.55],              # pred 1, gold 0: wrong,   conf .55 -> bin (0.5, 0.6]
]
GOLD = [0, 0, 1, 0, 0]


def test_calibration_worked_by_hand():
    out = load_metric("mc_calibration").compute(predictions=PROBS, references=GOLD, n_bins=10)
    # Bins: (0.8,0.9] n=2 acc .5 conf .85 gap .35; (0.6,0.7] n=1 acc 1 conf .65 gap .35;
    # (0.2,0.3] n=1 acc 1 conf .25 gap .75; (0.5,0.6] n=1 acc 0 conf .55 gap .55.
    # ECE = (2*.35 + .35 + .75 + .55) / 5 = 2.35 / 5 = .47; MCE = .75.
    assert out["ece"] == pytest.approx(0.47, abs=1e-9)
    assert out["mce"] == pytest.approx(0.75, abs=1e-9)
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["mean_confidence"] == pytest.approx((0.85 + 0.85 + 0.65 + 0.25 + 0.55) / 5)
    # Brier: .035 + 1.635 + .245 + .75 + .605 = 3.27 over 5 questions.
    #   q1 (.85-1)^2+.1^2+.05^2 = .0225+.01+.0025; q2 (.05-1)^2+.85^2+.1^2 = .9025+.7225+.01;
    #   q3 .35^2+.35^2; q4 .75^2+3*.25^2; q5 .55^2+.55^2
    assert out["brier"] == pytest.approx(0.654, abs=1e-9)
    bins = out["bins"]
    assert len(bins) == 10 and [b["count"] for b in bins] == [0, 0, 1, 0, 0, 1, 1, 0, 2, 0]
    assert bins[8] == {"lower": 0.8, "upper": 0.9, "count": 2, "accuracy": 0.5, "confidence": pytest.approx(0.85)}
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    # One bin: ECE = |accuracy - mean confidence| = |.6 - .63|.
    one = load_metric("mc_calibration").compute(predictions=PROBS, references=GOLD, n_bins=1)
    assert one["ece"] == pytest.approx(0.03, abs=1e-9)


def test_calibration_perfect():
    out = load_metric("mc_calibration").compute(predictions=[[1.0, 0.0], [0.0, 1.0]], references=[0, 1])
    assert out["ece"] == 0.0 and out["brier"] == 0.0


def test_accuracy_micro_macro_and_stderr():
    # Subject a: 1 1 1 0 (acc .75), subject b: 0 1 (acc .5).
    preds = [0, 1, 2, 0, 1, 1]
    refs = [0, 1, 2, 3, 0, 1]
    subjects = ["a", "a", "a", "a", "b", "b"]
    out = load_metric("mc_accuracy").compute(predictions=preds, references=refs, subjects=subjects)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # lm-eval's mean_stderr: sample sd (n-1) / sqrt(n). All six: var = (4*(1/3)^2 + 2*(2/3)^2)/5 = 4/15.
    assert out["stderr"] == pytest.approx(math.sqrt(4 / 15 / 6))
    a, b = out["per_subject"]["a"], out["per_subject"]["b"]
    # a: var = (3*.25^2 + .75^2)/3 = .25, se = .5/2; b: var = (.5^2+.5^2)/1 = .5, se = sqrt(.5)/sqrt(2) = .5
    assert (a["accuracy"], a["stderr"], a["n"]) == (0.75, pytest.approx(0.25), 4)
    assert (b["accuracy"], b["stderr"], b["n"]) == (0.5, pytest.approx(0.5), 2)
    assert out["macro_accuracy"] == pytest.approx(0.625)
    assert out["macro_stderr"] == pytest.approx(math.sqrt(0.25**2 + 0.5**2) / 2)
    assert out["n_subjects"] == 2
    # A single question has no standard error.
    single = load_metric("mc_accuracy").compute(predictions=[1], references=[1], subjects=["x"])
    assert single["stderr"] is None and single["macro_stderr"] is None


def test_answer_distribution():
    out = load_metric("mc_answer_distribution").compute(predictions=[0, 0, 0, 1], references=[0, 1, 2, 3],
                                                        n_choices=[4, 4, 4, 2])
    assert out["predicted"] == {"A": 3, "B": 1, "C": 0, "D": 0}
    assert out["predicted_share"]["A"] == 0.75
    assert out["gold_share"] == {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}
    assert out["chance"] == pytest.approx((0.25 * 3 + 0.5) / 4)
    assert out["majority_baseline"] == 0.25


def test_metric_paths():
    assert (metric_path("mc_accuracy") / "mc_accuracy.py").is_file()
    with pytest.raises(KeyError, match="known"):
        metric_path("nope")


def test_softmax_over_choices():
    p = softmax_over_choices([math.log(0.2), math.log(0.6), math.log(0.2)])
    assert p == pytest.approx([0.2, 0.6, 0.2])
    assert sum(softmax_over_choices([-1000.0, -1001.0])) == pytest.approx(1.0)


def test_aggregate_cloze_letters_and_json():
    qs = [
        MCQuestion("Q1", ("a", "bbbb"), 1, "s1"),
        MCQuestion("Q2", ("xx", "y", "zz"), 0, "s1"),
        MCQuestion("Q3", ("é", "ab"), 0, "s2"),
    ]
    # Q1: acc picks a (-1 > -2); acc_norm picks bbbb (-2/4 > -1/1). Q2: acc picks y; norm: xx -2/2=-1 vs y -1.5.
    # Q3: "é" is 1 character but 2 bytes: -1.5/1 < -2/2 for chars (picks ab), -1.5/2 > -2/2 for bytes (picks é).
    logprobs = [[-1.0, -2.0], [-2.0, -1.5, -9.0], [-1.5, -2.0]]
    out = aggregate(qs, logprobs, mode="cloze", shots=0)
    assert [r["pred"] for r in out["records"]] == [0, 1, 0]
    assert out["acc"]["accuracy"] == pytest.approx(1 / 3)
    assert out["acc_norm"]["accuracy"] == pytest.approx(2 / 3)  # Q1 right, Q2 right, Q3 wrong
    assert out["acc_bytes"]["accuracy"] == pytest.approx(1.0)
    assert out["letters"]["predicted"] == {"A": 2, "B": 1, "C": 0}
    assert out["letters"]["chance"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    m = out["metrics"]
    assert m["mc/acc"] == out["acc"]["accuracy"] and m["mc/acc_norm"] == out["acc_norm"]["accuracy"]
    assert m["mc/acc/s2"] == 1.0 and "mc/ece" in m
    json.dumps(out, allow_nan=False)


def test_aggregate_letter_mode_has_no_acc_norm():
    qs = [MCQuestion("Q", ("a", "b"), 0, "")]
    out = aggregate(qs, [[-0.1, -3.0]], mode="letter", include_records=False)
    assert "acc_norm" not in out and "records" not in out
    assert out["acc"]["per_subject"] == {"(none)": {"accuracy": 1.0, "stderr": None, "n": 1}}
    with pytest.raises(ValueError, match="choices"):
        aggregate(qs, [[-0.1]], mode="letter")


def test_acc_norm_with_five_options_worked_by_hand():
    q = MCQuestion("Q", ("a", "bb", "cccc", "dddddddd", "e"), 3, "s")
    # log-likelihoods -1, -1.5, -2.4, -4, -3: acc picks "a" (-1); per character -1, -0.75, -0.6, -0.5, -3, so
    # acc_norm picks "dddddddd", the answer.
    out = aggregate([q], [[-1.0, -1.5, -2.4, -4.0, -3.0]], mode="cloze")
    assert out["acc"]["accuracy"] == 0.0 and out["acc_norm"]["accuracy"] == 1.0


def test_circular_eval_counts_a_question_only_if_every_rotation_is_right():
    q = MCQuestion("Q", ("w", "x", "y"), 1, "s")
    assert [(r.choices, r.answer) for r in rotations(q)] == [(("w", "x", "y"), 1), (("x", "y", "w"), 0),
                                                              (("y", "w", "x"), 2)]
    # A model that knows the answer "x" wherever it stands, and one that always picks the first option (right
    # only in rotation 1, where "x" comes first).
    knows = [[-2.0, -0.1, -3.0], [-0.1, -2.0, -3.0], [-2.0, -3.0, -0.1]]
    first = [[-0.1, -2.0, -3.0]] * 3
    two = MCQuestion("R", ("p", "q"), 0, "t")
    assert circular_correct([q, two], knows + [[-0.1, -1.0], [-1.0, -0.1]]) == [True, True]
    assert circular_correct([q, two], first + [[-0.1, -1.0], [-0.1, -1.0]]) == [False, False]
    out = aggregate([q, two], [knows[0], [-0.1, -1.0]], mode="letter", circular=[True, False])
    assert out["circular"]["accuracy"] == 0.5 and out["metrics"]["mc/circular"] == 0.5
    assert out["acc"]["accuracy"] == 1.0
